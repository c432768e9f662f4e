"""The ``federated_finetune`` pipeline: a federated LoRA fine-tune as one KFP v2 DAG.

::

    init ─► evaluate(round 0)
      │
      └► round 1: select clients ─► ParallelFor(client) fine-tune ─Collected─► aggregate ─► evaluate(round 1)
                                                                                │  (adapter,
         round 2: select clients ─► ParallelFor(client) fine-tune ◄─────────────┘   server state)
                  … ─► export (PEFT adapter)

Rounds are unrolled at compile time (KFP has no loops whose body feeds the next iteration), so the
compiled pipeline is for ``cfg.rounds`` rounds; everything else is read from the ``config``
parameter at run time, which defaults to the config it was compiled from.
"""

import ast
import re
from pathlib import Path
from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Artifact, Model

from fedfm.components import DEFAULT_IMAGE, build_components
from fedfm.config import FederationConfig
from fedfm.errors import ConfigError
from fedfm.privacy import rounds_within_budget

PIPELINE_NAME = "federated-finetune"


def build_pipeline(cfg: FederationConfig, image: str = DEFAULT_IMAGE):
    """The pipeline function for ``cfg`` (compile it, or call it under ``kfp.local``)."""
    if cfg.secure_aggregation.enabled:
        raise ConfigError("secure_aggregation runs in `fedfm simulate` only for now: the pipeline does not yet have "
                          "the protocol's key-exchange and unmasking steps (turn it off, or use fedfm simulate)")
    steps = build_components(image)
    default_config = cfg.as_dict()
    Outputs = NamedTuple("Outputs", [("adapter", Model), ("history", Artifact)])

    @dsl.pipeline(
        name=PIPELINE_NAME,
        description=f"Federated LoRA fine-tuning of {cfg.model.name_or_path} ({cfg.task}) over "
                    f"{len(cfg.training_clients)} client(s), {cfg.rounds} round(s), {cfg.strategy.name}.",
    )
    def federated_finetune(config: dict = default_config) -> Outputs:
        run_id = dsl.PIPELINE_JOB_ID_PLACEHOLDER  # keeps this run's cluster objects apart from other runs'
        init = steps.init_federation(config=config, compiled_rounds=cfg.rounds).set_display_name("init")
        global_adapter, server_state = init.outputs["global_adapter"], init.outputs["server_state"]
        evaluation = steps.evaluate(config=config, run_id=run_id, global_adapter=global_adapter,
                                    history_in=init.outputs["history"]).set_display_name("round 0: evaluate")
        for round_index in range(1, rounds_within_budget(cfg) + 1):  # a privacy budget may allow fewer
            selection = steps.select_clients(config=config, round_index=round_index).after(init)
            selection.set_display_name(f"round {round_index}: select clients")
            with dsl.ParallelFor(selection.output, parallelism=cfg.parallelism,
                                 name=f"round-{round_index}-clients") as client:
                finetune = steps.client_finetune(config=config, client=client, round_index=round_index,
                                                 run_id=run_id, global_adapter=global_adapter)
                finetune.set_display_name(f"round {round_index}: fine-tune")
                finetune.set_caching_options(False)  # a new run is a new fine-tune, even from equal inputs
            aggregation = steps.aggregate(config=config, round_index=round_index, run_id=run_id,
                                          global_adapter=global_adapter,
                                          updates=dsl.Collected(finetune.outputs["update"]),
                                          server_state=server_state)
            aggregation.set_display_name(f"round {round_index}: aggregate")
            global_adapter = aggregation.outputs["new_global_adapter"]
            server_state = aggregation.outputs["new_server_state"]
            evaluation = steps.evaluate(config=config, run_id=run_id, global_adapter=global_adapter,
                                        history_in=evaluation.outputs["history"])
            evaluation.set_display_name(f"round {round_index}: evaluate")
        export = steps.export_adapter(config=config, global_adapter=global_adapter).set_display_name("export")
        return Outputs(adapter=export.outputs["adapter"], history=evaluation.outputs["history"])

    return federated_finetune


def compile_pipeline(cfg: FederationConfig, output: str, image: str = DEFAULT_IMAGE) -> None:
    """Write the pipeline YAML that the Kubeflow UI uploads (and ``kfp.Client`` submits); the same config
    and image always give the same bytes."""
    from kfp import compiler

    from fedfm.strategies import check_federation

    check_federation(cfg)  # a federation its strategy cannot run is refused before anything is written
    compiler.Compiler().compile(build_pipeline(cfg, image), package_path=str(output))
    path = Path(output)
    path.write_text(_stable_header(path.read_text()))


def _stable_header(text: str) -> str:
    """KFP's comment header shows each input's default as a Python dict in protobuf map order, which
    changes from process to process; write those defaults with sorted keys instead (the YAML body
    itself is already stable)."""
    def ordered(value):
        if isinstance(value, dict):
            return {key: ordered(value[key]) for key in sorted(value)}
        if isinstance(value, list):
            return [ordered(item) for item in value]
        return value

    lines = text.split("\n")
    for index, line in enumerate(lines):
        if not line.startswith("#"):
            break
        match = re.match(r"^(#\s+\w+: dict \[Default: )(\{.*\})\]$", line)
        if match:
            lines[index] = f"{match.group(1)}{ordered(ast.literal_eval(match.group(2)))!r}]"
    return "\n".join(lines)
