"""fedfm.data and fedfm.builtin_data: reading sources, column mapping, partitions, tenants, errors."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from fedfm.builtin_data import load_builtin
from fedfm.config import CENTRALIZED_CLIENT, FederationConfig
from fedfm.data import (
    ClientData,
    describe_clients,
    load_client_data,
    load_eval_sets,
    load_table,
    partition_indices,
    resolve_labels,
)
from fedfm.errors import DataError


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def hf_offline(monkeypatch, tmp_path):
    """``datasets`` offline with a private cache, even when another test imported it before the env was set."""
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


def make_cfg(source, clients=3, **data) -> FederationConfig:
    task = data.pop("task", "classification")
    seed = data.pop("seed", 0)
    return FederationConfig(task=task, seed=seed, clients=clients, data={"source": str(source), **data})


def labelled_frame(n_per_label=40, labels=(1, 2, 10)) -> pd.DataFrame:
    rows = []
    for label in labels:
        for i in range(n_per_label):
            rows.append({"title": f"title {label}-{i}", "body": f"body {label}-{i}", "label": label})
    return pd.DataFrame(rows)


def texts(frame: pd.DataFrame) -> list[str]:
    return frame["text"].tolist()


def assert_canonical_classification(frame: pd.DataFrame) -> None:
    assert list(frame.columns) == ["text", "label"]
    assert frame["label"].dtype == np.int64
    assert all(isinstance(value, str) for value in frame["text"])


# --------------------------------------------------------------------------------------------------
# File formats and column mapping
# --------------------------------------------------------------------------------------------------


def test_csv_round_trip_joins_text_columns_and_maps_int_labels(tmp_path):
    frame = labelled_frame()
    frame.loc[5, ["title", "body"]] = [np.nan, np.nan]  # empty text: dropped
    path = tmp_path / "data.csv"
    frame.to_csv(path, index=False)
    cfg = resolve_labels(make_cfg(path, text_column="title, body", partition="iid"))
    assert cfg.data.text_column == ["title", "body"]
    assert cfg.data.labels == ["1", "2", "10"]  # read from CSV as ints, numerically sorted, no "1.0"

    parts = [load_client_data(cfg, name) for name in cfg.client_names]
    rows = pd.concat([frame for part in parts for frame in (part.train, part.eval)], ignore_index=True)
    assert_canonical_classification(rows)
    assert len(rows) == len(frame) - 1
    expected = {f"title {lab}-{i} body {lab}-{i}": str(lab) for lab in (1, 2, 10) for i in range(40)}
    del expected["title 1-5 body 1-5"]
    got = {text: cfg.data.labels[label] for text, label in zip(rows["text"], rows["label"])}
    assert got == expected


def test_jsonl_and_json_own_client_files(tmp_path):
    train = tmp_path / "a-train.jsonl"
    train.write_text("\n".join(json.dumps({"review": f"good {i}", "stars": "pos" if i % 2 else "neg"})
                               for i in range(10)) + "\n\n")
    evaluation = tmp_path / "a-eval.json"
    evaluation.write_text(json.dumps([{"review": "fine", "stars": "pos"}, {"review": "bad", "stars": "neg"}]))
    other = tmp_path / "b-train.jsonl"
    other.write_text("\n".join(json.dumps({"review": f"meh {i}", "stars": "neutral"}) for i in range(5)))
    cfg = FederationConfig(
        clients=[{"name": "a", "train": str(train), "eval": str(evaluation)}, {"name": "b", "train": str(other)}],
        data={"text_column": "review", "label_column": "stars"},
    )
    cfg = resolve_labels(cfg)
    assert cfg.data.labels == ["neg", "neutral", "pos"]  # union of the clients' files, lexicographic

    a = load_client_data(cfg, "a")
    assert isinstance(a, ClientData) and a.client == "a"
    assert texts(a.train) == [f"good {i}" for i in range(10)]
    assert a.train["label"].tolist() == [0 if i % 2 == 0 else 2 for i in range(10)]
    assert texts(a.eval) == ["fine", "bad"] and a.eval["label"].tolist() == [2, 0]

    b = load_client_data(cfg, "b")  # no eval file: eval_fraction split of its train
    assert len(b.train) == 4 and len(b.eval) == 1
    assert sorted(texts(b.train) + texts(b.eval)) == [f"meh {i}" for i in range(5)]
    assert set(b.train["label"]) == {1}


def test_parquet_causal_lm_round_trip(tmp_path):
    frame = pd.DataFrame({
        "question": [f"q{i}" for i in range(30)],
        "answer": [f"a{i}" if i != 7 else "  " for i in range(30)],  # blank response: dropped
        "extra": range(30),
    })
    path = tmp_path / "qa.parquet"
    frame.to_parquet(path)
    cfg = make_cfg(path, task="causal-lm", prompt_column="question", response_column="answer", partition="iid")
    assert resolve_labels(cfg) is cfg
    data = [load_client_data(cfg, name) for name in cfg.client_names]
    for part in data:
        assert list(part.train.columns) == ["prompt", "response"]
        assert len(part.eval) >= 1
    pairs = {(p, r) for part in data for f in (part.train, part.eval) for p, r in zip(f["prompt"], f["response"])}
    assert pairs == {(f"q{i}", f"a{i}") for i in range(30) if i != 7}
    assert "labels" not in describe_clients(cfg)["tenant-0"]


def test_float_labels_become_integer_strings(tmp_path):
    path = tmp_path / "f.json"
    path.write_text(json.dumps({"text": ["x", "y", "z", "w"], "label": [1.0, 2.0, 1.0, 0.5]}))
    raw = load_table(str(path))
    assert len(raw) == 4
    cfg = resolve_labels(make_cfg(path, clients=1, partition="iid"))
    assert cfg.data.labels == ["0.5", "1", "2"]


def test_hf_dataset_folder(tmp_path, hf_offline):
    folder = tmp_path / "my-dataset"
    folder.mkdir()
    labelled_frame(20, labels=("cat", "dog")).to_csv(folder / "train.csv", index=False)
    pd.DataFrame({"title": ["t1", "t2"], "body": ["b1", "b2"], "label": ["dog", "cat"]}).to_csv(
        folder / "test.csv", index=False)

    raw = load_table(str(folder), split="test")
    assert raw["title"].tolist() == ["t1", "t2"]

    cfg = resolve_labels(make_cfg(folder, clients=2, text_column=["title", "body"], partition="dirichlet:1"))
    assert cfg.data.labels == ["cat", "dog"]
    parts = [load_client_data(cfg, name) for name in cfg.client_names]
    all_rows = pd.concat([frame for part in parts for frame in (part.train, part.eval)])
    assert len(all_rows) == 40 and set(all_rows["text"]) == {
        f"title {lab}-{i} body {lab}-{i}" for lab in ("cat", "dog") for i in range(20)}

    with pytest.raises(DataError, match="split 'nope'"):
        load_table(str(folder), split="nope")


def test_hf_id_failure_is_a_data_error(hf_offline):
    expected = r"cannot load Hugging Face dataset 'no-such-owner/no-such-set' \(split 'train'\)"
    with pytest.raises(DataError, match=expected):
        load_table("hf:no-such-owner/no-such-set")


# --------------------------------------------------------------------------------------------------
# Partitions
# --------------------------------------------------------------------------------------------------

CLIENTS = ["a", "b", "c", "d"]
LABELS = np.repeat(np.arange(5), 200)  # 1,000 rows, label-sorted


@pytest.mark.parametrize("scheme, values", [
    ("iid", None),
    ("dirichlet:0.5", LABELS),
    ("column:region", np.array([CLIENTS[i * 7 % 4] for i in range(1000)], dtype=object)),
])
def test_partitions_are_disjoint_complete_and_deterministic(scheme, values):
    first = partition_indices(values, 1000, scheme, CLIENTS, seed=3)
    again = partition_indices(values, 1000, scheme, CLIENTS, seed=3)
    assert list(first) == CLIENTS
    merged = np.concatenate(list(first.values()))
    assert len(merged) == 1000 and set(merged.tolist()) == set(range(1000))
    for name, rows in first.items():
        assert rows.dtype == np.int64 and rows.size > 0
        assert np.all(np.diff(rows) > 0)
        assert np.array_equal(rows, again[name])
    other = partition_indices(values, 1000, scheme, CLIENTS, seed=4)
    if scheme.startswith("column:"):  # a column partition does not depend on the seed
        assert all(np.array_equal(first[n], other[n]) for n in CLIENTS)
    else:
        assert any(not np.array_equal(first[n], other[n]) for n in CLIENTS)


def test_iid_shards_are_near_equal():
    sizes = [len(rows) for rows in partition_indices(None, 1001, "iid", CLIENTS, seed=0).values()]
    assert max(sizes) - min(sizes) <= 1


def test_partition_is_identical_in_another_process():
    code = ("import numpy as np; from fedfm.data import partition_indices; "
            "p = partition_indices(np.repeat(np.arange(5), 200), 1000, 'dirichlet:0.3', ['a','b','c','d'], 11); "
            "print([p[k].tolist() for k in p])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    here = partition_indices(LABELS, 1000, "dirichlet:0.3", CLIENTS, 11)
    assert out.strip() == str([here[k].tolist() for k in here])


def _mean_max_label_share(alpha: float) -> float:
    shares = []
    for seed in range(5):
        for rows in partition_indices(LABELS, 1000, f"dirichlet:{alpha}", CLIENTS, seed).values():
            shares.append(np.bincount(LABELS[rows], minlength=5).max() / len(rows))
    return float(np.mean(shares))


def test_small_alpha_skews_labels_more_than_large_alpha():
    skewed, even = _mean_max_label_share(0.1), _mean_max_label_share(100.0)
    assert even < 0.3  # close to the uniform 1/5
    assert skewed > 0.5
    assert skewed > even + 0.25


def test_dirichlet_every_client_gets_minimum_rows():
    for seed in range(5):
        parts = partition_indices(LABELS, 1000, "dirichlet:0.05", CLIENTS, seed)
        assert min(len(rows) for rows in parts.values()) >= 10


def test_dirichlet_impossible_raises_with_advice():
    labels = np.repeat(np.arange(2), 3)
    with pytest.raises(DataError) as info:
        partition_indices(labels, 6, "dirichlet:0.5", ["a", "b", "c", "d", "e", "f", "g"], 0)
    assert "'g'" in str(info.value)
    with pytest.raises(DataError, match="needs labels"):
        partition_indices(None, 100, "dirichlet:0.5", CLIENTS, 0)


def test_column_partition_gives_each_client_the_rows_of_its_value_and_never_merges_values():
    """Issue 18, item 4: a column partition makes one tenant per value, named after it (a DNS-label form of it);
    clients that disagree with the values are an error naming both sides, where values used to be dealt out
    round-robin (merged) among clients named otherwise."""
    values = np.array(["b", "a", "c", "a", "b", "c", "c"], dtype=object)
    named = partition_indices(values, 7, "column:site", ["c", "a", "b"], 0)
    assert {k: v.tolist() for k, v in named.items()} == {"c": [2, 5, 6], "a": [1, 3], "b": [0, 4]}
    with pytest.raises(DataError) as info:
        partition_indices(values, 7, "column:site", ["x", "a"], 0)
    assert str(info.value).startswith(
        "partition 'column:site' makes one tenant per value of column 'site', named after it ('a', 'b', 'c'), and "
        "the clients ('x', 'a') disagree: no value of the column names client(s) 'x'; value(s) 'b', 'c' name no "
        "client. Leave the clients unset (no --clients)")
    spelled = np.array(["Site A", "site_b", "Zürich", "Site A"], dtype=object)
    shares = partition_indices(spelled, 4, "column:site", ["site-a", "site-b", "zurich"], 0)
    assert {k: v.tolist() for k, v in shares.items()} == {"site-a": [0, 3], "site-b": [1], "zurich": [2]}


def test_column_partition_through_config(tmp_path):
    frame = pd.DataFrame({"text": [f"t{i}" for i in range(12)], "label": ["p", "n"] * 6,
                          "hospital": ["north", "south", "east"] * 4})
    path = tmp_path / "h.csv"
    frame.to_csv(path, index=False)
    cfg = resolve_labels(FederationConfig(clients=["east", "north", "south"],
                                          data={"source": str(path), "partition": "column:hospital"}))
    for name in cfg.client_names:
        part = load_client_data(cfg, name)
        got = sorted(texts(part.train) + texts(part.eval))
        assert got == sorted(frame.loc[frame["hospital"] == name, "text"])

    bad = cfg.with_overrides({"data.partition": "column:ward"})
    with pytest.raises(DataError, match=r"no column 'ward'.*hospital"):
        load_client_data(bad, "east")


def hospital_file(tmp_path, hospitals) -> str:
    frame = pd.DataFrame({"text": [f"t{i}" for i in range(len(hospitals))], "label": ["p", "n"] * (len(hospitals) // 2),
                          "hospital": hospitals})
    path = tmp_path / "h.csv"
    frame.to_csv(path, index=False)
    return str(path)


def test_an_unset_clients_list_becomes_one_tenant_per_column_value_named_after_it(tmp_path):
    """Issue 18, item 4: ``--partition column:NAME`` without clients makes one tenant per value of the column,
    named after it, each holding exactly the rows of its value; a count that agrees names them the same way, one
    that disagrees is an error, not a merge."""
    hospitals = ["North", "South Wing", "east"] * 4
    path = hospital_file(tmp_path, hospitals)
    unset = FederationConfig(data={"source": path, "partition": "column:hospital"}).with_overrides({"rounds": 2})
    cfg = resolve_labels(unset)
    assert cfg.client_names == ["east", "north", "south-wing"]
    names = {"east": "east", "north": "North", "south-wing": "South Wing"}
    for name in cfg.client_names:
        part = load_client_data(cfg, name)
        assert sorted(texts(part.train) + texts(part.eval)) == sorted(
            f"t{i}" for i, hospital in enumerate(hospitals) if hospital == names[name])
    assert resolve_labels(cfg) is cfg  # the names are the values': nothing left to resolve
    assert resolve_labels(unset.with_overrides({"clients": 3})).client_names == cfg.client_names
    with pytest.raises(DataError) as info:
        resolve_labels(unset.with_overrides({"clients": 2}))
    assert str(info.value) == (
        "clients: 2 (--clients 2) asks for 2 tenants, and data.partition 'column:hospital' makes one per value of "
        "column 'hospital': 3 ('east', 'north', 'south-wing'); leave the clients unset (no --clients), or set them "
        "to 3")
    named = cfg.with_overrides({"clients": ["east", "north", "west"]})
    assert resolve_labels(named) is named  # clients given by name are the user's: checked, never renamed
    with pytest.raises(DataError, match=r"and the clients \('east', 'north', 'west'\) disagree: no value of the "
                                        r"column names client\(s\) 'west'; value\(s\) 'south-wing' name no client"):
        describe_clients(named)


@pytest.mark.parametrize("hospitals, message", [
    (["Site A", "site-a"], "data.partition 'column:hospital': values 'Site A' and 'site-a' both name tenant "
                           "'site-a' (row 1); make the values differ in more than case and punctuation"),
    (["north", "--"], "data.partition 'column:hospital': value '--' gives no tenant name (a tenant is named after "
                      "its value as a lowercase RFC 1123 label: a-z, 0-9 and '-', at most 63 characters) (row 1)"),
    (["north", "Centralized"], "value 'Centralized' would name a tenant 'centralized', which is reserved"),
    (["north", None], "row 1 has no value in column 'hospital', which data.partition 'column:hospital' makes the "
                      "tenants of; fill it in or remove the row"),
])
def test_column_values_that_cannot_name_a_tenant_are_named_with_their_row(tmp_path, hospitals, message):
    path = hospital_file(tmp_path, hospitals)
    with pytest.raises(DataError) as info:
        resolve_labels(FederationConfig(data={"source": path, "partition": "column:hospital"}))
    assert str(info.value).startswith(f"data.source {path}: ") and message in str(info.value)


def test_a_column_partition_in_kubernetes_mode_needs_the_clients_by_name(tmp_path):
    from fedfm.errors import ConfigError

    cfg = FederationConfig(data={"source": "s3://bucket/h.csv", "partition": "column:hospital", "labels": ["n", "p"]},
                           execution={"mode": "kubernetes", "storage_uri": "s3://bucket/runs"})
    with pytest.raises(ConfigError, match="in kubernetes mode the data is read in the tenants' namespaces: list the "
                                          "clients by name, one per value"):
        resolve_labels(cfg)
    named = cfg.with_overrides({"clients": ["north", "south"]})
    assert resolve_labels(named) is named


# --------------------------------------------------------------------------------------------------
# Tenants: splits, centralized, eval sets, labels, max_samples
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def topics_cfg(tmp_path):
    path = tmp_path / "topics.csv"
    frame = labelled_frame(50, labels=("red", "green", "blue", "gold"))
    frame.to_csv(path, index=False)
    cfg = resolve_labels(make_cfg(path, clients=4, text_column=["title", "body"], partition="dirichlet:0.5",
                                  eval_fraction=0.25, seed=7))
    return cfg, frame


def test_centralized_is_union_of_tenants(topics_cfg):
    cfg, _ = topics_cfg
    tenants = [load_client_data(cfg, name) for name in cfg.client_names]
    pooled = load_client_data(cfg, CENTRALIZED_CLIENT)
    assert pooled.client == CENTRALIZED_CLIENT
    pd.testing.assert_frame_equal(pooled.train, pd.concat([t.train for t in tenants], ignore_index=True))
    pd.testing.assert_frame_equal(pooled.eval, pd.concat([t.eval for t in tenants], ignore_index=True))


def test_eval_sets_are_all_rows_not_in_training(topics_cfg):
    cfg, frame = topics_cfg
    evals = load_eval_sets(cfg)
    assert list(evals) == cfg.client_names
    trained = set(texts(load_client_data(cfg, CENTRALIZED_CLIENT).train))
    evaluated = [text for part in evals.values() for text in texts(part)]
    everything = {f"{t} {b}" for t, b in zip(frame["title"], frame["body"])}
    assert len(evaluated) == len(set(evaluated))
    assert set(evaluated) == everything - trained and not trained & set(evaluated)
    for name, part in evals.items():  # about eval_fraction of each tenant, at least one row
        tenant = load_client_data(cfg, name)
        total = len(tenant.train) + len(tenant.eval)
        assert 1 <= len(part) and abs(len(part) - 0.25 * total) <= 1


def test_loading_is_deterministic_and_seeded(topics_cfg):
    cfg, _ = topics_cfg
    one, two = load_client_data(cfg, "tenant-2"), load_client_data(cfg, "tenant-2")
    pd.testing.assert_frame_equal(one.train, two.train)
    pd.testing.assert_frame_equal(one.eval, two.eval)
    other = load_client_data(cfg.with_overrides({"seed": 8}), "tenant-2")
    assert texts(other.train) != texts(one.train)


def test_describe_clients(topics_cfg):
    cfg, _ = topics_cfg
    table = describe_clients(cfg)
    assert list(table) == cfg.client_names
    for name, entry in table.items():
        part = load_client_data(cfg, name)
        assert entry["train"] == len(part.train) and entry["eval"] == len(part.eval)
        assert list(entry["labels"]) == cfg.data.labels == ["blue", "gold", "green", "red"]
        assert sum(entry["labels"].values()) == len(part.train)
    # Labels unset: describe_clients reads them itself.
    assert describe_clients(cfg.with_overrides({"data.labels": None})) == table


def test_labels_resolved_automatically_when_unset(tmp_path):
    path = tmp_path / "d.csv"
    labelled_frame(10).to_csv(path, index=False)
    cfg = make_cfg(path, clients=2, text_column="title", partition="iid")
    assert cfg.data.labels is None
    part = load_client_data(cfg, "tenant-0")
    assert set(part.train["label"]) <= {0, 1, 2}


def test_resolve_labels_numeric_sort_and_unchanged_cases(tmp_path):
    path = tmp_path / "n.csv"
    pd.DataFrame({"text": list("abcdef"), "label": [10, 2, 1, 10, 2, 1]}).to_csv(path, index=False)
    cfg = make_cfg(path, partition="iid")
    assert resolve_labels(cfg).data.labels == ["1", "2", "10"]
    assert cfg.data.labels is None  # a copy, not a mutation
    fixed = cfg.with_overrides({"data.labels": ["10", "2", "1"]})
    assert resolve_labels(fixed) is fixed
    one = tmp_path / "one.csv"
    pd.DataFrame({"text": ["a", "b"], "label": ["x", "x"]}).to_csv(one, index=False)
    with pytest.raises(DataError, match="at least 2"):
        resolve_labels(make_cfg(one))


def test_max_samples_keeps_every_label_of_a_sorted_file(tmp_path):
    path = tmp_path / "sorted.csv"
    labelled_frame(100, labels=("a", "b", "c")).to_csv(path, index=False)
    cfg = resolve_labels(make_cfg(path, clients=2, text_column="title", partition="iid", max_samples=30))
    parts = [load_client_data(cfg, name) for name in cfg.client_names]
    rows = pd.concat([f for p in parts for f in (p.train, p.eval)])
    assert len(rows) == 30
    assert set(rows["label"]) == {0, 1, 2}
    again = pd.concat([f for p in (load_client_data(cfg, n) for n in cfg.client_names) for f in (p.train, p.eval)])
    assert texts(again) == texts(rows)


# --------------------------------------------------------------------------------------------------
# Errors name the input and the fix
# --------------------------------------------------------------------------------------------------


def test_missing_column_names_column_and_file(tmp_path):
    path = tmp_path / "cols.csv"
    pd.DataFrame({"sentence": ["a", "b"], "label": [0, 1]}).to_csv(path, index=False)
    with pytest.raises(DataError) as info:
        load_client_data(make_cfg(path, clients=1), "tenant-0")
    message = str(info.value)
    assert "'text'" in message and str(path) in message and "'sentence'" in message
    assert "data.text_column" in message


def test_unknown_label(tmp_path):
    path = tmp_path / "lab.csv"
    pd.DataFrame({"text": ["a", "b", "c"], "label": ["yes", "no", "maybe"]}).to_csv(path, index=False)
    cfg = make_cfg(path, clients=1, labels=["no", "yes"])
    with pytest.raises(DataError) as info:
        load_client_data(cfg, "tenant-0")
    message = str(info.value)
    assert "'maybe'" in message and str(path) in message and "no, yes" in message


def test_unknown_suffix_and_missing_file(tmp_path):
    odd = tmp_path / "data.xlsx"
    odd.write_text("whatever")
    with pytest.raises(DataError) as info:
        load_table(str(odd))
    assert str(odd) in str(info.value) and ".csv" in str(info.value) and ".parquet" in str(info.value)
    missing = tmp_path / "nope.csv"
    with pytest.raises(DataError, match="does not exist") as info:
        load_table(str(missing))
    assert str(missing) in str(info.value)
    with pytest.raises(DataError, match="does not exist"):
        load_table("relative/missing.jsonl")


@pytest.mark.parametrize("name, content", [
    ("bad.parquet", b"PAR1 this is not parquet"),
    ("bad.jsonl", b'{"text": "a"}\n{"text": \n'),
    ("bad.json", b'[{"text": "a"},'),
    ("bad.csv", b'text,label\n"unterminated,1\n'),
    ("empty.csv", b""),
])
def test_corrupt_files_are_data_errors(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError) as info:
        load_table(str(path))
    assert str(path) in str(info.value)


def test_empty_tenant_names_the_client(tmp_path):
    path = tmp_path / "small.csv"
    pd.DataFrame({"text": ["a", "b"], "label": ["x", "y"]}).to_csv(path, index=False)
    cfg = make_cfg(path, clients=3, partition="iid")
    with pytest.raises(DataError) as info:
        load_client_data(cfg, "tenant-0")
    assert "'tenant-2'" in str(info.value) and "iid" in str(info.value)
    with pytest.raises(DataError, match="'b'"):
        partition_indices(np.array(["a", "a"], dtype=object), 2, "column:site", ["a", "b"], 0)


def test_unknown_client_and_builtin():
    cfg = FederationConfig(clients=2)
    with pytest.raises(DataError, match="tenant-0, tenant-1"):
        load_client_data(cfg, "tenant-9")
    with pytest.raises(DataError, match="builtin:topics") as info:
        load_table("builtin:nope")
    assert "builtin:nope" in str(info.value)


def test_dirichlet_on_causal_lm_is_refused():
    with pytest.raises(ValueError, match="iid or column"):  # by the config, before any data is read
        FederationConfig(task="causal-lm", data={"source": "builtin:topics-instructions", "partition": "dirichlet:0.5"})
    with pytest.raises(DataError, match="iid or column"):  # and by the partition itself, given no labels
        partition_indices(None, 10, "dirichlet:0.5", ["a", "b"], 0)


# --------------------------------------------------------------------------------------------------
# Built-in datasets
# --------------------------------------------------------------------------------------------------


def test_builtin_topics_is_deterministic_and_balanced():
    first, second = load_builtin("topics"), load_builtin("topics", seed=5)
    pd.testing.assert_frame_equal(first, second)
    assert list(first.columns) == ["text", "label"]
    assert 2000 <= len(first) <= 3000
    counts = first["label"].value_counts()
    assert sorted(counts.index) == ["business", "health", "science", "sports"]
    assert counts.max() / counts.min() < 1.1
    assert first["text"].is_unique
    assert first["label"].iloc[:100].nunique() == 4  # shuffled, not grouped by topic


def test_builtin_topics_instructions_mirror_topics():
    topics, instructions = load_builtin("topics"), load_builtin("topics-instructions")
    assert list(instructions.columns) == ["prompt", "response"]
    assert instructions["prompt"].tolist() == [f"Classify the topic of: {t}\nTopic:" for t in topics["text"]]
    assert instructions["response"].tolist() == [f" {label}" for label in topics["label"]]


def test_builtin_topics_through_config():
    cfg = resolve_labels(FederationConfig())
    assert cfg.data.labels == ["business", "health", "science", "sports"]
    table = describe_clients(cfg)
    assert sum(entry["train"] + entry["eval"] for entry in table.values()) == 2400
