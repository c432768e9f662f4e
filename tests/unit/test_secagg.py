"""Secure aggregation's core: exact sums through dropouts, masked inputs that look uniform, loud failures."""

from __future__ import annotations

import copy
import json
import random

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from scipy import stats

from fedfm.errors import FedFMError, SecureAggregationError
from fedfm.trust import secagg, signing

CONTEXT = b"federation-a/round-3"
BITS = 20
P_MIN = 1e-3


def wire(message):
    """What a message looks like after a trip through file storage as JSON."""
    return json.loads(json.dumps(message))


def random_ring_vector(seed: int, size: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 2**64, size, dtype=np.uint64)


class Round:
    """One round run in-process, phase by phase, every message passed through JSON, each client with a
    registered signing key."""

    def __init__(self, clients: list[str], threshold: int, context: bytes = CONTEXT):
        self.threshold, self.context = threshold, context
        self.identities = {name: Ed25519PrivateKey.generate() for name in clients}
        self.registry = {name: signing.public_key(key) for name, key in self.identities.items()}
        self.states: dict[str, bytes] = {}
        self.u1: dict[str, dict] = {}
        for name in clients:
            self.states[name], message = secagg.advertise(name, self.identities[name], context)
            self.u1[name] = wire(message)
        self.sent: dict[str, dict[str, str]] = {}
        self.u2: dict[str, dict] = {}

    def share(self, drop: tuple[str, ...] = ()) -> None:
        for name in self.u1:
            if name not in drop:
                self.states[name], ciphertexts = secagg.share_keys(name, self.states[name], self.u1, self.threshold,
                                                                   self.context, self.registry)
                self.sent[name] = wire(ciphertexts)
        self.u2 = {name: self.u1[name] for name in self.sent}
        self.shared = dict(self.states)  # each client's state before it confirmed anything

    def masked(self, inputs: dict[str, np.ndarray], survivors: list[str]) -> np.ndarray:
        acc = None
        for name in survivors:
            masked = secagg.mask(name, self.states[name], self.u2, inputs[name], self.context, self.registry)
            acc = secagg.add_masked(acc, secagg.vector_from_bytes(secagg.vector_to_bytes(masked)))
        return acc

    def inbox(self, name: str) -> dict[str, str]:
        return {sender: ciphertexts[name] for sender, ciphertexts in self.sent.items() if sender != name}

    def confirm(self, survivors: list[str], signers: list[str] | None = None) -> dict[str, str]:
        """The consistency check: ``signers`` (default every survivor) sign ``survivors``."""
        confirmations = {}
        for name in survivors if signers is None else signers:
            self.states[name], confirmations[name] = secagg.confirm(name, self.states[name], self.u2, survivors,
                                                                    self.context, self.identities[name], self.registry)
        return wire(confirmations)

    def reveal(self, name: str, survivors: list[str], confirmations: dict[str, str] | None = None) -> dict[str, dict]:
        confirmations = self.confirm(survivors) if confirmations is None else confirmations
        return wire(secagg.reveal(name, self.states[name], self.u2, self.inbox(name), survivors, confirmations,
                                  self.context, self.registry))

    def unmask(self, masked_sum: np.ndarray, survivors: list[str], responders: list[str]) -> np.ndarray:
        revealed = {name: self.reveal(name, survivors) for name in responders}
        return secagg.unmask(masked_sum, self.u2, survivors, revealed, self.threshold, self.context, self.registry)

    def forgetting(self) -> "Round":
        """The same round with every client back at its state before confirming: what colluding clients that
        ignore their own confirmations can do."""
        other = copy.copy(self)
        other.states = dict(self.shared)
        return other


def run_round(inputs: dict[str, np.ndarray], threshold: int, *, drop_before_shares: tuple[str, ...] = (),
              drop_after_shares: tuple[str, ...] = (), silent: tuple[str, ...] = ()) -> tuple[np.ndarray, list[str]]:
    """The unmasked sum and the survivors, with clients dropping at each point of the protocol."""
    protocol = Round(sorted(inputs), threshold)
    protocol.share(drop=drop_before_shares)
    survivors = [name for name in protocol.u2 if name not in drop_after_shares]
    masked_sum = protocol.masked(inputs, survivors)
    responders = [name for name in survivors if name not in silent]
    return protocol.unmask(masked_sum, survivors, responders), survivors


