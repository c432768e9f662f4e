"""Storage: atomic writes that never clobber, readable errors, and fsspec URIs."""

from __future__ import annotations

import pytest

from fedfm import events, storage
from fedfm.errors import StorageError


def test_write_read_and_size(tmp_path):
    target = tmp_path / "deep" / "dir" / "blob.bin"
    storage.write_bytes(target, b"hello")
    assert storage.read_bytes(target) == b"hello"
    assert storage.size(target) == 5
    assert storage.read_bytes(f"file://{target}") == b"hello"


def test_existing_objects_are_not_overwritten_unless_asked(tmp_path):
    target = tmp_path / "blob.bin"
    storage.write_bytes(target, b"first")
    with pytest.raises(StorageError, match="blob.bin already exists; refusing to overwrite it"):
        storage.write_bytes(target, b"second")
    assert target.read_bytes() == b"first"
    storage.write_bytes(target, b"third", overwrite=True)
    assert target.read_bytes() == b"third"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blob.bin"]  # no temporary files left


def test_fsspec_uris_work_too():
    storage.write_bytes("memory://fedfm-test/a.bin", b"xyz")
    assert storage.read_bytes("memory://fedfm-test/a.bin") == b"xyz"
    assert storage.size("memory://fedfm-test/a.bin") == 3
    with pytest.raises(StorageError, match="already exists"):
        storage.write_bytes("memory://fedfm-test/a.bin", b"again")


def test_errors_name_the_uri(tmp_path):
    with pytest.raises(StorageError, match="nothing.bin does not exist"):
        storage.read_bytes(tmp_path / "nothing.bin")
    with pytest.raises(StorageError, match="memory://fedfm-test/none does not exist"):
        storage.read_bytes("memory://fedfm-test/none")
    with pytest.raises(StorageError, match="cannot read nosuchscheme://x"):
        storage.read_bytes("nosuchscheme://x")


def test_events_reach_a_reader_in_order(tmp_path, monkeypatch):
    path = tmp_path / "events.jsonl"
    monkeypatch.setenv(events.ENV, str(path))
    with events.step("client_finetune", client="a", round=1) as figures:
        figures["train_loss"] = 0.5
    with pytest.raises(ValueError):
        with events.step("aggregate", round=1):
            raise ValueError("bad update")
    seen, offset = events.read(path)
    assert [(e["event"], e["step"]) for e in seen] == [
        ("started", "client_finetune"), ("finished", "client_finetune"), ("started", "aggregate"),
        ("failed", "aggregate")]
    assert seen[1]["train_loss"] == 0.5 and seen[1]["client"] == "a"
    assert seen[3]["error"] == "ValueError: bad update"
    assert events.read(path, offset) == ([], offset)
    monkeypatch.delenv(events.ENV)
    events.emit("ignored")  # no file configured: nothing happens
    assert events.read(path, offset) == ([], offset)
