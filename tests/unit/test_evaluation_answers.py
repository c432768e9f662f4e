"""A tenant's evaluation answer is checked and bounded (issue 17, finding 11): a forged count once moved the
global accuracy to 0.99999996, and an extra JSON key crashed the evaluate step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedfm.config import FederationConfig
from fedfm.errors import EvaluationError
from fedfm.evaluation import bounded, summarize
from fedfm.operators.executor import KubernetesExecutor
from fedfm.tasks import LossSums

HONEST = {"loss_sum": 80.0, "count": 100, "correct": 60, "examples": 100}


@pytest.mark.parametrize("answer, why", [
    ({**HONEST, "bonus": 1}, "exactly loss_sum, count, correct, examples"),
    ([1, 2, 3, 4], "it has list"),
    ({**HONEST, "correct": True}, "correct is True, not a count"),
    ({**HONEST, "count": -1}, "count is -1, not a count"),
    ({**HONEST, "examples": 10**40}, "not a count from 0 to 1e+12"),
    ({**HONEST, "loss_sum": float("nan")}, "loss_sum is nan, not a finite sum"),
    ({**HONEST, "loss_sum": -5.0}, "loss_sum is -5.0"),
    ({**HONEST, "correct": 101}, "101 correct of 100 scored"),
    ({**HONEST, "count": 10**9, "correct": 10**9}, "1000000000 scored, 100 examples"),
])
def test_a_malformed_or_impossible_answer_is_refused_by_name(answer, why):
    with pytest.raises(EvaluationError, match="client c's evaluation") as refused:
        LossSums.parse(answer, client="c", task="classification")
    assert why in str(refused.value)
    assert LossSums.parse(HONEST, client="a", task="classification") == LossSums(80.0, 100, 60, 100)


def test_forged_and_malformed_answers_from_tenant_jobs_move_the_global_figure_only_so_far(tmp_path, monkeypatch):
    """Through the cluster executor's evaluate: b's answer has an extra key (dropped, with why, not a crashed
    step); c claims a billion correct answers, which under a preset count as twice the median tenant's."""
    executor = KubernetesExecutor.__new__(KubernetesExecutor)
    executor.root, executor.run = str(tmp_path), "run"
    monkeypatch.setattr(executor, "_publish", lambda path: path)
    monkeypatch.setattr(executor, "_create", lambda client, *args, **kwargs: (client, "ns"))
    monkeypatch.setattr(executor, "_wait", lambda waiting: {client: {"phase": "Succeeded"}
                                                            for client in waiting.values()})
    answers = {"a": HONEST, "b": {**HONEST, "bonus": 1}, "c": {"loss_sum": 0.0, "count": 10**9, "correct": 10**9,
                                                              "examples": 10**9},
               "d": {"loss_sum": 70.0, "count": 100, "correct": 70, "examples": 100}}
    for client, answer in answers.items():
        path = Path(executor._folder(client, 1)) / "evaluation.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(answer))
    cfg = FederationConfig(clients=["a", "b", "c", "d"])
    sums, missing = executor.evaluate(cfg, 1, "global.safetensors", ["a", "b", "c", "d"])
    assert sorted(sums) == ["a", "c", "d"]
    assert missing["b"].startswith("Failed: client b's evaluation must be an object with exactly")

    # unbounded (the attack): c's billion decides the global accuracy
    assert summarize("classification", bounded(sums, cfg.policy))["global"]["accuracy"] > 0.9999
    # under a preset, c counts as 200 examples (2 × the median, 100): (60 + 200 + 70) / 400
    guarded = cfg.with_overrides({"policy.preset": "checks"}).policy
    result = summarize("classification", bounded(sums, guarded))
    assert result["global"]["accuracy"] == pytest.approx(330 / 400)
    assert result["clients"]["c"]["samples"] == 200 and result["clients"]["a"]["samples"] == 100
