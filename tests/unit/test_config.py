"""The federation config: defaults, overrides, files, and errors that name the field."""

from __future__ import annotations

import json

import pytest

from fedfm.config import CENTRALIZED_CLIENT, FederationConfig, load_config
from fedfm.errors import ConfigError


def test_default_is_the_embedded_federation():
    cfg = FederationConfig()
    assert cfg.model.name_or_path == "sentence-transformers/all-MiniLM-L6-v2"
    assert cfg.task == "classification"
    assert cfg.data.source == "builtin:topics"
    assert cfg.client_names == ["tenant-0", "tenant-1", "tenant-2", "tenant-3"]
    assert cfg.rounds == 3
    assert cfg.training.local_steps is None and cfg.training.local_epochs == 1.0


def test_the_json_form_round_trips_and_holds_no_nulls():
    cfg = FederationConfig.parse({"clients": ["hospital-a", {"name": "bank-b", "train": "/data/b.csv"}],
                                  "training": {"local_epochs": 1.5}, "data": {"text_column": "title, description"}})
    data = cfg.as_dict()
    assert "null" not in json.dumps(data)  # a KFP struct parameter cannot hold null
    assert FederationConfig.parse(data) == cfg
    assert cfg.data.text_column == ["title", "description"]
    assert cfg.client("bank-b").train == "/data/b.csv"


def test_overrides_apply_dotted_paths_and_switch_the_training_budget():
    cfg = FederationConfig().with_overrides({"clients": 8, "rounds": 10, "lora.r": 16, "training.local_epochs": 2.0,
                                             "model.name_or_path": None})
    assert len(cfg.clients) == 8 and cfg.rounds == 10 and cfg.lora.r == 16
    assert cfg.training.local_epochs == 2.0 and cfg.training.local_steps is None
    assert cfg.model.name_or_path == "sentence-transformers/all-MiniLM-L6-v2"  # None means "not given"
    back = cfg.with_overrides({"training.local_steps": 7})
    assert back.training.local_steps == 7 and back.training.local_epochs is None


@pytest.mark.parametrize("data, message", [
    ({"rounds": 0}, "rounds: Input should be greater than or equal to 1"),
    ({"clients": [{"name": "Tenant_A"}]}, "clients.0.name: client name 'Tenant_A' must be a lowercase RFC 1123 label"),
    ({"clients": ["a", "a"]}, "client names must be unique; repeated: a"),
    ({"clients": [CENTRALIZED_CLIENT]}, "reserved for centralized runs"),
    ({"data": {"partition": "dirichlet:-1"}},
     "data.partition: partition 'dirichlet:-1': ALPHA must be a positive number"),
    ({"data": {"partition": "shards"}}, "data.partition: partition 'shards' is not one of iid, dirichlet:ALPHA"),
    ({"training": {"local_steps": 5, "local_epochs": 1}}, "set only one of training.local_steps and"),
    ({"training": {"batch_size": 10, "world_size": 4}}, "batch_size 10 must be a multiple of world_size"),
    ({"training": {"zero_stage": 4}}, "training.zero_stage"),
    ({"task": "regression"}, "task: Input should be 'classification', 'causal-lm' or 'preference'"),
    ({"lora": {"rank": 8}}, "lora.rank: Extra inputs are not permitted"),
])
def test_bad_configs_name_the_field(data, message):
    with pytest.raises(ConfigError) as raised:
        FederationConfig.parse(data)
    assert message in str(raised.value)


def test_centralized_runs_one_pooled_client_with_every_tenants_steps():
    cfg = FederationConfig(clients=4, centralized=True, training={"local_steps": 20})
    assert cfg.training_clients == [CENTRALIZED_CLIENT]
    assert cfg.local_steps_for(CENTRALIZED_CLIENT) == 4 * 20
    assert cfg.local_steps_for("tenant-0") == 20
    # by default a round is one epoch: the pooled client's epoch is every tenant's epoch together
    epochs = FederationConfig(clients=4, centralized=True)
    assert epochs.local_steps_for(CENTRALIZED_CLIENT) is None and epochs.training.local_epochs == 1.0
    with pytest.raises(ConfigError, match="cannot be pooled here: a"):
        FederationConfig.parse({"clients": [{"name": "a", "train": "x.csv"}], "centralized": True})


