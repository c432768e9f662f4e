"""One client's local fine-tune: PEFT LoRA on a Hugging Face model, trained through DeepSpeed.

:func:`train_client` is the whole client step: read the global adapter, train on the client's own
data for the configured steps, write the update (local − global) with its metadata, compressed as
``compression`` says (with error feedback, plus what compression left out of earlier updates). With
``training.world_size > 1`` it runs ``world_size`` data-parallel DeepSpeed processes under
``torch.distributed.run``; each process executes :func:`run_rank`, rank 0 writes the update. Those
processes may span nodes: on each node of a multi-node fine-tune (a Kubeflow Trainer TrainJob's Pods) the
same command reads the layout from the environment Trainer's torch plugin sets (:func:`node_layout`), and
starts its share of the ranks; only the first node's first process, global rank 0, writes the update.

The global batch (``training.batch_size``) is split over processes and accumulation micro-steps, and
every rank draws its slice of the same seeded batch order, so a run with 2 processes sees the same
examples per optimizer step as a run with 1.

For ``preference`` the loss is DPO's (:mod:`fedfm.preference`): before the first step each rank scores its own
micro-batches with the round's model, in evaluation mode, as the reference.
"""

from __future__ import annotations

import collections
import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from fedfm import storage
from fedfm.adapters import AdapterMeta, Tensors, l2_norm, load_adapter, save_adapter
from fedfm.compression import compress, decompress, tensor_bytes, unsent, uses_error_feedback, with_error_feedback
from fedfm.config import CompressionConfig, FederationConfig
from fedfm.errors import FedFMError, TrainingError
from fedfm.head import COUNTS_KEY, class_counts, init_from_prototypes, per_class_aggregation, prototypes_this_round
from fedfm.lora import is_lora_a, is_lora_b, rank_of, truncate
from fedfm.personal import load_personal, load_residual, save_personal, save_residual
from fedfm.strategies import configure_client

_TORCHRUN_LOG_TAIL = 40

PoisonData = Callable[[pd.DataFrame], pd.DataFrame]  # a simulated attacker's change to its training frame


@dataclass
class TrainResult:
    client: str
    round: int
    samples: int
    steps: int
    loss_history: list[float] = field(default_factory=list)
    train_loss: float = float("nan")
    seconds: float = 0.0
    setup_seconds: float = 0.0
    step_seconds: float = 0.0
    bytes_down: int = 0
    bytes_raw: int = 0  # the update's values in float32
    bytes_stored: int = 0  # the same, as stored (compressed); the server measures the whole file as bytes_up
    update_norm: float = 0.0
    sha256: str = ""

    def metrics(self) -> dict:
        """What the update file and the round record keep (the per-step history is left out)."""
        data = asdict(self)
        history = data.pop("loss_history")
        data["loss_first"] = history[0] if history else float("nan")
        data["loss_last"] = history[-1] if history else float("nan")
        return data


def train_client(cfg: FederationConfig, client: str, round_index: int, global_adapter: str,
                 update_out: str, *, poison_data: PoisonData | None = None) -> TrainResult | None:
    """Fine-tune ``client`` from ``global_adapter`` and write its update to ``update_out``. None on a node
    other than the first of a multi-node fine-tune: its ranks trained, and the first node wrote the update.

    ``poison_data`` (simulated attackers, :mod:`fedfm.attacks`) replaces the client's training frame
    with what it returns, e.g. the frame with flipped labels; it runs in this process, so it needs
    ``training.world_size`` 1.
    """
    cfg = configure_client(cfg, client, round_index)
    if cfg.training.world_size == 1:
        with single_process_group():
            return run_rank(cfg, client, round_index, global_adapter, update_out, poison_data=poison_data)
    if poison_data is not None:
        raise TrainingError(f"client {client}: training on poisoned data (a simulated label-flip attacker) runs in "
                            f"this process and needs training.world_size 1, not {cfg.training.world_size}")
    return _launch_ranks(cfg, client, round_index, global_adapter, update_out)


