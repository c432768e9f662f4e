"""Run the ``federated_finetune`` pipeline on this machine with ``kfp.local`` — what ``fedfm run`` does.

The very pipeline that ``fedfm compile`` writes for the Kubeflow UI runs here step by step, each step
a subprocess of this Python (``SubprocessRunner(use_venv=False)``), or with ``--runner docker`` a container
of the component image (``DockerRunner``, see ``docker_steps``). KFP's own log goes to
``OUTPUT/run.log``; the terminal shows progress from the steps' events and a summary at the end.
"""

from __future__ import annotations

import builtins
import contextlib
import json
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from fedfm import events, storage
from fedfm.checkpoint import Checkpoint
from fedfm.config import FederationConfig
from fedfm.errors import FedFMError

# kfp.local runs at most this many ParallelFor iterations at once, whatever `parallelism` says.
KFP_LOCAL_MAX_CONCURRENCY = 2
RUNNER = "kfp.local"
# How kfp.local runs each step: a subprocess of this Python, or a container of the component image.
STEP_RUNNERS = ("subprocess", "docker")
# What a run directory records when the run starts: the runner and the config, for --resume.
RUN_RECORD = "run.json"
# A round's file or folder name (round-3, round-0003.safetensors)
_ROUND_NAME = re.compile(r"^round-0*(\d+)(\.safetensors)?$")


@dataclass
class LocalRun:
    output: Path
    history: list[dict[str, Any]]
    seconds: float

    @property
    def adapter_dir(self) -> Path:
        return self.output / "adapter"

    @property
    def metrics_path(self) -> Path:
        return self.output / "metrics.json"

    @property
    def report_path(self) -> Path:
        return self.output / "report.png"


def run_local(cfg: FederationConfig | None, output: Path,
              on_event: Callable[[dict[str, Any]], None] | None = None, *, resume: bool = False,
              steps: str = "subprocess", image: str | None = None) -> LocalRun:
    """Run the pipeline for ``cfg`` under kfp.local; write ``metrics.json``, ``report.png`` and the
    final PEFT adapter under ``output``.

    ``steps``: how each step runs, ``subprocess`` (a Python process here) or ``docker`` (a container of
    ``image``, default the released component image; :mod:`fedfm.pipelines.docker_steps`).

    ``on_event`` sees each step's progress event as it happens, on a background thread, while
    ``sys.stdout`` and ``sys.stderr`` go to ``run.log``: a callback that shows something writes to a
    stream it took beforehand.

    ``resume``: continue the interrupted run in ``output`` with its own config (``cfg`` is ignored):
    the pipeline runs again with ``start_round`` after the last checkpointed round, whose files its
    init step restores; the rounds before are not recomputed.
    """
    from kfp import local

    from fedfm.components import DEFAULT_IMAGE
    from fedfm.pipelines.federated_finetune import build_pipeline
    from fedfm.report import plot_report, write_metrics

    output = Path(output)
    resumed_from = None  # the checkpointed round this run goes on from
    if resume:
        resumed = resume_run(output, RUNNER)
        cfg, resumed_from = resumed.cfg, None if resumed.checkpoint is None else resumed.checkpoint.round
        steps, image = resumed.record.get("steps", "subprocess"), resumed.record.get("image")  # as it started
    else:
        if steps not in STEP_RUNNERS:
            raise FedFMError(f"no step runner {steps!r}: choose one of {', '.join(STEP_RUNNERS)}")
        image = (image or DEFAULT_IMAGE) if steps == "docker" else None
    # how the steps run, in run.json (a resumed run goes on the same way) and in metrics.json
    how = {"steps": steps, **({"image": image} if image else {})}
    if not resume:
        cfg = start_run(cfg, output, RUNNER, how)
    events_path, log_path = output / "events.jsonl", output / "run.log"
    environment = _step_values(cfg, events_path)
    if steps == "docker":
        from fedfm.pipelines.docker_steps import docker_runner

        runner = docker_runner(cfg, output, image, environment)
    else:
        runner = local.SubprocessRunner(use_venv=False)
    local.init(runner=runner, pipeline_root=str(output.absolute() / "kfp"), raise_on_error=True)
    pipeline = build_pipeline(cfg, image or DEFAULT_IMAGE, retries=False)

    started = time.time()
    try:
        with open(log_path, "a") as log, _kfp_output_to(events.PlainText(log)), environ(environment), \
                _loop_concurrency(cfg), _arguments_kept_verbatim(), _loop_inputs_kept(), \
                _follow(events_path, on_event, from_end=resume):
            try:
                task = pipeline(config=cfg.as_dict(), start_round=1 if resumed_from is None else resumed_from + 1)
            except RuntimeError as exc:
                raise FedFMError(_failure(events_path, log_path, exc)) from None
    finally:
        events.make_plain(log_path)
    seconds = time.time() - started

    history = json.loads(Path(task.outputs["history"].path).read_text())
    shutil.copytree(task.outputs["adapter"].path, output / "adapter")
    run = LocalRun(output=output, history=history, seconds=seconds)
    write_metrics(run.metrics_path, cfg.as_dict(), history,
                  {"seconds": seconds, "runner": RUNNER, **how, "centralized": cfg.centralized,
                   "clients": cfg.training_clients, "resumed_from": resumed_from})
    mode = "centralized" if cfg.centralized else f"{len(cfg.training_clients)} clients"
    plot_report(run.report_path, cfg.task, history, f"{cfg.name}: {cfg.model.name_or_path}, {mode}")
    return run


