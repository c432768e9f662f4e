"""bench/quality.py without training: the federation it builds from any CSV, with the library's defaults."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture(scope="module")
def quality():
    sys.path.insert(0, str(BENCH))  # robust.py and quality.py import each other's helpers by module name
    spec = importlib.util.spec_from_file_location("bench_quality", BENCH / "quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    sys.path.remove(str(BENCH))


def test_any_csv_with_the_librarys_training_defaults(quality, tmp_path):
    from fedfm.config import FederationConfig

    data = tmp_path / "intents.csv"
    data.write_text("utterance,intent\n" + "".join(f"text {i},{'ab'[i % 2]}\n" for i in range(40)))
    cfg = quality.bench_config(quality.parse_args(["--data", str(data), "--text-column", "utterance",
                                                   "--label-column", "intent", "--clients", "2"]))
    defaults = FederationConfig()
    assert cfg.training == defaults.training and cfg.head == defaults.head and cfg.lora == defaults.lora
    assert cfg.model.max_length == defaults.model.max_length and cfg.strategy.name == "fedavg"
    assert cfg.data.text_column == ["utterance"] and cfg.data.label_column == "intent"
    assert cfg.data.labels == ["a", "b"] and cfg.data.partition == "dirichlet:0.3" and cfg.name == "intents"


def test_training_flags_override_the_defaults_and_text_defaults_by_dataset(quality, tmp_path):
    data = tmp_path / "snips.csv"
    data.write_text("text,label\n" + "".join(f"text {i},{'xy'[i % 2]}\n" for i in range(40)))
    args = quality.parse_args(["--data", str(data), "--local-steps", "30", "--learning-rate", "0.002",
                               "--lora-r", "4", "--clients", "2"])
    cfg = quality.bench_config(args)
    assert cfg.training.local_steps == 30 and cfg.training.local_epochs is None
    assert cfg.training.learning_rate == 0.002 and cfg.lora.r == 4 and cfg.lora.alpha == 8
    assert cfg.data.text_column == ["text"]  # not AG News: the text column is "text"
    assert quality.parse_args([]).text_column is None  # AG News: title and description, resolved in bench_config


def test_diagnose_needs_the_simulate_engine(quality, capsys):
    with pytest.raises(SystemExit) as caught:
        quality.parse_args(["--diagnose"])
    assert caught.value.code == 2 and "--diagnose reads the clients' updates" in capsys.readouterr().err
