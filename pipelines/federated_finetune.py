"""The ``federated_finetune`` pipeline: a federated LoRA fine-tune as one KFP v2 DAG.

::

    init ─► evaluate(round 0)
      │
      └► round 1: select clients ─► ParallelFor(client) fine-tune ─Collected─► aggregate ─► evaluate(round 1)
                                                                                │  (adapter,
         round 2: select clients ─► ParallelFor(client) fine-tune ◄─────────────┘   server state)
                  … ─► export (PEFT adapter)

Under secure aggregation (``secure_aggregation.enabled``) a round is the protocol of
:mod:`fedfm.trust.secure_round` instead, in ``fedfm simulate``'s order::

    select clients ─► ParallelFor advertise keys ─► relay keys ─► ParallelFor share keys ─► relay shares
      ─► ParallelFor fine-tune (masked) ─► sum masked updates ─► ParallelFor(survivors) confirm survivors
      ─► relay confirmations ─► ParallelFor(confirmers) reveal shares
      ─► unmask and aggregate ─► evaluate

A round below its quorum under ``policy.below_quorum: retry`` draws fresh clients in its aggregate
step, which has them fine-tune through the executor (the same Jobs a client step starts): the loop of
client steps is fixed when the run starts.

Rounds are unrolled at compile time (KFP has no loops whose body feeds the next iteration), so the
compiled pipeline is for ``cfg.rounds`` rounds, its clients and secure aggregation on or off (its
description says which); everything else is read at run time from the ``config`` parameter, which defaults
to the config it was compiled from, and the typed run parameters (:mod:`fedfm.run_parameters`: model,
dataset, learning rate, ...), which override it where they are changed. The init step merges them, and every
other step runs with its result.

Every round ends with a checkpoint of the federation's state (:mod:`fedfm.checkpoint`, written by
the evaluate step). The ``start_round`` parameter resumes a run: init restores the checkpoint of
round ``start_round - 1`` from ``execution.checkpoint_uri``, and the steps of earlier rounds pass it
through without training, aggregating or evaluating anything (evaluate passes on a round whose
record the restored history already holds) (kfp.local cannot run a loop over no
clients, nor select between artifacts of an If and an Else, so they are no-ops rather than absent).
"""

import re
from pathlib import Path
from typing import Any, NamedTuple

import yaml
from kfp import dsl, kubernetes
from kfp.dsl import Artifact, Model

from fedfm.components import DEFAULT_IMAGE, Components, build_components
from fedfm.config import FederationConfig, PodSettingsConfig
from fedfm.run_parameters import run_parameter_values
from fedfm.trust.privacy import rounds_within_budget


def pipeline_name(cfg: FederationConfig) -> str:
    """The compiled pipeline's name, from the federation's: ``fedfm-NAME`` as KFP allows names."""
    return re.sub(r"[^a-z0-9-]+", "-", f"fedfm-{cfg.name}".lower()).strip("-")[:128]


def pipeline_description(cfg: FederationConfig) -> str:
    clients = ", ".join(cfg.client_names[:12]) + (f", ... ({len(cfg.client_names)} in all)"
                                                  if len(cfg.client_names) > 12 else "")
    secure = "with" if cfg.secure_aggregation.enabled else "without"
    return (f"Federated LoRA fine-tuning of {cfg.model.name_or_path} ({cfg.task}), {cfg.strategy.name}. Compiled "
            f"for {cfg.rounds} round(s), the clients {clients}, {secure} secure aggregation, clients trained "
            f"{_WHERE[cfg.execution.mode]}: change these with `fedfm compile`. The typed parameters override "
            "`config` where set to other than their defaults.")


_WHERE = {"local": "in the pipeline's pods (execution.mode local)",
          "kubernetes": "as Jobs in the tenants' namespaces (execution.mode kubernetes)"}


