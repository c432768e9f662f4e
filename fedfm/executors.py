"""Where a client's work runs: in this process (``local``) or as a Job in the tenant's namespace.

A pipeline step asks its executor to fine-tune or evaluate on a client's data and gets back an
outcome; it never touches the data itself. :class:`LocalExecutor` trains right here (``fedfm run``
and the tests). The Kubernetes executor (``fedfm.operators.executor``) creates a ``ClientRound`` in
the tenant's namespace and waits for the operator to report it.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass

from fedfm.adapters import AdapterMeta
from fedfm.config import FederationConfig
from fedfm.tasks import LossSums

# The phases a client's work can end in: a ClientRound's final phases in cluster mode (operators/api.py takes them
# from here), a local outcome's otherwise.
SUCCEEDED, FAILED, TIMED_OUT = "Succeeded", "Failed", "TimedOut"


@dataclass
class ClientOutcome:
    """What became of one client's fine-tune. ``phase`` is a ClientRound phase; anything but
    ``Succeeded`` means no update, and ``reason`` says why."""

    client: str
    phase: str = SUCCEEDED
    reason: str = ""

    @property
    def succeeded(self) -> bool:
        return self.phase == SUCCEEDED


class Executor(ABC):
    """Runs clients' work for a pipeline step."""

    @abstractmethod
    def train(self, cfg: FederationConfig, client: str, round_index: int, global_uri: str,
              update_out: str) -> ClientOutcome:
        """Fine-tune ``client`` from the adapter at ``global_uri``; on success its update is at ``update_out``."""

    @abstractmethod
    def evaluate(self, cfg: FederationConfig, round_index: int, adapter_uri: str,
                 clients: list[str]) -> tuple[dict[str, LossSums], dict[str, str]]:
        """Each client's evaluation counts for the adapter, and the clients that gave none, with why."""

    @abstractmethod
    def secure_step(self, cfg: FederationConfig, client: str, round_index: int, phase: str, inputs: dict[str, str],
                    output: str) -> ClientOutcome:
        """One of ``client``'s secure-aggregation steps (:func:`fedfm.trust.secure_round.client_step`), its inputs
        by URI; on success its message is at ``output``."""

    def secure_steps(self, cfg: FederationConfig, round_index: int, phase: str,
                     requests: dict[str, tuple[dict[str, str], str]]) -> dict[str, ClientOutcome]:
        """Several clients' step ``phase`` (``client: (inputs, output)``), each client's failure its own; the
        cluster runs them at once."""
        outcomes = {}
        for client, (inputs, output) in sorted(requests.items()):
            try:
                outcomes[client] = self.secure_step(cfg, client, round_index, phase, inputs, output)
            except Exception as exc:  # the client's step failed, not the round
                outcomes[client] = ClientOutcome(client, FAILED, f"{type(exc).__name__}: {exc}")
        return outcomes

    @abstractmethod
    def signing_keys(self, cfg: FederationConfig) -> dict[str, str]:
        """The clients' registered public signing keys (client → hex), which the server steps verify every
        secure-aggregation message with (:mod:`fedfm.trust.signing`)."""

    def round_aggregated(self, cfg: FederationConfig, meta: AdapterMeta, adapter_uri: str) -> None:
        """Told after a round's new global adapter is written (the cluster publishes it)."""

    def round_evaluated(self, cfg: FederationConfig, round_index: int, global_metrics: dict[str, float]) -> None:
        """Told the global evaluation of a round's adapter (the cluster records it on the Federation)."""

    def round_failed(self, cfg: FederationConfig, round_index: int, message: str) -> None:
        """Told when a round cannot aggregate (the cluster records it on the Federation)."""

    def round_checkpointed(self, cfg: FederationConfig, round_index: int, directory: str) -> None:
        """Told where round ``round_index``'s checkpoint is (the cluster records it on the Federation, for
        a resumed run's ``execution.checkpoint_uri`` and ``start_round``)."""


