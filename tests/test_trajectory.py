"""Encoder snapshots, the leakage trajectory and per-task leakage, on tiny vectorised runs (no Ray)."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import run
from attacks import run_security_games
from fedtask import pipeline, rundir
from fedtask.config import ConfigError, load_config
from fedtask.oracle import embedding_oracle
from fedtask.trajectory import default_probe_steps, probe_losses, run_trajectory, summarize

TINY = ["data.num_in_tasks=8", "data.num_out_tasks=8", "federation.tasks_per_round=4", "federation.rounds=6",
        "federation.warm_start_rounds=2", "attack.trials=16", "attack.bootstrap=50", "federation.engine=vectorized"]


def experiment(out, *settings):
    config = load_config("configs/synthetic.toml", [*TINY, *settings])
    pipeline.run_experiment(config, out)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("trajectory")
    with_snapshots = experiment(base / "every2", "federation.snapshot_every=2")
    without = experiment(base / "off")
    return with_snapshots, without, run_trajectory(with_snapshots, progress=lambda message: None)


def test_snapshots_every_n_rounds_and_none_when_off(runs):
    with_snapshots, without, _ = runs
    assert [r for r, _ in rundir.list_snapshots(with_snapshots)] == [2, 4, 6]
    assert not (without / rundir.SNAPSHOTS).exists()
    initial = load_file(str(with_snapshots / rundir.INITIAL_ENCODER))
    final = load_file(str(with_snapshots / rundir.ENCODER))
    warm = load_file(str(rundir.snapshot_path(with_snapshots, 2)))  # round 2 is warm start: encoder untouched
    last = load_file(str(rundir.snapshot_path(with_snapshots, 6)))
    middle = load_file(str(rundir.snapshot_path(with_snapshots, 4)))
    assert all(torch.equal(warm[k], initial[k]) and torch.equal(last[k], final[k]) for k in final)
    assert any(not torch.equal(middle[k], final[k]) for k in final)
    # keeping snapshots changes nothing of the run itself
    for name in (rundir.ENCODER, rundir.INITIAL_ENCODER):
        assert (with_snapshots / name).read_bytes() == (without / name).read_bytes()
    a, b = (json.loads((d / rundir.RESULTS).read_text()) for d in (with_snapshots, without))
    assert a["attacks"] == b["attacks"] and a["fingerprint"] == b["fingerprint"]


def test_trajectory_has_the_contract_shape(runs):
    with_snapshots, _, result = runs
    stored = json.loads((with_snapshots / rundir.TRAJECTORY).read_text())
    assert [s["round"] for s in stored["snapshots"]] == [0, 2, 4, 6]
    for snapshot in stored["snapshots"]:
        assert set(snapshot["loss"]) >= {"in_train", "in_holdout", "out"}
        assert all(isinstance(snapshot["loss"][k], float) for k in ("in_train", "in_holdout", "out"))
        assert set(snapshot["attacks"]) == {"variance", "inner_product"}
        for games in snapshot["attacks"].values():
            assert set(games) == {"strong", "weak", "null_control"}
            assert all(0.0 <= games[g]["auc"] <= 1.0 for g in games)
        assert snapshot["gap"]["strong"] == pytest.approx(snapshot["loss"]["out"] - snapshot["loss"]["in_train"])
    assert stored["probe"]["head_steps"] == default_probe_steps(load_config(with_snapshots / rundir.CONFIG))
    for name in (rundir.TRAJECTORY_REPORT, rundir.TRAJECTORY_PLOT, rundir.TRAJECTORY_GAPS_PLOT):
        assert (with_snapshots / name).stat().st_size > 0


def test_last_snapshot_is_the_runs_own_attack_and_round_0_the_null_control(runs):
    with_snapshots, _, result = runs
    attacks = json.loads((with_snapshots / rundir.RESULTS).read_text())["attacks"]
    first, last = result["snapshots"][0], result["snapshots"][-1]
    for name, games in attacks.items():
        for game, metrics in games.items():
            assert last["attacks"][name][game]["auc"] == metrics["auc"], (name, game)
        # the initial encoder under the strong game is the null control, subset for subset
        assert first["attacks"][name]["strong"]["auc"] == games["null_control"]["auc"]
        assert {s["attacks"][name]["null_control"]["auc"] for s in result["snapshots"]} == {games["null_control"]["auc"]}


def test_the_final_encoder_closes_a_trajectory_whose_snapshots_stop_short(tmp_path):
    config = load_config("configs/synthetic.toml", [*TINY, "federation.snapshot_every=4"])
    pipeline.run_training(config, tmp_path / "run", on_round=None)
    result = run_trajectory(tmp_path / "run", head_steps=3, progress=lambda message: None)
    assert [(s["round"], s["encoder"]) for s in result["snapshots"]] == [
        (0, rundir.INITIAL_ENCODER), (4, f"{rundir.SNAPSHOTS}/encoder_round_00004.safetensors"), (6, rundir.ENCODER)]
    assert result["probe"]["head_steps"] == 3


def test_probe_losses_follow_a_direct_fit(runs):
    # one task's probe by hand: zeros, full-batch SGD with decoupled weight decay, cross-entropy
    with_snapshots, _, _ = runs
    config = load_config(with_snapshots / rundir.CONFIG)
    taskset = pipeline.load_taskset(config)
    oracle = embedding_oracle(config, taskset.spec, with_snapshots / rundir.ENCODER)
    losses, _ = probe_losses(oracle, taskset, steps=7, lr=0.1, weight_decay=1e-3)
    per_task = {"in_train": [], "in_holdout": [], "out": []}
    for side, tasks in (("in", taskset.in_tasks), ("out", taskset.out_tasks)):
        for task in tasks:
            e = torch.as_tensor(oracle(task.train_x))
            w = torch.zeros(taskset.num_classes, e.shape[1], requires_grad=True)
            b = torch.zeros(taskset.num_classes, requires_grad=True)
            for _ in range(7):
                loss = torch.nn.functional.cross_entropy(e @ w.T + b, task.train_y)
                gw, gb = torch.autograd.grad(loss, (w, b))
                with torch.no_grad():
                    w -= 0.1 * (gw + 1e-3 * w)
                    b -= 0.1 * (gb + 1e-3 * b)
            held = torch.as_tensor(oracle(task.holdout_x))
            with torch.no_grad():
                if side == "in":
                    per_task["in_train"].append(float(torch.nn.functional.cross_entropy(e @ w.T + b, task.train_y)))
                    per_task["in_holdout"].append(float(torch.nn.functional.cross_entropy(held @ w.T + b,
                                                                                          task.holdout_y)))
                else:
                    per_task["out"].append(float(torch.nn.functional.cross_entropy(held @ w.T + b, task.holdout_y)))
    for key, values in per_task.items():
        assert losses[key] == pytest.approx(np.mean(values), rel=1e-4), key


def test_per_task_means_agree_with_the_raw_scores(runs):
    with_snapshots, _, _ = runs
    results = json.loads((with_snapshots / rundir.RESULTS).read_text())
    per_task = results["per_task"]
    config = load_config(with_snapshots / rundir.CONFIG)
    taskset = pipeline.load_taskset(config)
    assert [row["task"] for row in per_task] == [t.name for t in taskset.in_tasks + taskset.out_tasks]
    assert [row["side"] for row in per_task] == ["IN"] * 8 + ["OUT"] * 8
    assert all(row["samples"] == {"strong": 32, "weak": 16} for row in per_task)
    # replay the run's games: the stored per-task means are the raw scores' means over trials
    oracle = embedding_oracle(config, taskset.spec, with_snapshots / rundir.ENCODER)
    null = embedding_oracle(config, taskset.spec, with_snapshots / rundir.INITIAL_ENCODER)
    pools = {a: ([t.challenge_pool(a) for t in taskset.in_tasks], [t.challenge_pool(a) for t in taskset.out_tasks])
             for a in ("strong", "weak")}
    at = config.attack
    metrics, raw = run_security_games(oracle, null, pools, trials=at.trials, k_strong=at.k_strong, k_weak=at.k_weak,
                                      seed=config.seed, whiten=at.whiten, cosine=at.cosine,
                                      whiten_lambda=at.whiten_lambda, bootstrap=at.bootstrap, progress=lambda m: None)
    assert metrics == results["attacks"]
    for name, games in raw.items():
        for game, sides in games.items():
            stored_in = np.array([row["mean_score"][name][game] for row in per_task[:8]])
            stored_out = np.array([row["mean_score"][name][game] for row in per_task[8:]])
            np.testing.assert_allclose(stored_in, sides["in"].mean(axis=1), rtol=1e-12)
            assert stored_out.mean() == pytest.approx(sides["out"].mean(), rel=1e-12)
    report = (with_snapshots / rundir.REPORT).read_text()
    assert "Tasks that leak most" in report and "OUT percentile" in report


def test_summary_over_runs(runs, tmp_path):
    with_snapshots, _, result = runs
    summary = summarize([with_snapshots, with_snapshots / rundir.TRAJECTORY])
    assert summary["mean_of_runs"]["variance"]["strong"]["pearson"] == pytest.approx(
        result["correlation"]["variance"]["strong"]["pearson"])


@pytest.mark.parametrize("argv, message", [
    (["trajectory", "--run", "{off}"], "snapshot_every"),
    (["trajectory", "--run", "{tmp}"], "finished training run"),
    (["trajectory", "--run", "{every2}", "--head-steps", "0"], "--head-steps"),
    (["trajectory", "--run", "{every2}", "--set", "federation.rounds=3"], "federation.rounds"),
    (["heads", "--run", "{tmp}"], "finished training run"),
])
def test_bad_input_exits_2_with_one_line(runs, tmp_path, capsys, argv, message):
    with_snapshots, without, _ = runs
    paths = {"off": without, "tmp": tmp_path, "every2": with_snapshots}
    before = sorted(p.name for p in with_snapshots.iterdir())
    status = run.main([arg.format(**paths) for arg in argv])
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("error:")]
    assert status == 2 and len(errors) == 1 and message in errors[0], err
    assert sorted(p.name for p in with_snapshots.iterdir()) == before


def test_snapshot_every_must_not_be_negative():
    with pytest.raises(ConfigError, match="federation.snapshot_every"):
        load_config("configs/synthetic.toml", ["federation.snapshot_every=-1"])


def test_readme_trajectory_table_matches_docs():
    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    summary = json.loads((root / "docs" / "trajectory_seeds.json").read_text())
    seed0 = json.loads((root / "docs" / "trajectory.json").read_text())
    assert seed0["correlation"] == summary["runs"][0]["correlation"] and seed0["seed"] == 0
    lines = readme[readme.index("Three runs of the synthetic preset"):].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    assert [row[0] for row in rows] == [str(run["seed"]) for run in summary["runs"]] == ["0", "1", "2"]
    for row, run in zip(rows, summary["runs"]):
        at = {r: i for i, r in enumerate(run["rounds"])}
        auc = run["auc"]["variance"]["strong"]
        corr = run["correlation"]["variance"]
        null = run["null_control"]["variance"]
        assert row[1:] == [
            " → ".join(f"{auc[at[r]]:.3f}" for r in (0, 20, 200)),
            f"{run['gap']['strong'][at[0]]:.3f} → {run['gap']['strong'][at[200]]:.3f}",
            *(f"{corr[g]['pearson']:.2f} ({corr[g]['spearman']:.2f})" for g in ("strong", "weak")),
            f"{null['auc']:.3f} [{null['auc_ci95'][0]:.3f}, {null['auc_ci95'][1]:.3f}]"], row