def build_pipeline(cfg: FederationConfig, image: str = DEFAULT_IMAGE, *, retries: bool = True):
    """The pipeline function for ``cfg`` (compile it, or call it under ``kfp.local``). Without ``retries`` no task
    is retried: kfp.local follows KFP's retry policy, and a step of ``fedfm run`` that failed on this machine
    would fail again after the backoff."""
    steps = build_components(image)
    default_config = cfg.as_dict()
    compiled = run_parameter_values(cfg)
    if not retries:  # the tasks' settings only: the `config` parameter keeps the run's own
        kfp = cfg.execution.kfp.model_copy(update={"retries": 0})
        cfg = cfg.model_copy(update={"execution": cfg.execution.model_copy(update={"kfp": kfp})})
    Outputs = NamedTuple("Outputs", [("adapter", Model), ("history", Artifact)])
    one_round = _secure_round if cfg.secure_aggregation.enabled else _plain_round

    @dsl.pipeline(name=pipeline_name(cfg), description=pipeline_description(cfg))
    def federated_finetune(
        config: dict = default_config,
        start_round: int = 1,
        model: str = compiled["model"],
        dataset: str = compiled["dataset"],
        learning_rate: float = compiled["learning_rate"],
        local_steps: int = compiled["local_steps"],
        batch_size: int = compiled["batch_size"],
        lora_r: int = compiled["lora_r"],
        lora_alpha: float = compiled["lora_alpha"],
        strategy: str = compiled["strategy"],
        strategy_params: dict = compiled["strategy_params"],
        sample_fraction: float = compiled["sample_fraction"],
        min_clients: int = compiled["min_clients"],
        target_epsilon: float = compiled["target_epsilon"],
        seed: int = compiled["seed"],
    ) -> Outputs:
        run_id = dsl.PIPELINE_JOB_ID_PLACEHOLDER  # keeps this run's cluster objects apart from other runs'
        init = steps.init_federation(
            config=config, run_id=run_id, start_round=start_round, compiled_rounds=cfg.rounds,
            compiled_secure_aggregation=cfg.secure_aggregation.enabled,
            compiled_execution_mode=cfg.execution.mode, compiled_parameters=compiled, model=model,
            dataset=dataset, learning_rate=learning_rate, local_steps=local_steps, batch_size=batch_size,
            lora_r=lora_r, lora_alpha=lora_alpha, strategy=strategy, strategy_params=strategy_params,
            sample_fraction=sample_fraction, min_clients=min_clients, target_epsilon=target_epsilon, seed=seed)
        _server_task(cfg, init, "init")
        config = init.outputs["run_config"]  # the config with the run parameters in it: what every step runs with
        global_adapter, server_state = init.outputs["global_adapter"], init.outputs["server_state"]
        evaluation = steps.evaluate(config=config, run_id=run_id, round_index=0, global_adapter=global_adapter,
                                    server_state=server_state, history_in=init.outputs["history"])
        _client_task(cfg, evaluation, "round 0: evaluate")
        for round_index in range(1, rounds_within_budget(cfg) + 1):  # a privacy budget may allow fewer
            selection = steps.select_clients(config=config, round_index=round_index, server_state=server_state)
            # only once the last round is evaluated and checkpointed: a run stopped now resumes after it
            _server_task(cfg, selection.after(evaluation), f"round {round_index}: select clients")
            aggregation = one_round(_Round(steps, cfg, config, run_id, round_index, start_round), selection,
                                    global_adapter, server_state)
            global_adapter = aggregation.outputs["new_global_adapter"]
            server_state = aggregation.outputs["new_server_state"]
            evaluation = steps.evaluate(config=config, run_id=run_id, round_index=round_index,
                                        global_adapter=global_adapter, server_state=server_state,
                                        history_in=evaluation.outputs["history"])
            _client_task(cfg, evaluation, f"round {round_index}: evaluate")
        export = _server_task(cfg, steps.export_adapter(config=config, global_adapter=global_adapter), "export")
        return Outputs(adapter=export.outputs["adapter"], history=evaluation.outputs["history"])

    return federated_finetune


class _Round(NamedTuple):
    """What every task of one round is built with."""

    steps: Components
    cfg: FederationConfig
    config: Any  # the pipeline's `config` parameter
    run_id: str
    index: int
    start_round: Any  # the pipeline's `start_round` parameter: rounds before it are restored, not run

    @property
    def label(self) -> str:
        return f"round {self.index}"

    def clients(self, items: Any, name: str) -> dsl.ParallelFor:
        """A loop with a task per client in ``items`` (a step's list output)."""
        return dsl.ParallelFor(items, parallelism=self.cfg.parallelism, name=f"round-{self.index}-{name}")


def _client_task(cfg: FederationConfig, task: Any, display_name: str) -> Any:
    """A task that does tenants' work (a client step, evaluate): in local mode it trains or scores in its own
    pod (``execution.kfp.client``); in kubernetes mode it only creates ClientRounds and waits for the tenants'
    Jobs (``execution.kfp.launcher``)."""
    kfp = cfg.execution.kfp
    return _configured(cfg, task, display_name, kfp.client if cfg.execution.mode == "local" else kfp.launcher)


