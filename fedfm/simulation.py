"""``fedfm simulate``: a whole federation in this process, without KFP — many clients on one machine.

The steps of the ``federated_finetune`` pipeline, in its order and through the same core functions:
init, evaluate round 0, then per round the sampled clients' fine-tunes (one after another), the
aggregate (the strategy's server state chained from round to round) and the evaluation, and finally
the export. Each base model is loaded from disk once (:func:`fedfm.modeling.reuse_base_models`);
every client and evaluation gets a copy of it. A client whose fine-tune raises is a missing client
with the error as its reason, and the quorum (``policy.min_clients``) decides whether the round
aggregates, as for a failed Job in cluster mode.

What it leaves in ``OUTPUT`` is what ``fedfm run`` leaves (``metrics.json`` with ``run.runner``
"simulate", ``report.png``, ``adapter/``, ``run.log``, ``events.jsonl``), plus ``work/``: every
round's global adapter, the clients' updates, the server state and the history so far.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import sys
import time
import traceback
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from fedfm import checkpoint, events
from fedfm.attacks import Attack
from fedfm.checkpoint import Checkpoint, checkpoint_root
from fedfm.config import FederationConfig
from fedfm.errors import ConfigError
from fedfm.executors import FAILED, ClientOutcome
from fedfm.pipelines.local_runner import LocalRun, _follow, environ, resume_run, start_run

RUNNER = "simulate"


@dataclass(frozen=True)
class Attackers:
    """``fedfm simulate --attack``: which clients are Byzantine, and how."""

    attack: Attack
    clients: frozenset[str]

    def record(self) -> dict[str, Any]:
        """What run.json keeps, so that a resumed run attacks as the interrupted one did."""
        return {"kind": self.attack.kind, "scale": self.attack.scale, "clients": sorted(self.clients)}

    @classmethod
    def from_record(cls, record: dict[str, Any] | None) -> Attackers | None:
        if not record:
            return None
        return cls(Attack(kind=record["kind"], scale=record["scale"]), frozenset(record["clients"]))

    def check(self, cfg: FederationConfig) -> None:
        unknown = sorted(self.clients - set(cfg.training_clients))
        if unknown:
            raise ConfigError(f"attackers {', '.join(unknown)} are not clients of this federation "
                              f"({', '.join(cfg.training_clients)})")
        if not self.clients:
            raise ConfigError("an attack needs at least one attacker")
        if self.attack.kind == "label-flip" and cfg.task != "classification":
            raise ConfigError("the label-flip attack needs a classification task")


def attacked_update(cfg: FederationConfig, attack: Attack, client: str, round_index: int, global_uri: str,
                    update_uri: str) -> ClientOutcome:
    """A Byzantine client's update: trained on flipped labels (label-flip), or trained honestly and then
    replaced by the attack's tensors, written where the honest update would be."""
    from fedfm.adapters import load_adapter, save_adapter
    from fedfm.attacks import attack_seed, poison_data_hook, poison_update
    from fedfm.executors import train_here

    if not attack.poisons_update:  # label-flip: honest training on poisoned data
        return train_here(cfg, client, round_index, global_uri, update_uri,
                          poison_data=poison_data_hook(attack, cfg.data.labels))
    honest_uri = f"{update_uri}.honest"
    outcome = train_here(cfg, client, round_index, global_uri, honest_uri)
    if outcome.succeeded:
        honest = load_adapter(honest_uri, who=f"client {client}")
        tensors = poison_update(attack, honest.tensors, seed=attack_seed(cfg.seed, client, round_index))
        save_adapter(update_uri, tensors, honest.meta)  # the honest file stays beside it, for the record
    return outcome


