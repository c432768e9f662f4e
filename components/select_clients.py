"""Step 2 (one per round): draw the round's clients (policy.sample_fraction, seeded)."""

from kfp.dsl import Artifact, Input


def select_clients(config: dict, round_index: int, server_state: Input[Artifact]) -> list:
    """The clients that train in ``round_index``: the items of that round's ParallelFor. Clients the
    server state (after the last round) quarantined are not drawn."""
    from fedfm.config import FederationConfig
    from fedfm.federation import quarantined
    from fedfm.privacy import check_budget, noise_multiplier, sampling_rate

    cfg = FederationConfig.parse(config, source="pipeline parameter 'config'")
    if cfg.privacy.enabled:  # a round the budget cannot pay for is not started (the config may have changed)
        check_budget(cfg, round_index, [(sampling_rate(cfg), noise_multiplier(cfg))] * (round_index - 1))
    return cfg.sampled_clients(round_index, exclude=quarantined(cfg, server_state.path))
