"""Bad input exits 2 with one line naming the key or file, before anything is written."""
import pytest

import run
from fedtask.config import ConfigError, from_dict, load_config, parameter_error, parse_set, to_toml, with_overrides


def run_cli(capsys, *argv):
    status = run.main(list(argv))
    err = capsys.readouterr().err.strip().splitlines()
    return status, err


@pytest.mark.parametrize("assignment, key", [
    ("data.nmu_in_tasks=3", "data.nmu_in_tasks"),               # unknown key
    ("federation.rounds=\"ten\"", "federation.rounds"),          # wrong type
    ("attack.k_strong=999", "attack.k_strong"),                   # k larger than the samples a task has
    ("attack.k_weak=999", "attack.k_weak"),
    ("dp.noise_multiplier=-1.0", "dp.noise_multiplier"),         # negative noise
    ("dp.clipping_norm=0.0", "dp.clipping_norm"),
    ("dp.delta=1.5", "dp.delta"),
    ("federation.tasks_per_round=65", "federation.tasks_per_round"),  # sampling rate above 1
    ("federation.warm_start_rounds=100000", "federation.warm_start_rounds"),
    ("data.path=\"/no/such/file.parquet\"", "data.path"),        # missing data file
    ("data.name=\"mnist\"", "data.name"),
    ("federation.engine=\"spark\"", "federation.engine"),
    ("federation.samples_per_pass=-1", "federation.samples_per_pass"),
])
def test_bad_values_exit_2_naming_the_key(capsys, tmp_path, assignment, key):
    out = tmp_path / "run"
    status, err = run_cli(capsys, "train", "--config", "configs/synthetic.toml", "--set", assignment, "--out", str(out))
    assert status == 2
    assert len(err) == 1 and key in err[0], err
    assert "Traceback" not in "\n".join(err)
    assert not out.exists() and not out.with_name("run.incomplete").exists()


def test_missing_config_file_is_named(capsys, tmp_path):
    status, err = run_cli(capsys, "train", "--config", str(tmp_path / "nope.toml"))
    assert status == 2 and "nope.toml" in err[0]


def test_unknown_key_in_preset_is_named(capsys, tmp_path):
    preset = tmp_path / "bad.toml"
    preset.write_text("[federation]\nroundz = 3\n")
    status, err = run_cli(capsys, "train", "--config", str(preset))
    assert status == 2 and "federation.roundz" in err[0] and "bad.toml" in err[0]


def test_attack_on_a_directory_that_is_no_run(capsys, tmp_path):
    status, err = run_cli(capsys, "attack", "--run", str(tmp_path))
    assert status == 2 and "config.toml" in err[0]


def test_set_values_are_typed_as_toml():
    assert parse_set("federation.rounds=5") == ("federation.rounds", 5)
    assert parse_set("dp.enabled=true") == ("dp.enabled", True)
    assert parse_set("data.name=femnist") == ("data.name", "femnist")
    config = load_config("configs/synthetic.toml", ["federation.server_lr=1", "seed=3"])
    assert config.federation.server_lr == 1.0 and isinstance(config.federation.server_lr, float)
    assert config.seed == 3


def test_resolved_config_round_trips_through_toml(tmp_path):
    config = load_config("configs/synthetic.toml", ["dp.target_epsilon=8.0", "attack.whiten=true"])
    path = tmp_path / "config.toml"
    path.write_text(to_toml(config))
    assert load_config(path) == config


def test_boolean_is_not_an_integer():
    with pytest.raises(ConfigError, match="federation.rounds"):
        load_config(None, ["federation.rounds=true"])


def test_overrides_keep_the_config_typed_and_hashable():
    # the task cache is keyed by the frozen sections: every way of making a config must give hashable ones
    config = load_config("configs/synthetic.toml", ["model.lora_targets=[\"a\"]"])
    changed = with_overrides(config, {"dp.enabled": True})
    assert changed.model.lora_targets == ("a",) and changed.dp.enabled and not config.dp.enabled
    assert hash(changed.model) == hash(config.model)
    assert from_dict(changed.to_dict()) == changed


@pytest.mark.parametrize("assignment, key", [
    ("federation.server_lr=inf", "federation.server_lr"),
    ("dp.noise_multiplier=nan", "dp.noise_multiplier"),
    ("seed=-1", "seed"),
    ("seed=18446744073709551616", "seed"),
])
def test_non_finite_and_out_of_range_values_are_refused(assignment, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config("configs/synthetic.toml", [assignment])


def test_library_errors_name_the_configuration_key():
    error = parameter_error(ValueError("target_epsilon=0.1 cannot be reached"), {"target_epsilon": "dp.target_epsilon"})
    assert str(error) == "dp.target_epsilon: target_epsilon=0.1 cannot be reached"
    assert str(parameter_error(ValueError("k must not exceed samples"), {"k": "--k"})).startswith("--k: k must")
