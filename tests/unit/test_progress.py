"""The run display of `fedfm run` / `fedfm simulate`: every event a run emits has a line."""

from __future__ import annotations

from fedfm.cli import RunProgress
from fedfm.config import FederationConfig


def test_every_kind_of_event_gets_a_line_including_failed_clients_and_retries():
    progress = RunProgress(FederationConfig(clients=3, rounds=2))
    lines = [progress.update(event) for event in (
        {"event": "started", "step": "init"},
        {"event": "finished", "step": "init"},
        {"event": "finished", "step": "client_finetune", "client": "tenant-0", "round": 1, "train_loss": 0.5,
         "samples": 3, "seconds": 1.0},
        {"event": "finished", "step": "client_finetune", "client": "tenant-1", "round": 1, "phase": "TimedOut",
         "reason": "past the round's deadline"},
        {"event": "retry", "round": 1, "attempt": 2, "clients": ["tenant-2"], "short": 1},
        {"event": "finished", "step": "checkpoint", "round": 1},
    )]
    assert lines[0] is None and lines[1] == "init: done"
    assert lines[2] == "client_finetune [round 1 tenant-0]: loss 0.500"
    assert lines[3] == "client_finetune [round 1 tenant-1]: TimedOut: past the round's deadline"
    assert lines[4] == "retry [round 1]: 1 short of the quorum; attempt 2: tenant-2"
    assert lines[5] == "checkpoint [round 1]: done"
    assert progress.rounds[1]["clients"] == {"tenant-0": "loss 0.500",
                                             "tenant-1": "TimedOut: past the round's deadline"}


def test_every_commands_help_reads_at_80_columns():
    """Issue 18, item 5: help text readable in an 80-column terminal, for every command."""
    from typer.main import get_command
    from typer.testing import CliRunner

    from fedfm.cli import app

    names = sorted(get_command(app).commands)
    assert {"run", "simulate", "status", "validate", "submit", "storage-policy"} <= set(names)
    for name in [None, *names]:
        shown = CliRunner().invoke(app, [name, "--help"] if name else ["--help"], env={"COLUMNS": "80"})
        assert shown.exit_code == 0, shown.output
        assert max(len(line) for line in shown.output.splitlines()) <= 80, name


def test_a_log_written_with_colour_codes_is_left_plain(tmp_path):
    from fedfm import events

    log = tmp_path / "run.log"
    log.write_text("\x1b[1mBertForSequenceClassification LOAD REPORT\x1b[0m\nINFO \x1b[96m'init'\x1b[0m done\n")
    events.make_plain(log)
    assert log.read_text() == "BertForSequenceClassification LOAD REPORT\nINFO 'init' done\n"
