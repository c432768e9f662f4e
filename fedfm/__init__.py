"""FedFM: federated fine-tuning of foundation models on Kubeflow.

The pure core lives here (adapters, strategies, training, data, config, CLI); the KFP components,
pipelines and the operator are mapped into ``fedfm.components``, ``fedfm.pipelines`` and
``fedfm.operators`` from the top-level folders of the same names.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("kfp-fedfm")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"
