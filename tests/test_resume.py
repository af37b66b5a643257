"""Checkpoints and --resume: a killed run continues to the encoder an uninterrupted run ends with."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import run
from fedtask import checkpoint, pipeline, rundir
from fedtask.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
# DP on, so the accounting and the per-round noise generator are part of what must continue exactly
SETTINGS = ["data.num_in_tasks=16", "data.num_out_tasks=8", "federation.tasks_per_round=8", "federation.rounds=120",
            "federation.warm_start_rounds=5", 'federation.engine="vectorized"', "dp.enabled=true",
            "dp.noise_multiplier=1.0", "attack.trials=16", "attack.bootstrap=20"]


def _args(*argv, settings=SETTINGS):
    args = list(argv)
    for item in settings:
        args += ["--set", item]
    return args


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The reference: the same run without checkpoints, never stopped."""
    out = tmp_path_factory.mktemp("plain") / "run"
    pipeline.run_training(load_config("configs/synthetic.toml", SETTINGS), out, on_round=None)
    return out


def _same_run(a: Path, b: Path) -> None:
    for name in (rundir.ENCODER, rundir.INITIAL_ENCODER):
        left, right = load_file(str(a / name)), load_file(str(b / name))
        assert left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left), name
    heads_a, heads_b = sorted((a / rundir.HEADS).iterdir()), sorted((b / rundir.HEADS).iterdir())
    assert [p.name for p in heads_a] == [p.name for p in heads_b] and len(heads_a) == 16
    for left, right in zip(heads_a, heads_b):
        assert all(torch.equal(load_file(str(left))[k], load_file(str(right))[k]) for k in load_file(str(left)))

    def rows(path):
        return [{k: v for k, v in row.items() if k != "seconds"} for row in rundir.read_json(path / rundir.METRICS)["rounds"]]

    assert rows(a) == rows(b) and len(rows(a)) == 120
    privacy_a, privacy_b = (rundir.read_json(p / rundir.RESULTS)["privacy"] for p in (a, b))
    # every encoder round is accounted exactly once: the log's training rounds are the accountant's steps
    print(f"vectorized kill-and-resume: encoders torch.equal; epsilon {privacy_a['epsilon']} vs {privacy_b['epsilon']}")
    assert privacy_a["epsilon"] == privacy_b["epsilon"] and privacy_b["rounds"] == 115
    assert checkpoint.encoder_rounds_done(rundir.read_json(b / rundir.METRICS)["rounds"]) == 115


