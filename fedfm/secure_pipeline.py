"""What the pipeline's secure-aggregation steps (``components/secure_aggregation.py``) share.

Each client step of :mod:`fedfm.trust.secure_round` is a pipeline task per client, and a client that fails
one step must not fail the run: like a fine-tune that produced nothing, its output artifact then
exists but is empty, and its metadata says why (``phase``, ``reason``, and ``missing``, the line the
round record keeps). The server steps read those artifacts, go on with the clients that succeeded,
and pass the others' reasons along, so the round's ``missing`` says at which step each client left,
as :func:`fedfm.simulation._secure_round` records it. A client that left at an earlier step is not
asked again: its later tasks are skipped and carry the earlier reason.
"""

from __future__ import annotations

import json
from typing import Any, Iterable

from fedfm import storage
from fedfm.config import FederationConfig
from fedfm.executors import SUCCEEDED, ClientOutcome, Executor, build_executor

SKIPPED = "Skipped"  # a client step not run because the client left the round at an earlier step
RESTORED = "Restored"  # a step of a round before the pipeline's start_round: restored from a checkpoint
# The sum step's list for the reveal loop in a restored round: one no-op item (kfp.local cannot run a loop
# over nothing)
RESTORED_ITEMS = ["(restored from the checkpoint)"]


def restored(client: str, round_index: int, output: str) -> dict[str, Any]:
    """A client step of a round restored from a checkpoint (before ``start_round``): an empty output,
    and metadata that says so, as ``client_finetune``'s does."""
    storage.write_bytes(output, b"")
    return {"client": client, "round": round_index, "phase": RESTORED, "reason": "from the checkpoint"}


def missing_line(step: str, phase: str, reason: str) -> str:
    """The round record's reason for a client that left at ``step``: the fine-tune's as the aggregate
    step writes it, the protocol steps' as ``fedfm simulate`` writes them."""
    if step == "train":
        return f"{phase}: {reason}".rstrip(": ")
    return f"{phase} in secure aggregation {step}: {reason}".rstrip(": ")


def run_client_step(cfg: FederationConfig, run_id: str, client: str, round_index: int, step: str,
                    inputs: dict[str, str], output: str) -> dict[str, Any]:
    """Run ``client``'s protocol ``step`` where its data is (the executor); returns the output artifact's
    metadata. A failed step leaves an empty output: the artifact must exist for the tasks after it."""
    outcome = build_executor(cfg, run_id).secure_step(cfg, client, round_index, step, inputs, output)
    if not outcome.succeeded:
        storage.write_bytes(output, b"", overwrite=True)  # whatever a failed step left there is not its message
    return outcome_metadata(outcome, round_index, step)


def outcome_metadata(outcome: ClientOutcome, round_index: int, step: str) -> dict[str, Any]:
    """What a client step's artifact says about the client: who, which round, and how the step ended."""
    metadata = {"client": outcome.client, "round": round_index, "phase": outcome.phase, "reason": outcome.reason}
    if not outcome.succeeded:
        metadata["missing"] = missing_line(step, outcome.phase, outcome.reason)
    return metadata


def run_if_relayed(cfg: FederationConfig, run_id: str, client: str, round_index: int, step: str, keys: Any,
                   inputs: dict[str, str], output: str) -> dict[str, Any]:
    """``client``'s ``step`` if the relay step's ``keys`` artifact passed its keys on, as in ``fedfm
    simulate`` where only those clients go on; otherwise an empty output that says why it left."""
    why = left_earlier(client, keys.path, keys.metadata.get("missing") or {})
    if why is not None:
        return skipped(client, round_index, step, why, output)
    return run_client_step(cfg, run_id, client, round_index, step, inputs, output)


def left_earlier(client: str, keys_path: str, missing: dict[str, str]) -> str | None:
    """Why ``client`` is no longer in the round, judged by the keys a relay step passed on (at
    ``keys_path``) with the reasons that came along (``missing``); None while it is in."""
    if client in relayed_clients(keys_path):
        return None
    return missing.get(client) or f"{SKIPPED}: its keys were not relayed"


