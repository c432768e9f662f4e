"""Up-front checks of the paths and URIs a config names, before any work starts.

:func:`check_inputs` fails fast, with the field and the fix, on what would otherwise fail minutes into
a run (after the pipeline compiled, a model loaded, a round trained): a local model directory that is
missing or holds no ``config.json``, a data file that does not exist or has a type FedFM cannot read,
a storage URI whose scheme has no fsspec implementation here, or whose local directory cannot be
written.

It only looks: nothing is created, written or downloaded. Hub ids (models and datasets) and remote
objects are left to load time, since checking them needs the network.

:func:`check_model` goes further, for ``fedfm validate``: it loads the tokenizer and the model's skeleton (its
config, no weights) with LoRA applied, so what a run would refuse minutes in is refused before anything runs
(``fedfm validate`` also reads every tenant's data, with :func:`fedfm.data.describe_clients`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from fedfm.config import FederationConfig
from fedfm.errors import DataError, ModelError, StorageError

_MODEL_FIX = "not a directory with a Hugging Face config.json; give a hub id or a local model directory"


def check_inputs(cfg: FederationConfig, *, local: bool | None = None) -> None:
    """Raise :class:`~fedfm.errors.ModelError`, :class:`~fedfm.errors.DataError` or
    :class:`~fedfm.errors.StorageError`, naming the field, for the first input of ``cfg`` that cannot work.

    ``local`` (default: ``execution.mode`` is local) says whether this machine is where the run reads its
    model, data and state. When it is not (kubernetes mode: tenants' Jobs read their own data and model
    in their pods), local paths are not looked up and fsspec implementations need not be installed here;
    a URI scheme fsspec does not know at all is still refused.
    """
    if local is None:
        local = cfg.execution.mode == "local"
    _check_model(cfg.model.name_or_path, local)
    for field, source in _data_sources(cfg):
        _check_data_source(field, source, local)
    for field, uri in _storage_uris(cfg):
        _check_storage(field, uri, local)


def check_model(cfg: FederationConfig) -> None:
    """Raise :class:`~fedfm.errors.ModelError` unless the model resolves (a local directory, the Hugging Face
    cache offline, or the hub), its tokenizer loads, and LoRA finds ``lora.target_modules`` in it. The model is
    built on the meta device: no weights are read or allocated."""
    import torch
    from peft import get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from fedfm.modeling import load_failure, load_tokenizer, lora_config, resolve_model_source

    name = cfg.model.name_or_path
    load_tokenizer(cfg)
    try:
        config = AutoConfig.from_pretrained(resolve_model_source(name), revision=cfg.model.revision,
                                            trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelError(load_failure("model", name, exc)) from None
    if cfg.task == "classification":
        config.num_labels = max(2, len(cfg.data.labels or []))
    auto = AutoModelForSequenceClassification if cfg.task == "classification" else AutoModelForCausalLM
    with torch.device("meta"):
        try:
            model = auto.from_config(config, trust_remote_code=cfg.model.trust_remote_code)
        except (OSError, ValueError) as exc:
            raise ModelError(f"model {name!r} ({config.model_type}) cannot be built for task {cfg.task}: {exc}") \
                from None
        try:
            get_peft_model(model, lora_config(cfg, cfg.global_rank))
        except ValueError as exc:
            targets = cfg.lora.target_modules or "PEFT's default for the model type"
            linear = sorted({module_name.rsplit(".", 1)[-1] for module_name, module in model.named_modules()
                             if isinstance(module, torch.nn.Linear)})
            raise ModelError(f"lora.target_modules {targets} cannot be applied to model {name!r} "
                             f"({config.model_type}): {str(exc).split('. ')[0].strip()}; its linear layers are "
                             f"named {', '.join(linear)}") from None


def check_conversations(cfg: FederationConfig) -> None:
    """causal-lm and preference, for ``fedfm validate``: every tenant's rows become training examples as a run makes
    them (the chat template renders each conversation, a pair's two; without one, each is a prompt/response pair),
    or :class:`~fedfm.errors.DataError` names the tenant, the split and the conversation."""
    if cfg.task == "classification":
        return
    from fedfm.data import load_client_data
    from fedfm.modeling import load_tokenizer
    from fedfm.tasks import encode

    tokenizer = load_tokenizer(cfg)
    for client in cfg.client_names:
        data = load_client_data(cfg, client)
        for split, frame in (("training", data.train), ("evaluation", data.eval)):
            try:
                encode(frame, tokenizer, cfg)
            except DataError as exc:
                raise DataError(f"client {client}'s {split} data: {exc}") from None


def cluster_warnings(cfg: FederationConfig) -> list[str]:
    """What a config meant for a cluster names that will not work there, or not as expected."""
    if cfg.execution.mode != "kubernetes":
        return []
    warnings = []
    if _looks_like_local_model(cfg.model.name_or_path) and "://" not in cfg.model.name_or_path:
        warnings.append(f"model.name_or_path {cfg.model.name_or_path!r} is a local path: the tenants' Jobs load the "
                        "model in their own Pods, where it exists only if their image or a volume holds it there")
    from fedfm.data import _URI, _looks_like_path

    source = cfg.data.source
    if source.startswith("file://") or (not _URI.match(source) and not source.startswith(("builtin:", "hf:"))
                                        and _looks_like_path(source)):
        warnings.append(f"data.source {cfg.data.source!r} is a local path: in kubernetes mode each tenant's data is "
                        "its FederatedClient's spec.data, in its own namespace")
    if not cfg.execution.checkpoint_uri:
        warnings.append("execution.checkpoint_uri is not set: a run that stops cannot be resumed (start_round needs "
                        "the checkpoints)")
    return warnings


# --- the model -----------------------------------------------------------------------------------


def _looks_like_local_model(name: str) -> bool:
    """A local path rather than a hub id (``name`` or ``owner/name``)."""
    if name.startswith(("/", ".", "~")) or name.endswith(("/", os.sep)) or "\\" in name or name.count("/") > 1:
        return True
    try:
        return Path(name).expanduser().exists()  # resolve_model_source prefers an existing directory
    except (OSError, ValueError):
        return True


def _check_model(name: str, local: bool) -> None:
    field = f"model.name_or_path {name!r}"
    if not name.strip():
        raise ModelError(f"{field} is empty: {_MODEL_FIX}")
    if "://" in name:
        raise ModelError(f"{field} is a URI, which FedFM does not load a model from: {_MODEL_FIX} (copy the model "
                         "into a local directory first)")
    if not local or not _looks_like_local_model(name):
        return  # a hub id: loading it is the check (it may need the network)
    path = Path(name).expanduser()
    try:
        if not path.exists():
            raise ModelError(f"{field} does not exist (relative paths are resolved from {os.getcwd()}): {_MODEL_FIX}")
        if not path.is_dir():
            raise ModelError(f"{field} is a file: {_MODEL_FIX}")
        config = path / "config.json"
        if not config.is_file():
            raise ModelError(f"{field} has no config.json: {_MODEL_FIX} (one that save_pretrained wrote)")
        text = config.read_text(encoding="utf-8")
    except (OSError, ValueError) as exc:  # unreadable, or a name the filesystem refuses
        raise ModelError(f"{field} cannot be read ({exc}): {_MODEL_FIX}") from None
    try:
        valid = isinstance(json.loads(text), dict)
    except (ValueError, RecursionError):
        valid = False
    if not valid:
        raise ModelError(f"{field}: its config.json is not a JSON object; write the model again with "
                         "save_pretrained, or give a hub id")


# --- data ----------------------------------------------------------------------------------------


def _data_sources(cfg: FederationConfig) -> list[tuple[str, str]]:
    """(field, source) of every dataset a run reads: ``data.source`` when some client is simulated, and
    the clients' own train/eval data."""
    sources = []
    if any(not client.train for client in cfg.clients):
        sources.append(("data.source", cfg.data.source))
    for index, client in enumerate(cfg.clients):
        for part in ("train", "eval"):
            value = getattr(client, part)
            if value:
                sources.append((f"clients[{index}].{part} (client {client.name!r})", value))
    return sources


def _check_data_source(field: str, source: str, local: bool) -> None:
    from fedfm.data import _URI, SUPPORTED_SUFFIXES, _looks_like_path, _suffix_and_compression

    source = source.strip()
    if not source:
        raise DataError(f"{field} is empty; set it to a file, a Hugging Face dataset id or builtin:topics")
    if source.startswith("builtin:"):
        from fedfm.builtin_data import BUILTINS

        if source.removeprefix("builtin:") not in BUILTINS:
            raise DataError(f"{field} {source!r} is not a built-in dataset; built-ins are: "
                            + ", ".join(f"builtin:{name}" for name in BUILTINS))
        return
    if source.startswith("hf:"):
        return  # a hub dataset: loading it is the check
    if _URI.match(source) and not source.startswith("file://"):
        problem = _scheme_problem(source, local)
        if problem:
            raise DataError(f"{field} {source!r}: {problem}")
        return  # a remote object: reading it is the check (it needs the network)
    if not local:
        return
    path = Path(source.removeprefix("file://")).expanduser()
    try:
        exists, is_file = path.exists(), path.is_file()
    except (OSError, ValueError) as exc:
        raise DataError(f"{field} {source!r} is not a usable path ({exc})") from None
    if exists:
        if is_file:
            suffix, _ = _suffix_and_compression(str(path))
            if suffix not in SUPPORTED_SUFFIXES:
                raise DataError(f"{field} {source!r} has an unsupported type {suffix or '(no suffix)'!r}; "
                                f"supported: {', '.join(SUPPORTED_SUFFIXES)} (optionally compressed, e.g. .csv.gz)")
        return  # a directory is read as a Hugging Face dataset folder
    if source.startswith("file://") or _looks_like_path(source):
        raise DataError(f"{field}: data file {source} does not exist; check the path (relative paths are "
                        f"resolved from {os.getcwd()})")
    # anything else is a Hugging Face dataset id, checked when it is loaded


# --- storage -------------------------------------------------------------------------------------


def _storage_uris(cfg: FederationConfig) -> list[tuple[str, str]]:
    execution = cfg.execution
    uris = [("execution.storage_uri", execution.storage_uri),
            ("execution.client_state_uri", execution.client_state_uri),
            ("execution.checkpoint_uri", getattr(execution, "checkpoint_uri", None))]
    uris += [(f"clients[{index}].state_uri (client {client.name!r})", client.state_uri)
             for index, client in enumerate(cfg.clients)]
    return [(field, uri) for field, uri in uris if uri]


def _scheme_problem(uri: str, local: bool) -> str | None:
    """Why fsspec cannot open ``uri`` here (None: it can, as far as can be told without the network)."""
    import fsspec

    for part in uri.split("::"):  # chained URLs: simplecache::s3://...
        protocol = part.split("://", 1)[0] if "://" in part else part
        if not protocol or protocol == "file":
            continue
        try:
            fsspec.get_filesystem_class(protocol)
        except ValueError:
            from fsspec.registry import known_implementations

            known = ", ".join(sorted(set(known_implementations) & {"s3", "gs", "gcs", "az", "abfs", "memory", "file",
                                                                     "hdfs", "http", "https"}))
            return (f"no fsspec implementation handles scheme {protocol!r} (object stores: {known}); use a local "
                    "path or a URI such as s3://bucket/prefix")
        except ImportError as exc:
            if local:
                package = " (pip install 'kfp-fedfm[object-stores]')" if protocol in ("s3", "s3a", "gs", "gcs") else ""
                return f"scheme {protocol!r} needs a package that is not installed here: {exc}; install it{package}"
    return None


def _check_storage(field: str, uri: str, local: bool) -> None:
    if "://" in uri and not uri.startswith("file://"):
        problem = _scheme_problem(uri, local)
        if problem:
            raise StorageError(f"{field} {uri!r}: {problem}")
        return  # an object store: writing to it is the check (it needs the network)
    if not local:
        return  # a path inside the step's container or a mounted volume
    path = Path(uri.removeprefix("file://")).expanduser().absolute()
    try:
        existing = path
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if existing == path and not path.is_dir():
            raise StorageError(f"{field} {uri!r} is a file; it must name a directory FedFM writes files under")
        if not existing.is_dir():
            raise StorageError(f"{field} {uri!r}: {existing} is a file, so no directory can be made under it; "
                               "choose another location")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise StorageError(f"{field} {uri!r}: {existing} is not writable by this user; choose a directory you "
                               "can write to, or change its permissions")
    except (OSError, ValueError) as exc:  # a name the filesystem refuses (too long, a NUL byte)
        raise StorageError(f"{field} {uri!r} is not a usable path ({exc})") from None