def test_a_killed_run_resumes_to_the_uninterrupted_encoder(tmp_path, uninterrupted):
    out = tmp_path / "run"
    command = [sys.executable, "run.py", *_args("train", "--config", "configs/synthetic.toml", "--out", str(out),
                                                settings=[*SETTINGS, "federation.checkpoint_every=10"])]
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    latest = rundir.incomplete(out) / checkpoint.CHECKPOINTS / checkpoint.LATEST
    deadline = time.monotonic() + 120
    while not latest.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)  # no handler runs: what is on disk is all that is left
    proc.wait()
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    killed_at = checkpoint.latest_round(rundir.incomplete(out))
    assert killed_at is not None and killed_at < 120 and not out.exists()

    status = subprocess.run([sys.executable, "run.py", "train", "--resume", str(out)], cwd=ROOT,
                            capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert status.returncode == 0, status.stderr[-2000:]
    assert f"resuming after round {killed_at}" in status.stderr
    _same_run(uninterrupted, out)
    assert not rundir.incomplete(out).exists() and not (out / checkpoint.CHECKPOINTS).exists()


def test_an_interrupt_keeps_the_checkpoint_and_experiment_resume_finishes(tmp_path, uninterrupted, capsys):
    out = tmp_path / "run"
    config = load_config("configs/synthetic.toml", [*SETTINGS, "federation.checkpoint_every=25"])

    def stop_at_60(server_round, encoder, row):
        if server_round == 60:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pipeline.run_training(config, out, on_round=stop_at_60)
    assert checkpoint.latest_round(rundir.incomplete(out)) == 50 and not out.exists()
    assert "--resume" in capsys.readouterr().err

    assert run.main(["experiment", "--resume", str(out)]) == 0
    _same_run(uninterrupted, out)
    assert "attacks" in rundir.read_json(out / rundir.RESULTS)
    assert run.main(["train", "--resume", str(out)]) == 2  # finished: nothing to resume
    assert "finished already" in capsys.readouterr().err


def test_an_interrupt_before_any_checkpoint_keeps_nothing(tmp_path):
    config = load_config("configs/synthetic.toml", [*SETTINGS, "federation.checkpoint_every=50"])

    def stop_at_20(server_round, encoder, row):
        if server_round == 20:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pipeline.run_training(config, tmp_path / "run", on_round=stop_at_20)
    assert list(tmp_path.iterdir()) == []


def _interrupted(tmp_path, every=10, stop=15):
    out = tmp_path / "run"
    config = load_config("configs/synthetic.toml", [*SETTINGS, f"federation.checkpoint_every={every}"])

    def stop_early(server_round, encoder, row):
        if server_round == stop:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pipeline.run_training(config, out, on_round=stop_early)
    return out


def test_resume_refuses_what_would_continue_another_run(tmp_path, capsys):
    out = _interrupted(tmp_path)
    capsys.readouterr()
    assert run.main(["train", "--resume", str(out), "--set", "federation.server_lr=0.1"]) == 2
    assert "federation.server_lr: cannot change when resuming" in capsys.readouterr().err
    assert run.main(["train", "--resume", str(out), "--out", str(tmp_path / "other")]) == 2
    assert "--resume" in capsys.readouterr().err
    assert run.main(["train", "--resume", str(tmp_path / "nothing")]) == 2
    assert "no interrupted run to resume" in capsys.readouterr().err
    work = rundir.incomplete(out)
    text = (work / rundir.CONFIG).read_text()
    (work / rundir.CONFIG).write_text(text.replace("head_steps = 5", "head_steps = 4"))
    assert run.main(["train", "--resume", str(out)]) == 2
    assert "differs from the configuration the checkpoint was trained with" in capsys.readouterr().err
    (work / rundir.CONFIG).write_text(text)
    assert work.is_dir() and checkpoint.latest_round(work) == 10  # refusals change nothing


def test_a_half_written_checkpoint_is_ignored(tmp_path):
    """The pointer moves only once a round's files are all written: a kill mid-write leaves the previous one."""
    out = _interrupted(tmp_path, every=10, stop=25)
    work = rundir.incomplete(out)
    assert checkpoint.latest_round(work) == 20
    half = checkpoint.round_dir(work, 30)
    half.mkdir()
    (half / checkpoint.SERVER).write_bytes(b"truncated")
    assert checkpoint.load_checkpoint(work).round == 20


def test_the_aggregator_state_round_trips_through_safetensors(tmp_path):
    from strategies.fedsgd import EncoderAggregator

    torch.manual_seed(0)
    state = {"w": torch.randn(4, 3), "b": torch.randn(4), "running": torch.ones(2)}

    def make():
        return EncoderAggregator(state, ["w", "b"], seed=0, optimizer="adamw", lr=0.01)

    a = make()
    for r in range(1, 4):
        a.step([{"w": torch.randn(4, 3), "b": torch.randn(4)} for _ in range(3)], r)
    rundir.save_state(a.checkpoint_state(), tmp_path / "server.safetensors")
    b = make()
    b.restore(rundir.load_state(tmp_path / "server.safetensors"))
    grads = [{"w": torch.randn(4, 3), "b": torch.randn(4)} for _ in range(3)]
    a.step(grads, 4)
    b.step(grads, 4)
    assert all(torch.equal(a.state()[k], b.state()[k]) for k in state)
    with pytest.raises(ValueError, match="state lacks"):
        make().restore({"param/w": torch.zeros(4, 3)})


def test_checkpoint_every_must_not_be_negative():
    with pytest.raises(ConfigError, match="federation.checkpoint_every"):
        load_config("configs/synthetic.toml", ["federation.checkpoint_every=-1"])