def with_client_state_here(cfg: FederationConfig, output: Path) -> FederationConfig:
    """``cfg``, with clients that keep state of their own (FedSA-LoRA's lora_B, secure aggregation's keys
    and plain update, compression's residual) keeping it under ``output/client-state/`` unless the config
    says where. In kubernetes mode each tenant's FederatedClient says where (``spec.state``), not the run."""
    from fedfm.strategies import client_keeps

    if cfg.execution.mode != "local" or cfg.execution.client_state_uri \
            or not any(client_keeps(cfg, client) for client in cfg.training_clients):
        return cfg
    return cfg.with_overrides({"execution.client_state_uri": str(Path(output).resolve() / "client-state")})


def claim_output(output: Path) -> None:
    """Never mix two runs in one directory, and never overwrite a finished run's results."""
    if output.exists() and any(output.iterdir()):
        raise FedFMError(f"output directory {output} is not empty; choose a new --output (a finished run's "
                         "results are never overwritten), or continue an interrupted run there with --resume")
    output.mkdir(parents=True, exist_ok=True)


def start_run(cfg: FederationConfig, output: Path, runner: str, extra: dict[str, Any] | None = None
              ) -> FederationConfig:
    """Claim ``output`` for a new run and record there what resuming it needs (``run.json``): the runner
    and the config, whose clients keep their state and whose checkpoints go under ``output`` unless the
    config says where. Returns that config."""
    claim_output(output)
    cfg = with_client_state_here(cfg, output)
    if not cfg.execution.checkpoint_uri:
        cfg = cfg.with_overrides({"execution.checkpoint_uri": str(output.resolve() / "checkpoints")})
    record = {"runner": runner, "config": cfg.as_dict(), **(extra or {})}
    storage.write_bytes(output / RUN_RECORD, json.dumps(record, indent=1, sort_keys=True).encode())
    return cfg


@dataclass
class ResumedRun:
    cfg: FederationConfig
    checkpoint: Checkpoint | None  # None: killed before round 0 was checkpointed; the run starts over
    record: dict[str, Any]  # run.json


def run_config(output: Path) -> FederationConfig:
    """The config the run in ``output`` started with (its ``run.json``)."""
    return FederationConfig.parse(_run_record(Path(output))["config"], source=f"the config in {output / RUN_RECORD}")


