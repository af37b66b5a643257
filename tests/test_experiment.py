"""End to end on the synthetic tasks (vectorised engine: the same algorithm, seconds not minutes)."""
import json

import pytest

import run
from fedtask import pipeline
from fedtask.config import load_config

FAST = ['federation.engine="vectorized"']


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """The default synthetic config, trained and attacked."""
    out = tmp_path_factory.mktemp("default") / "run"
    config = load_config("configs/synthetic.toml", FAST + ["attack.bootstrap=200"])
    pipeline.run_experiment(config, out)
    return out


def test_the_synthetic_config_learns(tmp_path):
    # with enough samples per task the heads clearly beat chance and the majority-label baseline
    config = load_config("configs/synthetic.toml", FAST + ["data.train_samples_per_task=64", "federation.rounds=120"])
    results = pipeline.run_training(config, tmp_path / "run", on_round=None)
    utility = results["utility"]
    assert utility["in_task_accuracy"] > 0.8
    assert utility["in_task_accuracy"] > utility["majority_baseline_accuracy"] + 0.05


def test_null_control_sits_near_half_and_the_trained_encoder_leaks(default_run):
    attacks = json.loads((default_run / "results.json").read_text())["attacks"]
    variance = attacks["variance"]
    assert abs(variance["null_control"]["auc"] - 0.5) < 0.1
    assert abs(attacks["inner_product"]["null_control"]["auc"] - 0.5) < 0.1
    assert variance["strong"]["auc"] > variance["null_control"]["auc"] + 0.1
    assert variance["strong"]["auc_ci95"][0] > 0.5  # the whole interval is above chance
    for name in ("variance", "inner_product"):
        for game in ("strong", "weak", "null_control"):
            metrics = attacks[name][game]
            assert metrics["num_in_tasks"] == 64 and metrics["num_out_tasks"] == 64 and metrics["trials"] == 128
            assert set(metrics["tpr_at_fpr"]) == {"0.001", "0.01", "0.1"}
            assert set(metrics["percentile"]) == {"50", "75", "90"}
    assert attacks["variance"]["strong"]["k"] == 16 and attacks["variance"]["weak"]["k"] == 8


def test_report_and_plots_are_written(default_run):
    for name in ("report.md", "roc.png", "hist.png", "results.json", "config.toml"):
        assert (default_run / name).stat().st_size > 0, name
    report = (default_run / "report.md").read_text()
    assert "AUC" in report and "Null control" in report


def test_attack_reruns_post_training_with_new_settings(default_run, capsys):
    before = json.loads((default_run / "results.json").read_text())
    status = run.main(["attack", "--run", str(default_run), "--set", "attack.whiten=true", "--set", "attack.trials=32",
                       "--set", "attack.bootstrap=50"])
    assert status == 0
    after = json.loads((default_run / "results.json").read_text())
    assert after["config"]["attack"]["whiten"] is True
    assert after["attacks"]["variance"]["strong"]["trials"] == 32
    assert after["utility"] == before["utility"]  # training results untouched
    assert "Coordinate-wise variance" in capsys.readouterr().out
    # training keys cannot change on a finished run
    assert run.main(["attack", "--run", str(default_run), "--set", "federation.rounds=3"]) == 2
