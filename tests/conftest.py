"""Shared fixtures: an offline environment and tiny models built from configs (nothing downloads)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Set before transformers/datasets/deepspeed are imported anywhere in the session.
os.environ.update(
    HF_HUB_OFFLINE="1",
    HF_DATASETS_OFFLINE="1",
    TRANSFORMERS_OFFLINE="1",
    TOKENIZERS_PARALLELISM="false",
    DS_ACCELERATOR="cpu",
)
# One CPU thread per process unless told otherwise: `make test` runs a worker per core, and each worker's
# processes (and the fine-tunes they start) use the cores together, so torch's thread per core in each only
# makes them wait on each other (the same tests took twice the CPU time with it).
os.environ.setdefault("OMP_NUM_THREADS", "1")

CLUSTER_TESTS = "tests/cluster/"
# Tests that share one expensive session fixture, each set kept on one worker so that the fixture runs once.
SHARED_RUNS = {
    "classification-pipeline-run": (
        "tests/integration/test_pipeline.py::test_two_rounds_three_clients_under_kfp_local[classification]",
        "tests/integration/test_pipeline.py::test_server_state_carries_across_rounds_in_the_pipeline",
        "tests/integration/test_simulate.py::test_simulate_gives_the_pipelines_results_and_files",
    ),
    "preference-simulate-run": (
        "tests/integration/test_preference_federation.py::"
        "test_federated_dpo_raises_held_out_preference_accuracy_from_round_0",
        "tests/integration/test_preference_federation.py::test_federated_dpo_under_kfp_local_equals_simulate",
    ),
}


@pytest.hookimpl(tryfirst=True)
def pytest_xdist_make_scheduler(config, log):
    """Under pytest-xdist with ``--dist loadgroup`` (``make test``): every test of tests/cluster in one worker, so
    the session starts one control plane, not one per worker; the tests of each of ``SHARED_RUNS`` in one worker,
    so that their shared fixture runs once; every other test goes to whichever worker is free.

    A scheduler rather than an ``xdist_group`` mark: with pytest 9.2, xdist 3.8 no longer sees marks added at
    collection (pytest-dev/pytest-xdist#1386)."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadGroupScheduling

    class ClusterTestsTogether(LoadGroupScheduling):
        def _split_scope(self, nodeid: str) -> str:
            if nodeid.startswith(CLUSTER_TESTS):
                return "cluster"
            return next((name for name, tests in SHARED_RUNS.items() if nodeid in tests),
                        super()._split_scope(nodeid))

    return ClusterTestsTogether(config, log)


@pytest.fixture(scope="session")
def component_image(request) -> str:
    """The component image, built here (tests/images.py), by name (skips where containers cannot run)."""
    from images import build_images, can_run_containers, image_name, printer

    if not can_run_containers():
        pytest.skip("building and running images needs root" if os.geteuid() != 0 else "FEDFM_SKIP_NODE=1")
    return image_name(build_images(printer(request), ("fedfm",))["fedfm"])


@pytest.fixture(scope="session")
def docker_host(component_image, tmp_path_factory) -> str:
    """A Docker engine API (podman's) that has the component image, as a DOCKER_HOST value."""
    from images import docker_api

    with docker_api(tmp_path_factory.mktemp("podman-api") / "podman-api.log") as host:
        yield host


_SPECIAL = ["<pad>", "<unk>", "<s>", "</s>"]


def _vocabulary(*, words_of_builtins: bool = False) -> list[str]:
    """The tiny tokenizer's words. With ``words_of_builtins``, every word of the built-in datasets, so the tokenizer
    never needs <unk> on them.

    Without it, what the fixtures have had since pandas 3: the check for text columns below looks for the object
    dtype, and pandas 3 reads text as its own str dtype, so no column qualifies and the vocabulary is the special
    tokens alone (every word <unk>). The tests calibrated on that (tolerances of secure aggregation's fixed point
    among them) are kept as they are here; the preference fixture, which needs the words to learn anything,
    asks for them. Making every fixture use the words is a change of its own (and of those tests' tolerances)."""
    import pandas as pd

    from fedfm.builtin_data import load_builtin

    words: set[str] = set()
    for name in ("topics", "topics-instructions", "topics-preferences"):
        frame = load_builtin(name)
        for column in frame.columns:
            if pd.api.types.is_string_dtype(frame[column]) if words_of_builtins else frame[column].dtype == object:
                for text in frame[column].astype(str):
                    words.update(text.lower().replace("\n", " ").replace(":", " : ").split())
    return _SPECIAL + sorted(words)


def build_tiny_tokenizer(directory: Path, *, words_of_builtins: bool = False):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {word: index for index, word in enumerate(_vocabulary(words_of_builtins=words_of_builtins))}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    fast.save_pretrained(directory)
    return fast


@pytest.fixture(scope="session")
def tiny_classifier(tmp_path_factory) -> str:
    """A 2-layer BERT (hidden 32) saved with save_pretrained, as a user's local checkpoint would be: inside a
    virtual environment's site-packages, where a package that ships a model keeps it (kfp.local once rewrote
    the ``python3`` in such a path in every step's config; the pipeline runs on this model check it arrives)."""
    import torch
    from transformers import BertConfig, BertModel

    directory = tmp_path_factory.mktemp("venv") / "lib" / "python3.11" / "site-packages" / "tiny-bert"
    directory.mkdir(parents=True)
    tokenizer = build_tiny_tokenizer(directory)
    torch.manual_seed(1)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id)
    BertModel(config).save_pretrained(directory)
    return str(directory)


