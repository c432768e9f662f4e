"""A round under secure aggregation (``secure_aggregation.enabled``): the protocol of
:mod:`fedfm.trust.secure_round` as pipeline steps, in the order ``fedfm simulate`` runs them.

Client steps (one task per client, run where its data is through the executor): advertise, share,
fine-tune and mask, confirm the survivors, reveal. Server steps: relay the keys, relay the shares, sum the
masked updates, relay the confirmations, unmask and aggregate; each verifies the clients' signatures with
the keys the executor names (``Executor.signing_keys``). A client that fails a step leaves the round
without failing the run (its artifact is empty and says why, :mod:`fedfm.secure_pipeline`); the protocol's
threshold and the quorum decide whether the round aggregates.
"""

from typing import List

from kfp.dsl import Artifact, Input, Model, Output


def secagg_advertise(config: dict, client: str, round_index: int, start_round: int, run_id: str,
                     public_keys: Output[Artifact]):
    """The client's fresh key pairs for this round; only the public keys come out. (Every step here
    does nothing in a round before ``start_round``, which was restored from a checkpoint.)"""
    from fedfm import events
    from fedfm.executors import SUCCEEDED
    from fedfm.federation import step_config
    from fedfm.secure_pipeline import restored, run_client_step

    if round_index < start_round:
        public_keys.metadata.update(restored(client, round_index, public_keys.path))
        return
    with events.step("secagg_advertise", client=client, round=round_index) as figures:
        cfg = step_config(config)
        metadata = run_client_step(cfg, run_id, client, round_index, "advertise", {}, public_keys.path)
        if metadata["phase"] != SUCCEEDED:
            figures.update(phase=metadata["phase"], reason=metadata["reason"])
    public_keys.metadata.update(metadata)


def secagg_relay_keys(config: dict, round_index: int, start_round: int, run_id: str, clients: list,
                      public_keys: Input[List[Artifact]], keys: Output[Artifact]):
    """Collect the advertised keys (U1) into the file every client reads next; below the protocol's
    threshold (of the ``clients`` the select step drew) the round ends here."""
    from fedfm import events, storage
    from fedfm.errors import QuorumError
    from fedfm.executors import build_executor
    from fedfm.federation import step_config
    from fedfm.secure_pipeline import split
    from fedfm.trust import secure_round

    if round_index < start_round:
        storage.write_bytes(keys.path, b"")
        keys.metadata.update(round=round_index, clients=[], missing={})
        return
    with events.step("secagg_relay_keys", round=round_index) as figures:
        cfg = step_config(config)
        published, missing = split(public_keys, "advertise")
        executor = build_executor(cfg, run_id)
        try:
            advertised = secure_round.relay_keys(cfg, round_index, published, keys.path, clients,
                                                 executor.signing_keys(cfg), rejected=missing)
        except QuorumError as exc:
            executor.round_failed(cfg, round_index, str(exc))
            raise
        figures.update(clients=len(advertised), missing=len(missing))
    keys.metadata.update(round=round_index, clients=advertised, missing=missing)


def secagg_share(config: dict, client: str, round_index: int, start_round: int, run_id: str, keys: Input[Artifact],
                 shares: Output[Artifact]):
    """The client's encrypted shares of its seeds, one per peer in U1 (skipped if it is not in U1)."""
    from fedfm import events
    from fedfm.executors import SUCCEEDED
    from fedfm.federation import step_config
    from fedfm.secure_pipeline import restored, run_if_relayed

    if round_index < start_round:
        shares.metadata.update(restored(client, round_index, shares.path))
        return
    with events.step("secagg_share", client=client, round=round_index) as figures:
        cfg = step_config(config)
        metadata = run_if_relayed(cfg, run_id, client, round_index, "share", keys, {"keys": keys.path}, shares.path)
        if metadata["phase"] != SUCCEEDED:
            figures.update(phase=metadata["phase"], reason=metadata["reason"])
    shares.metadata.update(metadata)


def secagg_relay_shares(config: dict, round_index: int, start_round: int, keys: Input[Artifact],
                        shares: Input[List[Artifact]], keys_shared: Output[Artifact], inboxes: Output[Artifact]):
    """Pass each client that shared its inbox of ciphertexts (``inboxes/<client>.json``) and write the
    keys of the clients that shared (U2)."""
    import os

    from fedfm import events, storage
    from fedfm.secure_pipeline import split
    from fedfm.trust import secure_round

    if round_index < start_round:
        os.makedirs(inboxes.path, exist_ok=True)
        storage.write_bytes(keys_shared.path, b"")
        keys_shared.metadata.update(round=round_index, clients=[], missing={})
        return
    with events.step("secagg_relay_shares", round=round_index) as figures:
        sent, missing = split(shares, "share")
        os.makedirs(inboxes.path, exist_ok=True)  # the artifact is a directory, even when nobody shared
        shared = secure_round.relay_shares(keys.path, sent, keys_shared.path,
                                           {client: f"{inboxes.path}/{client}.json" for client in sent})
        figures.update(clients=len(shared), missing=len(missing))
    keys_shared.metadata.update(round=round_index, clients=shared,
                                missing={**(keys.metadata.get("missing") or {}), **missing})


