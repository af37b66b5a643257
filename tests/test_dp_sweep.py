"""dp-sweep end to end (vectorised engine, tiny): one run per budget, three files, budgets honoured."""
import json
import math
from pathlib import Path

import pytest

import run
from fedtask.sweep import parse_epsilons

TINY = ["data.num_in_tasks=8", "data.num_out_tasks=8", "federation.tasks_per_round=4", "federation.rounds=8",
        "federation.warm_start_rounds=2", "attack.trials=16", "attack.bootstrap=20", 'federation.engine="vectorized"']


def sweep_args(out, epsilons):
    args = ["dp-sweep", "--config", "configs/synthetic.toml", "--epsilons", epsilons, "--out", str(out)]
    for item in TINY:
        args += ["--set", item]
    return args


def test_short_sweep_writes_its_three_files(tmp_path):
    out = tmp_path / "sweep"
    assert run.main(sweep_args(out, "inf,8,2")) == 0
    for name in ("dp_sweep.json", "dp_sweep.md", "dp_sweep.png"):
        assert (out / name).stat().st_size > 0, name
    rows = json.loads((out / "dp_sweep.json").read_text())
    assert [row["target_epsilon"] for row in rows] == ["inf", 8.0, 2.0]
    assert rows[0]["epsilon"] == "inf" and rows[0]["noise_multiplier"] == 0.0
    for row in rows[1:]:
        assert row["epsilon"] <= row["target_epsilon"] * 1.0001  # the spend never exceeds the budget
        assert row["epsilon"] >= row["target_epsilon"] * 0.95
    assert rows[2]["noise_multiplier"] > rows[1]["noise_multiplier"] > 0  # less budget, more noise
    for row in rows:
        assert set(row["auc"]) == {"variance", "inner_product"}
        results = json.loads((out / Path(row["run"]).name / "results.json").read_text())
        assert row["auc"] == {a: {g: results["attacks"][a][g]["auc"] for g in ("strong", "weak")} for a in row["auc"]}
        assert row["in_task_accuracy"] == results["utility"]["in_task_accuracy"]
        assert (out / f"eps_{'inf' if row['target_epsilon'] == 'inf' else format(row['target_epsilon'], 'g')}"
                / "results.json").is_file()


@pytest.mark.parametrize("epsilons, message", [("inf,abc", "--epsilons"), ("8,-1", "--epsilons"),
                                               ("1e-9", "dp.target_epsilon")])
def test_bad_budgets_exit_2_before_training(tmp_path, capsys, epsilons, message):
    out = tmp_path / "sweep"
    assert run.main(sweep_args(out, epsilons)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not out.exists()


def test_parse_epsilons():
    assert parse_epsilons("inf, 16,8") == [math.inf, 16.0, 8.0]


def test_a_sweep_rerun_on_its_out_keeps_finished_budgets_and_resumes_the_interrupted_one(tmp_path, monkeypatch,
                                                                                          capsys):
    from fedtask import checkpoint, pipeline, rundir

    def args(out, epsilons):  # later --set values win
        return [*sweep_args(out, epsilons), "--set", "federation.rounds=30", "--set", "federation.checkpoint_every=10"]

    reference = tmp_path / "reference"
    assert run.main(args(reference, "inf,8")) == 0

    real = pipeline.train_or_resume

    def stop_at_25(server_round, encoder, row):
        if server_round == 25:
            raise KeyboardInterrupt

    def interrupted(config, out_dir, on_round=None):
        return real(config, out_dir, on_round=stop_at_25 if Path(out_dir).name == "eps_8" else None)

    out = tmp_path / "sweep"
    monkeypatch.setattr(pipeline, "train_or_resume", interrupted)
    assert run.main(args(out, "inf,8")) == 130
    monkeypatch.undo()
    assert checkpoint.latest_round(rundir.incomplete(out / "eps_8")) == 20
    finished = (out / "eps_inf" / "results.json").read_bytes()
    capsys.readouterr()

    assert run.main(args(out, "inf,8,4")) == 2  # other budgets: another sweep, refused
    assert "holds a DP sweep of other settings" in capsys.readouterr().err
    assert run.main(args(out, "inf,8")) == 0
    err = capsys.readouterr().err
    assert "finished budgets are kept" in err and "resuming after round 20" in err
    assert (out / "eps_inf" / "results.json").read_bytes() == finished  # kept, not trained again

    def rows(path):
        return [{k: v for k, v in row.items() if k != "run"} for row in json.loads((path / "dp_sweep.json").read_text())]

    assert rows(out) == rows(reference)
