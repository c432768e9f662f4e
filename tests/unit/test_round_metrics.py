"""The round's metrics as the pipeline's evaluate step logs them to KFP."""

import math

import pytest
from google.protobuf import json_format, struct_pb2

from fedfm.evaluation import summarize
from fedfm.federation import logged_metrics
from fedfm.tasks import LossSums


def _as_kfp_carries_them(values: dict) -> dict:
    # KFP passes a Metrics artifact's metadata on as a protobuf Struct (kfp.local: MessageToDict)
    struct = struct_pb2.Struct()
    struct.update(values)
    return json_format.MessageToDict(struct)


def test_a_round_no_tenant_could_evaluate_logs_only_what_kfp_can_carry():
    evaluation = summarize("classification", {})  # every tenant's evaluation Job failed
    assert math.isnan(evaluation["global"]["accuracy"])
    with pytest.raises(ValueError, match="Fail to serialize NaN"):  # what used to fail the round's step
        _as_kfp_carries_them({"accuracy": evaluation["global"]["accuracy"]})

    assert _as_kfp_carries_them(logged_metrics(3, evaluation)) == {"round": 3.0, "samples": 0.0}


def test_the_tenants_that_answered_are_logged_globally_and_by_name():
    evaluation = summarize("classification", {"bank": LossSums(loss_sum=2.0, count=4, correct=3, examples=4),
                                              "clinic": LossSums()})  # the clinic's split was empty
    logged = logged_metrics(1, evaluation)
    assert logged == {"round": 1, "loss": 0.5, "accuracy": 0.75, "samples": 4,
                      "bank.loss": 0.5, "bank.accuracy": 0.75, "bank.samples": 4, "clinic.samples": 0}
    assert _as_kfp_carries_them(logged)["bank.accuracy"] == 0.75
