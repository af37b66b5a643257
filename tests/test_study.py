"""Studies: spec checks, cells, across-seed summaries, and a tiny study that resumes."""
import json
import math

import pytest
from scipy import stats

import run
from fedtask.config import ConfigError
from fedtask.study import cells, load_spec, run_study, summary

SPEC = """
base = "configs/synthetic.toml"
seeds = 2
[set]
"federation.engine" = "vectorized"
"data.num_in_tasks" = 6
"data.num_out_tasks" = 6
"federation.tasks_per_round" = 3
"federation.rounds" = 5
"federation.warm_start_rounds" = 1
"attack.trials" = 4
"attack.bootstrap" = 10
"attack.k_strong" = 4
"attack.k_weak" = 4
[[axis]]
name = "samples per task"
key = "data.train_samples_per_task"
values = [8, 16]
[[axis]]
name = "embedding dimension"
values = [{"model.embedding_dim" = 4, "data.projection_dim" = 4}]
"""


def write(tmp_path, text, name="spec.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_one_at_a_time_and_grid_cells(tmp_path):
    spec = load_spec(write(tmp_path, SPEC))
    assert [c.settings for c in cells(spec)] == [
        {"data.train_samples_per_task": 8}, {"data.train_samples_per_task": 16},
        {"model.embedding_dim": 4, "data.projection_dim": 4}]
    grid = load_spec(write(tmp_path, "grid = true\n" + SPEC, "grid.toml"))
    assert len(cells(grid)) == 2 and cells(grid)[1].settings == {
        "data.train_samples_per_task": 16, "model.embedding_dim": 4, "data.projection_dim": 4}


@pytest.mark.parametrize("text, message", [
    ("base = 1\n", "base must name a config file"),
    ('base = "configs/synthetic.toml"\nseedz = 3\n', "unknown study key 'seedz'"),
    ('base = "configs/synthetic.toml"\nseeds = 0\n', "seeds must be an integer"),
    ('base = "configs/synthetic.toml"\n[[axis]]\nname = "a"\nvalues = [1, 2]\n', "scalar values need a key"),
    ('base = "configs/synthetic.toml"\n[[axis]]\nname = "a"\nkey = "data.nope"\nvalues = [1]\n', "data.nope"),
    ('base = "configs/synthetic.toml"\n[[axis]]\nname = "a"\nkey = "attack.k_strong"\nvalues = [999]\n',
     "attack.k_strong"),
])
def test_bad_specs_are_refused_before_training(tmp_path, capsys, text, message):
    out = tmp_path / "study"
    status = run.main(["study", "--spec", str(write(tmp_path, text)), "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and message in err[0], err
    assert not out.exists()


def test_summary_is_a_student_t_interval_over_seeds():
    values = [0.61, 0.70, 0.66, 0.75]
    got = summary(values)
    mean, sd = sum(values) / 4, stats.tstd(values)
    half = stats.t.ppf(0.975, 3) * sd / 2
    assert got["mean"] == pytest.approx(mean) and got["std"] == pytest.approx(sd)
    assert got["ci95"] == pytest.approx([mean - half, mean + half]) and got["values"] == values
    assert summary([0.5])["ci95"] == [None, None] and summary([None])["mean"] is None


def test_a_tiny_study_summarises_its_runs_and_resumes(tmp_path):
    spec = write(tmp_path, SPEC)
    out = tmp_path / "study"
    result = run_study(spec, out, workers=1)
    assert result["timing"]["runs_done_now"] == 6
    for name in ("study.json", "study.md", "study_variance.png", "study_inner_product.png"):
        assert (out / name).stat().st_size > 0, name
    cell = result["cells"][1]
    assert cell["settings"] == {"data.train_samples_per_task": 16} and cell["seeds"] == [0, 1]
    per_run = [json.loads((out / r / "results.json").read_text()) for r in cell["runs"]]
    assert [r["config"]["seed"] for r in per_run] == [0, 1]  # each seed its own tasks and training
    aucs = [r["attacks"]["variance"]["strong"]["auc"] for r in per_run]
    strong = cell["summary"]["attacks"]["variance"]["strong"]
    assert strong["auc"]["values"] == aucs and math.isclose(strong["auc"]["mean"], sum(aucs) / 2)
    assert set(strong["tpr_at_fpr"]) == {"0.001", "0.01", "0.1"}
    assert cell["summary"]["in_task_accuracy"]["values"] == [r["utility"]["in_task_accuracy"] for r in per_run]

    # a killed study: one run lost, one left half-written, one stopped after a checkpoint;
    # the re-run trains the first two again and continues the third from its checkpoint
    kept = (out / cell["runs"][0] / "results.json").read_bytes()
    lost = out / result["cells"][0]["runs"][0]
    import shutil
    shutil.rmtree(lost)
    partial = out / result["cells"][2]["runs"][1]
    shutil.rmtree(partial)
    (partial.with_name(partial.name + ".incomplete")).mkdir()
    from fedtask import pipeline, rundir
    from fedtask.config import load_config, with_overrides

    stopped = out / cell["runs"][1]
    encoder = (stopped / rundir.ENCODER).read_bytes()
    config = with_overrides(load_config(stopped / rundir.CONFIG), {"federation.checkpoint_every": 2})
    shutil.rmtree(stopped)

    def stop_at_4(server_round, state, row):
        if server_round == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pipeline.run_training(config, stopped, on_round=stop_at_4)
    again = run_study(spec, out, workers=1)
    assert again["timing"]["runs_done_now"] == 3
    assert (stopped / rundir.ENCODER).read_bytes() == encoder  # resumed from round 2 to the same encoder
    assert "resuming after round 2" in (out / "logs" / f"{stopped.parent.name}-{stopped.name}.log").read_text()
    assert (out / cell["runs"][0] / "results.json").read_bytes() == kept
    assert again["cells"][0]["summary"]["attacks"]["variance"]["strong"]["auc"]["values"] == \
        result["cells"][0]["summary"]["attacks"]["variance"]["strong"]["auc"]["values"]  # same seed, same AUC
    assert not partial.with_name(partial.name + ".incomplete").exists()


def test_an_existing_directory_that_is_not_a_study_is_refused(tmp_path):
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("x")
    with pytest.raises(ConfigError, match="is not a study"):
        run_study(write(tmp_path, SPEC), other, workers=1)


def test_cells_that_resolve_to_the_same_config_share_their_runs(tmp_path):
    from fedtask.study import plan

    text = SPEC.replace("values = [8, 16]", "values = [16, 8]").replace(
        '"model.embedding_dim" = 4, "data.projection_dim" = 4', '"model.embedding_dim" = 16, "data.projection_dim" = 16')
    runs = plan(load_spec(write(tmp_path, text)), tmp_path / "study")
    # synthetic.toml has 32 samples per task and projection_dim 4, so nothing is shared yet
    assert len({r.directory for r in runs}) == 6
    base = SPEC.replace("values = [8, 16]", "values = [8, 32]").replace(
        '"model.embedding_dim" = 4, "data.projection_dim" = 4', '"model.embedding_dim" = 8, "data.projection_dim" = 4')
    runs = plan(load_spec(write(tmp_path, base, "base.toml")), tmp_path / "study")
    assert len(runs) == 6 and len({r.directory for r in runs}) == 4  # the base cell (32 samples) is trained once
