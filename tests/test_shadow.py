"""The shadow-calibrated adversary: scorers on planted arrays (attacks/calibration.py), the membership
plan and public pool (fedtask/shadow.py), and tiny end-to-end runs (vectorized shadows) through the CLI."""
import json

import numpy as np
import pytest
import torch

import run
from attacks.calibration import challenge_features, feature_names, lira_scores, metaclassifier_scores
from attacks.game import challenge_scores
from attacks.metrics import mann_whitney_auc
from fedtask.config import load_config
from fedtask.data.synthetic import make_synthetic_tasks
from fedtask.shadow import membership_plan, public_pool

METRIC_KEYS = {"auc", "auc_ci95", "tpr_at_fpr", "percentile", "k", "trials", "num_in_tasks", "num_out_tasks"}


def planted(seed=0, tasks=20, trials=12, shadows=8, shift=0.5):
    """Scores whose challenge content dominates (a per-(task, trial) offset shared by every model),
    with a small membership shift: hard without reference models, easy with them."""
    rng = np.random.default_rng(seed)
    content = 5.0 * rng.normal(size=(tasks, trials))
    shadow_in = np.zeros((shadows, tasks), dtype=bool)
    for pair in range(shadows // 2):
        order = rng.permutation(tasks)
        shadow_in[2 * pair, order[: tasks // 2]] = True
        shadow_in[2 * pair + 1, order[tasks // 2:]] = True
    shadow_scores = content + shift * shadow_in[:, :, None] + 0.2 * rng.normal(size=(shadows, tasks, trials))
    target_in = np.arange(tasks) < tasks // 2
    target = content + shift * target_in[:, None] + 0.2 * rng.normal(size=(tasks, trials))
    return target, shadow_scores, shadow_in, target_in


def test_lira_online_and_offline_find_a_leak_the_raw_score_misses():
    target, shadows, shadow_in, target_in = planted()
    raw = mann_whitney_auc(target[target_in], target[~target_in])
    online = lira_scores(target=target, shadows=shadows, shadow_in=shadow_in, mode="online")
    offline = lira_scores(target=target, shadows=shadows, shadow_in=np.zeros_like(shadow_in),
                          mode="offline")  # every shadow taken as OUT
    assert raw < 0.75
    assert mann_whitney_auc(online[target_in], online[~target_in]) > 0.88  # Bayes-optimal ~0.93 here
    # offline sees IN shadows as OUT here, so its reference is blurred, yet still far above the raw score
    assert mann_whitney_auc(offline[target_in], offline[~target_in]) > 0.85


def test_lira_is_at_chance_without_a_leak():
    target, shadows, shadow_in, target_in = planted(shift=0.0, tasks=40)
    online = lira_scores(target=target, shadows=shadows, shadow_in=shadow_in, mode="online")
    assert 0.35 < mann_whitney_auc(online[target_in], online[~target_in]) < 0.65


def test_lira_errors_name_their_parameter():
    target, shadows, shadow_in, _ = planted()
    with pytest.raises(ValueError, match="^mode"):
        lira_scores(target=target, shadows=shadows, shadow_in=shadow_in, mode="sideways")
    with pytest.raises(ValueError, match="^shadows"):
        lira_scores(target=target, shadows=shadows[:, :3], shadow_in=shadow_in, mode="online")
    with pytest.raises(ValueError, match="^shadow_in"):
        lira_scores(target=target, shadows=shadows[:2], shadow_in=shadow_in[:2], mode="online")  # 1 IN per task


def test_metaclassifier_learns_the_planted_feature():
    target, shadows, shadow_in, target_in = planted(seed=3)
    rng = np.random.default_rng(4)
    noise = rng.normal(size=(*shadows.shape, 2))
    features = np.concatenate([shadows[..., None], noise], axis=-1)  # one informative column, two noise
    target_features = np.concatenate([target[..., None], rng.normal(size=(*target.shape, 2))], axis=-1)
    scores, = metaclassifier_scores(train_features=features, train_in=shadow_in, reference_features=features,
                                    reference_in=shadow_in, targets=[target_features])
    assert scores.shape == target.shape
    assert mann_whitney_auc(scores[target_in], scores[~target_in]) > 0.9


def test_features_use_the_games_subsets():
    """The target's statistic columns are the reference-free game's raw scores: same subsets, same whitening."""
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(10 * 12, 5)) + np.repeat(rng.normal(size=(10, 5)), 12, axis=0)
    index = np.repeat(np.arange(10), 12)
    for whiten in (False, True):
        game = challenge_scores(emb, index, 5, 4, 7, np.random.default_rng(42), whiten=whiten)
        features = challenge_features(emb, index, k=4, trials=7, rng=np.random.default_rng(42), whiten=whiten)
        assert features.shape == (10, 7, len(feature_names(5)))
        for j, name in enumerate(game):
            np.testing.assert_allclose(features[..., j], np.concatenate([game[name]["in"], game[name]["out"]]),
                                       rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("mode, size, challenges", [("online", 8, 16), ("online", 10, 15), ("offline", 8, 16)])
def test_membership_plan(mode, size, challenges):
    challenge_in, public_in = membership_plan(shadow_models=6, challenge_tasks=challenges, federation_size=size,
                                              mode=mode, rng=np.random.default_rng(0))
    assert ((challenge_in.sum(axis=1) + public_in.sum(axis=1)) == size).all()  # the target's federation size
    if mode == "online":
        assert (challenge_in.sum(axis=0) == 3).all()  # every challenge task IN for exactly half the shadows
    else:
        assert not challenge_in.any() and public_in.shape[1] == 2 * size
    assert (public_in.sum(axis=0) <= 3).all()
    with pytest.raises(ValueError, match="^shadow_models"):
        membership_plan(shadow_models=5, challenge_tasks=challenges, federation_size=size, mode=mode,
                        rng=np.random.default_rng(0))


def test_public_pool_is_fresh_tasks_of_the_same_distribution():
    config = load_config("configs/synthetic.toml", ["data.num_in_tasks=4", "data.num_out_tasks=4",
                                                    "federation.tasks_per_round=2"])
    target = make_synthetic_tasks(4, 4, 32, 16, 64, 4, seed=0)
    again = make_synthetic_tasks(4, 4, 32, 16, 64, 4, seed=0, task_seed=None)  # the default: unchanged tasks
    assert all(torch.equal(a.train_x, b.train_x) for a, b in zip(target.in_tasks, again.in_tasks))
    pool = public_pool(config, 6, task_seed=123)
    assert len(pool) == 6 and pool[0].train_x.shape == target.in_tasks[0].train_x.shape
    for task in pool:
        assert not any(torch.equal(task.train_x, t.train_x) for t in target.in_tasks + target.out_tasks)


TINY = ["data.num_in_tasks=16", "data.num_out_tasks=16", "data.train_samples_per_task=8",
        "data.holdout_samples_per_task=8", "federation.tasks_per_round=8", "federation.rounds=30",
        "federation.warm_start_rounds=2", "attack.trials=16", "attack.bootstrap=20", "attack.k_strong=8",
        "attack.k_weak=4", 'federation.engine="vectorized"', "attack.shadow_models=4"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("shadow") / "run"
    args = ["train", "--config", "configs/synthetic.toml", "--out", str(out)]
    for item in TINY:
        args += ["--set", item]
    assert run.main(args) == 0
    return out


def _attack(run_dir, tmp_path, name, *sets):
    import shutil

    copy = tmp_path / name
    shutil.copytree(run_dir, copy)
    args = ["attack", "--run", str(copy)]
    for item in sets:
        args += ["--set", item]
    assert run.main(args) == 0
    return json.loads((copy / "results.json").read_text()), copy


def test_online_shadows_end_to_end(trained, tmp_path):
    plain, _ = _attack(trained, tmp_path, "plain")
    results, copy = _attack(trained, tmp_path, "online", "attack.calibration=shadow")
    assert "calibrated" not in plain
    assert results["attacks"] == plain["attacks"]  # the reference-free results do not move
    calibrated = results["calibrated"]
    assert calibrated["shadow_models"] == 4 and calibrated["mode"] == "online"
    assert set(calibrated["lira"]) == {"variance", "inner_product"}
    for games in [*calibrated["lira"].values(), calibrated["metaclassifier"]]:
        assert {"strong", "weak"} <= set(games)
        for metrics in games.values():
            assert set(metrics) == METRIC_KEYS
            assert (metrics["num_in_tasks"], metrics["num_out_tasks"], metrics["trials"]) == (16, 16, 16)
    lira = calibrated["lira"]["variance"]["strong"]["auc"]  # measured: 0.969 against 0.926 reference-free
    assert lira > 0.8 and lira >= plain["attacks"]["variance"]["strong"]["auc"] - 0.05
    assert calibrated["metaclassifier"]["strong"]["auc"] > 0.75  # measured: 0.906
    assert calibrated["lira"]["variance"]["null_control"]["auc"] < lira - 0.2  # the untrained encoder: 0.484
    assert results["privacy"]["empirical_epsilon_lower_bound"]["decisions"] == 16
    assert "Shadow-calibrated attacks" in (copy / "report.md").read_text()
    # a later attack without calibration drops the calibrated block
    again = json.loads((copy / "results.json").read_text())
    assert run.main(["attack", "--run", str(copy)]) == 0
    assert "calibrated" not in json.loads((copy / "results.json").read_text()) and "calibrated" in again


def test_offline_shadows_end_to_end(trained, tmp_path):
    results, _ = _attack(trained, tmp_path, "offline", "attack.calibration=shadow", "attack.shadow_mode=offline")
    calibrated = results["calibrated"]
    assert calibrated["mode"] == "offline" and calibrated["public_tasks"] == 32
    assert calibrated["lira"]["variance"]["strong"]["auc"] > 0.75  # measured: 0.875
    assert set(calibrated["metaclassifier"]["weak"]) == METRIC_KEYS


@pytest.mark.parametrize("setting, key", [
    ("attack.calibration=bogus", "attack.calibration"),
    ("attack.shadow_models=3", "attack.shadow_models"),
    ("attack.shadow_models=2", "attack.shadow_models"),
    ("attack.shadow_mode=sideways", "attack.shadow_mode"),
    ("attack.shadow_models=true", "attack.shadow_models"),
])
def test_bad_keys_exit_2(trained, tmp_path, capsys, setting, key):
    assert run.main(["attack", "--run", str(trained), "--set", setting]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and key in err[0]


@pytest.mark.parametrize("sets, key", [
    (["data.name=femnist", "attack.calibration=shadow"], "attack.calibration"),
    (["data.num_out_tasks=12", "data.num_in_tasks=8", "federation.tasks_per_round=4", "attack.calibration=shadow"],
     "attack.shadow_mode"),
])
def test_impossible_calibrations_exit_2_before_training(tmp_path, capsys, sets, key):
    out = tmp_path / "run"
    args = ["experiment", "--config", "configs/synthetic.toml", "--out", str(out)]
    for item in sets:
        args += ["--set", item]
    assert run.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {key}")
    assert not out.exists()
