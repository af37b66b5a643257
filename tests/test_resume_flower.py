"""Kill-and-resume on the Flower engine: the clients' heads come back from the checkpoint."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedtask import checkpoint, pipeline, rundir
from fedtask.config import load_config

ROOT = Path(__file__).resolve().parents[1]
# SGD: the Flower and vectorized engines then agree to float reassociation (AdamW magnifies it)
SETTINGS = ["data.num_in_tasks=8", "data.num_out_tasks=4", "federation.tasks_per_round=4", "federation.rounds=40",
            "federation.warm_start_rounds=2", 'federation.server_optimizer="sgd"', "federation.server_lr=0.05",
            "dp.enabled=true", "dp.noise_multiplier=0.5", "attack.trials=8", "attack.bootstrap=10"]


def _cli(*argv, settings=()):
    args = [sys.executable, "run.py", *argv]
    for item in settings:
        args += ["--set", item]
    return args


@pytest.mark.simulation
def test_a_killed_flower_run_resumes_to_the_uninterrupted_encoder(tmp_path):
    reference = tmp_path / "vectorized"
    pipeline.run_training(load_config("configs/synthetic.toml", [*SETTINGS, 'federation.engine="vectorized"']),
                          reference, on_round=None)

    out = tmp_path / "flower"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(_cli("train", "--out", str(out), settings=[*SETTINGS, 'federation.engine="flower"',
                                                                       "federation.checkpoint_every=5"]),
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                            start_new_session=True)  # its own process group: Ray's workers die with it
    work = rundir.incomplete(out)
    deadline = time.monotonic() + 300
    while checkpoint.latest_round(work) is None and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = checkpoint.latest_round(work)
    assert killed_at is not None and killed_at < 40 and not out.exists(), "the run ended before it could be killed"
    heads = sorted((checkpoint.round_dir(work, killed_at) / checkpoint.HEADS_DIR).iterdir())
    assert len(heads) == 8  # every client wrote its head, trained or not

    resumed = subprocess.run(_cli("train", "--resume", str(out)), cwd=ROOT, capture_output=True, text=True, env=env,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming after round {killed_at}" in resumed.stderr

    a, b = load_file(str(reference / rundir.ENCODER)), load_file(str(out / rundir.ENCODER))
    difference = max(float((a[k] - b[k]).abs().max()) for k in a)
    print(f"killed after round {killed_at}; resumed vs uninterrupted (vectorized) encoder: max |diff| {difference:.3g}")
    assert difference < 1e-5
    for left, right in zip(sorted((reference / rundir.HEADS).iterdir()), sorted((out / rundir.HEADS).iterdir())):
        l, r = load_file(str(left)), load_file(str(right))
        assert left.name == right.name and all(torch.allclose(l[k], r[k], atol=1e-5) for k in l)
    rows = rundir.read_json(out / rundir.METRICS)["rounds"]
    assert [row["round"] for row in rows] == list(range(1, 41))
    assert [row["tasks"] for row in rows] == [row["tasks"] for row in rundir.read_json(reference / rundir.METRICS)["rounds"]]
    privacy = [rundir.read_json(p / rundir.RESULTS)["privacy"] for p in (reference, out)]
    print(f"epsilon: uninterrupted {privacy[0]['epsilon']}, resumed {privacy[1]['epsilon']}")
    assert privacy[0]["epsilon"] == privacy[1]["epsilon"] and checkpoint.encoder_rounds_done(rows) == 38
