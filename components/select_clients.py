"""Step 2 (one per round): draw the round's clients (policy.sample_fraction, seeded)."""


def select_clients(config: dict, round_index: int) -> list:
    """The clients that train in ``round_index``: the items of that round's ParallelFor."""
    from fedfm.config import FederationConfig

    return FederationConfig.parse(config, source="pipeline parameter 'config'").sampled_clients(round_index)
