"""Server-side aggregation strategies, one file per rule, selected by name from the config."""

from __future__ import annotations

import inspect

from fedfm.config import StrategyConfig
from fedfm.errors import ConfigError
from fedfm.strategies.base import Aggregate, ServerState, Strategy
from fedfm.strategies.fedadagrad import FedAdagrad
from fedfm.strategies.fedadam import FedAdam
from fedfm.strategies.fedavg import FedAvg
from fedfm.strategies.fedavgm import FedAvgM
from fedfm.strategies.fedmedian import FedMedian
from fedfm.strategies.fedprox import FedProx
from fedfm.strategies.fedtrimmedavg import FedTrimmedAvg
from fedfm.strategies.fedyogi import FedYogi
from fedfm.strategies.krum import Krum, MultiKrum

STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls
    for cls in (FedAvg, FedAvgM, FedAdam, FedYogi, FedAdagrad, FedProx, FedMedian, FedTrimmedAvg, Krum, MultiKrum)
}


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


__all__ = ["STRATEGIES", "Aggregate", "ServerState", "Strategy", "build_strategy"]
