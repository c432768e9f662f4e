"""Server-side aggregation strategies, one file per rule, selected by name from the config."""

from __future__ import annotations

import inspect

from fedfm import lora
from fedfm.adapters import Tensors, shapes_of
from fedfm.config import FederationConfig, StrategyConfig
from fedfm.errors import ConfigError
from fedfm.strategies.base import Aggregate, ServerState, Strategy
from fedfm.strategies.fedadagrad import FedAdagrad
from fedfm.strategies.fedadam import FedAdam
from fedfm.strategies.fedavg import FedAvg
from fedfm.strategies.fedavgm import FedAvgM
from fedfm.strategies.fedmedian import FedMedian
from fedfm.strategies.fedprox import FedProx
from fedfm.strategies.fedsalora import FedSALoRA
from fedfm.strategies.fedtrimmedavg import FedTrimmedAvg
from fedfm.strategies.fedyogi import FedYogi
from fedfm.strategies.ffalora import FFALoRA
from fedfm.strategies.flexlora import FlexLoRA
from fedfm.strategies.flora import FLoRA
from fedfm.strategies.hetlora import HetLoRA
from fedfm.strategies.krum import Krum, MultiKrum

STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls
    for cls in (FedAvg, FedAvgM, FedAdam, FedYogi, FedAdagrad, FedProx, FedMedian, FedTrimmedAvg, Krum, MultiKrum,
                HetLoRA, FlexLoRA, FLoRA, FFALoRA, FedSALoRA)
}


def configure_client(cfg: FederationConfig, client: str, round_index: int) -> FederationConfig:
    """The config ``client`` trains with in ``round_index``: the federation's, with what the strategy's
    :meth:`Strategy.configure` hook sets for that client and round."""
    overrides = build_strategy(cfg.strategy).configure(round_index, client)
    return cfg.with_overrides(overrides) if overrides else cfg


def expected_update_shapes(cfg: FederationConfig, client: str, round_index: int,
                           global_tensors: Tensors) -> dict[str, tuple[int, ...]] | None:
    """The tensors, with their shapes, that ``client``'s update for ``round_index`` must hold: the global
    adapter's at the client's LoRA rank, without lora_A where the client trains with A frozen and
    without lora_B where it keeps B; None when that is exactly the global adapter's tensors."""
    client_lora = configure_client(cfg, client, round_index).lora
    if not (cfg.mixed_ranks or client_lora.freeze_a or client_lora.keep_b_local or client_lora.restart):
        return None
    rank = cfg.client_rank(client) if cfg.mixed_ranks or client_lora.restart else lora.rank_of(global_tensors)
    return {name: lora.shape_at(name, shape, rank) for name, shape in shapes_of(global_tensors).items()
            if not (client_lora.freeze_a and lora.is_lora_a(name))
            and not (client_lora.keep_b_local and lora.is_lora_b(name))}


def client_keeps(cfg: FederationConfig, client: str) -> list[str]:
    """What ``client`` keeps with itself from one step or round to the next (and so needs a state location
    for, one only it can read): FedSA-LoRA's lora_B, error feedback's residual, secure aggregation's keys and
    plain update. Empty when the client keeps nothing."""
    kept = []
    if configure_client(cfg, client, 1).lora.keep_b_local:
        kept.append(f"its lora_B (strategy {build_strategy(cfg.strategy).name!r})")
    if cfg.compression.error_feedback and cfg.compression.method in ("int8", "topk"):
        kept.append(f"its residual (compression {cfg.compression.method!r} with error feedback)")
    if cfg.secure_aggregation.enabled:
        kept.append("its secure-aggregation keys and plain update")
    return kept