def _run_record(output: Path) -> dict[str, Any]:
    from fedfm.errors import CheckpointError

    try:
        return json.loads(storage.read_bytes(output / RUN_RECORD))
    except (FedFMError, ValueError):
        raise CheckpointError(f"{output} is not a run directory to resume: it has no readable {RUN_RECORD} (the "
                              "record `fedfm run` and `fedfm simulate` write when they start)") from None


def resume_run(output: Path, runner: str) -> ResumedRun:
    """The interrupted run in ``output``: its config and last checkpoint. What the interrupted round
    left (its updates, the clients' state files for it) is moved aside, never deleted, so that the
    round runs again from the checkpoint as it would have the first time."""
    from fedfm import checkpoint
    from fedfm.errors import CheckpointError

    output = Path(output)
    record = _run_record(output)
    if record.get("runner") != runner:
        command = "fedfm simulate" if record.get("runner") == "simulate" else "fedfm run"
        raise CheckpointError(f"{output} was started by {command}: resume it with `{command} --resume {output}`")
    if (output / "metrics.json").exists():
        raise CheckpointError(f"the run in {output} finished (its metrics.json is written): nothing to resume")
    cfg = run_config(output)
    last = checkpoint.latest(cfg.execution.checkpoint_uri)
    _set_aside(output, -1 if last is None else last.round)
    return ResumedRun(cfg, last, record)


def _set_aside(output: Path, last_round: int) -> None:
    """Rename what rounds after ``last_round`` left under ``output`` (``work/round-N``, the clients'
    ``round-NNNN`` state files, an unfinished checkpoint) to ``NAME.interrupted-TIME``."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    moved: list[Path] = []
    for folder in ("work", "client-state", "checkpoints"):
        for path in sorted((output / folder).rglob("round-*"), key=lambda item: len(item.parts)):
            match = _ROUND_NAME.match(path.name)
            if match and int(match.group(1)) > last_round and not any(parent in moved for parent in path.parents):
                path.rename(path.with_name(f"{path.name}.interrupted-{stamp}"))
                moved.append(path)


def _step_values(cfg: FederationConfig, events_path: Path) -> dict[str, str]:
    """Environment of the steps (subprocesses inherit it, containers are given it): where to report
    progress, and how many CPU threads each may use so that concurrent clients share the cores instead of
    oversubscribing them."""
    concurrent = max(1, min(cfg.parallelism, KFP_LOCAL_MAX_CONCURRENCY, len(cfg.training_clients)))
    threads = max(1, (os.cpu_count() or 1) // (concurrent * cfg.training.world_size))
    return {events.ENV: str(events_path.absolute()), "TOKENIZERS_PARALLELISM": "false",
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(threads))}


@contextlib.contextmanager
def _arguments_kept_verbatim():
    """Keep kfp.local from rewriting the steps' arguments.

    To run a step with this Python, kfp.local replaces the text ``python3`` with its path in every element of
    the step's command line, the executor input included, and so in the config: a model or dataset path such
    as ``.venv/lib/python3.11/site-packages/...`` reached the step corrupted. Only the command before the
    executor input (the bootstrap that starts Python) needs the replacement."""
    from kfp.local import subprocess_task_handler as handler

    original = handler.replace_python_executable

    def replace_in_the_command_only(full_command: list[str], new_executable: str) -> list[str]:
        cut = full_command.index(_EXECUTOR_INPUT) if _EXECUTOR_INPUT in full_command else len(full_command)
        return original(full_command[:cut], new_executable) + list(full_command[cut:])

    handler.replace_python_executable = replace_in_the_command_only
    try:
        yield
    finally:
        handler.replace_python_executable = original


_EXECUTOR_INPUT = "--executor_input"  # the argument after which kfp.local's command line is the step's input


@contextlib.contextmanager
def _loop_inputs_kept():
    """Keep kfp.local from handing a loop's tasks its item in place of another task's output.

    For each iteration of a ParallelFor, kfp.local replaces *every* input of the loop that comes from a task's
    output with the loop's item, not only the list it iterates over: the run config of the init step
    reached each client step as the client's name. A KFP backend does not; here the other inputs are put back."""
    from kfp.local.orchestrator import task_spec_utils

    original = task_spec_utils.create_parameter_loop_iteration_task_spec

    def one_iteration(original_task_spec, *args, **kwargs):
        iteration = original(original_task_spec, *args, **kwargs)
        items = original_task_spec.parameter_iterator.items.input_parameter
        for name, given in original_task_spec.inputs.parameters.items():
            if given.HasField("task_output_parameter") and name != items:
                iteration.inputs.parameters[name].CopyFrom(given)
        return iteration

    task_spec_utils.create_parameter_loop_iteration_task_spec = one_iteration
    try:
        yield
    finally:
        task_spec_utils.create_parameter_loop_iteration_task_spec = original


