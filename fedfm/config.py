"""The federation config: one pydantic model for the CLI, the pipeline parameters and (later) the CRDs.

A config is plain data (JSON/YAML); :func:`load_config` reads a file, :meth:`FederationConfig.with_overrides`
applies CLI flags on top, and :meth:`FederationConfig.as_dict` is what the compiled pipeline carries as its
``config`` parameter. Validation errors become :class:`~fedfm.errors.ConfigError` naming the field.
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from collections.abc import Collection
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fedfm.errors import ConfigError

# Names become Kubernetes object names and label values in cluster mode, so they follow RFC 1123.
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_PARTITION = re.compile(r"^(iid|dirichlet:(?P<alpha>[0-9.eE+-]+)|column:(?P<column>.+))$")
# Kubernetes quantities (cpu "500m", "2"; memory "512Mi", "16Gi"), as the API server accepts them.
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti|P|Pi|E|Ei)?$")
_LABEL_KEY = re.compile(r"^([a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

Task = Literal["classification", "causal-lm", "preference"]
# Tasks that train a causal LM on conversations (rows have no label to skew tenants by).
GENERATIVE_TASKS = ("causal-lm", "preference")

# A client's work per round when none is set: one pass over its own training rows (McMahan et al.'s E = 1),
# so every tenant's data counts at its size; a fixed step count was too little for large, skewed tenants
# (bench/README.md: the measurements of issue #15).
DEFAULT_LOCAL_EPOCHS = 1.0

# policy.preset: how many MADs above the median norm an update may be (with update_checks' floor of 10 % of
# the median, at least 1.5 × the median: honest clients on skewed data reach 1.25 ×, model poisoning 8 ×), and
# the robust rule it brings
PRESET_NORM_MADS = 5.0
# Under a preset, one client's update counts for at most this many times the round's median sample count.
PRESET_SAMPLES_RATIO = 2.0
PRESET_RULE = ("fedtrimmedavg", {"beta": 0.2})
ROBUST_RULES = ("fedmedian", "fedtrimmedavg", "krum", "multikrum")

# The most tenants `clients: N` simulates (each is a ClientConfig; 10^9 of them would exhaust memory).
MAX_CLIENTS = 10_000

# The pooled pseudo-client of a centralized run (the baseline federated quality is judged against).
CENTRALIZED_CLIENT = "centralized"


def _dns_label(value: str, what: str) -> str:
    if not _DNS_LABEL.match(value):
        raise ValueError(f"{what} {value!r} must be a lowercase RFC 1123 label (a-z, 0-9, '-')")
    return value


def client_name_for(value: str) -> str:
    """The tenant name a value of a ``column:NAME`` partition gets: accents dropped, lowercased, every run of other
    characters than a-z and 0-9 turned into one '-', no '-' at either end ("Site A" → ``site-a``). ValueError when
    that leaves no RFC 1123 label (nothing left, or more than 63 characters) or the reserved ``centralized``."""
    ascii_text = unicodedata.normalize("NFKD", value).encode("ascii", "ignore").decode("ascii")
    name = re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-")
    if not _DNS_LABEL.match(name):
        raise ValueError(f"value {value!r} gives no tenant name (a tenant is named after its value as a lowercase "
                         "RFC 1123 label: a-z, 0-9 and '-', at most 63 characters)")
    if name == CENTRALIZED_CLIENT:
        raise ValueError(f"value {value!r} would name a tenant {CENTRALIZED_CLIENT!r}, which is reserved for the "
                         "pooled baseline")
    return name


def numbered_client_count(clients: list[ClientConfig]) -> int | None:
    """N when ``clients`` are exactly what ``clients: N`` (``--clients N``) makes: tenant-0 … tenant-N-1 with no
    setting of their own; None for clients given by name."""
    expected = [{"name": client.name} for client in _numbered_clients(len(clients))]
    given = [client.model_dump(exclude_none=True) for client in clients]
    return len(clients) if given == expected else None


def parse_partition(scheme: str) -> tuple[str, float | str | None]:
    """``("iid", None)``, ``("dirichlet", alpha)`` or ``("column", name)``; ValueError for anything else."""
    match = _PARTITION.match(scheme or "")
    if not match:
        raise ValueError(f"partition {scheme!r} is not one of iid, dirichlet:ALPHA, column:NAME")
    if match.group("alpha") is not None:
        try:
            alpha = float(match.group("alpha"))
        except ValueError:
            raise ValueError(f"partition {scheme!r}: ALPHA must be a number") from None
        if not alpha > 0 or alpha == float("inf"):
            raise ValueError(f"partition {scheme!r}: ALPHA must be a positive number")
        return "dirichlet", alpha
    if match.group("column") is not None:
        return "column", match.group("column")
    return "iid", None


class _Section(BaseModel):
    # inf/NaN are refused: as_dict() must be JSON (a KFP parameter), and no setting means them
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ModelConfig(_Section):
    """The base model. ``name_or_path`` is a Hugging Face hub id or a local directory."""

    name_or_path: str = "sentence-transformers/all-MiniLM-L6-v2"
    revision: str | None = None
    trust_remote_code: bool = False
    max_length: int = Field(128, ge=8, le=32768, description="tokens per example after truncation")
    chat_template: str | None = Field(None, description="causal-lm, preference: a Jinja chat template (the text) to "
                                                        "render conversations with, in place of the tokenizer's own")
    adapter: str | None = Field(None, description="a PEFT adapter directory (another federation's export, e.g. its "
                                                  "SFT adapter) merged into the base weights before LoRA: the "
                                                  "federation starts from that model (SFT-then-DPO)")

    @field_validator("chat_template")
    @classmethod
    def _check_chat_template(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("model.chat_template is empty; give a Jinja template, or leave it unset to use the "
                             "tokenizer's")
        return value


class DataConfig(_Section):
    """Where the examples come from and how they map onto the task.

    ``source`` is a CSV / JSONL / Parquet file, a Hugging Face ``datasets`` id (``hf:`` prefix optional),
    or ``builtin:topics`` (a dataset the project generates). When clients have no data of their own,
    the source is split among them by ``partition`` — the simulation of tenants.
    """

    source: str = "builtin:topics"
    split: str = "train"
    subset: str | None = Field(None, description="HF dataset config name")
    text_column: list[str] = Field(default_factory=lambda: ["text"], description="joined with a space")
    label_column: str = "label"
    prompt_column: str = "prompt"
    response_column: str = "response"
    chosen_column: str = Field("chosen", description="preference: the preferred assistant reply")
    rejected_column: str = Field("rejected", description="preference: the dispreferred assistant reply")
    labels: list[str] | None = Field(None, description="label vocabulary; read from the data when absent")
    messages_column: str | None = Field(None, description="causal-lm: a column of conversations, each a list of "
                                                          "{role, content} (or its JSON text); preference: the "
                                                          "turns before the replies; default: 'messages' when the "
                                                          "data has that column, else prompt/response (prompt)")
    partition: str | None = Field(None, description="how simulated tenants split data.source: iid, "
                                                       "dirichlet:ALPHA (label skew) or column:NAME (one tenant per "
                                                       "value, named after it) (default: dirichlet:0.5 for "
                                                       "classification, iid for causal-lm and preference)")
    eval_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    max_samples: int | None = Field(None, ge=1, description="use at most this many rows of the source")

    @field_validator("text_column", mode="before")
    @classmethod
    def _split_columns(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("labels")
    @classmethod
    def _check_labels(cls, value: list[str] | None) -> list[str] | None:
        if value is not None:
            if len(value) < 2:
                raise ValueError(f"data.labels {value!r} has fewer than 2 labels; a classifier needs at least 2 "
                                 "(or leave data.labels unset to read them from the data)")
            repeated = sorted({label for label in value if value.count(label) > 1})
            if repeated:
                raise ValueError(f"data.labels repeats {', '.join(map(repr, repeated))}; list each label once")
        return value

    @field_validator("partition")
    @classmethod
    def _check_partition(cls, value: str | None) -> str | None:
        if value is not None:
            parse_partition(value)
        return value


class ClientConfig(_Section):
    """One tenant. Without ``train``, its data is its share of ``data.source`` (simulation)."""

    name: str
    train: str | None = Field(None, description="the tenant's own training data (file or HF id)")
    eval: str | None = Field(None, description="the tenant's own evaluation data")
    namespace: str | None = Field(None, description="the tenant's Kubernetes namespace in cluster mode "
                                                    "(default: the client's name)")
    state_uri: str | None = Field(None, description="where this client keeps what it never sends (FedSA-LoRA's "
                                                   "lora_B), one file per round (default: "
                                                   "execution.client_state_uri/NAME); in kubernetes mode the "
                                                   "tenant's FederatedClient says where (spec.state), not this")
    lora_r: int | None = Field(None, ge=1, le=1024, description="this client's LoRA rank (default lora.r): a "
                                                                 "GPU-rich tenant can train a larger one; mixed ranks "
                                                                 "need a rank-aware strategy (hetlora, flexlora)")

    @field_validator("namespace")
    @classmethod
    def _check_namespace(cls, value: str | None) -> str | None:
        return None if value is None else _dns_label(value, "namespace")

    @property
    def kubernetes_namespace(self) -> str:
        return self.namespace or self.name

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        return _dns_label(value, "client name")


class LoRAConfig(_Section):
    """PEFT LoRA settings. ``target_modules`` None uses PEFT's default for the model family."""

    r: int = Field(8, ge=1, le=1024)
    alpha: float = Field(16.0, gt=0, description="LoRA's scaling is alpha / r; clients of other ranks keep "
                                                 "that scaling (their alpha is scaled with their rank)")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] | None = None
    freeze_a: bool = Field(False, description="keep every lora_A at its initial value and train (and send) only "
                                              "lora_B, as FFA-LoRA does (the ffalora strategy sets it)")
    restart: bool = Field(False, description="each round, fold the global adapter into the base weights and "
                                             "train a fresh LoRA on top, as FLoRA does (the flora strategy sets it)")
    keep_b_local: bool = Field(False, description="each client keeps its lora_B as its personalization and sends "
                                                  "only lora_A (and any head), as FedSA-LoRA does (the fedsalora "
                                                  "strategy sets it)")

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


