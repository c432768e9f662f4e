"""Errors FedFM raises on bad input.

Every failure a user can cause (a config, a dataset, a model path, an adapter file, a client) surfaces
as a :class:`FedFMError` subclass whose message names the offending input, so that a pipeline step's
log says what to fix instead of ending in a traceback from inside torch or safetensors.
"""

from __future__ import annotations


class FedFMError(Exception):
    """Base class of every error FedFM raises on purpose."""


class ConfigError(FedFMError):
    """A federation config (file, flags or pipeline parameter) is invalid."""


class DataError(FedFMError):
    """A dataset cannot be read, lacks a column, or leaves a tenant without data."""


class ModelError(FedFMError):
    """A base model or tokenizer cannot be loaded or does not fit the task."""


class StorageError(FedFMError):
    """A URI cannot be read or written."""


class AdapterError(FedFMError):
    """An adapter file is unreadable or does not belong to this federation."""


class AdapterValidationError(AdapterError):
    """A client's update does not match the global adapter.

    ``client`` and ``tensor`` name what failed, for callers that quarantine or report it.
    """

    def __init__(self, message: str, *, client: str | None = None, tensor: str | None = None):
        super().__init__(message)
        self.client = client
        self.tensor = tensor


class TrainingError(FedFMError):
    """Local fine-tuning of a client failed."""


class QuorumError(FedFMError):
    """Too few clients sent a usable update for a round to aggregate."""


class SecureAggregationError(FedFMError):
    """A secure-aggregation message or round is unusable: a value does not fit the fixed-point ring, a
    ciphertext fails authentication, shares are inconsistent, or too few clients remain for the threshold.

    It fails the round rather than produce a wrong or unmasked aggregate.
    """


class EvaluationError(FedFMError):
    """A client's evaluation answer that is not well formed or not possible (its counts disagree)."""


class PipelineError(FedFMError):
    """A compiled pipeline is not one FedFM can run."""


class SubmitError(FedFMError):
    """A Kubeflow Pipelines endpoint refused a submission or could not be reached."""


class PrivacyBudgetError(FedFMError):
    """A round would spend more differential-privacy budget than the run's target allows."""


class CheckpointError(FedFMError):
    """A run cannot resume from (or write) a checkpoint: none where one is needed, one that is damaged,
    or a start that would recompute or skip a checkpointed round."""
