"""What lets tenants that do not trust each other, or the platform, federate: differential privacy
(:mod:`~fedfm.trust.privacy`), secure aggregation (:mod:`~fedfm.trust.secagg`, the protocol, and
:mod:`~fedfm.trust.secure_round`, a round of it as steps that exchange files) and the server's checks of
every update (:mod:`~fedfm.trust.update_checks`). README, *Threat model*, says who is trusted with what."""