def _server_task(cfg: FederationConfig, task: Any, display_name: str) -> Any:
    """Any other task (``execution.kfp.server``)."""
    return _configured(cfg, task, display_name, cfg.execution.kfp.server)


def _configured(cfg: FederationConfig, task: Any, display_name: str, pod: PodSettingsConfig) -> Any:
    """``task`` with its name in the UI, ``pod``'s Kubernetes settings and the run's retries. No task is served
    from KFP's cache: each reads or writes state outside its inputs (the tenants' data, the federation's
    storage, checkpoints, secure aggregation's one-time keys), so equal inputs are not equal work."""
    task.set_display_name(display_name)
    task.set_caching_options(False)
    kfp = cfg.execution.kfp
    if kfp.retries:  # a rerun after the step's work was saved refuses to redo it (a checkpoint, a protocol answer)
        task.set_retry(num_retries=kfp.retries, backoff_duration=f"{kfp.retry_backoff_seconds}s", backoff_factor=2)
    if kfp.image_pull_secrets:
        kubernetes.set_image_pull_secrets(task, list(kfp.image_pull_secrets))
    for value, setter in ((pod.cpu, task.set_cpu_request), (pod.memory, task.set_memory_request),
                          (pod.cpu_limit, task.set_cpu_limit), (pod.memory_limit, task.set_memory_limit)):
        if value is not None:
            setter(value)
    if pod.accelerator_type:
        task.set_accelerator_type(pod.accelerator_type)
        task.set_accelerator_limit(pod.accelerator_count or 1)
    for key, value in sorted(pod.node_selector.items()):
        kubernetes.add_node_selector(task, label_key=key, label_value=value)
    for toleration in pod.tolerations:
        kubernetes.add_toleration(task, key=toleration.key, operator=toleration.operator, value=toleration.value,
                                  effect=toleration.effect, toleration_seconds=toleration.toleration_seconds)
    for volume in pod.volumes:
        kubernetes.mount_pvc(task, pvc_name=volume.pvc, mount_path=volume.mount_path, sub_path=volume.sub_path)
    for secret in pod.secrets:
        if secret.env is not None:
            kubernetes.use_secret_as_env(task, secret_name=secret.name, secret_key_to_env=dict(secret.env))
        else:
            kubernetes.use_secret_as_volume(task, secret_name=secret.name, mount_path=secret.mount_path)
    return task


def _plain_round(round_: _Round, selection: Any, global_adapter: Any, server_state: Any) -> Any:
    """Each selected client fine-tunes, and the aggregate step combines the updates; returns that step."""
    steps, config, run_id, index = round_.steps, round_.config, round_.run_id, round_.index
    with round_.clients(selection.output, "clients") as client:
        finetune = steps.client_finetune(config=config, client=client, round_index=index,
                                         start_round=round_.start_round, run_id=run_id, global_adapter=global_adapter)
        _client_task(round_.cfg, finetune, f"{round_.label}: fine-tune")
    aggregation = steps.aggregate(config=config, round_index=index, start_round=round_.start_round, run_id=run_id,
                                  global_adapter=global_adapter, updates=dsl.Collected(finetune.outputs["update"]),
                                  server_state=server_state)
    if round_.cfg.policy.below_quorum == "retry":  # it has fresh clients fine-tune, as the client steps do
        return _client_task(round_.cfg, aggregation, f"{round_.label}: aggregate")
    return _server_task(round_.cfg, aggregation, f"{round_.label}: aggregate")