def plain_sum(inputs: dict[str, np.ndarray], names: list[str]) -> np.ndarray:
    total = np.zeros_like(next(iter(inputs.values())))
    for name in names:
        total += inputs[name]
    return total


@pytest.fixture
def seeded(monkeypatch):
    """Every key, seed, share polynomial and nonce from one seeded generator, so statistical tests are stable."""
    generator = random.Random(20170281)
    monkeypatch.setattr(secagg, "_random_bytes", generator.randbytes)


# --- fixed point ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [8, 20, 24, 40])
def test_decode_of_encode_round_trips_within_precision(bits):
    generator = torch.Generator().manual_seed(bits)
    tensors = {"b.lora_B.weight": torch.randn(8, 4, generator=generator) * 3,
               "a.lora_A.weight": torch.randn(4, 8, generator=generator) / 100,
               "head.bias": torch.tensor([0.0, -1.5, 2.0**-bits, -(2.0**-bits)]),
               "empty": torch.zeros(0, 3)}
    vector, layout = secagg.encode(tensors, bits)

    assert vector.dtype == np.uint64 and vector.size == 32 + 32 + 4
    assert [name for name, _ in layout] == sorted(tensors)
    decoded = secagg.decode(vector, wire(layout), bits)
    for name, tensor in tensors.items():
        assert decoded[name].dtype == torch.float32 and decoded[name].shape == tensor.shape
        assert torch.all((decoded[name] - tensor).abs() <= 2.0**-bits)


def test_negative_values_are_twos_complement():
    vector, _ = secagg.encode({"t": torch.tensor([-1.0, 1.0])}, 4)
    assert vector.tolist() == [2**64 - 16, 16]


@pytest.mark.parametrize("bad, message", [(2.0**42, "magnitude"), (-(2.0**42), "magnitude"),
                                          (float("inf"), "non-finite"), (float("nan"), "non-finite")])
def test_encode_refuses_values_that_do_not_fit(bad, message):
    tensors = {"fine": torch.ones(3), "layer.lora_B.weight": torch.tensor([0.5, bad])}
    with pytest.raises(SecureAggregationError, match=rf"'layer\.lora_B\.weight'.*{message}"):
        secagg.encode(tensors, 20)  # 2^42 · 2^20 = 2^62: the first value that does not fit
    secagg.encode({"t": torch.tensor([2.0**42 - 1.0], dtype=torch.float64)}, 20)  # the largest that does


def test_decode_refuses_a_layout_of_another_size():
    vector, layout = secagg.encode({"t": torch.ones(2, 3)}, BITS)
    with pytest.raises(SecureAggregationError, match="layout describes 6"):
        secagg.decode(vector[:5], layout, BITS)


# --- the protocol ----------------------------------------------------------------------------------------


def test_unmasked_sum_decodes_to_the_plain_float_sum():
    generator = torch.Generator().manual_seed(5)
    shapes = {"q.lora_A.weight": (8, 64), "q.lora_B.weight": (64, 8), "classifier.bias": (3,), "x": (2, 3, 5)}
    clients = {f"tenant-{i}": {name: torch.randn(shape, generator=generator) for name, shape in shapes.items()}
               for i in range(5)}
    inputs, layout = {}, None
    for name, tensors in clients.items():
        inputs[name], layout = secagg.encode(tensors, BITS)

    total, survivors = run_round(inputs, threshold=3)

    assert len(survivors) == 5
    decoded = secagg.decode(total, layout, BITS)
    for tensor_name in shapes:
        expected = sum(tensors[tensor_name].double() for tensors in clients.values())
        error = (decoded[tensor_name].double() - expected).abs()
        assert (error <= 5 * 2.0**-BITS + expected.abs() * 2.0**-23).all()  # fixed point, then float32 rounding


