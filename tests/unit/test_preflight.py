"""fedfm.preflight.check_inputs: model paths, data files and storage URIs refused up front, naming the
field and the fix, without creating, writing or downloading anything."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fedfm import preflight
from fedfm.config import FederationConfig
from fedfm.errors import DataError, FedFMError, ModelError, StorageError

MODEL_FIX = "not a directory with a Hugging Face config.json; give a hub id or a local model directory"


@pytest.fixture
def model_dir(tmp_path) -> Path:
    from transformers import BertConfig

    directory = tmp_path / "tiny-bert"
    BertConfig(vocab_size=32, hidden_size=8, num_hidden_layers=1, num_attention_heads=1,
               intermediate_size=16).save_pretrained(directory)
    return directory


@pytest.fixture
def data_file(tmp_path) -> Path:
    path = tmp_path / "tickets.csv"
    path.write_text("text,label\nhello,0\nworld,1\n")
    return path


_ROOTS: list[Path] = []


@pytest.fixture(autouse=True)
def _watched(tmp_path):
    _ROOTS[:] = [tmp_path]
    yield
    _ROOTS.clear()


def _snapshot() -> dict[str, int]:
    paths = [path for root in _ROOTS for path in (root, *root.rglob("*"))]
    paths += [Path.cwd(), *Path.cwd().glob("*")]
    return {str(path): path.lstat().st_mtime_ns for path in paths}


def check_inputs(cfg: FederationConfig, **options) -> None:
    """fedfm.preflight.check_inputs, asserting that it creates, modifies and deletes nothing (under the
    test's tmp_path, or in the working directory)."""
    before = _snapshot()
    try:
        preflight.check_inputs(cfg, **options)
    finally:
        assert _snapshot() == before, "check_inputs changed the filesystem"


def config(**fields) -> FederationConfig:
    return FederationConfig.parse(fields)


def test_a_valid_local_setup_passes(tmp_path, model_dir, data_file):
    cfg = config(model={"name_or_path": str(model_dir)}, data={"source": str(data_file)},
                 execution={"storage_uri": str(tmp_path / "store" / "deep"),
                            "client_state_uri": f"file://{tmp_path}/state"},
                 clients=[{"name": "a", "state_uri": "memory://fedfm/a"}, "b"])
    check_inputs(cfg)
    assert not (tmp_path / "store").exists() and not (tmp_path / "state").exists()


def test_the_defaults_pass():
    check_inputs(FederationConfig())  # a hub id (packaged), builtin:topics, no storage URIs


def test_hub_ids_are_left_to_load_time():
    check_inputs(config(model={"name_or_path": "no-such-owner/no-such-model"}, data={"source": "owner/dataset"}))
    check_inputs(config(data={"source": "hf:owner/dataset"}))


@pytest.mark.parametrize("name", ["/nonexistent/model", "./models/bert", "../bert", "~/no-such-model-dir",
                                  "models/bert/v1"])
def test_a_missing_local_model_is_a_model_error(name):
    with pytest.raises(ModelError) as info:
        check_inputs(config(model={"name_or_path": name}))
    message = str(info.value)
    assert f"model.name_or_path {name!r}" in message and "does not exist" in message and MODEL_FIX in message


def test_a_model_directory_without_config_json(tmp_path, model_dir):
    (model_dir / "config.json").unlink()
    with pytest.raises(ModelError, match="has no config.json") as info:
        check_inputs(config(model={"name_or_path": str(model_dir)}))
    assert MODEL_FIX in str(info.value) and str(model_dir) in str(info.value)


def test_a_model_file_or_damaged_config_json(tmp_path, model_dir):
    (model_dir / "config.json").write_text("[1, 2")
    with pytest.raises(ModelError, match="config.json is not a JSON object"):
        check_inputs(config(model={"name_or_path": str(model_dir)}))
    with pytest.raises(ModelError, match=f"is a file: {MODEL_FIX}"):
        check_inputs(config(model={"name_or_path": str(model_dir / "config.json")}))


def test_a_relative_directory_counts_as_local(tmp_path, monkeypatch, model_dir):
    monkeypatch.chdir(tmp_path)
    check_inputs(config(model={"name_or_path": "tiny-bert"}))  # resolved like from_pretrained does
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="has no config.json"):
        check_inputs(config(model={"name_or_path": "empty"}))


