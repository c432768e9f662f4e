"""MkDocs hooks: the pages that describe code are written from the code at build time, so they cannot go stale.

A page holds a marker where the generated Markdown goes:

- ``<!-- fedfm:strategies -->``: every strategy of the registry (``fedfm.strategies.STRATEGIES``), with its
  summary, paper, parameters and defaults, from its module's and class's docstrings and signature;
- ``<!-- fedfm:cli -->``: every command of the ``fedfm`` CLI (the typer app), with its help and options;
- ``<!-- fedfm:include PATH -->``: a Markdown file of the repository (its path from the root), e.g.
  ``bench/README.md``, which lives beside the code it describes.
"""

from __future__ import annotations

import enum
import inspect
import re
import sys
import typing
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_INCLUDE = re.compile(r"<!-- fedfm:include (?P<path>\S+) -->")


def on_page_markdown(markdown: str, page, config, files) -> str:
    if "<!-- fedfm:strategies -->" in markdown:
        markdown = markdown.replace("<!-- fedfm:strategies -->", strategies_reference())
    if "<!-- fedfm:cli -->" in markdown:
        markdown = markdown.replace("<!-- fedfm:cli -->", cli_reference())
    return _INCLUDE.sub(lambda match: (ROOT / match["path"]).read_text(), markdown)


def _markdown(docstring: str | None) -> str:
    """A docstring in reStructuredText's inline forms as Markdown: ``code`` and :role:`name` as code, bare URLs
    as links."""
    text = inspect.cleandoc(docstring or "")
    text = re.sub(r":\w+:`~?([^`]+)`", r"`\1`", text)
    text = text.replace("``", "`")
    return re.sub(r"(?<![<(])(https?://[^\s)]+)", r"<\1>", text)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def strategies_reference() -> str:
    from fedfm.strategies import STRATEGIES

    lines = ["| name | parameters (defaults) | works from the mean (DP, secure aggregation) | mixed LoRA ranks |",
             "| --- | --- | --- | --- |"]
    for name, cls in STRATEGIES.items():
        parameters = ", ".join(f"`{p.name}` {p.default!r}" for p in inspect.signature(cls).parameters.values())
        lines.append(f"| [`{name}`](#{name}) | {_cell(parameters) or '—'} | {'yes' if cls.from_mean else 'no'} "
                     f"| {'yes' if cls.mixed_ranks else 'no'} |")
    for name, cls in STRATEGIES.items():
        module = _markdown(sys.modules[cls.__module__].__doc__)
        summary, _, source = module.partition("\n\n")
        lines += ["", f"## `{name}` {{#{name}}}", "", summary.replace("\n", " "), ""]
        if source:
            lines += [f"**Paper:** {source.strip()}".replace("\n", " "), ""]
        lines += [_markdown(cls.__doc__), ""]
        parameters = list(inspect.signature(cls).parameters.values())
        if parameters:
            lines += ["| parameter | type | default |", "| --- | --- | --- |"]
            # the strategies' modules use postponed annotations, so each annotation is its source text
            lines += [f"| `{p.name}` | {_cell(str(p.annotation))} | `{p.default!r}` |" for p in parameters]
        else:
            lines.append("No parameters.")
        lines += ["", f"Class `{cls.__module__}.{cls.__name__}`."]
    return "\n".join(lines) + "\n"


def cli_reference() -> str:
    import typer.main

    from fedfm.cli import app

    root = typer.main.get_command(app)
    commands = {name: command for name, command in root.commands.items() if not command.hidden}
    lines = [inspect.cleandoc(root.help or ""), "", "| command | what it does |", "| --- | --- |"]
    lines += [f"| [`fedfm {name}`](#fedfm-{name}) | {_cell(_first_paragraph(command.help))} |"
              for name, command in commands.items()]
    for name, command in commands.items():
        parameters = [parameter for parameter in command.params if not getattr(parameter, "hidden", False)]
        arguments = [parameter for parameter in parameters if not parameter.name or not _is_option(parameter)]
        usage = " ".join(["fedfm", name, "[OPTIONS]", *(_argument_name(argument) for argument in arguments)])
        lines += ["", f"## `fedfm {name}` {{#fedfm-{name}}}", "", "```", usage, "```", "", _markdown(command.help), "",
                  "| option | meaning | default |", "| --- | --- | --- |"]
        lines += [_parameter_row(parameter) for parameter in parameters]
    return "\n".join(lines) + "\n"


def _first_paragraph(text: str | None) -> str:
    return _markdown(text).split("\n\n")[0].replace("\n", " ")


def _is_option(parameter) -> bool:
    return any(name.startswith("-") for name in parameter.opts)


def _argument_name(argument) -> str:
    return (argument.metavar or argument.name).upper()


def _choices(parameter) -> list[str]:
    """The values of an enum-typed parameter (``Optional[Enum]`` too), else none."""
    annotation = getattr(getattr(parameter, "type_descriptor", None), "annotation", None)
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, enum.Enum):
            return [str(member.value) for member in candidate]
    return []


def _parameter_row(parameter) -> str:
    if _is_option(parameter):
        names = ", ".join(f"`{name}`" for name in [*parameter.opts, *parameter.secondary_opts])
    else:
        names = f"`{_argument_name(parameter)}` (argument)"
    meaning = parameter.help or ""
    if _choices(parameter):
        meaning += f" One of {', '.join(f'`{choice}`' for choice in _choices(parameter))}."
    if parameter.envvar:
        meaning += f" Environment variable: `{parameter.envvar}`."
    default = parameter.default.value if isinstance(parameter.default, enum.Enum) else parameter.default
    if parameter.required:
        shown = "required"
    elif default is None or default is False or default in ((), []):
        shown = ""
    else:
        shown = f"`{default}`"
    return f"| {names} | {_cell(meaning.strip())} | {shown} |"
