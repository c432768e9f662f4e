"""The federation's state after each round (``FederationState``), checkpointed so a run can resume.

After round ``r`` is aggregated and evaluated, ``{root}/round-{r:04d}/`` receives:

- ``global_adapter.safetensors``: the round's global adapter (with its record in the header);
- ``server_state.safetensors``: the strategy's state (moments, momentum) together with the privacy
  accountant's released rounds (``privacy.`` keys) and the per-client bookkeeping (``checks.`` keys:
  quarantined clients, consecutive failures);
- ``history.json``: every round's record so far (what ``metrics.json`` is made of);
- ``checkpoint.json``, written last: the round, the sha256 and size of each file above, the config the
  run uses and the sampler's state.

Every file is written atomically (:func:`fedfm.storage.write_bytes`: temp file, fsync, link, fsync of
the directory) and never over an existing one, and a round counts as checkpointed only once its
``checkpoint.json`` exists and every file matches its sha256. A process killed at any moment leaves
either the complete checkpoint or none (at worst an unused ``.tmp`` file beside it); finished rounds'
checkpoints are never touched again.

The sampler needs no saved generator: the clients of round ``r`` are drawn by a generator seeded with
``(seed, r)`` (:meth:`fedfm.config.FederationConfig.sampled_clients`; under differential privacy, by the
secret key the server state keeps), and every client seeds its training from ``(seed, client, r)``, so the
state to resume the draws is ``(seed, next round)`` and the server state, which the checkpoint records.
Resuming from round ``r``'s checkpoint therefore gives bit-for-bit the rounds an uninterrupted run would have
computed (differential-privacy noise aside, which comes from
the OS unless ``privacy.noise_seed`` is set).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from typing import Any

from fedfm import events, storage
from fedfm.config import FederationConfig
from fedfm.errors import CheckpointError, StorageError

FORMAT = "fedfm-checkpoint/1"
MANIFEST = "checkpoint.json"
# role → file name in a round's directory
FILES = {"global_adapter": "global_adapter.safetensors", "server_state": "server_state.safetensors",
         "history": "history.json"}


def round_directory(root: str, round_index: int) -> str:
    return f"{root.rstrip('/')}/round-{round_index:04d}"


def checkpoint_root(cfg: FederationConfig, run_id: str = "") -> str | None:
    """Where this run checkpoints: ``execution.checkpoint_uri``; in cluster mode by default a folder of
    the run under ``execution.storage_uri``; None (no checkpoints) for a local run that names none."""
    if cfg.execution.checkpoint_uri:
        return cfg.execution.checkpoint_uri.rstrip("/")
    if cfg.execution.storage_uri:
        return f"{cfg.execution.storage_uri.rstrip('/')}/{cfg.name}/runs/{run_key(run_id)}/checkpoints"
    return None


def run_key(run_id: str) -> str:
    """A short stable name for a run's folders and objects (a KFP run id is long and not a DNS label)."""
    return hashlib.sha256((run_id or "unnamed-run").encode()).hexdigest()[:8]


@dataclass(frozen=True)
class Checkpoint:
    """A complete, verified checkpoint: round ``round``'s files, by role, and its manifest."""

    round: int
    directory: str
    manifest: dict[str, Any]

    def uri(self, role: str) -> str:
        return f"{self.directory}/{FILES[role]}"

    @property
    def config(self) -> FederationConfig:
        return FederationConfig.parse(self.manifest["config"], source=f"the config saved in {self.directory}")