def run_rank(cfg: FederationConfig, client: str, round_index: int, global_adapter: str,
             update_out: str, *, poison_data: PoisonData | None = None) -> TrainResult:
    """The training loop of one DeepSpeed process (rank); rank 0 writes the update.

    Runs inside a process group: :func:`single_process_group` for one process, or the group that
    :func:`_rank_main` joins under ``torch.distributed.run``. ``poison_data``, when given, replaces
    the client's training frame right after it is loaded (see :func:`train_client`).
    """
    from fedfm.data import load_client_data
    from fedfm.modeling import adapter_tensors, build_model, load_adapter_tensors, peft_config_dict, restart_lora
    from fedfm.tasks import batches, collate, encode

    started = time.time()
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    if world != cfg.training.world_size:
        raise TrainingError(f"client {client}: launched with {world} processes, config asks for "
                            f"training.world_size={cfg.training.world_size}")

    global_state = load_adapter(global_adapter, who="the federation")
    # read first, so that a client with nowhere to keep its residual fails before it trains
    residual = (load_residual(cfg, client, round_index, started_from=global_state.meta.sha256)
                if uses_error_feedback(cfg.compression) else None)
    lora_rank = cfg.client_rank(client)
    loaded = build_model(cfg, rank=rank_of(global_state.tensors) if cfg.lora.restart else lora_rank)
    if global_state.meta.base_model != loaded.fingerprint:
        raise TrainingError(
            f"client {client}: the local base model {cfg.model.name_or_path!r} (fingerprint "
            f"{loaded.fingerprint[:16]}…) is not the federation's ({global_state.meta.base_model[:16]}…)"
        )
    if cfg.lora.restart:  # FLoRA: the global adapter goes into the base weights; a fresh LoRA trains on top
        load_adapter_tensors(loaded.model, global_state.tensors, where=f"global adapter {global_adapter}")
        torch.manual_seed(_client_seed(cfg, client, round_index))  # this client's and round's fresh A
        restart_lora(loaded, cfg, lora_rank)
        # the update is the fresh factors themselves (their change from nothing); a head, its change
        start = {name: torch.zeros_like(value) if is_lora_a(name) or is_lora_b(name) else value
                 for name, value in adapter_tensors(loaded.model).items()}
    else:
        start = truncate(global_state.tensors, lora_rank)  # the client's view of the global adapter, at its rank
        if cfg.lora.keep_b_local:  # FedSA-LoRA: this client's own B from its last round replaces the global one
            start.update(load_personal(cfg, client, round_index - 1))
        load_adapter_tensors(loaded.model, start, where=f"global adapter {global_adapter} at LoRA rank {lora_rank}")
    if cfg.lora.freeze_a:  # FFA-LoRA: A stays as initialized; only B (and any head) trains and is sent
        for name, parameter in loaded.model.named_parameters():
            if is_lora_a(name):
                parameter.requires_grad_(False)

    train = load_client_data(cfg, client).train
    if poison_data is not None:
        train = poison_data(train)
        if not isinstance(train, pd.DataFrame):
            raise TrainingError(f"client {client}: the poison_data hook returned a {type(train).__name__}, "
                                "not a DataFrame")
    examples = encode(train, loaded.tokenizer, cfg)
    if not examples:
        raise TrainingError(f"client {client} has no training examples")
    steps = _optimizer_steps(cfg, client, len(examples))
    order = _batch_order(cfg, client, round_index, len(examples), steps)
    if prototypes_this_round(cfg, round_index):  # every rank computes the same rows from the same examples
        pad = loaded.tokenizer.pad_token_id
        empty = encode(pd.DataFrame({"text": [""], "label": [0]}), loaded.tokenizer, cfg)
        if not empty[0]["input_ids"]:  # a tokenizer that adds no special tokens: one pad token stands in
            empty[0].update(input_ids=[pad], attention_mask=[1])
        empty = collate(empty, pad)
        init_from_prototypes(loaded.model, batches(examples, pad, 64), len(cfg.data.labels), reference=empty)

    torch.manual_seed(_client_seed(cfg, client, round_index))  # dropout
    engine = deepspeed_engine(cfg, loaded.model, client)
    proximal = _proximal_term(engine.module, cfg.training.proximal_mu)
    setup_seconds = time.time() - started

    micro = cfg.training.micro_batch_size
    accumulation = cfg.training.gradient_accumulation_steps

    def micro_batch(step: int, accumulation_step: int) -> dict[str, torch.Tensor]:
        """This rank's share of one accumulation micro-step of ``step``, on the engine's device."""
        batch_indices = order[step * cfg.training.batch_size : (step + 1) * cfg.training.batch_size]
        slot = accumulation_step * world + rank
        indices = batch_indices[slot * micro : (slot + 1) * micro]
        batch = collate([examples[i] for i in indices], loaded.tokenizer.pad_token_id)
        return {name: value.to(engine.device) for name, value in batch.items()}

    reference = None
    if cfg.task == "preference":  # the round's model, before any step, on the very micro-batches the steps use
        from fedfm.preference import batch_loss, reference_logps

        reference = reference_logps(engine, (micro_batch(step, accumulation_step) for step in range(steps)
                                             for accumulation_step in range(accumulation)), cfg.preference)
    losses: list[float] = []
    engine.train()
    loop_started = time.time()
    for step in range(steps):
        step_loss = torch.zeros(1)
        for accumulation_step in range(accumulation):
            batch = micro_batch(step, accumulation_step)
            if reference is not None:
                loss = batch_loss(engine, batch, reference[step * accumulation + accumulation_step], cfg.preference)
            else:
                loss = engine(**batch).loss
            engine.backward(loss + proximal() if proximal else loss)
            engine.step()
            step_loss += loss.detach().float().cpu() / accumulation  # the task's loss, comparable across rules
        if world > 1:
            torch.distributed.all_reduce(step_loss)
            step_loss /= world
        if not math.isfinite(float(step_loss)):
            raise TrainingError(f"client {client}: training loss became {float(step_loss)} at step {step + 1}; "
                                "lower training.learning_rate")
        losses.append(float(step_loss))
    loop_seconds = time.time() - loop_started

    local_state = _full_precision_adapter(engine)
    result = TrainResult(
        client=client, round=round_index, samples=len(examples), steps=steps, loss_history=losses,
        train_loss=float(np.mean(losses)), seconds=loop_seconds, setup_seconds=setup_seconds,
        step_seconds=loop_seconds / steps, bytes_down=storage.size(global_adapter),
    )
    if rank == 0:
        # what trained and is shared, and only that
        delta = {name: local_state[name] - start[name] for name in local_state
                 if not (cfg.lora.keep_b_local and is_lora_b(name))}
        if cfg.lora.keep_b_local:
            save_personal(cfg, client, round_index, {n: v for n, v in local_state.items() if is_lora_b(n)})
        result.update_norm = l2_norm(delta)
        update, left_out, result.bytes_stored = _compressed(cfg.compression, delta, residual,
                                                            f"client {client}'s error-feedback residual")
        result.bytes_raw = tensor_bytes(update)
        meta = AdapterMeta(
            kind="update", base_model=loaded.fingerprint, peft_config=peft_config_dict(loaded.model),
            round=round_index, samples=len(examples), client=client,
            metrics=dict(result.metrics(), started_at=started, finished_at=time.time(),
                         world_size=world, zero_stage=cfg.training.zero_stage, bf16=cfg.training.bf16),
        )
        if per_class_aggregation(cfg):  # read by the server only, never published
            meta.metrics[COUNTS_KEY] = class_counts((example["labels"] for example in examples), len(cfg.data.labels))
        result.sha256 = save_adapter(update_out, update, meta, compression=cfg.compression)
        if left_out is not None:  # only once the update is written: a failed write leaves no residual
            save_residual(cfg, client, round_index, left_out, started_from=global_state.meta.sha256)
    return result


