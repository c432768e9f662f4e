"""What lets tenants that do not trust each other, or the platform, federate: differential privacy
(:mod:`~fedfm.trust.privacy`), secure aggregation (:mod:`~fedfm.trust.secagg`, the protocol, and
:mod:`~fedfm.trust.secure_round`, a round of it as steps that exchange files), the tenants' signing keys that
authenticate its messages (:mod:`~fedfm.trust.signing`) and the server's checks of every update
(:mod:`~fedfm.trust.update_checks`, :mod:`~fedfm.trust.admission`) and each tenant's own key to the federation's
storage (:mod:`~fedfm.trust.grants`). docs/security/threat-model.md says who is trusted with what."""
