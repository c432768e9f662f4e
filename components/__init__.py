"""KFP components: thin shells over the core, one file per step.

The steps are lightweight Python components that run in the FedFM image (``base_image``), which has
this package installed; nothing is pip-installed at run time. :func:`build_components` binds them to
an image, so ``fedfm compile --image`` can point a pipeline at a private registry.
"""

from __future__ import annotations

from dataclasses import dataclass

from kfp import dsl

from fedfm import __version__
from fedfm.components.aggregate import aggregate
from fedfm.components.client_finetune import client_finetune
from fedfm.components.evaluate import evaluate
from fedfm.components.export_adapter import export_adapter
from fedfm.components.init_federation import init_federation
from fedfm.components.secure_aggregation import (secagg_advertise, secagg_confirm, secagg_finetune, secagg_finish,
                                                  secagg_relay_confirmations, secagg_relay_keys, secagg_relay_shares,
                                                  secagg_reveal, secagg_share, secagg_sum)
from fedfm.components.select_clients import select_clients

DEFAULT_IMAGE = f"ghcr.io/fedfm/fedfm:{__version__}"


@dataclass(frozen=True)
class Components:
    init_federation: dsl.base_component.BaseComponent
    select_clients: dsl.base_component.BaseComponent
    client_finetune: dsl.base_component.BaseComponent
    aggregate: dsl.base_component.BaseComponent
    evaluate: dsl.base_component.BaseComponent
    export_adapter: dsl.base_component.BaseComponent
    # a round under secure aggregation (components/secure_aggregation.py)
    secagg_advertise: dsl.base_component.BaseComponent
    secagg_relay_keys: dsl.base_component.BaseComponent
    secagg_share: dsl.base_component.BaseComponent
    secagg_relay_shares: dsl.base_component.BaseComponent
    secagg_finetune: dsl.base_component.BaseComponent
    secagg_sum: dsl.base_component.BaseComponent
    secagg_confirm: dsl.base_component.BaseComponent
    secagg_relay_confirmations: dsl.base_component.BaseComponent
    secagg_reveal: dsl.base_component.BaseComponent
    secagg_finish: dsl.base_component.BaseComponent


def build_components(image: str = DEFAULT_IMAGE) -> Components:
    """The steps as KFP components running in ``image``."""

    def component(func):
        return dsl.component(func, base_image=image, install_kfp_package=False)

    return Components(
        init_federation=component(init_federation),
        select_clients=component(select_clients),
        client_finetune=component(client_finetune),
        aggregate=component(aggregate),
        evaluate=component(evaluate),
        export_adapter=component(export_adapter),
        secagg_advertise=component(secagg_advertise),
        secagg_relay_keys=component(secagg_relay_keys),
        secagg_share=component(secagg_share),
        secagg_relay_shares=component(secagg_relay_shares),
        secagg_finetune=component(secagg_finetune),
        secagg_sum=component(secagg_sum),
        secagg_confirm=component(secagg_confirm),
        secagg_relay_confirmations=component(secagg_relay_confirmations),
        secagg_reveal=component(secagg_reveal),
        secagg_finish=component(secagg_finish),
    )