def late(cfg: FederationConfig, seconds: float) -> str | None:
    """Why a fine-tune that took ``seconds`` missed ``policy.round_deadline_seconds`` (None: in time)."""
    deadline = cfg.policy.round_deadline_seconds
    if deadline is None or seconds <= deadline:
        return None
    return f"the fine-tune took {seconds:.1f} s, past the round's deadline of {deadline:g} s " \
           "(policy.round_deadline_seconds): its update is not used"


class DeadlineReached(BaseException):
    """Raised into a local fine-tune when ``policy.round_deadline_seconds`` runs out. A BaseException, as
    KeyboardInterrupt is, so that no ``except Exception`` on the way turns it into an ordinary failure."""


@contextlib.contextmanager
def deadline(seconds: float | None) -> Iterator[None]:
    """Interrupt the code in this block with :class:`DeadlineReached` after ``seconds`` (None: never).

    A SIGALRM timer, so only in the main thread (where a step's and ``fedfm simulate``'s clients run);
    elsewhere the block runs to its end and :func:`late` judges it afterwards. Python code is interrupted
    between bytecodes, a torch op once it returns, a wait (a sleep, a subprocess's output) at once.
    """
    if seconds is None or threading.current_thread() is not threading.main_thread():
        yield
        return

    def reached(signum, frame):
        raise DeadlineReached(seconds)

    previous = signal.signal(signal.SIGALRM, reached)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def train_here(cfg: FederationConfig, client: str, round_index: int, global_uri: str, update_out: str,
               **options) -> ClientOutcome:
    """Fine-tune ``client`` in this process, as a Job would in its namespace: an error is the client's
    own (the round goes on without it, quorum permitting), and a fine-tune still running at the round's
    deadline is stopped there (:func:`deadline`) and counts as missing, as a Job past its deadline does.
    An update written after the deadline (off the main thread) is not used."""
    import traceback

    from fedfm.training import train_client

    started = time.time()
    limit = cfg.policy.round_deadline_seconds
    try:
        with deadline(limit):
            train_client(cfg, client, round_index, global_uri, update_out, **options)
    except DeadlineReached:
        return ClientOutcome(client, TIMED_OUT, f"the fine-tune was stopped at the round's deadline of {limit:g} s "
                                                "(policy.round_deadline_seconds)")
    except Exception as exc:  # a client's crash is its own, as a failed Job is
        print(f"client {client}, round {round_index} failed:", file=sys.stderr)
        traceback.print_exc()
        return ClientOutcome(client, FAILED, f"{type(exc).__name__}: {exc}")
    reason = late(cfg, time.time() - started)
    return ClientOutcome(client, TIMED_OUT, reason) if reason else ClientOutcome(client)


class LocalExecutor(Executor):
    """Clients' work in this process, on data this process can read (simulation and tests)."""

    def train(self, cfg, client, round_index, global_uri, update_out):
        return train_here(cfg, client, round_index, global_uri, update_out)

    def evaluate(self, cfg, round_index, adapter_uri, clients):
        from fedfm.evaluation import evaluate_clients

        return evaluate_clients(cfg, adapter_uri, clients), {}

    def secure_step(self, cfg, client, round_index, phase, inputs, output):
        from fedfm.trust.secure_round import client_step

        client_step(cfg, client, round_index, phase, inputs, output)
        return ClientOutcome(client)

    def signing_keys(self, cfg):
        from fedfm.trust.secure_round import local_registry

        return local_registry(cfg)


def build_executor(cfg: FederationConfig, run_id: str = "") -> Executor:
    """The executor ``cfg.execution.mode`` names; ``run_id`` keeps one run's cluster objects apart."""
    if cfg.execution.mode == "kubernetes":
        from fedfm.operators.executor import KubernetesExecutor  # only cluster mode needs the kubernetes client

        return KubernetesExecutor(cfg, run_id)
    return LocalExecutor()