def _compressed(config: CompressionConfig, delta: Tensors, residual: Tensors | None,
                residual_where: str) -> tuple[Tensors, Tensors | None, int]:
    """The update to send (``delta``, plus what earlier rounds left unsent under error feedback), what
    compressing it leaves unsent (None without error feedback), and the bytes its stored tensors take."""
    update = delta if residual is None else with_error_feedback(delta, residual, where=residual_where)
    if config.method == "none":
        return update, None, tensor_bytes(update)
    stored, description = compress(update, config)
    left_out = None if residual is None else unsent(update, decompress(stored, description))
    return update, left_out, tensor_bytes(stored)


def _proximal_term(model: torch.nn.Module, mu: float):
    """FedProx's ``μ/2·‖w − w_global‖²`` over the trainable weights, as a function of the current
    weights (None when μ is 0). Called before the first step, so the anchors are the global adapter."""
    if not mu:
        return None
    pairs = [(parameter, parameter.detach().clone()) for parameter in model.parameters() if parameter.requires_grad]

    def term() -> torch.Tensor:
        return 0.5 * mu * sum((parameter - anchor).float().pow(2).sum() for parameter, anchor in pairs)

    return term


def _optimizer_steps(cfg: FederationConfig, client: str, examples: int) -> int:
    steps = cfg.local_steps_for(client)
    if steps is None:
        steps = math.ceil(cfg.training.local_epochs * examples / cfg.training.batch_size)
    return max(1, steps)