def simulate(cfg: FederationConfig, output: Path, on_event: Callable[[dict[str, Any]], None] | None = None, *,
             reuse_models: bool = True, resume: bool = False, attack: Attack | None = None,
             attackers: Collection[str] = ()) -> LocalRun:
    """Run the federation ``cfg`` in this process; write ``metrics.json``, ``report.png`` and the final
    PEFT adapter under ``output``, as :func:`fedfm.pipelines.local_runner.run_local` does.

    ``on_event`` sees each step's progress event (:mod:`fedfm.events`) on a background thread while
    ``sys.stdout`` and ``sys.stderr`` go to ``run.log``. ``reuse_models=False`` loads the base model
    from disk for every client and evaluation, as the pipeline's separate steps do (for comparisons).

    ``resume``: continue the interrupted run in ``output`` after its last checkpointed round, with the
    config (and attack) it started with; ``cfg`` is then ignored and may be None. ``attack`` makes the
    clients in ``attackers`` Byzantine (:mod:`fedfm.attacks`), for testing a setup's robustness.
    """
    from fedfm.federation import step_config
    from fedfm.modeling import reuse_base_models
    from fedfm.report import plot_report, write_metrics

    output = Path(output)
    if resume:
        resumed = resume_run(output, RUNNER)
        cfg, start = resumed.cfg, resumed.checkpoint
        plan = Attackers.from_record(resumed.record.get("attack"))
    else:
        check_simulated(cfg)
        plan = None if attack is None else Attackers(attack, frozenset(attackers))
        if plan is not None:
            plan.check(cfg)
        cfg, start = start_run(cfg, output, RUNNER, {"attack": plan and plan.record()}), None
    events_path, log_path = output / "events.jsonl", output / "run.log"
    started = time.time()
    reuse = reuse_base_models() if reuse_models else contextlib.nullcontext()
    try:
        with open(log_path, "a", buffering=1) as log, _output_to(log), _environment(events_path), \
                _follow(events_path, on_event, from_end=resume), reuse:
            with _collections_skip_what_lives_on():
                history = _federate(step_config(cfg.as_dict()), output / "work", output / "adapter", start, plan)
    finally:
        events.make_plain(log_path)
    seconds = time.time() - started

    run = LocalRun(output=output, history=history, seconds=seconds)
    write_metrics(run.metrics_path, cfg.as_dict(), history,
                  {"seconds": seconds, "runner": RUNNER, "steps": "in-process", "centralized": cfg.centralized,
                   "clients": cfg.training_clients, "resumed_from": None if start is None else start.round})
    mode = "centralized" if cfg.centralized else f"{len(cfg.training_clients)} clients"
    plot_report(run.report_path, cfg.task, history, f"{cfg.name}: {cfg.model.name_or_path}, {mode}")
    return run


def check_simulated(cfg: FederationConfig) -> None:
    """A simulation runs every client here: ``cfg`` must be a local federation."""
    if cfg.execution.mode != "local":
        raise ConfigError(f"fedfm simulate runs every client in this process; execution.mode is "
                          f"{cfg.execution.mode!r}: set it to 'local', or run the pipeline on the cluster "
                          "(fedfm submit)")


def _federate(cfg: FederationConfig, work: Path, adapter_dir: Path, start: Checkpoint | None,
              plan: Attackers | None) -> list[dict[str, Any]]:
    """The pipeline's steps, one after another, from round 0 or after the checkpoint ``start``; every
    round ends in a checkpoint. Returns the run's history (rounds 0..R)."""
    from fedfm.federation import aggregate_round, export, initialize
    from fedfm.server_state import write_initial_server_state
    from fedfm.trust.privacy import rounds_within_budget

    root = checkpoint_root(cfg)
    if start is None:
        global_uri = str(work / "round-0" / "global_adapter.safetensors")
        with events.step("init"):
            initialize(cfg, global_uri)
        history_uri = _evaluate(cfg, global_uri, None, str(work / "round-0" / "history.json"), None)
        state_uri: str | None = None  # round 1 starts without server state, but under privacy its sampling key
        if cfg.privacy.enabled:
            state_uri = str(work / "round-0" / "server_state")
            write_initial_server_state(cfg, state_uri)
        _checkpoint(root, cfg, 0, global_uri, state_uri, history_uri)
    else:  # the last checkpointed round's files are the next round's inputs, as they would have been
        global_uri, state_uri, history_uri = (start.uri("global_adapter"), start.uri("server_state"),
                                              start.uri("history"))
    first = 1 if start is None else start.round + 1
    for round_index in range(first, rounds_within_budget(cfg) + 1):  # a privacy budget may end the run early
        round_dir = work / f"round-{round_index}"
        if cfg.secure_aggregation.enabled:
            global_uri, state_uri = _secure_round(cfg, round_index, global_uri, state_uri, round_dir)
        else:
            updates, missing = _train_round(cfg, round_index, global_uri, round_dir, state_uri, plan)
            new_global, new_state = str(round_dir / "global_adapter.safetensors"), str(round_dir / "server_state")
            with events.step("aggregate", round=round_index) as figures:
                meta = aggregate_round(cfg, round_index, global_uri, updates, new_global, missing,
                                       state_in=state_uri, state_out=new_state)
                figures.update(clients=len(updates), missing=len(missing), samples=meta.samples,
                               round_seconds=meta.metrics.get("round_seconds"))
            global_uri, state_uri = new_global, new_state
        history_uri = _evaluate(cfg, global_uri, history_uri, str(round_dir / "history.json"), state_uri)
        _checkpoint(root, cfg, round_index, global_uri, state_uri, history_uri)
    with events.step("export"):
        export(cfg, global_uri, str(adapter_dir))
    return json.loads(Path(history_uri).read_text())