def test_a_model_uri_is_refused():
    with pytest.raises(ModelError, match="is a URI"):
        check_inputs(config(model={"name_or_path": "s3://bucket/models/bert"}))


@pytest.mark.parametrize("source", ["/nonexistent/tickets.csv", "data/missing.jsonl", "./x", "file:///nonexistent.csv"])
def test_a_missing_data_file_is_a_data_error(source):
    with pytest.raises(DataError) as info:
        check_inputs(config(data={"source": source}))
    assert "data.source" in str(info.value) and "does not exist" in str(info.value)
    assert source.removeprefix("file://") in str(info.value)


def test_missing_client_files_name_the_client(tmp_path, data_file):
    cfg = config(clients=[{"name": "acme", "train": str(data_file), "eval": str(tmp_path / "eval.csv")}])
    with pytest.raises(DataError, match=r"clients\[0\].eval \(client 'acme'\).*eval.csv does not exist"):
        check_inputs(cfg)
    cfg = config(clients=[{"name": "acme", "train": str(tmp_path / "train.parquet")}])
    with pytest.raises(DataError, match=r"clients\[0\].train \(client 'acme'\)"):
        check_inputs(cfg)


def test_data_source_is_only_checked_when_a_client_is_simulated(data_file):
    check_inputs(config(data={"source": "/nonexistent.csv"}, clients=[{"name": "a", "train": str(data_file)}]))


def test_unsupported_types_and_unknown_builtins(tmp_path):
    sheet = tmp_path / "data.xlsx"
    sheet.write_bytes(b"not really")
    with pytest.raises(DataError, match="unsupported type '.xlsx'"):
        check_inputs(config(data={"source": str(sheet)}))
    with pytest.raises(DataError, match="builtin:topics"):
        check_inputs(config(data={"source": "builtin:nope"}))
    folder = tmp_path / "folder"
    folder.mkdir()
    check_inputs(config(data={"source": str(folder)}))  # a dataset folder, read by datasets


def test_a_data_uri_with_an_unknown_scheme(tmp_path):
    with pytest.raises(DataError, match="no fsspec implementation handles scheme 'nosuch'"):
        check_inputs(config(data={"source": "nosuch://bucket/tickets.csv"}))
    check_inputs(config(data={"source": "memory://bucket/tickets.csv"}))  # reading it is the check


@pytest.mark.parametrize("field", ["storage_uri", "client_state_uri"])
def test_an_unknown_storage_scheme_names_the_field(field):
    with pytest.raises(StorageError) as info:
        check_inputs(config(execution={field: "nosuch://bucket/prefix"}))
    assert f"execution.{field} 'nosuch://bucket/prefix'" in str(info.value)
    assert "no fsspec implementation handles scheme 'nosuch'" in str(info.value)


def test_a_scheme_whose_package_is_missing(monkeypatch):
    import fsspec

    real = fsspec.get_filesystem_class

    def missing(protocol):
        if protocol == "s3":
            raise ImportError("Install s3fs to access S3")
        return real(protocol)

    monkeypatch.setattr(fsspec, "get_filesystem_class", missing)
    cfg = config(clients=[{"name": "acme", "state_uri": "s3://bucket/acme"}])
    with pytest.raises(StorageError) as info:
        check_inputs(cfg)
    message = str(info.value)
    assert "clients[0].state_uri (client 'acme')" in message and "Install s3fs" in message
    assert "kfp-fedfm[object-stores]" in message
    check_inputs(cfg, local=False)  # the step's image installs it; this machine need not


def test_a_local_storage_path_under_a_file(tmp_path, data_file):
    with pytest.raises(StorageError, match=r"execution.client_state_uri .*tickets.csv is a file, so no directory"):
        check_inputs(config(execution={"client_state_uri": str(data_file / "state")}))
    with pytest.raises(StorageError, match=r"execution.storage_uri .* is a file; it must name a directory"):
        check_inputs(config(execution={"storage_uri": str(data_file)}))


