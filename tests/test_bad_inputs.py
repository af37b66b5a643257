"""Bad input of every kind: one line on stderr, no traceback, the right exit status, and the disk
as it was (nothing half-written, nothing of the user's overwritten)."""
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import run

ROOT = Path(__file__).resolve().parents[1]
TINY = ["data.num_in_tasks=8", "data.num_out_tasks=8", "federation.tasks_per_round=4", "federation.rounds=6",
        "federation.warm_start_rounds=2", "attack.trials=8", "attack.bootstrap=20", 'federation.engine="vectorized"']


def cli(capsys, *argv, settings=TINY):
    args = list(argv)
    for item in settings:
        args += ["--set", item]
    status = run.main(args)
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("error:")]
    return status, err


def snapshot(path: Path) -> dict:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()} \
        if path.is_dir() else ({"": path.read_bytes()} if path.exists() else {})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("trained") / "run"
    assert run.main(["train", *sum((["--set", s] for s in TINY), []), "--out", str(out)]) == 0
    return out


@pytest.fixture
def copy_of(trained, tmp_path):
    def make():
        target = tmp_path / "copy"
        shutil.copytree(trained, target)
        return target
    return make


def not_a_run(path: Path) -> Path:
    path.mkdir()
    (path / "config.toml").write_text("mine\n")
    (path / "heads").mkdir()
    (path / "heads" / "keep.txt").write_text("x")
    return path


@pytest.mark.parametrize("make_out, message", [
    (lambda tmp: not_a_run(tmp / "mine"), "exists and is not empty"),
    (lambda tmp: (tmp / "file").write_text("x") and tmp / "file", "exists and is not a directory"),
    (lambda tmp: (tmp / "file").write_text("x") and tmp / "file" / "run", "is a file"),
    (lambda tmp: Path("/"), "must name a new directory"),
    (lambda tmp: Path("."), "must name a new directory"),
    (lambda tmp: Path("/proc/fedtask-run"), "cannot create"),
])
def test_unusable_out_is_refused_before_training(capsys, tmp_path, make_out, message):
    out = make_out(tmp_path)
    before = snapshot(tmp_path)
    status, err = cli(capsys, "train", "--out", str(out))
    assert status == 2 and len(err) == 1 and message in err[0], err
    assert snapshot(tmp_path) == before


def test_a_finished_run_and_an_interrupted_one_are_kept(capsys, tmp_path, trained):
    before = snapshot(trained)
    status, err = cli(capsys, "train", "--out", str(trained))
    assert status == 2 and "holds a finished run" in err[0]
    assert snapshot(trained) == before
    interrupted = tmp_path / "run.incomplete"
    interrupted.mkdir()
    (interrupted / "metrics.json").write_text("{}")
    status, err = cli(capsys, "train", "--out", str(tmp_path / "run"))
    assert status == 2 and "holds an interrupted run; it has no checkpoint" in err[0]
    assert (interrupted / "metrics.json").read_text() == "{}"


def test_a_second_run_on_the_same_out_is_refused(capsys, tmp_path):
    work = tmp_path / "run.incomplete"
    work.mkdir()
    with open(work / ".lock", "w") as held:  # what a running training holds
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        status, err = cli(capsys, "train", "--out", str(tmp_path / "run"))
    assert status == 2 and "another run is writing to" in err[0]
    assert work.is_dir() and not (tmp_path / "run").exists()


@pytest.mark.parametrize("settings, key", [
    (["federation.server_lr=inf"], "federation.server_lr"),
    (["dp.noise_multiplier=inf"], "dp.noise_multiplier"),
    (["seed=18446744073709551616"], "seed"),
    (["attack.bootstrap=0"], "attack.bootstrap"),
    (['model.encoder="nope"'], "model.encoder"),
    (["data.num_in_tasks=10000000", "data.dim=10000"], "data.num_in_tasks"),
    (['federation.engine="flower"', "federation.num_gpus_per_client=0.5"], "federation.num_gpus_per_client"),
    (['federation.engine="flower"', "federation.num_cpus_per_client=4096.0"], "federation.num_cpus_per_client"),
])
def test_impossible_values_exit_2_naming_the_key(capsys, tmp_path, settings, key):
    if "num_gpus_per_client" in key and __import__("torch").cuda.is_available():
        pytest.skip("this machine has a GPU")
    out = tmp_path / "run"
    status, err = cli(capsys, "experiment", "--out", str(out), settings=TINY + settings)
    assert status == 2 and len(err) == 1 and err[0].startswith(f"error: {key}:"), err
    assert not out.exists() and not out.with_name("run.incomplete").exists()