def skipped(client: str, round_index: int, step: str, why: str, output: str) -> dict[str, Any]:
    """Write the empty output of a step ``client`` is not asked to do, and return the metadata that
    passes on why it left."""
    storage.write_bytes(output, b"")
    return {"client": client, "round": round_index, "phase": SKIPPED,
            "reason": f"not asked to {step}: it left the round earlier", "missing": why}


def relayed_clients(keys_path: str) -> set[str]:
    """The clients whose public keys a relay step passed on (U1 or U2)."""
    return set(json.loads(storage.read_bytes(keys_path))["public"])


def split(artifacts: Iterable[Any], step: str) -> tuple[dict[str, str], dict[str, str]]:
    """The client artifacts of one step: the succeeded ones' paths by client, and the others' reasons.

    The client's name comes from the metadata, so even an unreadable file is named."""
    succeeded, missing = {}, {}
    for artifact in artifacts:
        client = artifact.metadata.get("client", artifact.uri)
        phase = artifact.metadata.get("phase", SUCCEEDED)
        if phase == SUCCEEDED:
            succeeded[client] = artifact.path
        else:
            missing[client] = artifact.metadata.get("missing") or missing_line(
                step, phase, artifact.metadata.get("reason", ""))
    return succeeded, missing


def evaluate_round(cfg: FederationConfig, executor: Executor, round_index: int, adapter_uri: str,
                   state_uri: str | None, scratch: str) -> tuple[dict[str, Any], dict[str, str], str]:
    """A round's evaluation under secure aggregation (the evaluate step's and ``fedfm simulate``'s): the
    round's survivors, as its finish step recorded them in the server state at ``state_uri``, each score the
    adapter and send their counts masked among them (client step ``evaluate``, through ``executor``); the
    server reads only the sum. Returns the figures (:func:`fedfm.evaluation.summarize`'s shape, with no
    client's), the survivors that gave no answer and why, and a note for the round's record.

    Round 0's adapter (before any secure round) is not evaluated: no pairwise keys exist yet to mask its
    counts, and in the clear they would be a tenant's own."""
    from fedfm.adapters import read_meta
    from fedfm.server_state import read_server_state
    from fedfm.tasks import LossSums
    from fedfm.trust import secure_round

    empty = {"global": LossSums().metrics(cfg.task), "clients": {}}
    recorded = read_server_state(cfg, state_uri).secure.get(secure_round.EVALUATION_STATE) if state_uri else None
    if not recorded or recorded.get("round") != round_index:
        return empty, {}, ("not evaluated: under secure aggregation a tenant's counts are read only summed over a "
                           "round's survivors, and this adapter is not a round's")
    files = {}
    for name in ("keys", "survivors", "confirmations"):
        files[name] = f"{scratch}/{name}.json"
        storage.write_bytes(files[name], json.dumps(recorded[name], sort_keys=True).encode(), overwrite=True)
    survivors = sorted(recorded["survivors"])
    requests = {client: ({"global": adapter_uri, **files}, f"{scratch}/{client}.evaluation.json")
                for client in survivors}
    outcomes = executor.secure_steps(cfg, round_index, "evaluate", requests)
    answers = {client: requests[client][1] for client, outcome in outcomes.items() if outcome.succeeded}
    missing = {client: missing_line("evaluate", outcome.phase, outcome.reason)
               for client, outcome in outcomes.items() if not outcome.succeeded}
    total, note = secure_round.sum_evaluations(cfg, round_index, read_meta(adapter_uri).sha256, survivors, answers,
                                               executor.signing_keys(cfg), missing)
    return ({"global": total.metrics(cfg.task), "clients": {}} if total else empty), missing, note


def masked_figures(path: str) -> dict[str, Any]:
    """The training figures a masked update carries in its header (see :func:`fedfm.trust.secure_round.mask`),
    or none when the header cannot be read: they are for display, the sum checks the file itself."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as handle:
            return json.loads((handle.metadata() or {}).get("metrics", "{}"))
    except Exception:  # a damaged file is the sum step's to report
        return {}
