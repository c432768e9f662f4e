"""Check a compiled FedFM pipeline without a cluster (``fedfm validate --pipeline``).

KFP's own loader must read it; it must be the DAG ``fedfm compile`` writes (init, per round a client
selection, a fine-tune loop and an aggregation — under secure aggregation, the protocol's five client
loops and its steps, ending in ``secagg-finish`` — evaluations, the export); its ``config`` parameter's
default must be a valid federation config compiled for as many rounds as the DAG unrolls, with or
without secure aggregation as the DAG is; and every step must run in one image. A config given next to
it must fit the compiled rounds and the same secure aggregation setting.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from fedfm.config import FederationConfig
from fedfm.strategies import check_federation
from fedfm.errors import ConfigError, PipelineError
from fedfm.trust.privacy import rounds_within_budget


@dataclass
class PipelineSummary:
    name: str
    rounds: int
    clients: int
    image: str
    config: FederationConfig


# A round ends in its aggregate step: ``aggregate``, or under secure aggregation ``secagg-finish``, whose round
# has five client loops (advertise, share, fine-tune, confirm, reveal) and the protocol's relay and sum steps.
_AGGREGATES = ("aggregate", "secagg-finish")
_LOOPS_PER_ROUND = {"aggregate": 1, "secagg-finish": 5}
_SECURE_ROUND_STEPS = ("secagg-relay-keys", "secagg-relay-shares", "secagg-sum", "secagg-relay-confirmations")


def validate_pipeline(path: str | Path, cfg: FederationConfig | None = None) -> PipelineSummary:
    from kfp.components import load_component_from_file

    path = Path(path)
    try:
        load_component_from_file(str(path))
        document = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise PipelineError(f"{path} does not exist") from None
    except Exception as exc:  # KFP's loader raises many kinds; all mean "not a KFP pipeline"
        raise PipelineError(f"{path} is not a KFP pipeline that KFP's loader reads: {exc}") from None
    tasks = list((document.get("root") or {}).get("dag", {}).get("tasks", {}))
    missing = [step for step in ("init-federation", "evaluate", "export-adapter", "select-clients", "for-loop")
               if not any(_step_of(task) == step for task in tasks)]
    if not any(_step_of(task) in _AGGREGATES for task in tasks):
        missing.append("aggregate")
    if missing:
        raise PipelineError(f"{path} is not a FedFM pipeline: it has no {', '.join(missing)} step "
                            "(write it with `fedfm compile`)")
    compiled_rounds, secure = _rounds(path, tasks)
    parameter = document["root"].get("inputDefinitions", {}).get("parameters", {}).get("config", {})
    if "defaultValue" not in parameter:
        raise PipelineError(f"{path} has no `config` parameter with a default")
    try:
        compiled = FederationConfig.parse(parameter["defaultValue"], source=f"{path}'s config parameter")
        check_federation(compiled)  # e.g. mixed LoRA ranks under a rule that needs one rank
    except ConfigError as exc:
        raise PipelineError(str(exc)) from None
    # a privacy budget can allow fewer rounds than config.rounds; the DAG unrolls those it allows
    if rounds_within_budget(compiled) != compiled_rounds:
        raise PipelineError(f"{path}: its config asks for {rounds_within_budget(compiled)} rounds but the DAG unrolls "
                            f"{compiled_rounds}")
    for whose, config in (("its", compiled), ("the", cfg)):
        if config is not None and config.secure_aggregation.enabled != secure:
            raise PipelineError(f"{path}'s rounds {'run' if secure else 'do not run'} secure aggregation, but {whose} "
                                f"config has secure_aggregation.enabled {not secure}: recompile it with the config")
    if cfg is not None and rounds_within_budget(cfg) != compiled_rounds:
        raise PipelineError(f"{path} is compiled for {compiled_rounds} rounds and the config asks for {cfg.rounds}: "
                            "recompile it (rounds are unrolled at compile time)")
    images = sorted({executor["container"]["image"]
                     for executor in document.get("deploymentSpec", {}).get("executors", {}).values()})
    if len(images) != 1:
        raise PipelineError(f"{path}: its steps run in {len(images)} images ({', '.join(images)}); FedFM's run in one")
    return PipelineSummary(document["pipelineInfo"]["name"], compiled_rounds, len(compiled.training_clients),
                           images[0], compiled)


def _rounds(path: Path, tasks: list[str]) -> tuple[int, bool]:
    """How many rounds the DAG unrolls, and whether they are secure aggregation's: every round has a client
    selection, its client loops and one aggregate step, all of one kind."""
    counts = {step: sum(_step_of(task) == step for task in tasks)
              for step in ("select-clients", "for-loop", *_AGGREGATES, *_SECURE_ROUND_STEPS)}
    rounds = sum(counts[step] for step in _AGGREGATES)
    loops = sum(counts[step] * _LOOPS_PER_ROUND[step] for step in _AGGREGATES)
    secure = counts["secagg-finish"]
    if secure not in (0, rounds) or counts["select-clients"] != rounds or counts["for-loop"] != loops \
            or any(counts[step] != secure for step in _SECURE_ROUND_STEPS):
        raise PipelineError(f"{path}: the rounds are incomplete ({counts})")
    return rounds, secure > 0


def _step_of(task: str) -> str:
    """KFP names repeated tasks ``aggregate-2``, ``for-loop-3``; the step is the name without that suffix."""
    return re.sub(r"-\d+$", "", task)
