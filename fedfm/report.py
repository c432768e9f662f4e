"""``metrics.json`` and ``report.png``: what a run leaves behind for people and for CI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedfm import storage


def write_metrics(path: Path, config: dict[str, Any], history: list[dict[str, Any]], run: dict[str, Any]) -> None:
    data = {"config": config, "run": run, "rounds": history}
    storage.write_bytes(path, json.dumps(data, indent=1, sort_keys=True).encode(), overwrite=True)


def quality_metric(task: str) -> str:
    """The figure a run is judged by: accuracy for classification, preference accuracy for preference, perplexity
    for causal LM."""
    return "perplexity" if task == "causal-lm" else "accuracy"


def plot_report(path: Path, task: str, history: list[dict[str, Any]], title: str) -> None:
    """Curves per round: the global quality metric, evaluation loss (global and per client), and each
    client's training loss; for preference also the mean reward margin (global and per client), its accuracy
    per client beside the global one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = quality_metric(task)
    rounds = [record["round"] for record in history]
    preference = task == "preference"
    figure, axes = plt.subplots(1, 4 if preference else 3, figsize=(20 if preference else 15, 4.2))
    quality_axis, eval_axis, train_axis = axes[:3]
    quality_axis.plot(rounds, [record["eval"]["global"][metric] for record in history], marker="o", color="black",
                      label="global", linewidth=2)
    quality_axis.set_title("preference accuracy (chosen reward above rejected)" if preference else f"global {metric}")
    if preference:
        _plot_clients(quality_axis, [(record["round"], record["eval"]["clients"]) for record in history], metric, 0.6)
        margin_axis = axes[3]
        margin_axis.plot(rounds, [record["eval"]["global"]["reward_margin"] for record in history], marker="o",
                         color="black", label="global", linewidth=2)
        _plot_clients(margin_axis, [(record["round"], record["eval"]["clients"]) for record in history],
                      "reward_margin", 0.6)
        margin_axis.set_title("mean reward margin (chosen − rejected)")

    eval_axis.plot(rounds, [record["eval"]["global"]["loss"] for record in history], marker="o", color="black",
                   label="global", linewidth=2)
    _plot_clients(eval_axis, [(record["round"], record["eval"]["clients"]) for record in history], "loss", 0.6)
    eval_axis.set_title("evaluation loss")
    _plot_clients(train_axis, [(record["round"], record.get("clients") or {}) for record in history], "train_loss",
                  0.8)
    train_axis.set_title("local training loss (mean over the round's steps)")

    for axis in axes:
        axis.set_xlabel("round")
        axis.set_xticks(rounds)
        axis.grid(alpha=0.3)
    for axis in axes[1:] if not preference else axes:
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=7)
    figure.suptitle(title)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _plot_clients(axis, rounds: list[tuple[int, dict[str, dict[str, Any]]]], key: str, alpha: float) -> None:
    """One line of ``key`` per client through the rounds it has figures for: a client may be absent from
    a round (not sampled, timed out, its evaluation missing), and its line skips that round."""
    for client in sorted({name for _, figures in rounds for name in figures}):
        # a client without the figure (secure aggregation keeps each client's loss from the server) has no line
        points = [(round_index, figures[client][key]) for round_index, figures in rounds
                  if key in figures.get(client, {})]
        if points:
            axis.plot(*zip(*points), marker=".", alpha=alpha, label=client)