def _checkpoint(root: str | None, cfg: FederationConfig, round_index: int, global_uri: str, state_uri: str | None,
                history_uri: str) -> None:
    if root is not None:
        checkpoint.save(root, cfg, round_index, global_uri, state_uri, history_uri)


def _train_round(cfg: FederationConfig, round_index: int, global_uri: str, round_dir: Path,
                 state_uri: str | None, plan: Attackers | None) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """The round's fine-tunes, one client after another: the ``(client, update)`` pairs and the missing
    clients, with why. Below the quorum, ``policy.below_quorum`` retry draws fresh clients (not yet in
    the round nor quarantined in the server state at ``state_uri``) in place of the missing ones
    (:func:`fedfm.federation.retry_below_quorum`)."""
    from fedfm.federation import retry_below_quorum, round_clients
    from fedfm.server_state import read_server_state

    updates: list[tuple[str, str]] = []
    missing: dict[str, str] = {}

    def finetune(client: str) -> tuple[str | None, str | None]:
        update_uri = str(round_dir / "updates" / f"{client}.safetensors")
        failure = _finetune(cfg, client, round_index, global_uri, update_uri, plan)
        return (update_uri, None) if failure is None else (None, failure)

    state = read_server_state(cfg, state_uri)
    for client in round_clients(cfg, round_index, state):
        update_uri, failure = finetune(client)
        if failure is None:
            updates.append((client, update_uri))
        else:
            missing[client] = failure
    retry_below_quorum(cfg, round_index, updates, missing, set(state.quarantine.since), finetune)
    return updates, missing