def _tiny_llama(directory: Path, *, words_of_builtins: bool = False) -> str:
    """A 2-layer Llama (hidden 32) saved with save_pretrained."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tiny_tokenizer(directory, words_of_builtins=words_of_builtins)
    torch.manual_seed(2)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=256,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="session")
def tiny_causal_lm(tmp_path_factory) -> str:
    """A 2-layer Llama (hidden 32) saved with save_pretrained."""
    return _tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_preference_lm(tmp_path_factory) -> str:
    """The tiny Llama with a tokenizer that knows every word of the built-in datasets (see :func:`_vocabulary`):
    a preference between two replies is learnable only when they are different tokens."""
    return _tiny_llama(tmp_path_factory.mktemp("tiny-preference-llama"), words_of_builtins=True)


@pytest.fixture(scope="session")
def tiny_config(tiny_classifier, tiny_causal_lm, tiny_preference_lm):
    """``tiny_config(task, **overrides)``: a small, fast federation on a tiny model and built-in data."""
    from fedfm.config import FederationConfig
    from fedfm.data import resolve_labels

    def make(task: str = "classification", **overrides):
        source = {"classification": "builtin:topics", "causal-lm": "builtin:topics-instructions",
                  "preference": "builtin:topics-preferences"}[task]
        model = {"classification": tiny_classifier, "causal-lm": tiny_causal_lm, "preference": tiny_preference_lm}[task]
        base = FederationConfig.parse({
            "task": task,
            "model": {"name_or_path": model, "max_length": 48},
            "data": {"source": source,
                     "max_samples": 240, "partition": "iid"},
            "clients": 3,
            "rounds": 2,
            "training": {"local_steps": 4, "batch_size": 8, "learning_rate": 5e-3},
            "lora": {"r": 4, "alpha": 8},
        })
        return resolve_labels(base.with_overrides(overrides))

    return make


@pytest.fixture(scope="session")
def classification_pipeline_run(tiny_config, tmp_path_factory):
    """``(cfg, run, events)``: one kfp.local run of a 2-round, 3-client classification federation and the progress
    events it emitted. test_pipeline checks the run and the server state its rounds pass on, test_simulate
    compares simulate with it (SHARED_RUNS keeps the three on one worker): one pipeline run serves them all.
    FedAvgM, whose momentum is server state that each round's aggregate step must carry to the next."""
    from fedfm.pipelines.local_runner import run_local

    cfg = tiny_config(rounds=2, clients=3, **{"training.local_steps": 6, "strategy.name": "fedavgm",
                                              "strategy.params": {"server_momentum": 0.5}})
    seen: list[dict] = []
    run = run_local(cfg, tmp_path_factory.mktemp("classification-pipeline") / "run", on_event=seen.append)
    return cfg, run, seen