def _uniformity_p_values(vector: np.ndarray) -> tuple[float, list[float], float]:
    """Chi-square p-values: the 256 byte values; 0s against 1s at each of the 64 bit positions; and the
    64 bit positions together (the sum of their statistics, 64 degrees of freedom)."""
    as_bytes = vector.astype("<u8").view(np.uint8)
    byte_p = stats.chisquare(np.bincount(as_bytes, minlength=256)).pvalue
    ones = [int(((vector >> np.uint64(bit)) & np.uint64(1)).sum()) for bit in range(64)]
    bit_tests = [stats.chisquare([vector.size - count, count]) for count in ones]
    joint_p = stats.chi2.sf(sum(test.statistic for test in bit_tests), df=64)
    return float(byte_p), [float(test.pvalue) for test in bit_tests], float(joint_p)


def _structured(size: int) -> np.ndarray:
    values = torch.arange(size, dtype=torch.float32) % 7 - 3  # a few small values: far from uniform
    vector, _ = secagg.encode({"t": values}, BITS)
    return vector


@pytest.mark.parametrize("kind", ["zeros", "structured"])
def test_a_masked_input_alone_is_indistinguishable_from_uniform(seeded, kind):
    size = 1 << 16
    x = np.zeros(size, dtype=np.uint64) if kind == "zeros" else _structured(size)
    protocol = Round(["alice", "bob", "carol"], threshold=2)
    protocol.share()

    for name in protocol.u2:
        masked = secagg.mask(name, protocol.states[name], protocol.u2, x, CONTEXT, protocol.registry)
        byte_p, bit_p, joint_p = _uniformity_p_values(masked)
        assert byte_p > P_MIN, (name, byte_p)
        assert joint_p > P_MIN, (name, joint_p)
        # Bonferroni over the 64 positions: a uniform vector passes all of them with probability 1 − 1e-3
        # (each at 1e-3 would fail one in 16 uniform vectors, and a change of seed would turn the test red).
        assert 64 * min(bit_p) > P_MIN, (name, int(np.argmin(bit_p)), min(bit_p))


def test_the_uniformity_check_sees_an_unmasked_input():
    byte_p, bit_p, joint_p = _uniformity_p_values(_structured(1 << 16))
    assert byte_p < 1e-12 and joint_p < 1e-12 and max(bit_p) < 1e-12


@pytest.mark.parametrize("dropped", [1, 2, 3])
def test_dropouts_after_sharing_leave_the_survivors_sum_exact(dropped):
    names = [f"c{i}" for i in range(7)]
    inputs = {name: random_ring_vector(seed, 1000) for seed, name in enumerate(names)}
    gone = tuple(names[1:1 + 2 * dropped:2])  # spread out, so dropped clients sort before and after survivors

    total, survivors = run_round(inputs, threshold=4, drop_after_shares=gone)

    assert len(survivors) == 7 - dropped
    assert total.dtype == np.uint64
    np.testing.assert_array_equal(total, plain_sum(inputs, survivors))


def test_clients_that_drop_before_sharing_are_not_in_u2():
    names = [f"c{i}" for i in range(7)]
    inputs = {name: random_ring_vector(seed, 500) for seed, name in enumerate(names)}

    total, survivors = run_round(inputs, threshold=4, drop_before_shares=("c0", "c4"), drop_after_shares=("c5",))

    assert survivors == ["c1", "c2", "c3", "c6"]
    np.testing.assert_array_equal(total, plain_sum(inputs, survivors))


def test_survivors_that_do_not_answer_the_reveal_are_not_needed_above_threshold():
    names = [f"c{i}" for i in range(7)]
    inputs = {name: random_ring_vector(seed, 500) for seed, name in enumerate(names)}

    total, survivors = run_round(inputs, threshold=4, drop_after_shares=("c2",), silent=("c0", "c6"))

    np.testing.assert_array_equal(total, plain_sum(inputs, survivors))