def _client_seed(cfg: FederationConfig, client: str, round_index: int) -> int:
    return (cfg.seed * 1_000_003 + round_index * 10_007 + zlib.crc32(client.encode())) % (2**31)


def _batch_order(cfg: FederationConfig, client: str, round_index: int, examples: int, steps: int) -> np.ndarray:
    """Example indices for every optimizer step: seeded reshuffles of the client's data, end to end."""
    rng = np.random.default_rng(_client_seed(cfg, client, round_index))
    needed = steps * cfg.training.batch_size
    epochs = math.ceil(needed / examples)
    return np.concatenate([rng.permutation(examples) for _ in range(epochs)])[:needed]


def deepspeed_engine(cfg: FederationConfig, model, client: str):
    import deepspeed

    training = cfg.training
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=training.learning_rate, weight_decay=training.weight_decay)
    ds_config = {
        "train_batch_size": training.batch_size,
        "train_micro_batch_size_per_gpu": training.micro_batch_size,
        "gradient_accumulation_steps": training.gradient_accumulation_steps,
        "gradient_clipping": training.max_grad_norm,
        "zero_optimization": {"stage": training.zero_stage},
        "bf16": {"enabled": training.bf16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    try:
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    except (RuntimeError, ValueError, AssertionError) as exc:
        raise TrainingError(f"client {client}: DeepSpeed could not start with {ds_config}: {exc}") from None
    return engine


def _full_precision_adapter(engine) -> dict[str, torch.Tensor]:
    """The trained adapter under PEFT's names, from DeepSpeed's fp32 master weights.

    Under bf16 the module holds rounded copies; the optimizer's fp32 masters are the real weights.
    ZeRO 1-3 expose them through ``safe_get_full_fp32_param`` (a collective under ZeRO-3: every rank
    calls it); ZeRO 0 with bf16 keeps them in the optimizer's ``fp32_groups``.
    """
    from deepspeed.utils import safe_get_full_fp32_param
    from peft import get_peft_model_state_dict

    masters: dict[int, torch.Tensor] = {}
    optimizer = engine.optimizer
    if hasattr(optimizer, "fp16_groups") and hasattr(optimizer, "fp32_groups"):
        for low_group, high_group in zip(optimizer.fp16_groups, optimizer.fp32_groups):
            masters.update({id(low): high for low, high in zip(low_group, high_group)})
    state = {}
    for name, parameter in engine.module.named_parameters():
        if not parameter.requires_grad:
            continue
        full = safe_get_full_fp32_param(parameter)
        if full is None:
            full = masters.get(id(parameter), parameter.data)
        state[name] = full.detach().to("cpu", torch.float32).clone()
    return get_peft_model_state_dict(engine.module, state_dict=state)


# --- process management -------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def single_process_group():
    """Make this process rank 0 of a one-process group for the duration of a client's training.

    The group lives on an in-memory store (no port, no environment variables, so processes started
    later inherit nothing) and stays for the life of the process: DeepSpeed caches its groups, and
    later in-process clients reuse this one. DeepSpeed's engine reads ``LOCAL_RANK`` from the
    environment when it is built, so that one variable is set while the block runs.
    """
    _use_cpu_accelerator_without_gpu()
    if not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend, store=torch.distributed.HashStore(), rank=0, world_size=1)
    saved = os.environ.get("LOCAL_RANK")
    os.environ["LOCAL_RANK"] = "0"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("LOCAL_RANK", None)
        else:
            os.environ["LOCAL_RANK"] = saved


def _use_cpu_accelerator_without_gpu() -> None:
    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"


@dataclass(frozen=True)
class NodeLayout:
    """Where this node's ranks sit among all of a fine-tune's: ``nodes`` nodes of ``processes`` ranks each,
    this one the ``node_rank``-th, meeting at ``master_addr``:``master_port`` (the first node)."""

    nodes: int
    node_rank: int
    processes: int
    master_addr: str
    master_port: int


# What Kubeflow Trainer's torch plugin sets on every node of a TrainJob (torchrun's own PET_* variables).
_TRAINER_ENV = ("PET_NNODES", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT")


def node_layout(client: str, world_size: int, environ: Mapping[str, str] = os.environ) -> NodeLayout:
    """The layout of a fine-tune of ``world_size`` processes: one node (this machine), or, where Trainer's
    environment says there are several, this node's place among them. ``world_size`` is all nodes' ranks
    together and must split evenly over them (and equal ``PET_NPROC_PER_NODE`` per node where it is set)."""
    if int(environ.get("PET_NNODES") or 1) <= 1:
        return NodeLayout(1, 0, world_size, "127.0.0.1", _free_port())
    missing = [name for name in _TRAINER_ENV if not environ.get(name)]
    if missing:
        raise TrainingError(f"client {client}: a multi-node fine-tune (PET_NNODES={environ['PET_NNODES']}) needs "
                            f"{', '.join(missing)} in its environment, as Kubeflow Trainer sets them")
    try:
        nodes, node_rank = int(environ["PET_NNODES"]), int(environ["PET_NODE_RANK"])
        port = int(environ["PET_MASTER_PORT"])
        per_node = int(environ.get("PET_NPROC_PER_NODE") or 0) or world_size // nodes
    except ValueError as exc:
        raise TrainingError(f"client {client}: Kubeflow Trainer's PET_* environment is not numeric: {exc}") from None
    if per_node * nodes != world_size or not 0 <= node_rank < nodes:
        raise TrainingError(f"client {client}: training.world_size {world_size} is not {nodes} nodes × {per_node} "
                            f"processes (node rank {node_rank}): the TrainJob and the config disagree")
    return NodeLayout(nodes, node_rank, per_node, environ["PET_MASTER_ADDR"], port)


def _launch_ranks(cfg: FederationConfig, client: str, round_index: int, global_adapter: str,
                  update_out: str) -> TrainResult | None:
    layout = node_layout(client, cfg.training.world_size)
    with tempfile.TemporaryDirectory(prefix="fedfm-ranks-") as scratch:
        spec = Path(scratch) / "spec.json"
        result_path = Path(scratch) / "result.json"
        spec.write_text(json.dumps({
            "config": cfg.as_dict(), "client": client, "round": round_index,
            "global_adapter": str(global_adapter), "update_out": str(update_out), "result": str(result_path),
        }))
        env = dict(os.environ)
        if not torch.cuda.is_available():
            # ranks share this machine's cores; without a cap each would start one thread per core
            env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // layout.processes)))
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(layout.nodes),
                   "--node_rank", str(layout.node_rank), "--nproc_per_node", str(layout.processes),
                   "--master_addr", layout.master_addr, "--master_port", str(layout.master_port),
                   "-m", "fedfm.training", str(spec)]
        tail: collections.deque[str] = collections.deque(maxlen=_TORCHRUN_LOG_TAIL)
        reason = None  # a rank that fails on bad input says why on a "FedFMError: ..." line (_rank_main)
        # a session of their own, so that the launcher and its ranks can be stopped together
        with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True) as process:
            assert process.stdout is not None
            try:
                for line in process.stdout:
                    sys.stdout.write(line)
                    tail.append(line.rstrip())
                    if reason is None and line.startswith("FedFMError: "):
                        # ranks failing together can interleave their reports on one line: keep the first
                        reason = line.removeprefix("FedFMError: ").split("FedFMError: ")[0].rstrip()
                code = process.wait()
            except BaseException:  # the round's deadline (fedfm.executors.deadline), or this process is stopped
                with contextlib.suppress(ProcessLookupError):  # they may all have exited already
                    os.killpg(process.pid, signal.SIGKILL)
                raise
        if code == 0 and layout.node_rank > 0:
            return None  # rank 0, on the first node, wrote the update
        if code != 0 or not result_path.exists():
            raise TrainingError(
                f"client {client}: {cfg.training.world_size} DeepSpeed processes exited with status {code}: "
                + (reason or "\n" + "\n".join(tail))
            )
        return TrainResult(**json.loads(result_path.read_text()))


def _rank_main(spec_path: str) -> int:
    """Entry point of each process that ``torch.distributed.run`` starts."""
    spec = json.loads(Path(spec_path).read_text())
    cfg = FederationConfig.parse(spec["config"])
    _use_cpu_accelerator_without_gpu()
    torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")  # env:// from torchrun
    try:
        result = run_rank(cfg, spec["client"], spec["round"], spec["global_adapter"], spec["update_out"])
    except FedFMError as exc:
        print(f"FedFMError: {exc}", file=sys.stderr)
        return 1
    if torch.distributed.get_rank() == 0:
        Path(spec["result"]).write_text(json.dumps(asdict(result)))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(_rank_main(sys.argv[1]))