def save(root: str, cfg: FederationConfig, round_index: int, global_adapter: str, server_state: str | None,
         history: str) -> Checkpoint:
    """Checkpoint round ``round_index`` from the files the round left (``server_state`` None or an
    empty file: the strategy has no state yet). Refuses to replace an existing checkpoint's files."""
    with events.step("checkpoint", round=round_index):  # the run's progress shows each checkpoint
        directory = round_directory(root, round_index)
        if storage.exists(f"{directory}/{MANIFEST}"):
            raise CheckpointError(f"round {round_index} is already checkpointed at {directory}; a finished round is "
                                  "never recomputed or replaced: resume after the last checkpointed round, or give "
                                  "the run a new execution.checkpoint_uri")
        sources = {"global_adapter": global_adapter, "server_state": server_state, "history": history}
        files = {}
        for role, source in sources.items():
            data = storage.read_bytes(source) if source else b""
            # overwrite: files without a manifest are a killed checkpoint's leftovers, not a checkpoint
            storage.write_bytes(f"{directory}/{FILES[role]}", data, overwrite=True)
            files[role] = {"name": FILES[role], "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        manifest = {"format": FORMAT, "round": round_index, "federation": cfg.name, "files": files,
                    "sampler": {"seed": cfg.seed, "next_round": round_index + 1}, "config": cfg.as_dict(),
                    "saved_at": time.time()}
        storage.write_bytes(f"{directory}/{MANIFEST}", json.dumps(manifest, indent=1, sort_keys=True).encode())
        return Checkpoint(round_index, directory, manifest)


def load(root: str, round_index: int) -> Checkpoint:
    """Round ``round_index``'s checkpoint, verified: every file present with its recorded sha256."""
    directory = round_directory(root, round_index)
    manifest_uri = f"{directory}/{MANIFEST}"
    try:
        manifest = json.loads(storage.read_bytes(manifest_uri))
    except StorageError:
        raise CheckpointError(f"no checkpoint of round {round_index} at {directory} (no {MANIFEST})") from None
    except ValueError as exc:
        raise CheckpointError(f"checkpoint manifest {manifest_uri} is damaged: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("round") != round_index:
        raise CheckpointError(f"{manifest_uri} is not a FedFM checkpoint of round {round_index}")
    for role, entry in manifest["files"].items():
        uri = f"{directory}/{FILES[role]}"
        try:
            data = storage.read_bytes(uri)
        except StorageError as exc:
            raise CheckpointError(f"checkpoint of round {round_index} is incomplete: {exc}") from None
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise CheckpointError(f"checkpoint file {uri} does not match the sha256 its manifest records: it was "
                                  "changed or damaged after the checkpoint was written")
    return Checkpoint(round_index, directory, manifest)


def latest_round(root: str) -> int | None:
    """The last checkpointed round under ``root`` (None: none yet). Rounds are checkpointed in order,
    so the first round without a manifest ends the search."""
    round_index = None
    while storage.exists(f"{round_directory(root, 0 if round_index is None else round_index + 1)}/{MANIFEST}"):
        round_index = 0 if round_index is None else round_index + 1
    return round_index


def latest(root: str) -> Checkpoint | None:
    """The last checkpoint under ``root``, verified (None: no round was checkpointed)."""
    round_index = latest_round(root)
    return None if round_index is None else load(root, round_index)


def require_start(root: str | None, start_round: int) -> Checkpoint | None:
    """The checkpoint a run starting at ``start_round`` continues from (None: a fresh run from round 0),
    after checking that starting there recomputes no checkpointed round and skips none."""
    if start_round < 1:
        raise CheckpointError(f"start_round must be at least 1, not {start_round}")
    if root is None:
        if start_round > 1:
            raise CheckpointError(f"start_round {start_round} resumes from a checkpoint, but the run has none: set "
                                  "execution.checkpoint_uri to the checkpoints of the run to resume")
        return None
    last = latest_round(root)
    if last is None:
        if start_round > 1:
            raise CheckpointError(f"start_round {start_round} needs round {start_round - 1}'s checkpoint, but "
                                  f"{root} holds none")
        return None
    if start_round != last + 1:
        raise CheckpointError(f"{root} holds rounds 0..{last}: resume with start_round {last + 1} (a run never "
                              "recomputes a checkpointed round nor skips one), or give a new run its own "
                              "execution.checkpoint_uri")
    return load(root, last)
