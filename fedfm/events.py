"""Progress events from pipeline steps to whoever watches the run.

A step wraps its work in :func:`step`; when ``FEDFM_EVENTS`` names a file (``fedfm run`` sets it for
the local runner's progress display), each step appends JSON lines to it: ``started``, then
``finished`` with the step's figures or ``failed`` with the error message. Lines are short single
``write`` calls on an ``O_APPEND`` file, so concurrent steps never interleave. Without the variable,
nothing is written.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ENV = "FEDFM_EVENTS"


def emit(kind: str, **fields: Any) -> None:
    path = os.environ.get(ENV)
    if not path:
        return
    line = json.dumps({"event": kind, "time": time.time(), **fields}, default=str) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


@contextlib.contextmanager
def step(name: str, **where: Any) -> Iterator[dict[str, Any]]:
    """Report a step's start and end; figures the body puts into the yielded dict go with ``finished``."""
    figures: dict[str, Any] = {}
    emit("started", step=name, **where)
    try:
        yield figures
    except Exception as exc:
        emit("failed", step=name, error=f"{type(exc).__name__}: {exc}", **where)
        raise
    emit("finished", step=name, **where, **figures)


_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def plain(text: str) -> str:
    """``text`` without terminal control codes (colours, cursor moves): what a log file should hold."""
    return _ANSI.sub("", text)


def make_plain(path: str | os.PathLike) -> None:
    """Rewrite the log at ``path`` without terminal control codes: what reached it through its file descriptor
    (native code, a library's handler that kept a stream of its own) passed no Python stream that strips them."""
    path = Path(path)
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return
    if "\x1b[" in text:
        spare = path.with_name(f".{path.name}.plain")
        spare.write_text(plain(text))
        os.replace(spare, path)


class PlainText:
    """A text stream that writes to ``target`` without terminal control codes, and says it is no terminal
    (libraries that colour their output for a terminal then leave it plain)."""

    def __init__(self, target):
        self.target = target

    def write(self, text: str) -> int:
        self.target.write(plain(text))
        return len(text)

    def isatty(self) -> bool:
        return False

    def __getattr__(self, name: str):
        return getattr(self.target, name)


def read(path: str | os.PathLike, offset: int = 0) -> tuple[list[dict[str, Any]], int]:
    """Events appended since ``offset`` (a byte position), and the new offset."""
    path = Path(path)
    if not path.exists():
        return [], offset
    with path.open("rb") as handle:
        handle.seek(offset)
        data = handle.read()
    complete = data[: data.rfind(b"\n") + 1]  # a line still being written waits for the next read
    events = [json.loads(line) for line in complete.decode().splitlines() if line.strip()]
    return events, offset + len(complete)