def _secure_round(cfg: FederationConfig, round_index: int, global_uri: str, state_uri: str | None,
                  round_dir: Path) -> tuple[str, str]:
    """One round under secure aggregation: the protocol's five client steps and the server's relays
    (:mod:`fedfm.trust.secure_round`), each client step one after another; a client whose step raises drops
    out, and the protocol recovers its masks while ``threshold`` clients remain."""
    from fedfm.federation import round_clients
    from fedfm.server_state import read_server_state
    from fedfm.trust import secure_round

    box, missing = round_dir / "secagg", {}

    def each(clients: list[str], phase: str, step: Callable[[str], None]) -> list[str]:
        done = []
        for client in clients:
            try:
                step(client)
                done.append(client)
            except Exception as exc:  # the client drops out of the round; the protocol goes on without it
                print(f"client {client}, round {round_index}, secure aggregation {phase} failed:", file=sys.stderr)
                traceback.print_exc()
                missing[client] = f"{FAILED} in secure aggregation {phase}: {type(exc).__name__}: {exc}"
        return done

    def at(kind: str, client: str = "") -> str:
        return str(box / kind / f"{client}.json") if client else str(box / f"{kind}.json")

    drawn = round_clients(cfg, round_index, read_server_state(cfg, state_uri))
    advertised = each(drawn, "advertise",
                      lambda client: secure_round.advertise(cfg, client, round_index, at("keys", client)))
    registry = secure_round.local_registry(cfg)  # what the server verifies every client's messages with
    advertisers = secure_round.relay_keys(cfg, round_index, {c: at("keys", c) for c in advertised}, at("keys"),
                                          drawn, registry, rejected=missing)
    shared = each(advertisers, "share", lambda client: secure_round.share(cfg, client, round_index, at("keys"),
                                                                           at("shares", client)))
    secure_round.relay_shares(at("keys"), {c: at("shares", c) for c in shared}, at("keys-shared"),
                              {c: at("inbox", c) for c in shared})
    # under privacy: how each client clips and noises its update
    noise = secure_round.train_inputs(cfg, at("keys-shared"), state_uri)
    masked = {}
    for client in shared:
        plain = secure_round.private_update_uri(cfg, client, round_index)
        failure = _finetune(cfg, client, round_index, global_uri, plain)
        if failure is not None:
            missing[client] = failure
            continue
        uri = str(box / "masked" / f"{client}.safetensors")
        if each([client], "mask", lambda c: secure_round.mask(cfg, c, round_index, plain, at("keys-shared"), uri,
                                                              noise)):
            masked[client] = uri
    new_global, new_state = str(round_dir / "global_adapter.safetensors"), str(round_dir / "server_state")
    with events.step("aggregate", round=round_index) as figures:
        clients = secure_round.sum_masked(cfg, round_index, global_uri, masked, at("keys-shared"), at("survivors"),
                                          str(box / "masked-sum.bin"), registry, rejected=missing)
        confirmed = each(sorted(clients), "confirm", lambda client: secure_round.confirm(
            cfg, client, round_index, at("keys-shared"), at("survivors"), at("confirm", client)))
        confirmers = secure_round.relay_confirmations(cfg, round_index, at("keys-shared"), at("survivors"),
                                                      {c: at("confirm", c) for c in confirmed}, at("confirmations"),
                                                      registry, missing)
        answered = each(confirmers, "reveal", lambda client: secure_round.reveal(
            cfg, client, round_index, at("keys-shared"), at("inbox", client), at("survivors"), at("confirmations"),
            at("reveal", client)))
        meta = secure_round.finish(cfg, round_index, global_uri, at("keys-shared"), at("survivors"),
                                   str(box / "masked-sum.bin"), {c: at("reveal", c) for c in answered}, clients,
                                   new_global, registry, missing, state_in=state_uri, state_out=new_state,
                                   confirmations_uri=at("confirmations"))
        figures.update(clients=len(clients), missing=len(missing), samples=meta.samples,
                       round_seconds=meta.metrics.get("round_seconds"))
    return new_global, new_state


def _finetune(cfg: FederationConfig, client: str, round_index: int, global_uri: str, update_uri: str,
              plan: Attackers | None = None) -> str | None:
    """Train ``client``; None when its update is at ``update_uri``, else why there is none (an error,
    or the round's deadline missed: :func:`fedfm.executors.train_here`)."""
    from fedfm.adapters import read_meta
    from fedfm.executors import train_here

    attack = plan.attack if plan is not None and client in plan.clients else None
    try:
        with events.step("client_finetune", client=client, round=round_index) as figures:
            if attack is None:
                outcome = train_here(cfg, client, round_index, global_uri, update_uri)
            else:
                outcome = attacked_update(cfg, attack, client, round_index, global_uri, update_uri)
            if not outcome.succeeded:
                figures.update(phase=outcome.phase, reason=outcome.reason)
                return f"{outcome.phase}: {outcome.reason}"
            meta = read_meta(update_uri)
            figures.update(train_loss=meta.metrics["train_loss"], samples=meta.samples,
                           seconds=meta.metrics["seconds"])
    finally:
        _collect()  # the client's model, optimizer and engine, before the next client builds its own
    return None


def _evaluate(cfg: FederationConfig, adapter_uri: str, history_in: str | None, history_out: str,
              state_uri: str | None) -> str:
    """Score the global adapter on every tenant's evaluation split (under secure aggregation: the round's
    survivors, their counts summed under masks, as the pipeline's evaluate step does) and extend the history."""
    from fedfm.adapters import read_meta
    from fedfm.evaluation import bounded, evaluate_clients, summarize
    from fedfm.executors import LocalExecutor
    from fedfm.federation import append_history, round_record
    from fedfm.secure_pipeline import evaluate_round

    round_index = read_meta(adapter_uri).round
    with events.step("evaluate", round=round_index) as figures:
        started = time.time()
        missing, note = {}, None  # every tenant's data is here
        if cfg.secure_aggregation.enabled:
            scratch = Path(history_out).parent / "secagg" / "evaluation"
            scratch.mkdir(parents=True, exist_ok=True)
            result, missing, note = evaluate_round(cfg, LocalExecutor(), round_index, adapter_uri, state_uri,
                                                   str(scratch))
        else:
            result = summarize(cfg.task, bounded(evaluate_clients(cfg, adapter_uri, cfg.client_names), cfg.policy))
        record = round_record(adapter_uri, result, time.time() - started)
        record["eval_missing"] = missing
        if note:
            record["eval_note"] = note
        append_history(history_in, record, history_out)
        figures.update(record["eval"]["global"])
    _collect()
    return history_out