def secagg_finetune(
    config: dict,
    client: str,
    round_index: int,
    start_round: int,
    run_id: str,
    global_adapter: Input[Model],
    keys_shared: Input[Artifact],
    server_state: Input[Artifact],
    update: Output[Model],
):
    """Fine-tune ``client`` and output its update masked (under privacy, clipped and noised first, with
    the clip norm from ``server_state``): the plain update stays in the client's own state location.
    Like ``client_finetune``, a client that produced nothing is not a failed step."""
    from fedfm import events
    from fedfm.executors import SUCCEEDED
    from fedfm.federation import step_config
    from fedfm.secure_pipeline import masked_figures, restored, run_if_relayed
    from fedfm.trust import secure_round

    if round_index < start_round:
        update.metadata.update(restored(client, round_index, update.path))
        return
    with events.step("client_finetune", client=client, round=round_index) as figures:
        cfg = step_config(config)
        # under privacy, how the client clips and noises its update: the server's to say, it knows the federation
        noise = secure_round.train_inputs(cfg, keys_shared.path, server_state.path)
        inputs = {"global": global_adapter.path, "keys": keys_shared.path,
                  **{name: str(value) for name, value in noise.items()}}
        metadata = run_if_relayed(cfg, run_id, client, round_index, "train", keys_shared, inputs, update.path)
        if metadata["phase"] == SUCCEEDED:
            # the header shows only timings: the client's sample count and loss travel masked
            figures.update({name: value for name, value in masked_figures(update.path).items() if name == "seconds"})
        else:
            figures.update(phase=metadata["phase"], reason=metadata["reason"])
    update.metadata.update(metadata)


def secagg_sum(
    config: dict,
    round_index: int,
    start_round: int,
    run_id: str,
    global_adapter: Input[Model],
    updates: Input[List[Model]],
    keys_shared: Input[Artifact],
    survivors: Output[Artifact],
    masked_sum: Output[Artifact],
    figures: Output[Artifact],
) -> list:
    """Add the masked updates that arrived and announce who survived (U3): the items of the confirm
    loop. ``figures`` keeps the survivors' training figures and the other clients' reasons for the
    finish step."""
    import json

    from fedfm import events, storage
    from fedfm.errors import QuorumError, SecureAggregationError
    from fedfm.executors import build_executor
    from fedfm.federation import step_config
    from fedfm.secure_pipeline import RESTORED_ITEMS, split
    from fedfm.trust import secure_round

    if round_index < start_round:
        for output in (survivors, masked_sum, figures):
            storage.write_bytes(output.path, b"")
        return list(RESTORED_ITEMS)
    with events.step("secagg_sum", round=round_index) as shown:
        cfg = step_config(config)
        masked, missing = split(updates, "train")
        executor = build_executor(cfg, run_id)
        try:
            clients = secure_round.sum_masked(cfg, round_index, global_adapter.path, masked, keys_shared.path,
                                              survivors.path, masked_sum.path, executor.signing_keys(cfg),
                                              rejected=missing)
        except (QuorumError, SecureAggregationError) as exc:
            executor.round_failed(cfg, round_index, str(exc))
            raise
        storage.write_bytes(figures.path, json.dumps({"clients": clients, "missing": missing}, sort_keys=True).encode())
        shown.update(clients=len(clients), missing=len(missing))
    survivors.metadata.update(round=round_index, clients=sorted(clients))
    return sorted(clients)


def secagg_confirm(config: dict, client: str, round_index: int, start_round: int, run_id: str,
                   keys_shared: Input[Artifact], survivors: Input[Artifact], confirmation: Output[Artifact]):
    """The survivor ``client``'s signature over the survivor set (the consistency check)."""
    from fedfm import events
    from fedfm.executors import SUCCEEDED
    from fedfm.federation import step_config
    from fedfm.secure_pipeline import restored, run_client_step

    if round_index < start_round:
        confirmation.metadata.update(restored(client, round_index, confirmation.path))
        return
    with events.step("secagg_confirm", client=client, round=round_index) as figures:
        cfg = step_config(config)
        inputs = {"keys": keys_shared.path, "survivors": survivors.path}
        metadata = run_client_step(cfg, run_id, client, round_index, "confirm", inputs, confirmation.path)
        if metadata["phase"] != SUCCEEDED:
            figures.update(phase=metadata["phase"], reason=metadata["reason"])
    confirmation.metadata.update(metadata)