def test_a_config_file_that_is_not_utf8(capsys, tmp_path):
    preset = tmp_path / "latin1.toml"
    preset.write_bytes("# caf\xe9\nseed = 0\n".encode("latin-1"))
    status, err = cli(capsys, "train", "--config", str(preset), "--out", str(tmp_path / "run"), settings=[])
    assert status == 2 and err == [f"error: {preset}: not a UTF-8 text file"]


def test_divergence_stops_training_with_one_line(capsys, tmp_path):
    out = tmp_path / "run"
    status, err = cli(capsys, "experiment", "--out", str(out), settings=TINY + [
        'federation.server_optimizer="sgd"', "federation.server_lr=1e30", "federation.grad_clip=0.0"])
    assert status == 1 and len(err) == 1 and "training diverged at round" in err[0]
    assert "federation.server_lr" in err[0]
    assert not out.exists() and not out.with_name("run.incomplete").exists()


@pytest.mark.parametrize("damage, message", [
    (lambda run: (run / "config.toml").write_text((run / "config.toml").read_text().replace("seed = 0", "seed = 1")),
     "seed is 1 in config.toml but the model was trained with 0"),
    (lambda run: (run / "encoder.safetensors").write_bytes((run / "encoder.safetensors").read_bytes()[:100]),
     "encoder.safetensors: not the file this run wrote"),
    (lambda run: (run / "results.json").write_text("{not json"), "results.json: not valid JSON"),
])
def test_attack_refuses_what_was_not_trained(capsys, copy_of, damage, message):
    target = copy_of()
    damage(target)
    before = snapshot(target)
    status, err = cli(capsys, "attack", "--run", str(target), settings=[])
    assert status == 2 and len(err) == 1 and message in err[0], err
    assert snapshot(target) == before  # the real results are not overwritten


@pytest.mark.parametrize("damage, message", [
    (lambda run: (run / "encoder.safetensors").write_bytes((run / "encoder.safetensors").read_bytes()[:100]),
     "not a readable safetensors file"),
    (lambda run: (run / "config.toml").write_text(
        (run / "config.toml").read_text().replace("hidden_dim = 512", "hidden_dim = 64")), "shapes do not match"),
])
def test_runs_without_a_fingerprint_still_fail_in_one_line(capsys, copy_of, damage, message):
    target = copy_of()
    results = json.loads((target / "results.json").read_text())
    results.pop("fingerprint")  # as written by an older fedtask
    (target / "results.json").write_text(json.dumps(results))
    damage(target)
    status, err = cli(capsys, "attack", "--run", str(target), settings=[])
    assert status == 2 and len(err) == 1 and message in err[0], err


def test_a_second_attack_replaces_the_first_with_a_notice(capsys, copy_of):
    target = copy_of()
    assert run.main(["attack", "--run", str(target), "--set", "attack.trials=4"]) == 0
    capsys.readouterr()
    assert run.main(["attack", "--run", str(target), "--set", "attack.trials=6"]) == 0
    assert "replacing the attacks" in capsys.readouterr().err
    assert json.loads((target / "results.json").read_text())["attacks"]["variance"]["strong"]["trials"] == 6


@pytest.mark.parametrize("sig, status, word", [(signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted")])
def test_signals_end_a_run_and_leave_nothing(tmp_path, sig, status, word):
    out = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "run.py"), "train", "--set", "federation.rounds=100000",
                             "--set", 'federation.engine="vectorized"', "--out", str(out)], cwd=ROOT, env=env,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (out.with_name("run.incomplete")).exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)  # training rounds are running
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == status
    assert err.strip().splitlines()[-1].startswith(word) and "Traceback" not in err
    assert not out.exists() and not out.with_name("run.incomplete").exists()