def test_load_config_reads_yaml_and_json_and_names_the_file(tmp_path):
    (tmp_path / "f.yaml").write_text("rounds: 5\nclients: 2\nlora:\n  r: 4\n")
    assert load_config(tmp_path / "f.yaml").rounds == 5
    (tmp_path / "f.json").write_text(json.dumps({"seed": 3}))
    assert load_config(tmp_path / "f.json").seed == 3
    (tmp_path / "bad.yaml").write_text("rounds: [1,\n")
    with pytest.raises(ConfigError, match="bad.yaml is not valid YAML/JSON"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="list.yaml must hold a mapping"):
        load_config(tmp_path / "list.yaml")
    (tmp_path / "typo.yaml").write_text("round: 5\n")
    with pytest.raises(ConfigError, match=r"invalid config file .*typo.yaml:\n  round: Extra inputs"):
        load_config(tmp_path / "typo.yaml")
    with pytest.raises(ConfigError, match="cannot read config file .*missing.yaml"):
        load_config(tmp_path / "missing.yaml")


def test_client_sampling_is_seeded_and_respects_the_quorum():
    cfg = FederationConfig.parse({"clients": 10, "policy": {"sample_fraction": 0.3, "min_clients": 4}})
    drawn = [cfg.sampled_clients(r) for r in range(1, 6)]
    assert all(len(clients) == 4 for clients in drawn)  # ceil(0.3 × 10) = 3 < min_clients 4
    assert len({tuple(clients) for clients in drawn}) > 1  # a new draw each round
    assert drawn == [FederationConfig.parse(cfg.as_dict()).sampled_clients(r) for r in range(1, 6)]
    assert cfg.with_overrides({"seed": 1}).sampled_clients(1) != drawn[0] or \
        cfg.with_overrides({"seed": 1}).sampled_clients(2) != drawn[1]
    assert FederationConfig(clients=3).sampled_clients(7) == ["tenant-0", "tenant-1", "tenant-2"]
    assert cfg.quorum(4) == 4 and FederationConfig(clients=3).quorum(3) == 3
    with pytest.raises(ConfigError, match="policy.min_clients 5 exceeds the 3 client"):
        FederationConfig.parse({"clients": 3, "policy": {"min_clients": 5}})
    with pytest.raises(ConfigError, match="execution.storage_uri is required when execution.mode is kubernetes"):
        FederationConfig.parse({"execution": {"mode": "kubernetes"}})


def test_quarantined_clients_are_never_drawn_and_fresh_draws_avoid_the_round():
    cfg = FederationConfig(clients=8).with_overrides({"policy.sample_fraction": 0.5, "policy.min_clients": 3})
    for round_index in range(1, 20):
        drawn = cfg.sampled_clients(round_index, exclude={"tenant-0", "tenant-1"})
        assert len(drawn) == 3 and not {"tenant-0", "tenant-1"} & set(drawn)  # half of the 6 left
        assert drawn == cfg.sampled_clients(round_index, exclude={"tenant-0", "tenant-1"})  # the same in any process
        fresh = cfg.fresh_clients(round_index, 2, 2, exclude={*drawn, "tenant-0"})
        assert len(fresh) == 2 and not set(fresh) & {*drawn, "tenant-0"}
    assert cfg.fresh_clients(1, 2, 5, exclude=cfg.client_names[:7]) == ["tenant-7"]  # all that is left


def test_below_quorum_retry_needs_a_quorum_and_no_privacy_or_secure_aggregation():
    with pytest.raises(ConfigError, match="below_quorum retry needs policy.min_clients"):
        FederationConfig.parse({"policy": {"below_quorum": "retry"}})
    with pytest.raises(ConfigError, match="cannot be combined with differential privacy"):
        FederationConfig.parse({"policy": {"below_quorum": "retry", "min_clients": 2},
                                "privacy": {"noise_multiplier": 1.0, "clip_norm": 1.0}})
    assert FederationConfig.parse({"policy": {"below_quorum": "retry", "min_clients": 2}}).policy.max_retries == 1


def test_validate_warns_about_a_config_that_weakens_the_threat_model(tmp_path):
    """Issue 17: cluster mode on a filesystem every tenant shares, unbounded sample weights, a known noise seed
    and remote code next to the tenants' Secrets are valid, and said."""
    import yaml
    from typer.testing import CliRunner

    from fedfm.cli import app

    weak = FederationConfig.parse({"clients": [{"name": "a", "namespace": "tenant-a"},
                                               {"name": "b", "namespace": "tenant-b"}],
                                   "data": {"labels": ["no", "yes"]},
                                   "execution": {"mode": "kubernetes", "storage_uri": "file:///shared/fedfm",
                                                 "checkpoint_uri": "s3://fedfm/checkpoints"},
                                   "privacy": {"noise_multiplier": 1.0, "clip_norm": 1.0, "noise_seed": 3},
                                   "model": {"trust_remote_code": True}})
    config = tmp_path / "weak.yaml"
    config.write_text(yaml.safe_dump(weak.as_dict()))
    result = CliRunner().invoke(app, ["validate", "-c", str(config)])
    said = " ".join(result.output.split())
    assert result.exit_code == 0 and said.count("warning: ") == 4, said
    assert "file:///shared/fedfm is a filesystem path" in said and "policy.preset is none" in said
    assert "privacy.noise_seed makes the noise reproducible" in said and "model.trust_remote_code runs code" in said
    strong = weak.with_overrides({"execution.storage_uri": "s3://fedfm/runs", "policy.preset": "checks",
                                  "privacy.noise_seed": 0, "model.trust_remote_code": False})
    strong = strong.model_copy(update={"privacy": strong.privacy.model_copy(update={"noise_seed": None})})
    assert strong.trust_warnings() == []