def test_a_storage_directory_that_is_not_writable(tmp_path, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    if os.geteuid() == 0:  # root may write anywhere: answer as the kernel would for another user
        real = os.access
        monkeypatch.setattr(os, "access", lambda path, mode: False if Path(path) == locked else real(path, mode))
    try:
        with pytest.raises(StorageError, match=r"clients\[1\].state_uri \(client 'b'\).*is not writable"):
            check_inputs(config(clients=["a", {"name": "b", "state_uri": str(locked / "b")}]))
    finally:
        locked.chmod(0o700)


def test_a_storage_path_the_filesystem_refuses():
    with pytest.raises(StorageError, match="execution.client_state_uri .* is not a usable path"):
        check_inputs(config(execution={"client_state_uri": "/tmp/" + "x" * 5000 + "/state"}))


def test_kubernetes_mode_does_not_look_up_local_paths():
    cfg = config(execution={"mode": "kubernetes", "storage_uri": "s3://bucket/fedfm"},
                 model={"name_or_path": "/models/in-the-image"},
                 data={"source": "/data/in-the-pod.csv", "labels": ["a", "b"]})
    check_inputs(cfg)
    with pytest.raises(StorageError, match="scheme 'nosuch'"):
        check_inputs(cfg.with_overrides({"execution.storage_uri": "nosuch://x"}))


def test_errors_are_fedfm_errors_with_one_line_messages(tmp_path):
    for cfg in (config(model={"name_or_path": "./missing"}), config(data={"source": "./missing.csv"}),
                config(execution={"storage_uri": "nosuch://x"})):
        with pytest.raises(FedFMError) as info:
            check_inputs(cfg)
        assert "\n" not in str(info.value)


# --- fedfm validate's deeper checks (issue 18, item 3): what a run would refuse minutes in ---------------------


def test_lora_target_modules_the_model_lacks_are_refused_naming_the_ones_it_has(tiny_config):
    """`[query, value]` (BERT's names) on a Llama once passed validation and failed the first fine-tune."""
    llama = tiny_config("causal-lm", **{"lora.target_modules": ["query", "value"]})
    with pytest.raises(ModelError, match=r"lora.target_modules \['query', 'value'\] cannot be applied to model .* "
                                         r"\(llama\): .*its linear layers are named .*q_proj.*v_proj"):
        preflight.check_model(llama)
    preflight.check_model(tiny_config("causal-lm", **{"lora.target_modules": ["q_proj", "v_proj"]}))
    preflight.check_model(tiny_config())  # PEFT's default for BERT


def test_a_model_that_does_not_load_is_refused(tiny_config, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="cannot load tokenizer"):
        preflight.check_model(tiny_config(**{"model.name_or_path": str(tmp_path / "empty")}))


def test_a_named_column_the_dataset_lacks_is_refused(tiny_config):
    from fedfm.data import describe_clients  # what fedfm validate reads every tenant's data with

    with pytest.raises(DataError, match="has no column 'body'.*set by data.text_column"):
        describe_clients(tiny_config(**{"data.text_column": ["body"]}))
    rows = describe_clients(tiny_config())
    assert sorted(rows) == ["tenant-0", "tenant-1", "tenant-2"] and all(entry["train"] > 0 for entry in rows.values())


def test_a_cluster_config_is_warned_about_local_paths_and_no_checkpoints(tiny_config):
    cluster = tiny_config(**{"execution.mode": "kubernetes", "execution.storage_uri": "s3://fed",
                             "data.source": "./tickets.csv", "data.labels": ["billing", "outage"]})
    warnings = " | ".join(preflight.cluster_warnings(cluster))
    assert "model.name_or_path" in warnings and "is a local path" in warnings
    assert "data.source './tickets.csv' is a local path" in warnings
    assert "execution.checkpoint_uri is not set: a run that stops cannot be resumed" in warnings
    resumable = cluster.with_overrides({"execution.checkpoint_uri": "s3://fed/checkpoints",
                                        "model.name_or_path": "meta-llama/Llama-3.2-1B", "data.source": "hf:org/set"})
    assert preflight.cluster_warnings(resumable) == []
    assert preflight.cluster_warnings(tiny_config()) == []  # a local run