def test_too_few_survivors_fails_loudly():
    names = [f"c{i}" for i in range(5)]
    inputs = {name: random_ring_vector(seed, 100) for seed, name in enumerate(names)}
    protocol = Round(names, threshold=4)
    protocol.share()
    survivors = names[:3]
    masked_sum = protocol.masked(inputs, survivors)

    with pytest.raises(SecureAggregationError, match="below the threshold"):
        protocol.reveal("c0", survivors)
    with pytest.raises(SecureAggregationError, match="below threshold.*no aggregate is produced"):
        secagg.unmask(masked_sum, protocol.u2, survivors, {}, 4, CONTEXT, protocol.registry)


def test_too_few_responders_fails_loudly():
    names = [f"c{i}" for i in range(6)]
    inputs = {name: random_ring_vector(seed, 100) for seed, name in enumerate(names)}
    protocol = Round(names, threshold=4)
    protocol.share()
    survivors = names[:5]
    masked_sum = protocol.masked(inputs, survivors)

    result = None
    with pytest.raises(SecureAggregationError, match="below threshold.*no aggregate is produced"):
        result = protocol.unmask(masked_sum, survivors, responders=names[:3])
    assert result is None


def test_too_few_clients_sending_shares_stops_masking():
    protocol = Round(["a", "b", "c", "d"], threshold=3)
    protocol.share(drop=("a", "b"))
    with pytest.raises(SecureAggregationError, match="below the threshold"):
        secagg.mask("c", protocol.states["c"], protocol.u2, np.zeros(4, dtype=np.uint64), CONTEXT, protocol.registry)


@pytest.mark.parametrize("threshold", [1, 5])
def test_share_keys_refuses_a_threshold_below_two_or_above_the_participants(threshold):
    protocol = Round(["a", "b", "c", "d"], threshold=threshold)
    with pytest.raises(SecureAggregationError, match="threshold"):
        protocol.share()


def test_a_tampered_ciphertext_fails_naming_the_sender():
    protocol = Round(["alice", "bob", "carol"], threshold=2)
    protocol.share()
    ciphertext = bytearray.fromhex(protocol.sent["carol"]["alice"])
    ciphertext[40] ^= 1
    protocol.sent["carol"]["alice"] = ciphertext.hex()

    with pytest.raises(SecureAggregationError, match="from 'carol' to 'alice' fails authentication"):
        protocol.reveal("alice", ["alice", "bob", "carol"])
    protocol.reveal("bob", ["alice", "bob", "carol"])  # what carol sent bob is intact


def test_a_ciphertext_from_another_round_fails():
    names = ["alice", "bob", "carol"]
    this_round, other_round = Round(names, 2), Round(names, 2, b"federation-a/round-2")
    this_round.share()
    other_round.share()
    this_round.sent["bob"]["alice"] = other_round.sent["bob"]["alice"]

    with pytest.raises(SecureAggregationError, match="from 'bob' to 'alice' fails authentication"):
        this_round.reveal("alice", names)
    with pytest.raises(SecureAggregationError, match="another round"):
        secagg.mask("alice", other_round.states["alice"], this_round.u2, np.zeros(3, dtype=np.uint64), CONTEXT,
                    this_round.registry)


def test_a_ciphertext_cannot_be_reflected_back_to_its_sender():
    protocol = Round(["alice", "bob", "carol"], threshold=2)
    protocol.share()
    protocol.sent["bob"]["alice"] = protocol.sent["alice"]["bob"]
    with pytest.raises(SecureAggregationError, match="from 'bob' to 'alice'"):
        protocol.reveal("alice", ["alice", "bob", "carol"])


def test_reveal_gives_exactly_one_kind_of_share_per_peer_never_both():
    names = [f"c{i}" for i in range(5)]
    protocol = Round(names, threshold=3)
    protocol.share(drop=("c4",))
    survivors = ["c0", "c2", "c3"]

    revealed = protocol.reveal("c0", survivors)

    assert sorted(revealed) == ["c0", "c1", "c2", "c3"]  # U2: c4 never sent shares, so nothing of it exists
    assert all(list(revealed[name]) == ["b"] for name in survivors)
    assert list(revealed["c1"]) == ["s_sk"]


