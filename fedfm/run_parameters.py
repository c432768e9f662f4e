"""The knobs a run changes most, as typed parameters of the compiled pipeline: what the Kubeflow UI shows as
fields (a string, a float, an integer), beside the whole ``config`` dict.

Each parameter overrides ``config`` when it is set to something other than the value the pipeline was compiled
with; left alone, ``config`` says. So a user of the UI changes the learning rate in its own field, and a
change made in ``config`` itself still counts. ``0`` stands for "unset" where the config's field may be empty:
``local_steps`` (``training.local_epochs`` then), ``min_clients`` (the default quorum), ``target_epsilon`` (no
budget).
"""

from __future__ import annotations

from typing import Any

from fedfm.config import FederationConfig

# name -> (the config field it sets, its type)
RUN_PARAMETERS: dict[str, tuple[str, type]] = {
    "model": ("model.name_or_path", str),
    "dataset": ("data.source", str),
    "learning_rate": ("training.learning_rate", float),
    "local_steps": ("training.local_steps", int),
    "batch_size": ("training.batch_size", int),
    "lora_r": ("lora.r", int),
    "lora_alpha": ("lora.alpha", float),
    "strategy": ("strategy.name", str),
    "strategy_params": ("strategy.params", dict),
    "sample_fraction": ("policy.sample_fraction", float),
    "min_clients": ("policy.min_clients", int),
    "target_epsilon": ("privacy.target_epsilon", float),
    "seed": ("seed", int),
}
_UNSET = {"local_steps": 0, "min_clients": 0, "target_epsilon": 0.0}


def run_parameter_values(cfg: FederationConfig) -> dict[str, Any]:
    """Each run parameter's value in ``cfg``: the compiled pipeline's defaults."""
    values = {}
    for name, (path, kind) in RUN_PARAMETERS.items():
        value: Any = cfg
        for part in path.split("."):
            value = getattr(value, part)
        values[name] = kind(value) if value is not None else _UNSET[name]
    return values


def apply_run_parameters(config: dict[str, Any], compiled: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """``config`` with each run parameter in ``given`` that differs from its ``compiled`` value written over
    it (validated: a bad value is a ConfigError that names the parameter's field)."""
    changed = {name: value for name, value in given.items()
               if name in RUN_PARAMETERS and value != compiled.get(name)}
    if not changed:
        return config
    data = FederationConfig.parse(config, source="pipeline parameter 'config'").as_dict()
    for name, value in changed.items():
        path, kind = RUN_PARAMETERS[name]
        *parents, leaf = path.split(".")
        node = data
        for key in parents:
            node = node.setdefault(key, {})
        if name in _UNSET and value == _UNSET[name]:
            node.pop(leaf, None)
        else:
            node[leaf] = kind(value)
            if name == "local_steps":
                node.pop("local_epochs", None)  # the one budget of a round: steps now, not epochs
    return FederationConfig.parse(data, source="the pipeline's run parameters").as_dict()