def check_federation(cfg: FederationConfig) -> Strategy:
    """The federation's strategy, checked against the rest of the config (mixed LoRA ranks need a
    rule that can combine them). In cluster mode each tenant says where it keeps its state (its
    FederatedClient's ``spec.state``, which the operator checks), so only a local run needs one here."""
    strategy = build_strategy(cfg.strategy)
    feedback = cfg.compression.error_feedback and cfg.compression.method in ("int8", "topk")
    for client in cfg.training_clients:
        if feedback and configure_client(cfg, client, 1).lora.restart:
            raise ConfigError(f"compression.error_feedback carries what one round's update left out into the next; "
                              f"strategy {strategy.name!r} trains fresh LoRA factors every round, so nothing carries "
                              "over: set compression.error_feedback to false")
    for feature, on in (("privacy (DP-FedAvg)", cfg.privacy.enabled),
                        ("secure_aggregation", cfg.secure_aggregation.enabled)):
        if on and not strategy.from_mean:
            able = ", ".join(sorted(name for name, cls in STRATEGIES.items() if cls.from_mean))
            raise ConfigError(f"{feature} gives the server only the round's mean update; strategy {strategy.name!r} "
                              f"needs each update; choose one that works from the mean ({able})")
    secagg = cfg.secure_aggregation
    if secagg.enabled and len(cfg.training_clients) < 3:  # checked here, not in the config: a tenant's Job has one
        raise ConfigError("secure_aggregation needs at least 3 clients: with 2, the sum and one's own update give "
                          "away the other's")
    if secagg.enabled and secagg.threshold is not None and secagg.threshold > len(cfg.training_clients):
        raise ConfigError(f"secure_aggregation.threshold {secagg.threshold} exceeds the "
                          f"{len(cfg.training_clients)} client(s) that train")
    for client in cfg.training_clients:
        kept = client_keeps(cfg, client)
        if kept and cfg.execution.mode == "local" and cfg.client_state_location(client) is None:
            remedy = " (or compression.error_feedback to false)" if feedback else ""
            raise ConfigError(f"client {client} has nowhere to keep {' and '.join(kept)}: set its state_uri or "
                              f"execution.client_state_uri{remedy}")
    if cfg.privacy.enabled:
        from fedfm.trust.privacy import noise_multiplier, rounds_within_budget, update_noise_multiplier

        update_noise_multiplier(cfg)  # a budget no noise multiplier meets is refused here
        if rounds_within_budget(cfg) == 0:
            raise ConfigError(f"privacy.target_epsilon {cfg.privacy.target_epsilon} does not pay for one round at "
                              f"noise multiplier {noise_multiplier(cfg):.4g}: raise it, or the noise")
    if cfg.mixed_ranks and not strategy.mixed_ranks:
        ranks = ", ".join(f"{name}: {cfg.client_rank(name)}" for name in cfg.training_clients)
        able = ", ".join(sorted(name for name, cls in STRATEGIES.items() if cls.mixed_ranks))
        raise ConfigError(f"clients train different LoRA ranks ({ranks}); strategy {strategy.name!r} needs one "
                          f"rank; choose a rank-aware strategy ({able})")
    return strategy


def build_strategy(config: StrategyConfig) -> Strategy:
    """The strategy ``config.name`` with ``config.params``; unknown names or parameters are config errors."""
    try:
        cls = STRATEGIES[config.name]
    except KeyError:
        known = ", ".join(sorted(STRATEGIES))
        raise ConfigError(f"strategy.name {config.name!r} is unknown; choose one of {known}") from None
    accepted = set(inspect.signature(cls).parameters)
    unknown = sorted(set(config.params) - accepted)
    if unknown:
        raise ConfigError(
            f"strategy {config.name!r} takes no parameter {', '.join(unknown)}"
            + (f" (it takes: {', '.join(sorted(accepted))})" if accepted else " (it takes none)")
        )
    try:
        return cls(**config.params)
    except (TypeError, ValueError) as exc:  # a parameter of the wrong type
        raise ConfigError(f"strategy {config.name!r}: bad parameters {config.params}: {exc}") from None


__all__ = ["STRATEGIES", "Aggregate", "ServerState", "Strategy", "build_strategy", "check_federation", "client_keeps",
           "configure_client", "expected_update_shapes"]