def test_reveal_refuses_survivors_below_threshold_or_outside_u2():
    protocol = Round([f"c{i}" for i in range(5)], threshold=3)
    protocol.share(drop=("c4",))

    with pytest.raises(SecureAggregationError, match="below the threshold"):
        protocol.reveal("c0", ["c0", "c1"])
    with pytest.raises(SecureAggregationError, match=r"\['c4'\].*sent shares"):
        protocol.reveal("c0", ["c0", "c1", "c4"])  # b of c4 would be asked for a client nobody masked with
    with pytest.raises(SecureAggregationError, match=r"\['mallory'\].*sent shares"):
        protocol.reveal("c0", ["c0", "c1", "mallory"])


def test_reveal_refuses_a_ciphertext_from_a_client_in_neither_set():
    protocol = Round([f"c{i}" for i in range(4)], threshold=3)
    protocol.share(drop=("c3",))
    inbox = protocol.inbox("c0") | {"c3": protocol.sent["c1"]["c0"]}
    survivors = ["c0", "c1", "c2"]
    confirmations = protocol.confirm(survivors)
    with pytest.raises(SecureAggregationError, match="neither"):
        secagg.reveal("c0", protocol.states["c0"], protocol.u2, inbox, survivors, confirmations, CONTEXT,
                      protocol.registry)


def test_unmask_refuses_an_s_sk_share_of_a_survivor():
    names = [f"c{i}" for i in range(4)]
    inputs = {name: random_ring_vector(seed, 50) for seed, name in enumerate(names)}
    protocol = Round(names, threshold=3)
    protocol.share()
    survivors = names[:3]
    masked_sum = protocol.masked(inputs, survivors)
    revealed = {name: protocol.reveal(name, survivors) for name in survivors}
    # c1 ignores its confirmation and, with c0 and c3, confirms a set without c2: the s_sk share of a survivor
    revealed["c1"]["c2"] = protocol.forgetting().reveal("c1", ["c0", "c1", "c3"])["c2"]

    with pytest.raises(SecureAggregationError, match="'c1' revealed.*'c2'"):
        secagg.unmask(masked_sum, protocol.u2, survivors, revealed, 3, CONTEXT, protocol.registry)


@pytest.mark.parametrize("owner, kind", [("c3", "s_sk"), ("c0", "b")])
def test_inconsistent_shares_fail_naming_the_client(owner, kind):
    names = [f"c{i}" for i in range(5)]
    inputs = {name: random_ring_vector(seed, 50) for seed, name in enumerate(names)}
    protocol = Round(names, threshold=3)
    protocol.share()
    survivors = ["c0", "c1", "c2", "c4"]
    masked_sum = protocol.masked(inputs, survivors)
    revealed = {name: protocol.reveal(name, survivors) for name in survivors}
    share = revealed["c1"][owner][kind]
    share["y"] = format(int(share["y"], 16) ^ 1, "x")

    with pytest.raises(SecureAggregationError, match=f"'{owner}'.*inconsistent"):
        secagg.unmask(masked_sum, protocol.u2, survivors, revealed, 3, CONTEXT, protocol.registry)


def test_a_mask_key_not_matching_its_public_key_fails_naming_the_client():
    names = [f"c{i}" for i in range(5)]
    inputs = {name: random_ring_vector(seed, 50) for seed, name in enumerate(names)}
    protocol = Round(names, threshold=3)
    protocol.share()
    survivors = ["c0", "c1", "c2", "c4"]
    masked_sum = protocol.masked(inputs, survivors)
    revealed = {name: protocol.reveal(name, survivors) for name in ["c0", "c1", "c2"]}  # exactly t: no redundancy
    share = revealed["c2"]["c3"]["s_sk"]
    share["y"] = format(int(share["y"], 16) ^ 1 << 8, "x")

    with pytest.raises(SecureAggregationError, match="'c3'.*(advertised public key|inconsistent)"):
        secagg.unmask(masked_sum, protocol.u2, survivors, revealed, 3, CONTEXT, protocol.registry)