class HeadConfig(_Section):
    """The classification head under label skew (see :mod:`fedfm.head`; ignored by causal-lm)."""

    init: Literal["prototypes", "random"] = Field(
        "prototypes", description="prototypes: in round 1 each client sets the rows of the classes it holds to the "
                                  "nearest-class-mean classifier of its data (FedNCM), not under differential privacy "
                                  "(clipping would erase it); random: the model's own initialization")
    aggregation: Literal["per-class", "samples"] = Field(
        "per-class", description="per-class: a class's row is averaged over the clients that hold the class, weighted "
                                 "by their examples of it (rules that work from the mean, without differential "
                                 "privacy or secure aggregation); samples: by each client's samples, like every tensor")


class TrainingConfig(_Section):
    """One client's local fine-tune per round, run through DeepSpeed.

    ``batch_size`` is the global batch of one optimizer step: it is split over ``world_size`` processes
    and ``gradient_accumulation_steps`` micro-steps, so results do not depend on the process count.
    """

    local_steps: int | None = Field(None, ge=1, description="optimizer steps per round (instead of local_epochs)")
    local_epochs: float | None = Field(None, gt=0, description=f"passes over the client's training rows per round "
                                                              f"(default {DEFAULT_LOCAL_EPOCHS:g} unless local_steps "
                                                              "is set)")
    batch_size: int = Field(16, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    learning_rate: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, ge=0, description="0 disables clipping")
    proximal_mu: float = Field(0.0, ge=0, description="FedProx's μ: adds μ/2·‖w − w_global‖² over the adapter "
                                                      "to the loss (the fedprox strategy sets it)")
    zero_stage: Literal[0, 1, 2, 3] = 0
    bf16: bool = False
    world_size: int = Field(1, ge=1, description="DeepSpeed processes per client")

    @model_validator(mode="after")
    def _one_budget(self) -> TrainingConfig:
        if self.local_steps is None and self.local_epochs is None:
            self.local_epochs = DEFAULT_LOCAL_EPOCHS
        if self.local_steps is not None and self.local_epochs is not None:
            raise ValueError("set only one of training.local_steps and training.local_epochs")
        if self.proximal_mu and self.zero_stage == 3:
            raise ValueError("training.proximal_mu (FedProx) needs the whole adapter on every process: use "
                             "zero_stage 0-2 (ZeRO-3 partitions the weights the proximal term compares)")
        per_step = self.world_size * self.gradient_accumulation_steps
        if self.batch_size % per_step:
            raise ValueError(
                f"training.batch_size {self.batch_size} must be a multiple of world_size × "
                f"gradient_accumulation_steps = {per_step}"
            )
        return self

    @property
    def micro_batch_size(self) -> int:
        return self.batch_size // (self.world_size * self.gradient_accumulation_steps)