def secagg_relay_confirmations(config: dict, round_index: int, start_round: int, run_id: str,
                               keys_shared: Input[Artifact], survivors: Input[Artifact],
                               confirmed: Input[List[Artifact]], confirmations: Output[Artifact]) -> list:
    """Collect the survivors' signed confirmations into the file each checks before it reveals: the items of
    the reveal loop (the clients that confirmed). The other survivors' reasons stay in the metadata."""
    from fedfm import events, storage
    from fedfm.errors import QuorumError
    from fedfm.executors import build_executor
    from fedfm.federation import step_config
    from fedfm.secure_pipeline import RESTORED_ITEMS, split
    from fedfm.trust import secure_round

    if round_index < start_round:
        storage.write_bytes(confirmations.path, b"")
        return list(RESTORED_ITEMS)
    with events.step("secagg_relay_confirmations", round=round_index) as figures:
        cfg = step_config(config)
        signed, missing = split(confirmed, "confirm")
        executor = build_executor(cfg, run_id)
        try:
            confirmers = secure_round.relay_confirmations(cfg, round_index, keys_shared.path, survivors.path, signed,
                                                          confirmations.path, executor.signing_keys(cfg), missing)
        except QuorumError as exc:
            executor.round_failed(cfg, round_index, str(exc))
            raise
        figures.update(clients=len(confirmers), missing=len(missing))
    confirmations.metadata.update(round=round_index, clients=confirmers, missing=missing)
    return confirmers


def secagg_reveal(config: dict, client: str, round_index: int, start_round: int, run_id: str,
                  keys_shared: Input[Artifact], inboxes: Input[Artifact], survivors: Input[Artifact],
                  confirmations: Input[Artifact], reveal: Output[Artifact]):
    """The survivor ``client``'s shares that let the server remove the masks (asked once per round)."""
    from fedfm import events
    from fedfm.executors import SUCCEEDED
    from fedfm.federation import step_config
    from fedfm.secure_pipeline import restored, run_client_step

    if round_index < start_round:
        reveal.metadata.update(restored(client, round_index, reveal.path))
        return
    with events.step("secagg_reveal", client=client, round=round_index) as figures:
        cfg = step_config(config)
        inputs = {"keys": keys_shared.path, "inbox": f"{inboxes.path}/{client}.json", "survivors": survivors.path,
                  "confirmations": confirmations.path}
        metadata = run_client_step(cfg, run_id, client, round_index, "reveal", inputs, reveal.path)
        if metadata["phase"] != SUCCEEDED:
            figures.update(phase=metadata["phase"], reason=metadata["reason"])
    reveal.metadata.update(metadata)


def secagg_finish(
    config: dict,
    round_index: int,
    start_round: int,
    run_id: str,
    global_adapter: Input[Model],
    keys_shared: Input[Artifact],
    survivors: Input[Artifact],
    masked_sum: Input[Artifact],
    figures: Input[Artifact],
    confirmations: Input[Artifact],
    reveals: Input[List[Artifact]],
    server_state: Input[Artifact],
    new_global_adapter: Output[Model],
    new_server_state: Output[Artifact],
):
    """Unmask the sum with the revealed shares and run the strategy on the round's mean update: the
    round's aggregate step (same record, same server state chain, same report to the executor). A round
    before ``start_round`` passes on the checkpoint's adapter and state that init restored."""
    import json

    from fedfm import events, storage
    from fedfm.errors import QuorumError, SecureAggregationError
    from fedfm.executors import build_executor
    from fedfm.federation import step_config
    from fedfm.secure_pipeline import split
    from fedfm.trust import secure_round

    if round_index < start_round:
        for source, target in ((global_adapter, new_global_adapter), (server_state, new_server_state)):
            storage.write_bytes(target.path, storage.read_bytes(source.path))
        new_global_adapter.metadata.update(global_adapter.metadata)
        return
    with events.step("aggregate", round=round_index) as shown:
        cfg = step_config(config)
        executor = build_executor(cfg, run_id)
        reported = json.loads(storage.read_bytes(figures.path))
        revealed, unrevealed = split(reveals, "reveal")
        # as fedfm simulate records a confirmation or a reveal that failed
        missing = {**reported["missing"], **(confirmations.metadata.get("missing") or {}), **unrevealed}
        try:
            meta = secure_round.finish(cfg, round_index, global_adapter.path, keys_shared.path, survivors.path,
                                       masked_sum.path, revealed, reported["clients"], new_global_adapter.path,
                                       executor.signing_keys(cfg), missing, state_in=server_state.path,
                                       state_out=new_server_state.path, confirmations_uri=confirmations.path)
        except (QuorumError, SecureAggregationError) as exc:
            executor.round_failed(cfg, round_index, str(exc))
            raise
        executor.round_aggregated(cfg, meta, new_global_adapter.path)
        shown.update(clients=len(reported["clients"]), missing=len(missing), samples=meta.samples,
                     round_seconds=meta.metrics.get("round_seconds"))
    new_global_adapter.metadata.update(round=round_index, samples=meta.samples, sha256=meta.sha256,
                                       clients=sorted(meta.metrics["clients"]), missing=missing)
