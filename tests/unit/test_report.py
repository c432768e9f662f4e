"""report.png from a history in which clients come and go (sampling, timeouts, missing evaluations)."""

from __future__ import annotations

import matplotlib

from fedfm.report import plot_report

matplotlib.use("Agg")


def _eval(*clients: str) -> dict:
    return {"global": {"loss": 1.0, "accuracy": 0.5},
            "clients": {client: {"loss": 1.0, "accuracy": 0.5} for client in clients}}


def test_clients_missing_from_some_rounds_are_plotted_where_they_have_figures(tmp_path):
    history = [
        {"round": 0, "eval": _eval("a", "b", "c")},
        {"round": 1, "eval": _eval("a", "c"), "clients": {"a": {"train_loss": 1.2}, "c": {"train_loss": 1.1}}},
        {"round": 2, "eval": _eval("a", "b", "c"), "clients": {"b": {"train_loss": 0.9}}},
    ]
    plot_report(tmp_path / "report.png", "classification", history, "clients come and go")
    image = matplotlib.image.imread(tmp_path / "report.png")
    assert image.shape[0] > 100 and image.shape[1] > 100