class PreferenceConfig(_Section):
    """The DPO objective of the ``preference`` task (Rafailov et al. 2023, https://arxiv.org/abs/2305.18290); the
    reference model is each round's global model (see :mod:`fedfm.preference`)."""

    beta: float = Field(0.1, gt=0, description="β: how far the policy may move from the reference (the implicit "
                                               "reward is β · log π/π_ref)")
    loss: Literal["sigmoid", "ipo"] = Field(
        "sigmoid", description="sigmoid: DPO's -log σ(β·h); ipo: IPO's (h - 1/(2β))², h the log-ratio margin "
                               "(IPO over mean per-token log-probabilities, as Azar et al. define it)")


class UpdateChecksConfig(_Section):
    """Checks on each update beyond its shapes, finite values and base model: an update whose L2 norm is an
    outlier among the round's (above median + ``norm_mads`` × the median absolute deviation) is handled by
    ``action``."""

    norm_mads: float | None = Field(None, gt=0, description="how many median absolute deviations above the "
                                                            "round's median norm an update may be (None: off)")
    action: Literal["reject", "clip", "quarantine"] = Field(
        "reject", description="reject: leave the update out of the round; clip: scale it down to the bound; "
                              "quarantine: leave it out and take no more updates from the client")
    min_updates: int = Field(3, ge=3, description="the outlier check needs at least this many updates in a round")
    clip_to_median: bool | None = Field(None, description="scale every kept update down to at most the round's median "
                                                    "norm (norm bounding without a fixed bound, as FLAME does)")


class AdaptiveClippingConfig(_Section):
    """Adaptive clipping (Andrew et al. 2021, https://arxiv.org/abs/1905.03871): the clip norm follows the
    ``target_quantile`` of the clients' update norms, estimated privately each round."""

    target_quantile: float = Field(0.5, gt=0, lt=1)
    learning_rate: float = Field(0.2, gt=0, description="geometric step of the clip norm per round")
    count_stddev: float | None = Field(None, gt=0, description="noise on the count of unclipped clients "
                                                               "(default: expected clients per round / 20)")


class PrivacyConfig(_Section):
    """Client-level differential privacy, DP-FedAvg (McMahan et al. 2018, https://arxiv.org/abs/1710.06963).

    Each client's update is clipped to ``clip_norm`` and Gaussian noise of standard deviation
    ``noise_multiplier × clip_norm`` is added to the sum, which is divided by the expected number of
    clients. Clients are Poisson-sampled with probability ``policy.sample_fraction``. Give
    ``noise_multiplier``, or ``target_epsilon`` (the multiplier that spends it over ``rounds`` is
    computed), or both (the run stops before a round that would exceed ``target_epsilon``).
    """

    noise_multiplier: float | None = Field(None, ge=0, description="σ: noise standard deviation / clip_norm")
    target_epsilon: float | None = Field(None, gt=0, description="the (ε, delta) budget of the whole run")
    delta: float = Field(1e-5, gt=0, lt=1)
    clip_norm: float | None = Field(None, gt=0, description="C: every client's update is scaled to at most this "
                                                            "L2 norm (the initial norm with adaptive clipping)")
    accountant: Literal["rdp", "pld"] = Field("rdp", description="dp-accounting's Rényi-DP or privacy-loss-"
                                                                 "distribution accountant")
    adaptive_clipping: AdaptiveClippingConfig | None = None
    noise_seed: int | None = Field(None, description="seed the noise, for reproducible experiments only: whoever "
                                                     "knows it can remove the noise (default: the OS's randomness)")

    @property
    def enabled(self) -> bool:
        return self.noise_multiplier is not None or self.target_epsilon is not None

    @model_validator(mode="after")
    def _clip_norm_when_enabled(self) -> PrivacyConfig:
        if self.enabled and self.clip_norm is None:
            raise ValueError("privacy.clip_norm is required with differential privacy: it bounds what one client "
                             "can change (the noise is noise_multiplier × clip_norm)")
        if self.adaptive_clipping is not None and not self.enabled:
            raise ValueError("privacy.adaptive_clipping needs differential privacy: set privacy.noise_multiplier "
                             "or privacy.target_epsilon")
        return self


