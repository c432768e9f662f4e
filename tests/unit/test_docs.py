"""The documentation (issue 18): docs/ builds with `mkdocs build --strict` (no broken link, anchor or page left out
of the navigation), its references are generated from the code and cover all of it, and the README stays a
landing page whose links all lead somewhere."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    site_dir = tmp_path_factory.mktemp("site")
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
                             str(ROOT / "mkdocs.yml"), "--site-dir", str(site_dir)],
                            capture_output=True, text=True, timeout=120, cwd=ROOT,
                            env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    return site_dir


def _page(site: Path, source: str) -> str:
    """The built HTML of docs/``source`` (MkDocs writes a.md as a/index.html, index.md as index.html)."""
    stem = source.removesuffix(".md")
    return (site / ("index.html" if stem == "index" else f"{stem}/index.html")).read_text()


def test_the_docs_build_with_mkdocs_strict(site):
    built = {path.relative_to(site).as_posix() for path in site.rglob("index.html")}
    sources = {path.relative_to(ROOT / "docs").as_posix() for path in (ROOT / "docs").rglob("*.md")}
    assert built == {("index.html" if s == "index.md" else s.removesuffix(".md") + "/index.html") for s in sources}
    assert "<!-- fedfm:" not in "".join(path.read_text() for path in site.rglob("index.html"))  # every marker filled


def test_the_strategies_reference_lists_every_registered_strategy(site):
    from fedfm.strategies import STRATEGIES

    page = _page(site, "reference/strategies.md")
    for name, cls in STRATEGIES.items():
        assert f'id="{name}"' in page, f"strategy {name} is missing from the reference"
        paper = re.search(r"https?://\S+", sys.modules[cls.__module__].__doc__ or "")
        assert paper and paper.group(0) in page, f"{name}: its paper is not linked"
    assert "<code>server_momentum</code>" in page and "<code>0.9</code>" in page  # parameters and defaults


def test_the_cli_reference_lists_every_command_and_option(site):
    import typer.main

    from fedfm.cli import app

    page = _page(site, "reference/cli.md")
    commands = typer.main.get_command(app).commands
    assert {"run", "simulate", "compile", "validate", "submit", "status"} <= set(commands)
    for name, command in commands.items():
        if command.hidden:
            continue
        assert f'id="fedfm-{name}"' in page, f"fedfm {name} is missing from the CLI reference"
        for parameter in command.params:
            for option in [] if getattr(parameter, "hidden", False) else parameter.opts:
                if option.startswith("--"):
                    assert f"<code>{option}</code>" in page, f"fedfm {name} {option} is missing"


def _slug(heading: str) -> str:
    """A heading's anchor as GitHub and MkDocs' toc both make it for the plain headings used here."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_the_readme_is_a_landing_page_whose_links_all_lead_somewhere(site):
    text = README.read_text()
    assert len(text.splitlines()) <= 250
    assert "make run" in text and "make test" in text
    links = _LINK.findall(text)
    local = [link for link in links if not re.match(r"[a-z]+:", link)]
    assert any(link.startswith("docs/") for link in local)
    own_anchors = {_slug(line.lstrip("#")) for line in text.splitlines() if line.startswith("#")}
    for link in local:
        path, _, anchor = link.partition("#")
        if not path:
            assert anchor in own_anchors, f"README links to #{anchor}, which it has no heading for"
            continue
        target = (ROOT / path).resolve()
        assert target.exists() and ROOT in target.parents, f"README links to {link}, which does not exist"
        if anchor and path.startswith("docs/"):
            assert f'id="{anchor}"' in _page(site, path.removeprefix("docs/")), f"README links to {link}: no anchor"
