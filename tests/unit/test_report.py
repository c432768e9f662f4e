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


def test_a_preference_run_plots_its_accuracy_and_reward_margin_per_tenant(tmp_path, monkeypatch):
    """Issue 20: beside the losses, the preference accuracy and the mean reward margin, globally and per tenant."""
    import matplotlib.pyplot as plt

    figures = []
    monkeypatch.setattr(plt.Figure, "savefig", lambda figure, *args, **kwargs: figures.append(figure))

    def evaluation(accuracy: float, margin: float) -> dict:
        client = {"loss": 0.6, "accuracy": accuracy, "reward_margin": margin, "samples": 16}
        return {"global": {**client, "samples": 32}, "clients": {"a": client, "b": client}}

    history = [{"round": 0, "eval": evaluation(0.0, 0.0)},
               {"round": 1, "eval": evaluation(0.7, 0.1), "clients": {"a": {"train_loss": 0.65}}}]
    plot_report(tmp_path / "report.png", "preference", history, "dpo")
    [figure] = figures
    titles = [axis.get_title() for axis in figure.axes]
    assert titles[0].startswith("preference accuracy") and titles[3].startswith("mean reward margin")
    margin_lines = {line.get_label(): list(line.get_ydata()) for line in figure.axes[3].get_lines()}
    assert margin_lines == {"global": [0.0, 0.1], "a": [0.0, 0.1], "b": [0.0, 0.1]}
    accuracy_lines = {line.get_label(): list(line.get_ydata()) for line in figure.axes[0].get_lines()}
    assert accuracy_lines == {"global": [0.0, 0.7], "a": [0.0, 0.7], "b": [0.0, 0.7]}