class SecureAggregationConfig(_Section):
    """Secure aggregation (Bonawitz et al. 2017, https://eprint.iacr.org/2017/281): the server sees only
    masked updates and their sum. ``threshold`` clients must stay to the end of a round (and any
    ``threshold`` of them can recover the masks of clients that dropped)."""

    enabled: bool = False
    threshold: int | None = Field(None, ge=2, description="t (default, and at least: a majority of the round's "
                                                          "clients)")
    fraction_bits: int = Field(24, ge=8, le=40, description="fixed-point precision of the masked values "
                                                            "(2^-bits), in a ring of 2^64")


class CompressionConfig(_Section):
    """How updates are encoded on the way up (the global adapter always goes down in float32)."""

    method: Literal["none", "fp16", "bf16", "int8", "topk"] = "none"
    block_size: int = Field(128, ge=8, le=65536, description="int8: values per absmax scale (128: the scales "
                                                             "add 1/64 byte per value)")
    topk_fraction: float = Field(0.1, gt=0, le=1, description="topk: share of each tensor's values sent")
    error_feedback: bool = Field(True, description="topk and int8: carry what was not sent into the client's "
                                                   "next update (kept in its state_uri)")


class PolicyConfig(_Section):
    """Who takes part in a round and what a round needs to count."""

    sample_fraction: float = Field(1.0, gt=0.0, le=1.0, description="share of the clients drawn each round "
                                                                    "(seeded, at least min_clients)")
    min_clients: int | None = Field(None, ge=1, description="quorum: updates a round needs to aggregate "
                                                           "(default: every client drawn)")
    round_deadline_seconds: float | None = Field(None, gt=0, description="a client's fine-tune must finish "
                                                                        "within this: a Job, or a local fine-tune, is "
                                                                        "stopped at it and counts as TimedOut")
    below_quorum: Literal["fail", "retry"] = Field(
        "fail", description="a round with fewer updates than the quorum: fail (the run stops; resume it later), or "
                            "retry: draw fresh clients, not yet in the round, in place of the missing ones")
    max_retries: int = Field(1, ge=1, le=10, description="below_quorum retry: how many fresh draws a round may make")
    quarantine_after_failures: int | None = Field(None, ge=1, description="a client that sent no usable update in "
                                                                          "this many of its rounds in a row is not "
                                                                          "drawn again (None: never)")
    invalid_updates: Literal["fail", "reject"] | None = Field(
        None, description="an update that fails validation (NaN/inf, wrong shapes, another base model): fail the "
                          "round, or reject it (the client counts as missing); default: reject under a preset, "
                          "else fail")
    preset: Literal["none", "checks", "robust"] = Field(
        "none", description="Byzantine robustness in one word. checks: reject invalid updates and norm outliers "
                            "(median + 5 MAD, at least 1.5 times the median) and bound the rest to the median norm, "
                            "any rule, with a majority quorum unless min_clients is set; robust: checks plus a "
                            "robust rule (fedtrimmedavg with beta 0.2 in place of fedavg)")
    update_checks: UpdateChecksConfig = Field(default_factory=UpdateChecksConfig)
    # What a client reports as its training samples weighs its update in the weighted rules, and no one can
    # check it: these bound what a report can buy.
    max_client_samples: int | None = Field(None, ge=1, description="the most training samples one update counts "
                                                                  "for: a larger report is weighed as this many "
                                                                  "(None: no cap)")
    max_samples_ratio: float | None = Field(None, ge=1.0, description="one update counts for at most this many times "
                                                                      "the round's median sample count, so that no "
                                                                      "client's report outweighs the others (None: "
                                                                      "off; the presets set 2)")

    @model_validator(mode="after")
    def _expand_preset(self) -> PolicyConfig:
        """A preset fills the checks the user left unset (an explicit setting wins)."""
        if self.preset != "none":  # unset: None, which is also what as_dict leaves out
            if self.invalid_updates is None:
                self.invalid_updates = "reject"
            if self.update_checks.norm_mads is None:
                self.update_checks.norm_mads = PRESET_NORM_MADS
            if self.update_checks.clip_to_median is None:
                self.update_checks.clip_to_median = True
            if self.max_samples_ratio is None:
                self.max_samples_ratio = PRESET_SAMPLES_RATIO
        return self


def _quantity(value: str | None, what: str) -> str | None:
    if value is not None and not _QUANTITY.match(value):
        raise ValueError(f"{what} {value!r} is not a Kubernetes quantity (e.g. 500m, 2, 512Mi, 16Gi)")
    return value


def _dns_subdomain(value: str, what: str) -> str:
    if len(value) > 253 or not all(_DNS_LABEL.match(part) for part in value.split(".")):
        raise ValueError(f"{what} {value!r} must be a lowercase RFC 1123 subdomain (a-z, 0-9, '-', '.')")
    return value


def _mount_path(value: str) -> str:
    if not value.startswith("/") or ":" in value:
        raise ValueError(f"mount_path {value!r} must be an absolute path in the container")
    return value


