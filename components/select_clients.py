"""Step 2 (one per round): draw the round's clients (policy.sample_fraction: seeded, or under differential
privacy keyed by the server state's secret)."""

from kfp.dsl import Artifact, Input


def select_clients(config: dict, round_index: int, server_state: Input[Artifact]) -> list:
    """The clients that train in ``round_index``: the items of that round's ParallelFor. Clients the
    server state (after the last round) quarantined are not drawn; under differential privacy, its secret
    key draws them."""
    from fedfm.config import FederationConfig
    from fedfm.federation import round_clients
    from fedfm.server_state import read_server_state
    from fedfm.trust.privacy import check_budget, noise_multiplier, sampling_rate

    cfg = FederationConfig.parse(config, source="pipeline parameter 'config'")
    if cfg.privacy.enabled:  # a round the budget cannot pay for is not started (the config may have changed)
        check_budget(cfg, round_index, [(sampling_rate(cfg), noise_multiplier(cfg))] * (round_index - 1))
    return round_clients(cfg, round_index, read_server_state(cfg, server_state.path))