@contextlib.contextmanager
def _loop_concurrency(cfg: FederationConfig):
    """Let a round's loops run ``cfg.parallelism`` clients at once in kubernetes mode, as a KFP backend does.

    kfp.local runs at most KFP_LOCAL_MAX_CONCURRENCY iterations of a ParallelFor at once, whatever its
    ``parallelism``, to spare this machine's cores. In kubernetes mode a client step only creates the tenant's
    ClientRound and waits for its Job, which runs on the tenant's own resources: the cap would only make the
    third tenant of a round wait for the first two. (A kfp without that class keeps its own limit.)"""
    from kfp.local.orchestrator import enhanced_dag_orchestrator as orchestrator

    capped = getattr(orchestrator, "ParallelExecutor", None)
    if cfg.execution.mode != "kubernetes" or cfg.parallelism <= KFP_LOCAL_MAX_CONCURRENCY or capped is None:
        yield
        return

    class Uncapped(capped):
        def __init__(self, max_workers: int | None = None):
            super().__init__(max_workers)
            self.conservative_max = self.max_workers = cfg.parallelism

    orchestrator.ParallelExecutor = Uncapped
    try:
        yield
    finally:
        orchestrator.ParallelExecutor = capped


@contextlib.contextmanager
def environ(values: dict[str, str]):
    """``os.environ`` with ``values`` set while the block runs, and as it was before afterwards."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def _kfp_output_to(log: TextIO):
    """Send KFP's output (``print`` and the root logger, from every step) to ``log`` while it runs.

    Around every task kfp.local swaps the root logger's handlers and ``builtins.print`` for its own;
    ParallelFor's threads do that concurrently and can leave kfp's versions installed, so they are put
    back afterwards.
    """
    root = logging.getLogger()
    handlers, level, original_print = root.handlers[:], root.level, builtins.print
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        try:
            yield
        finally:
            root.handlers[:] = handlers
            root.setLevel(level)
            builtins.print = original_print


@contextlib.contextmanager
def _follow(events_path: Path, on_event: Callable[[dict[str, Any]], None] | None, *, from_end: bool = False):
    """Deliver events to ``on_event`` from a background thread while the pipeline runs (``from_end``:
    only those appended from now on, as when a run resumes)."""
    if on_event is None:
        yield
        return
    stop = threading.Event()
    start = events_path.stat().st_size if from_end and events_path.exists() else 0

    def poll() -> None:
        offset = start
        while True:
            stopping = stop.is_set()
            batch, offset = events.read(events_path, offset)
            for event in batch:
                on_event(event)
            if stopping:
                return
            stop.wait(0.2)

    thread = threading.Thread(target=poll, name="fedfm-events", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _failure(events_path: Path, log_path: Path, exc: Exception) -> str:
    failed = [event for event in events.read(events_path)[0] if event["event"] == "failed"]
    if failed:
        event = failed[0]
        where = ", ".join(f"{key} {event[key]}" for key in ("round", "client") if key in event)
        return f"step {event['step']}{f' ({where})' if where else ''} failed: {event['error']}\nfull log: {log_path}"
    return f"the pipeline failed: {exc}\nfull log: {log_path}"