class TolerationConfig(_Section):
    """A Kubernetes toleration (a GPU node pool's taint, say)."""

    key: str | None = None
    operator: Literal["Equal", "Exists"] = "Equal"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = Field(None, ge=0, description="NoExecute: how long the pod stays bound")


class VolumeConfig(_Section):
    """A PersistentVolumeClaim mounted into the task's container (the tenants' data, a model cache)."""

    pvc: str
    mount_path: str
    sub_path: str = ""

    @model_validator(mode="after")
    def _check(self) -> VolumeConfig:
        _dns_subdomain(self.pvc, "pvc")
        _mount_path(self.mount_path)
        return self


class SecretConfig(_Section):
    """A Secret the task reads: its keys as environment variables (``env``: secret key -> variable), or
    mounted as files (``mount_path``)."""

    name: str
    env: dict[str, str] | None = None
    mount_path: str | None = None

    @model_validator(mode="after")
    def _one_way(self) -> SecretConfig:
        _dns_subdomain(self.name, "secret name")
        if (self.env is None) == (self.mount_path is None):
            raise ValueError(f"secret {self.name!r}: give exactly one of env (secret key -> variable) or mount_path")
        bad = [name for name in (self.env or {}).values() if not _ENV_NAME.match(name)]
        if bad:
            raise ValueError(f"secret {self.name!r}: {', '.join(map(repr, bad))} is no environment variable name")
        if self.mount_path is not None:
            _mount_path(self.mount_path)
        return self


class PodSettingsConfig(_Section):
    """What a pipeline task's pod asks of Kubernetes when the pipeline runs on Kubeflow Pipelines."""

    cpu: str | None = Field(None, description="CPU request (e.g. 4, 500m)")
    memory: str | None = Field(None, description="memory request (e.g. 16Gi)")
    cpu_limit: str | None = None
    memory_limit: str | None = None
    accelerator_type: str | None = Field(None, description="the accelerator's resource name, e.g. nvidia.com/gpu")
    accelerator_count: int | None = Field(None, ge=1, description="accelerators per task (with accelerator_type)")
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[TolerationConfig] = Field(default_factory=list)
    volumes: list[VolumeConfig] = Field(default_factory=list, description="PersistentVolumeClaims to mount")
    secrets: list[SecretConfig] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check(self) -> PodSettingsConfig:
        for name in ("cpu", "memory", "cpu_limit", "memory_limit"):
            _quantity(getattr(self, name), name)
        if self.accelerator_count is not None and not self.accelerator_type:
            raise ValueError("accelerator_count needs accelerator_type (e.g. nvidia.com/gpu)")
        bad = [key for key in self.node_selector if not _LABEL_KEY.match(key)]
        if bad:
            raise ValueError(f"node_selector key(s) {', '.join(map(repr, bad))} are no Kubernetes label keys")
        paths = [volume.mount_path for volume in self.volumes] + [s.mount_path for s in self.secrets if s.mount_path]
        repeated = sorted({path for path in paths if paths.count(path) > 1})
        if repeated:
            raise ValueError(f"mount_path {', '.join(repeated)} is used twice")
        return self

    @property
    def is_set(self) -> bool:
        return self != PodSettingsConfig()


class KFPConfig(_Section):
    """How each task of the compiled pipeline runs on a Kubeflow Pipelines cluster (the settings are compiled
    into the pipeline's platform spec; ``fedfm run`` and ``kfp.local`` ignore them)."""

    client: PodSettingsConfig = Field(default_factory=PodSettingsConfig, description=(
        "local mode: the tasks that do the tenants' work in the pipeline's own pods (each client step, evaluate, "
        "and aggregate under policy.below_quorum retry, which trains fresh clients)"))
    server: PodSettingsConfig = Field(default_factory=PodSettingsConfig, description=(
        "every other task (init loads the base model)"))
    launcher: PodSettingsConfig = Field(
        default_factory=lambda: PodSettingsConfig(cpu="100m", memory="512Mi"), description=(
            "kubernetes mode: the client steps and evaluate, which only create ClientRounds in the tenants' "
            "namespaces and wait for them (the tenants' Jobs get their FederatedClient's spec.resources)"))
    image_pull_secrets: list[str] = Field(default_factory=list, description="for images in a private registry")
    retries: int = Field(1, ge=0, le=10, description="how often KFP reruns a failed task (a pod evicted or "
                                                      "preempted); every step is safe to rerun")
    retry_backoff_seconds: int = Field(30, ge=1, description="wait before the first rerun, doubled for each next")


class ExecutionConfig(_Section):
    """Where client steps run: here (``local``), or as Jobs in the tenants' namespaces (``kubernetes``)."""

    mode: Literal["local", "kubernetes"] = "local"
    storage_uri: str | None = Field(None, description="fsspec URI under which adapters and updates move "
                                                      "between the pipeline and the tenants (kubernetes)")
    federation_namespace: str | None = Field(None, description="namespace of the Federation object (default: "
                                                               "the pipeline pod's own namespace)")
    poll_seconds: float = Field(2.0, gt=0, description="how often a step checks its ClientRounds")
    checkpoint_uri: str | None = Field(None, description="fsspec URI under which the federation's state is "
                                                         "checkpointed after every round, to resume from (default: "
                                                         "fedfm run/simulate: the run's directory; kubernetes: the "
                                                         "run's folder under storage_uri)")
    client_state_uri: str | None = Field(None, description="fsspec URI under which each client without its own "
                                                           "state_uri keeps its personal state (fedfm run: the "
                                                           "run's directory)")
    kfp: KFPConfig = Field(default_factory=KFPConfig, description="the compiled pipeline's tasks on a Kubeflow "
                                                                  "Pipelines cluster: resources, scheduling, "
                                                                  "volumes, Secrets, retries")

    @model_validator(mode="after")
    def _storage_for_kubernetes(self) -> ExecutionConfig:
        if self.mode == "kubernetes" and not self.storage_uri:
            raise ValueError("execution.storage_uri is required when execution.mode is kubernetes: tenants' "
                             "Jobs read adapters and write updates there")
        if self.mode == "kubernetes" and self.kfp.client.is_set:
            raise ValueError("execution.kfp.client is for local mode, where the pipeline's pods train; in "
                             "kubernetes mode each tenant's Jobs get its FederatedClient's spec.resources "
                             "(the pipeline's client steps are launchers: execution.kfp.launcher)")
        return self