_freeze = {"pending": False, "done": False}


@contextlib.contextmanager
def _collections_skip_what_lives_on() -> Iterator[None]:
    """Make the collections between clients cheap: a full collection walks every object of the process
    (torch's and transformers' modules, the cached base models: 0.2 s a client on 2 busy cores, more than an
    optimizer step). What is still alive after the run's first collection (imports, the cached base models)
    lives on for the run, so :func:`_collect` freezes it there (``gc.freeze``) and later collections walk only
    what later clients made; the run's end unfreezes it, unless someone else had frozen objects before."""
    _freeze.update(pending=gc.get_freeze_count() == 0, done=False)
    try:
        yield
    finally:
        if _freeze["done"]:
            gc.unfreeze()
        _freeze.update(pending=False, done=False)


def _collect() -> None:
    gc.collect()
    if _freeze["pending"]:
        gc.freeze()
        _freeze.update(pending=False, done=True)


def _environment(events_path: Path):
    """Where the steps report progress, for the duration of the run."""
    return environ({events.ENV: str(events_path), "TOKENIZERS_PARALLELISM": "false"})


@contextlib.contextmanager
def _output_to(log: TextIO) -> Iterator[None]:
    """Send what the libraries print and log (transformers, DeepSpeed) to ``log`` while the run lasts.

    Logging handlers set up before the run hold the terminal's streams themselves, so they are pointed
    at the log too, and back afterwards; handlers created during the run keep a stream that writes to
    the log until the run ends and to the terminal after.
    """
    # afterwards, the process's own streams: a stream swapped in for this run (a test's capture) may be gone
    out, err = _Forward(log, sys.__stdout__ or sys.stdout), _Forward(log, sys.__stderr__ or sys.stderr)
    streams = {id(sys.stdout): out, id(sys.stderr): err, id(sys.__stdout__): out, id(sys.__stderr__): err}
    loggers = [logging.getLogger()] + [logger for logger in logging.Logger.manager.loggerDict.values()
                                       if isinstance(logger, logging.Logger)]
    swapped = [(handler, handler.stream) for logger in loggers for handler in logger.handlers
               if type(handler) is logging.StreamHandler and id(handler.stream) in streams]
    for handler, stream in swapped:
        handler.setStream(streams[id(stream)])
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), _descriptor_to(2, log):
            yield
    finally:
        for handler, stream in swapped:
            handler.setStream(stream)
        out.target, err.target = out.after, err.after


@contextlib.contextmanager
def _descriptor_to(fd: int, log: TextIO) -> Iterator[None]:
    """Point file descriptor ``fd`` at ``log``: what subprocesses and native code write to stderr (a
    compiler probe of DeepSpeed's, gloo) goes to the log too. Standard output stays: the progress
    display writes there."""
    try:
        saved = os.dup(fd)
    except OSError:  # no such descriptor: nothing to redirect
        yield
        return
    if sys.__stderr__:
        sys.__stderr__.flush()
    os.dup2(log.fileno(), fd)
    try:
        yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)


class _Forward:
    """A text stream that writes to ``target``: the run's log, then (``after``) the process's stream."""

    def __init__(self, target: TextIO, after: TextIO):
        self.target, self.after = target, after

    def write(self, text: str) -> int:
        # the log holds plain text; the terminal, after the run, what the library meant
        return self.target.write(events.plain(text) if self.target is not self.after else text)

    def isatty(self) -> bool:  # while the run lasts its writes go to the log: no colours for it
        return self.target is self.after and bool(getattr(self.after, "isatty", lambda: False)())

    def flush(self) -> None:
        self.target.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.target, name)