def test_the_default_partition_fits_the_task_and_a_label_skew_without_labels_is_refused():
    """Issue 18, item 4: the first causal-LM run on the defaults failed on the default dirichlet partition, which
    skews tenants by label; a causal-LM dataset has none. The default is now the task's (and survives the
    round trips a config makes through the CLI's overrides and the pipeline's parameter)."""
    causal = FederationConfig.parse({"task": "causal-lm", "data": {"source": "builtin:topics-instructions"}})
    assert causal.partition == "iid" and causal.data.partition is None
    assert causal.with_overrides({"rounds": 2}).partition == "iid"
    assert FederationConfig.parse(causal.as_dict()).partition == "iid"
    assert FederationConfig().partition == "dirichlet:0.5"
    assert FederationConfig().with_overrides({"task": "causal-lm"}).partition == "iid"
    with pytest.raises(ConfigError, match="data.partition 'dirichlet:0.3' skews tenants by label, and a causal-lm "
                                          "task has no labels: use iid or column:NAME"):
        causal.with_overrides({"data.partition": "dirichlet:0.3"})
    # tenants with data of their own split nothing: no partition applies
    own = {"task": "causal-lm", "data": {"partition": "dirichlet:0.3"}, "clients": [{"name": "a", "train": "a.csv"}]}
    assert FederationConfig.parse(own).partition == "dirichlet:0.3"


def test_unset_clients_stay_unset_through_overrides_and_column_values_become_dns_label_names():
    """Issue 18, item 4: a column partition names the tenants after its values only when the config leaves the
    clients unset, so the CLI's overrides must not turn the four default tenants into given ones."""
    from fedfm.config import client_name_for, numbered_client_count

    unset = FederationConfig().with_overrides({"rounds": 2, "data.partition": "column:site"})
    assert "clients" not in unset.model_fields_set and unset.client_names == [f"tenant-{i}" for i in range(4)]
    assert "clients" in unset.with_overrides({"clients": 3}).model_fields_set
    assert numbered_client_count(unset.with_overrides({"clients": 3}).clients) == 3
    assert numbered_client_count(unset.with_overrides({"clients": ["tenant-0", "east"]}).clients) is None
    assert numbered_client_count(unset.with_overrides({"clients": [{"name": "tenant-0", "lora_r": 4}]}).clients) is None
    assert [client_name_for(value) for value in ["North", "South Wing", "site_b", "Zürich", " 42 ", "a" * 63]] == \
        ["north", "south-wing", "site-b", "zurich", "42", "a" * 63]
    for value in ["---", "", "a" * 64, "CENTRALIZED"]:
        with pytest.raises(ValueError, match=f"value {value!r} "):
            client_name_for(value)


def test_validate_names_the_tenants_of_a_column_partition_and_refuses_a_clients_count_that_disagrees(
        tmp_path, tiny_classifier):
    """`fedfm validate` (which shares config loading with run and simulate): `--partition column:NAME` alone makes
    one tenant per value; `--clients` with another number is an error naming both."""
    from typer.testing import CliRunner

    from fedfm.cli import app
    from fedfm.errors import DataError

    path = tmp_path / "wards.csv"
    path.write_text("text,label,ward\n" + "".join(f"t{i},{'pn'[i % 2]},{['Ward A', 'ICU'][i % 2]}\n"
                                                 for i in range(8)))
    flags = ["validate", "--model", tiny_classifier, "--dataset", str(path), "--partition", "column:ward"]
    result = CliRunner().invoke(app, flags)
    said = " ".join(result.output.split())
    assert result.exit_code == 0, said
    assert "2 client(s)" in said and "data: icu 3+1 rows, ward-a 3+1 rows (train+eval)" in said
    result = CliRunner().invoke(app, [*flags, "--clients", "3"])
    assert isinstance(result.exception, DataError)
    assert str(result.exception).startswith("clients: 3 (--clients 3) asks for 3 tenants, and data.partition "
                                            "'column:ward' makes one per value of column 'ward': 2 ('icu', 'ward-a')")