def _secure_round(round_: _Round, selection: Any, global_adapter: Any, server_state: Any) -> Any:
    """The secure aggregation protocol (components/secure_aggregation.py) in ``fedfm simulate``'s order;
    returns the finish step, which writes the round's global adapter and server state."""
    steps, label, cfg = round_.steps, round_.label, round_.cfg
    # what every step of the round is called with (a round before start_round passes through)
    common = {"config": round_.config, "round_index": round_.index, "start_round": round_.start_round}
    run_id = round_.run_id
    with round_.clients(selection.output, "advertise") as client:
        advertise = _client_task(cfg, steps.secagg_advertise(**common, client=client, run_id=run_id),
                                 f"{label}: advertise keys")
    relay_keys = steps.secagg_relay_keys(**common, run_id=run_id, clients=selection.output,
                                         public_keys=dsl.Collected(advertise.outputs["public_keys"]))
    _server_task(cfg, relay_keys, f"{label}: relay keys")
    keys = relay_keys.outputs["keys"]
    with round_.clients(selection.output, "share") as client:
        share = _client_task(cfg, steps.secagg_share(**common, client=client, run_id=run_id, keys=keys),
                             f"{label}: share keys")
    relay_shares = steps.secagg_relay_shares(**common, keys=keys, shares=dsl.Collected(share.outputs["shares"]))
    _server_task(cfg, relay_shares, f"{label}: relay shares")
    keys_shared = relay_shares.outputs["keys_shared"]
    with round_.clients(selection.output, "clients") as client:
        finetune = _client_task(cfg, steps.secagg_finetune(**common, client=client, run_id=run_id,
                                                           global_adapter=global_adapter, keys_shared=keys_shared,
                                                           server_state=server_state),
                                f"{label}: fine-tune")
    summed = steps.secagg_sum(**common, run_id=run_id, global_adapter=global_adapter,
                              updates=dsl.Collected(finetune.outputs["update"]), keys_shared=keys_shared)
    _server_task(cfg, summed, f"{label}: sum masked updates")
    survivors = summed.outputs["survivors"]
    with round_.clients(summed.outputs["Output"], "confirm") as client:
        confirm = _client_task(cfg, steps.secagg_confirm(**common, client=client, run_id=run_id,
                                                         keys_shared=keys_shared, survivors=survivors),
                               f"{label}: confirm survivors")
    relay_confirmations = steps.secagg_relay_confirmations(**common, run_id=run_id, keys_shared=keys_shared,
                                                           survivors=survivors,
                                                           confirmed=dsl.Collected(confirm.outputs["confirmation"]))
    _server_task(cfg, relay_confirmations, f"{label}: relay confirmations")
    confirmations = relay_confirmations.outputs["confirmations"]
    with round_.clients(relay_confirmations.outputs["Output"], "reveal") as client:
        reveal = _client_task(cfg, steps.secagg_reveal(**common, client=client, run_id=run_id,
                                                       keys_shared=keys_shared, inboxes=relay_shares.outputs["inboxes"],
                                                       survivors=survivors, confirmations=confirmations),
                              f"{label}: reveal shares")
    finish = steps.secagg_finish(**common, run_id=run_id, global_adapter=global_adapter, keys_shared=keys_shared,
                                 survivors=survivors, masked_sum=summed.outputs["masked_sum"],
                                 figures=summed.outputs["figures"], confirmations=confirmations,
                                 reveals=dsl.Collected(reveal.outputs["reveal"]), server_state=server_state)
    return _server_task(cfg, finish, f"{label}: unmask and aggregate")


def compile_pipeline(cfg: FederationConfig, output: str, image: str = DEFAULT_IMAGE) -> None:
    """Write the pipeline YAML that the Kubeflow UI uploads (and ``kfp.Client`` submits); the same config
    and image always give the same bytes."""
    from kfp import compiler

    from fedfm.strategies import check_federation

    check_federation(cfg)  # a federation its strategy cannot run is refused before anything is written
    compiler.Compiler().compile(build_pipeline(cfg, image), package_path=str(output))
    path = Path(output)
    defaults = {"config": cfg.as_dict(), "start_round": 1, **run_parameter_values(cfg)}
    path.write_text(_with_exact_defaults(path.read_text(), defaults))


def _with_exact_defaults(text: str, defaults: dict[str, Any]) -> str:
    """The compiled YAML with each input's default as it is, not as KFP writes it: KFP's protobuf turns every
    number into a float (a UI showed ``rounds: 2.0`` and ``batch_size: 16.0``) and its comment header shows a
    dict in protobuf map order, which changes from process to process. Both are written from ``defaults``,
    dicts with sorted keys."""
    def ordered(value):
        if isinstance(value, dict):
            return {key: ordered(value[key]) for key in sorted(value)}
        if isinstance(value, list):
            return [ordered(item) for item in value]
        return value

    lines = text.split("\n")
    body = next(index for index, line in enumerate(lines) if not line.startswith("#"))
    for index in range(body):
        match = re.match(r"^(#\s+(\w+): \w+ \[Default: ).*\]$", lines[index])
        if match and match.group(2) in defaults:
            lines[index] = f"{match.group(1)}{ordered(defaults[match.group(2)])!r}]"
    documents = list(yaml.safe_load_all("\n".join(lines[body:])))
    for name, parameter in documents[0]["root"]["inputDefinitions"]["parameters"].items():
        if name in defaults:
            parameter["defaultValue"] = ordered(defaults[name])
    return "\n".join(lines[:body]) + "\n" + yaml.safe_dump_all(documents, sort_keys=True)