class StrategyConfig(_Section):
    """The server's aggregation rule, by name (see ``fedfm.strategies``), with its parameters."""

    name: str = "fedavg"
    params: dict[str, Any] = Field(default_factory=dict)
    clip_norm: float | None = Field(None, gt=0, description="scale each client update to at most this L2 norm "
                                                            "before the rule combines them (any rule)")


class FederationConfig(_Section):
    """A federated fine-tune: who takes part, on what, for how long, and how updates are combined."""

    name: str = "fedfm"
    model: ModelConfig = Field(default_factory=ModelConfig)
    task: Task = "classification"
    data: DataConfig = Field(default_factory=DataConfig)
    clients: list[ClientConfig] = Field(default_factory=lambda: _numbered_clients(4))
    rounds: int = Field(3, ge=1, le=1000)
    strategy: StrategyConfig = Field(default_factory=StrategyConfig)
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    execution: ExecutionConfig = Field(default_factory=ExecutionConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    preference: PreferenceConfig = Field(default_factory=PreferenceConfig)
    lora: LoRAConfig = Field(default_factory=LoRAConfig)
    head: HeadConfig = Field(default_factory=HeadConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    secure_aggregation: SecureAggregationConfig = Field(default_factory=SecureAggregationConfig)
    compression: CompressionConfig = Field(default_factory=CompressionConfig)
    seed: int = Field(0, ge=0, description="partitioning, initialization and batch order (numpy seeds are >= 0)")
    parallelism: int = Field(2, ge=1, description="clients trained at once in one round")
    centralized: bool = Field(
        False,
        description="pool every tenant's training data into one client with the same total optimizer "
        "steps: the non-federated baseline",
    )

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        return _dns_label(value, "federation name")

    @field_validator("clients", mode="before")
    @classmethod
    def _expand_clients(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            if value < 1:
                raise ValueError("clients must be at least 1")
            if value > MAX_CLIENTS:
                raise ValueError(f"clients {value} is more than {MAX_CLIENTS}; simulate fewer tenants")
            return _numbered_clients(value)
        if isinstance(value, list):
            return [{"name": item} if isinstance(item, str) else item for item in value]
        return value

    @model_validator(mode="after")
    def _check_federation(self) -> FederationConfig:
        names = [client.name for client in self.clients]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"client names must be unique; repeated: {', '.join(duplicates)}")
        if CENTRALIZED_CLIENT in names:
            raise ValueError(f"client name {CENTRALIZED_CLIENT!r} is reserved for centralized runs")
        if self.policy.min_clients is not None and self.policy.min_clients > len(self.training_clients):
            raise ValueError(f"policy.min_clients {self.policy.min_clients} exceeds the "
                             f"{len(self.training_clients)} client(s) that train")
        if self.execution.mode == "kubernetes" and self.task == "classification" and not self.data.labels:
            raise ValueError("data.labels is required when execution.mode is kubernetes: the tenants' data stays in "
                             "their namespaces, so the pipeline cannot read the label set from it")
        chosen = [f"clients[{client.name}].state_uri" for client in self.clients if client.state_uri]
        chosen += ["execution.client_state_uri"] if self.execution.client_state_uri else []
        if self.execution.mode == "kubernetes" and chosen:
            # a tenant's keys and plain update go where the tenant says, never where the platform says
            raise ValueError(f"{', '.join(chosen)}: in kubernetes mode each tenant keeps its state where its "
                             "FederatedClient's spec.state says (storage only the tenant can read); the federation "
                             "config cannot choose it, so remove it")
        simulated = any(client.train is None for client in self.clients)  # tenants dealt a share of data.source
        if self.task in GENERATIVE_TASKS and simulated and parse_partition(self.partition)[0] == "dirichlet":
            raise ValueError(f"data.partition {self.partition!r} skews tenants by label, and a {self.task} task has "
                             "no labels: use iid or column:NAME")
        if self.strategy.name == "fedprox" and self.training.zero_stage == 3:
            raise ValueError("strategy fedprox needs training.zero_stage 0-2: its proximal term compares the "
                             "whole adapter, which ZeRO-3 partitions")
        secagg = self.secure_aggregation
        if secagg.enabled:
            if self.compression.method != "none":
                raise ValueError(f"compression.method {self.compression.method!r} cannot be combined with "
                                 "secure_aggregation: masked values are uniform ring elements, which neither "
                                 "quantize nor sparsify; turn one of them off")
            if self.policy.update_checks.norm_mads is not None:
                raise ValueError("policy.update_checks.norm_mads needs each update's norm, which secure aggregation "
                                 "hides from the server; bound what a client can send with privacy.clip_norm instead")
        if self.policy.below_quorum == "retry":
            if self.policy.min_clients is None:
                raise ValueError("policy.below_quorum retry needs policy.min_clients: without a quorum below the "
                                 "round's size, every client drawn is needed and no fresh one can stand in")
            if self.privacy.enabled or secagg.enabled:
                raise ValueError("policy.below_quorum retry cannot be combined with differential privacy (the "
                                 "accountant assumes one Poisson draw per round) or secure aggregation (its keys "
                                 "are agreed before training); use below_quorum fail")
        if self.policy.preset != "none" and self.policy.min_clients is None:
            # rejecting an update must not fail the round: the quorum becomes a majority, not every client
            self.policy.min_clients = len(self.training_clients) // 2 + 1
        if self.policy.preset == "robust" and self.strategy.name not in ROBUST_RULES:
            if self.strategy.name != "fedavg":
                raise ValueError(f"policy.preset robust brings a robust rule, but strategy {self.strategy.name!r} "
                                 f"is not one: choose one of {', '.join(ROBUST_RULES)}, or policy.preset checks "
                                 "(the checks with any rule)")
            self.strategy = StrategyConfig(name=PRESET_RULE[0], params=dict(PRESET_RULE[1]),
                                           clip_norm=self.strategy.clip_norm)
        own_data = [client.name for client in self.clients if client.train]
        if self.centralized and own_data:
            raise ValueError("centralized runs pool a simulated partition; clients with their own data "
                             f"cannot be pooled here: {', '.join(own_data)}")
        return self

    # --- views -----------------------------------------------------------------------------------

    @property
    def client_names(self) -> list[str]:
        return [client.name for client in self.clients]

    @property
    def training_clients(self) -> list[str]:
        """Who trains each round: every tenant, or the single pooled client of a centralized run."""
        return [CENTRALIZED_CLIENT] if self.centralized else self.client_names

    def client(self, name: str) -> ClientConfig:
        for client in self.clients:
            if client.name == name:
                return client
        raise ConfigError(f"client {name!r} is not in this federation (clients: {', '.join(self.client_names)})")

    @property
    def partition(self) -> str:
        """How simulated tenants split ``data.source``: ``data.partition``, else the task's default (label skew
        for classification; iid for causal-lm and preference, whose rows have no label)."""
        return self.data.partition or ("iid" if self.task in GENERATIVE_TASKS else "dirichlet:0.5")

    def client_state_location(self, name: str) -> str | None:
        """Where ``name`` keeps its personal state, if anywhere is configured."""
        client = None if name == CENTRALIZED_CLIENT else self.client(name)
        if client is not None and client.state_uri:
            return client.state_uri.rstrip("/")
        if self.execution.client_state_uri:
            return f"{self.execution.client_state_uri.rstrip('/')}/{name}"
        return None

    def client_rank(self, name: str) -> int:
        """The LoRA rank ``name`` trains (a pooled client trains the federation's widest)."""
        if name == CENTRALIZED_CLIENT:
            return self.global_rank
        return self.client(name).lora_r or self.lora.r

    @property
    def global_rank(self) -> int:
        """The global adapter's LoRA rank: the largest any client trains."""
        return max(client.lora_r or self.lora.r for client in self.clients)

    @property
    def mixed_ranks(self) -> bool:
        return len({self.client_rank(name) for name in self.training_clients}) > 1

    def trust_warnings(self) -> list[str]:
        """What in this config weakens the threat model (docs/security/threat-model.md): valid, but a platform team
        should know. ``fedfm validate`` prints them."""
        warnings = []
        storage = self.execution.storage_uri or ""
        if self.execution.mode == "kubernetes" and ("://" not in storage or storage.startswith("file://")):
            warnings.append(f"execution.storage_uri {storage} is a filesystem path: every tenant's Jobs and the "
                            "platform would share it, each able to read and replace the others' files; use an "
                            "object store (s3://, gs://)")
        if self.execution.mode == "kubernetes" and self.policy.preset == "none" \
                and self.policy.max_samples_ratio is None and self.policy.max_client_samples is None:
            warnings.append("policy.preset is none and no sample bound is set: a tenant's update weighs as many "
                            "samples as it claims (set policy.preset: checks, or policy.max_samples_ratio)")
        if self.privacy.enabled and self.privacy.noise_seed is not None:
            warnings.append("privacy.noise_seed makes the noise reproducible: whoever knows the seed can remove it "
                            "(experiments only)")
        if self.model.trust_remote_code:
            warnings.append("model.trust_remote_code runs code from the model's repository in every tenant's Job, "
                            "next to the tenant's data and Secret")
        return warnings

    def sampled_clients(self, round_index: int, exclude: Collection[str] = (), sampling_key: str | None = None
                        ) -> list[str]:
        """The clients drawn for ``round_index``: ``policy.sample_fraction`` of them (never fewer than the
        quorum), the same draw in every process for a given seed and round. Under differential privacy
        each client is drawn with probability ``policy.sample_fraction`` instead (Poisson sampling), keyed
        by the server state's secret ``sampling_key`` rather than the seed (so a round may draw fewer than
        the quorum). Clients in ``exclude`` (quarantined) are never drawn."""
        import numpy as np

        clients = [client for client in self.training_clients if client not in exclude]
        if self.privacy.enabled:  # Poisson sampling: each client independently, as the privacy accountant assumes
            if self.policy.sample_fraction >= 1:
                return list(clients)
            if sampling_key is None:
                raise ValueError("under differential privacy the clients are drawn with the server state's "
                                 "secret sampling key")
            from fedfm.trust.privacy import poisson_sample

            return poisson_sample(sampling_key, round_index, clients, self.policy.sample_fraction)
        count = max(math.ceil(self.policy.sample_fraction * len(clients)), self.policy.min_clients or 1)
        if count >= len(clients):
            return list(clients)
        chosen = np.random.default_rng([self.seed, round_index]).choice(len(clients), size=count, replace=False)
        return [clients[index] for index in sorted(chosen)]

    def fresh_clients(self, round_index: int, attempt: int, count: int, exclude: Collection[str]) -> list[str]:
        """``policy.below_quorum`` retry: up to ``count`` clients not in ``exclude`` (those already in the
        round, and quarantined ones), drawn for attempt ``attempt`` (≥ 2) of ``round_index``."""
        import numpy as np

        candidates = [client for client in self.training_clients if client not in exclude]
        if count >= len(candidates):
            return candidates
        chosen = np.random.default_rng([self.seed, round_index, attempt]).choice(len(candidates), size=count,
                                                                                  replace=False)
        return [candidates[index] for index in sorted(chosen)]

    def secagg_threshold(self, sampled: int) -> int:
        """t for a round with ``sampled`` clients: the configured threshold (at most ``sampled``), and at least a
        majority: with t at most half, a server could gather t shares of each kind of one client's secrets from
        two disjoint halves (each client refuses such a threshold: :func:`fedfm.trust.secagg.share_keys`)."""
        majority = sampled // 2 + 1
        return max(2, min(max(self.secure_aggregation.threshold or majority, majority), sampled))

    def quorum(self, sampled: int) -> int:
        """Updates a round with ``sampled`` clients needs before it aggregates."""
        return min(self.policy.min_clients or sampled, sampled)

    def local_steps_for(self, client: str) -> int | None:
        """Optimizer steps for ``client`` per round; a pooled client does every tenant's steps."""
        steps = self.training.local_steps
        if steps is not None and client == CENTRALIZED_CLIENT:
            return steps * len(self.clients)
        return steps

    # --- construction ----------------------------------------------------------------------------

    @classmethod
    def parse(cls, data: dict[str, Any], *, source: str = "config") -> FederationConfig:
        """Validate ``data``; errors list every bad field by its dotted path."""
        broken = _surrogate_path(data)
        if broken is not None:  # YAML's and JSON's \ud800 escapes: no character, and no UTF-8 text to pass on
            raise ConfigError(f"invalid {source}:\n  {broken or '(top level)'}: holds a lone UTF-16 surrogate "
                              "(an escape such as \\ud800), which is no character; write the character itself")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(_describe(exc, source)) from None

    def with_overrides(self, overrides: dict[str, Any]) -> FederationConfig:
        """A copy with dotted-path overrides (``{"training.local_steps": 5}``) applied and re-validated."""
        data = self.as_dict()
        if "clients" not in self.model_fields_set:  # still unset: a column partition names them from the data
            data.pop("clients")
        for path, value in overrides.items():
            if value is None:
                continue
            node = data
            *parents, leaf = path.split(".")
            for key in parents:
                node = node.setdefault(key, {})
            node[leaf] = value
            # The two training budgets are exclusive: choosing one through an override clears the other.
            if path == "training.local_steps":
                data["training"].pop("local_epochs", None)
            elif path == "training.local_epochs":
                data["training"].pop("local_steps", None)
        return FederationConfig.parse(data, source="config with overrides")

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON data that parses back to an equal config; unset (None) fields are left out,
        because a KFP struct parameter cannot hold null."""
        return self.model_dump(mode="json", exclude_none=True)

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), sort_keys=True)


def _numbered_clients(count: int) -> list[ClientConfig]:
    return [ClientConfig(name=f"tenant-{index}") for index in range(count)]


def _describe(exc: ValidationError, source: str) -> str:
    lines = [f"invalid {source}:"]
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"]) or "(top level)"
        message = error["msg"].removeprefix("Value error, ")
        lines.append(f"  {where}: {message}")
    return "\n".join(lines)


def _surrogate_path(value: Any) -> str | None:
    """The dotted path of the first string (key or value) in ``value`` holding a UTF-16 surrogate, or None
    (walked without recursion: a file may nest hundreds of levels deep before validation refuses it)."""
    def broken(text: str) -> bool:
        return any("\ud800" <= char <= "\udfff" for char in text)

    def shown(key: Any) -> str:
        return str(key).encode("utf-8", "backslashreplace").decode()  # the error message must print

    stack: list[tuple[str, Any]] = [("", value)]
    seen: set[int] = set()  # YAML's anchors can make a list hold itself (validation refuses it later)
    while stack:
        path, item = stack.pop()
        if isinstance(item, str) and broken(item):
            return path
        if isinstance(item, (dict, list)):
            if id(item) in seen:
                continue
            seen.add(id(item))
        children = item.items() if isinstance(item, dict) else enumerate(item) if isinstance(item, list) else ()
        for key, child in reversed(list(children)):
            where = f"{path}.{shown(key)}" if path else shown(key)
            if isinstance(key, str) and broken(key):
                return where
            stack.append((where, child))
    return None


def load_config(path: str | Path) -> FederationConfig:
    """Read a federation config from a YAML or JSON file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {exc.object[exc.start:exc.start + 1]!r} at "
                          f"position {exc.start}); save it as UTF-8") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML/JSON: {exc}") from None
    except RecursionError:
        raise ConfigError(f"config file {path} nests too deeply to be a federation config") from None
    except (ValueError, TypeError, OverflowError) as exc:  # a value PyYAML cannot construct: 2001-02-30
        raise ConfigError(f"config file {path} holds a value YAML cannot read ({exc}); quote it if it is "
                          "meant as a string") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping, not {type(data).__name__}")
    return FederationConfig.parse(data, source=f"config file {path}")