def test_a_state_of_another_client_or_a_mixed_up_key_set_is_refused():
    protocol = Round(["alice", "bob"], threshold=2)
    with pytest.raises(SecureAggregationError, match="belongs to 'bob'"):
        secagg.share_keys("alice", protocol.states["bob"], protocol.u1, 2, CONTEXT, protocol.registry)
    swapped = dict(protocol.u1, alice=dict(protocol.u1["bob"], client="alice"))
    with pytest.raises(SecureAggregationError, match="alice does not carry its registered key's signature"):
        secagg.share_keys("alice", protocol.states["alice"], swapped, 2, CONTEXT, protocol.registry)


def test_add_masked_refuses_vectors_of_another_length_or_type():
    acc = secagg.add_masked(None, np.ones(3, dtype=np.uint64))
    with pytest.raises(SecureAggregationError, match="4 elements"):
        secagg.add_masked(acc, np.ones(4, dtype=np.uint64))
    with pytest.raises(SecureAggregationError, match="uint64"):
        secagg.add_masked(acc, np.ones(3, dtype=np.float32))


def test_secure_aggregation_error_is_a_fedfm_error():
    assert issubclass(SecureAggregationError, FedFMError)


def test_a_round_started_again_runs_a_new_protocol_instance_and_keeps_the_first(tmp_path):
    """A resumed round (or a retried advertise Job) advertises fresh keys into a new instance
    (``secagg/round-NNNN/attempt-2``): the first instance's files are never overwritten nor used again,
    and the reveal-once rule holds per instance."""
    from fedfm.config import FederationConfig
    from fedfm.trust import secure_round

    state = tmp_path / "state"
    cfg = FederationConfig.parse({"clients": 3, "secure_aggregation": {"enabled": True},
                                  "execution": {"client_state_uri": str(state)}})
    clients = cfg.client_names

    def run_instance(box):
        for client in clients:
            secure_round.advertise(cfg, client, 1, f"{box}/keys/{client}.json")
        secure_round.relay_keys(cfg, 1, {client: f"{box}/keys/{client}.json" for client in clients}, f"{box}/keys.json",
                                clients, secure_round.local_registry(cfg))
        for client in clients:
            secure_round.share(cfg, client, 1, f"{box}/keys.json", f"{box}/shares/{client}.json")
        shares = {client: f"{box}/shares/{client}.json" for client in clients}
        inboxes = {client: f"{box}/inbox/{client}.json" for client in clients}
        secure_round.relay_shares(f"{box}/keys.json", shares, f"{box}/keys-shared.json", inboxes)
        (box / "survivors.json").write_text(json.dumps(clients))
        for client in clients:
            secure_round.confirm(cfg, client, 1, f"{box}/keys-shared.json", str(box / "survivors.json"),
                                 f"{box}/confirm/{client}.json")
        secure_round.relay_confirmations(cfg, 1, f"{box}/keys-shared.json", str(box / "survivors.json"),
                                         {client: f"{box}/confirm/{client}.json" for client in clients},
                                         f"{box}/confirmations.json", secure_round.local_registry(cfg), {})
        secure_round.reveal(cfg, clients[0], 1, f"{box}/keys-shared.json", f"{box}/inbox/{clients[0]}.json",
                            str(box / "survivors.json"), f"{box}/confirmations.json", f"{box}/reveal.json")

    first = tmp_path / "first"
    run_instance(first)
    with pytest.raises(SecureAggregationError, match="already revealed its shares for round 1"):
        secure_round.reveal(cfg, clients[0], 1, f"{first}/keys-shared.json", f"{first}/inbox/{clients[0]}.json",
                            str(first / "survivors.json"), f"{first}/confirmations.json", f"{first}/again.json")
    kept = {path: path.read_bytes() for path in sorted(state.rglob("*")) if path.is_file()}

    second = tmp_path / "second"
    run_instance(second)  # fresh keys, and a reveal again: a new instance
    assert {path: path.read_bytes() for path in kept} == kept  # the first instance's files are untouched
    folder = state / clients[0] / "secagg" / "round-0001"
    assert sorted(path.name for path in (folder / "attempt-2").iterdir()) == ["confirmed.json", "keys.json", "revealed",
                                                                              "shared.json"]
    advertised = [json.loads((box / "keys" / f"{clients[0]}.json").read_text()) for box in (first, second)]
    assert advertised[0] != advertised[1]
    assert secure_round.private_update_uri(cfg, clients[0], 1) == f"{folder}/attempt-2/update.safetensors"


