"""Issue 18, item 1: the knobs a Kubeflow UI user changes per run are typed parameters of the compiled pipeline
(fedfm.run_parameters), which override the ``config`` parameter where they are changed."""

from __future__ import annotations

import pytest

from fedfm.config import FederationConfig
from fedfm.errors import ConfigError
from fedfm.run_parameters import RUN_PARAMETERS, apply_run_parameters, run_parameter_values

CFG = FederationConfig.parse({"name": "tickets", "clients": 3, "training": {"learning_rate": 0.01},
                              "privacy": {"noise_multiplier": 0.8, "clip_norm": 1.0,
                                                                          "target_epsilon": 8.0}})
COMPILED = run_parameter_values(CFG)


def test_the_compiled_values_are_the_configs_with_unset_fields_as_zero():
    assert COMPILED["learning_rate"] == 0.01 and COMPILED["target_epsilon"] == 8.0
    assert COMPILED["local_steps"] == 0 and COMPILED["min_clients"] == 0
    assert COMPILED["dataset"] == "builtin:topics"
    assert {name: type(value) for name, value in COMPILED.items()} == {name: kind for name, (_, kind) in
                                                                      RUN_PARAMETERS.items()}


def test_a_parameter_left_alone_leaves_config_as_the_user_edited_it():
    edited = CFG.with_overrides({"training.batch_size": 32}).as_dict()
    assert apply_run_parameters(edited, COMPILED, dict(COMPILED)) is edited


def test_a_changed_parameter_overrides_config_and_is_validated_by_name():
    given = {**COMPILED, "learning_rate": 0.002, "local_steps": 7, "min_clients": 2, "target_epsilon": 0.0,
             "strategy": "fedprox", "strategy_params": {"mu": 0.1}, "seed": 3}
    run = FederationConfig.parse(apply_run_parameters(CFG.as_dict(), COMPILED, given))
    assert run.training.learning_rate == 0.002 and run.seed == 3
    assert run.training.local_steps == 7 and run.training.local_epochs is None  # steps now, not epochs
    assert run.policy.min_clients == 2
    assert run.privacy.target_epsilon is None  # 0 unsets the budget the pipeline was compiled with
    assert (run.strategy.name, run.strategy.params) == ("fedprox", {"mu": 0.1})
    with pytest.raises(ConfigError, match="training.learning_rate"):
        apply_run_parameters(CFG.as_dict(), COMPILED, {**COMPILED, "learning_rate": -1.0})