# --- an active server, a forging tenant (the paper's section 6) --------------------------------------------


def test_a_server_that_substitutes_a_peers_keys_is_caught_and_the_peer_named():
    """The server hands alice its own key pairs in bob's name: with them it could decrypt what alice sends
    bob and recompute their pairwise mask, and so unmask alice's input. Bob's registered key did not sign
    them, so alice shares nothing."""
    protocol = Round(["alice", "bob", "carol"], threshold=2)
    server_state, server_message = secagg.advertise("bob", Ed25519PrivateKey.generate(), CONTEXT)
    substituted = dict(protocol.u1, bob=wire(server_message))

    with pytest.raises(SecureAggregationError, match="advertised keys of client bob does not carry its registered"):
        secagg.share_keys("alice", protocol.states["alice"], substituted, 2, CONTEXT, protocol.registry)
    # the genuine advertisement, and one replayed from another round, are told apart too
    secagg.share_keys("alice", protocol.states["alice"], protocol.u1, 2, CONTEXT, protocol.registry)
    other_round = {name: wire(secagg.advertise(name, protocol.identities[name], b"federation-a/round-2")[1])
                   for name in protocol.u1}
    with pytest.raises(SecureAggregationError, match="of client (alice|bob|carol) does not carry"):
        secagg.share_keys("alice", protocol.states["alice"], dict(protocol.u1, bob=other_round["bob"]), 2, CONTEXT,
                          protocol.registry)


def test_a_server_that_tells_clients_different_survivor_sets_gets_no_reveal():
    """The server claims to some clients that c2 survived (to collect shares of its self-mask seed) and to
    others that it dropped (to collect shares of its mask key): both kinds would unmask c2's input. With the
    threshold above half the clients, no survivor set it tells gathers the confirmations a reveal needs."""
    names = [f"c{i}" for i in range(5)]
    protocol = Round(names, threshold=3)
    protocol.share()
    everyone, without_c2 = names, [name for name in names if name != "c2"]
    told_all = protocol.confirm(everyone, signers=["c0", "c1", "c2"])
    told_dropped = protocol.confirm(without_c2, signers=["c3", "c4"])

    with pytest.raises(SecureAggregationError, match="only 2 survivors confirmed"):
        protocol.reveal("c3", without_c2, told_dropped)
    # c0's confirmation is of the other set: reused for this one it does not verify, naming c0
    with pytest.raises(SecureAggregationError, match="confirmation of the survivors of client c0 does not carry"):
        protocol.reveal("c3", without_c2, {**told_dropped, "c0": told_all["c0"]})
    # and a client asked to confirm a second set refuses
    with pytest.raises(SecureAggregationError, match="c0' already confirmed the survivors"):
        protocol.confirm(without_c2, signers=["c0"])
    # the honest round still works: three confirmations of the set c0, c1, c2 were told
    assert sorted(protocol.reveal("c0", everyone, told_all)) == names


def test_keygen_writes_the_private_half_into_the_tenants_state_and_prints_the_public_half(tmp_path):
    from typer.testing import CliRunner

    from fedfm.cli import app
    from fedfm.errors import StorageError

    state = tmp_path / "tenant-a-state"
    result = CliRunner().invoke(app, ["keygen", "--client", "a", "--state", str(state)])
    assert result.exit_code == 0, result.output
    public = result.output.split("signingKey:")[1].split()[0]
    assert signing.valid_public_key(public)
    assert signing.public_key(signing.load_identity("a", str(state))) == public
    # the key is the tenant's: another client's name on it, or a second keygen over it, is refused
    with pytest.raises(SecureAggregationError, match="not a fedfm-identity/1 identity of client b"):
        signing.load_identity("b", str(state))
    again = CliRunner().invoke(app, ["keygen", "--client", "a", "--state", str(state)])
    assert again.exit_code != 0 and isinstance(again.exception, StorageError)
    assert signing.public_key(signing.load_identity("a", str(state))) == public
    # a tenant in a cluster that has none is told how to make one (never one made for it)
    with pytest.raises(SecureAggregationError, match="fedfm keygen --client c --state"):
        signing.load_identity("c", str(tmp_path / "empty"))


def test_a_client_refuses_to_share_under_a_threshold_that_is_not_a_majority():
    """With t at most half the clients, the server could tell two disjoint halves different survivor sets and
    still gather t confirmations of each: the consistency check needs 2t above the clients that shared."""
    from fedfm.config import FederationConfig

    protocol = Round([f"c{i}" for i in range(4)], threshold=2)
    with pytest.raises(SecureAggregationError, match="threshold of 2 among 4 clients is not a majority"):
        protocol.share()
    cfg = FederationConfig.parse({"clients": 5, "secure_aggregation": {"enabled": True, "threshold": 2}})
    assert [cfg.secagg_threshold(n) for n in (3, 4, 5)] == [2, 3, 3]


# --- evaluation counts under the survivors' masks (issue 17, finding 7) -------------------------------------


def test_masked_evaluations_add_up_to_the_survivors_counts_and_no_fewer_reveal_anything():
    names = ["c0", "c1", "c2", "c3"]
    protocol = Round(names, threshold=3)
    protocol.share()
    survivors = ["c0", "c1", "c3"]  # c2 dropped after sharing
    confirmations = protocol.confirm(survivors)
    counts = {name: secagg.encode({"e": torch.tensor([12.5 + i, 40.0, 31.0 - i, 40.0])}, BITS)[0]
              for i, name in enumerate(names)}
    masked = {name: secagg.mask_evaluation(name, protocol.states[name], protocol.u2, survivors, confirmations,
                                           counts[name], CONTEXT, protocol.registry) for name in survivors}
    total = None
    for name in survivors:
        total = secagg.add_masked(total, masked[name])
    np.testing.assert_array_equal(total, plain_sum(counts, survivors))
    assert secagg.decode(total, [("e", (4,))], BITS)["e"].tolist() == [41.5, 120.0, 89.0, 120.0]
    # any fewer answers: the masks of the missing survivor remain, and nothing decodes to a count
    partial = secagg.add_masked(secagg.add_masked(None, masked["c0"]), masked["c1"])
    assert not np.array_equal(partial, plain_sum(counts, ["c0", "c1"]))
    assert (np.abs(masked["c0"].view(np.int64)) > 2**40).all()


def test_a_server_cannot_shrink_the_evaluation_to_colluders():
    """Masked among the survivor set the client confirmed, with the threshold of confirmations: a server that
    names a smaller set (the victim and a colluder, whose shared mask then unmasks the victim) is refused."""
    names = [f"c{i}" for i in range(5)]
    protocol = Round(names, threshold=3)
    protocol.share()
    confirmations = protocol.confirm(names)
    vector = secagg.encode({"e": torch.tensor([1.0, 2.0, 3.0, 4.0])}, BITS)[0]
    with pytest.raises(SecureAggregationError, match="evaluates only for the survivor set it confirmed"):
        secagg.mask_evaluation("c0", protocol.states["c0"], protocol.u2, ["c0", "c1", "c2"],
                               {name: confirmations[name] for name in ("c0", "c1", "c2")}, vector, CONTEXT,
                               protocol.registry)
    with pytest.raises(SecureAggregationError, match="only 2 survivors confirmed"):
        secagg.mask_evaluation("c0", protocol.states["c0"], protocol.u2, names,
                               {name: confirmations[name] for name in ("c1", "c2")}, vector, CONTEXT,
                               protocol.registry)
