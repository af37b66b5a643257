"""What a user sees while work runs: the training bar or lines, run.log, --quiet, TensorBoard."""
import importlib.util
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import run
from fedtask import pipeline, progress
from fedtask.config import load_config

ROOT = Path(__file__).resolve().parents[1]
TINY = ["data.num_in_tasks=8", "data.num_out_tasks=8", "federation.rounds=4", "federation.warm_start_rounds=1",
        "federation.tasks_per_round=4", "federation.engine=vectorized", "attack.trials=16", "attack.bootstrap=50"]
HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None


@pytest.fixture(autouse=True)
def _clean_progress():
    """Each test starts and ends with no bar, no open log file and --quiet off."""
    progress.close_all()
    progress.set_quiet(False)
    yield
    progress.close_all()
    progress.set_quiet(False)


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def tiny(*extra: str, rounds: int = 4):
    return load_config("configs/synthetic.toml", [*TINY, f"federation.rounds={rounds}", *extra])


def row(server_round: int, *, warm: bool = False, failed: dict | None = None) -> dict:
    out = {"round": server_round, "phase": "warm_start" if warm else "train", "tasks": [0, 1, 2, 3],
           "loss": 1.0 / server_round, "seconds": 0.01}
    if not warm:
        out.update(aggregate_norm=0.5, update_norm_mean=0.4)
    if failed:
        out["failed"] = failed
    return out


def logged_rounds(directory: Path) -> int:
    """Round lines in a run's log file (each line: date, time, message)."""
    lines = (directory / progress.LOG_NAME).read_text().splitlines()
    return len(round_lines("\n".join(line.split(" ", 2)[2] for line in lines)))


def play(hook, rounds: int, warm: int = 1) -> None:
    for r in range(1, rounds + 1):
        hook(r, {}, row(r, warm=r <= warm))


def round_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if re.match(r"round +\d+/\d+ ", line)]


def test_without_a_terminal_the_hook_prints_round_lines_and_logs_every_round(tmp_path, capsys):
    hook = progress.training_hook(tiny(), tmp_path, progress.DEFAULT)
    play(hook, 4)
    lines = round_lines(capsys.readouterr().err)
    assert [line.split()[1] for line in lines] == ["1/4", "2/4", "3/4", "4/4"]  # a short run: every round
    assert "loss=0.5000" in lines[1] and "|g|=0.500" in lines[1]
    assert "left" in lines[0]  # the time left, from the rounds done so far
    assert logged_rounds(tmp_path) == 4


def test_a_long_run_prints_some_rounds_but_logs_all(tmp_path, capsys):
    hook = progress.training_hook(tiny(rounds=200), tmp_path, progress.DEFAULT)
    play(hook, 200)
    printed = round_lines(capsys.readouterr().err)
    assert printed[0].split()[1] == "1/200" and printed[-1].split()[1] == "200/200"
    assert 10 <= len(printed) < 200  # readable: a line every few rounds
    assert logged_rounds(tmp_path) == 200


def test_on_a_terminal_the_hook_draws_a_bar(tmp_path, monkeypatch):
    terminal = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    hook = progress.training_hook(tiny(), tmp_path, progress.DEFAULT)
    for r in range(1, 5):
        hook(r, {}, row(r, warm=r == 1, failed={"7": "timeout"} if r == 3 else None))
    shown = terminal.getvalue()
    assert "\r" in shown and "training" in shown and "4/4" in shown and "loss=0.2500" in shown
    assert not round_lines(shown.replace("\r", "\n"))  # a bar, not a line per round
    assert "round 3: 1 tasks failed (7)" in shown  # worth a line above the bar
    assert logged_rounds(tmp_path) == 4


def test_a_callers_hook_is_kept_and_none_shows_nothing(tmp_path, capsys):
    seen = []
    hook = progress.training_hook(tiny(), tmp_path / "a", lambda r, encoder, row: seen.append(r))
    play(hook, 4)
    assert seen == [1, 2, 3, 4]
    play(progress.training_hook(tiny(), tmp_path / "b", None), 4)
    assert not round_lines(capsys.readouterr().err)
    for name in ("a", "b"):  # the log file gets every round either way
        assert logged_rounds(tmp_path / name) == 4


def test_quiet_prints_nothing_and_still_logs(tmp_path, capsys, monkeypatch):
    progress.set_quiet(True)
    hook = progress.training_hook(tiny(), tmp_path, progress.DEFAULT)
    pipeline.log("a message")
    play(hook, 4)
    progress.error("an error")
    err = capsys.readouterr().err
    assert err.strip() == "an error"
    logged = (tmp_path / progress.LOG_NAME).read_text()
    assert "a message" in logged and "an error" in logged and logged_rounds(tmp_path) == 4
    monkeypatch.setattr(sys, "stderr", FakeTerminal())  # no bar either
    play(progress.training_hook(tiny(), tmp_path / "tty", progress.DEFAULT), 4)
    assert sys.stderr.getvalue() == ""


def test_progress_without_a_terminal_prints_lines_at_a_rate(capsys):
    work = progress.Progress(100, "study", unit="run", every=10)
    for done in range(1, 101):
        work.update(done)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("study: 1/100 runs") and lines[-1].startswith("study: 100/100 runs")
    assert len(lines) == 11 and work.closed


def test_a_quick_counter_prints_nothing_without_a_terminal(capsys):
    advance = progress.counter("attack: embedding", "sample")
    for done in range(0, 1001, 100):
        advance(done, 1000)
    assert capsys.readouterr().err == ""


def test_the_attack_reports_the_samples_it_embeds():
    from attacks import run_security_games

    rng = np.random.default_rng(0)
    pools = [torch.tensor(rng.normal(size=(10, 4)), dtype=torch.float32) for _ in range(8)]
    calls = []
    run_security_games(lambda b: b.numpy(), lambda b: b.numpy() * 2, {"strong": (pools[:4], pools[4:]),
                                                                        "weak": (pools[:4], pools[4:])},
                       trials=4, k_strong=3, k_weak=3, seed=0, bootstrap=10, batch_size=7,
                       progress=lambda message: None, advance=lambda done, total: calls.append((done, total)))
    done = [d for d, _ in calls]
    assert done == sorted(done) and calls[-1] == (160, 160)  # 80 samples, once per oracle


def test_quiet_experiment_prints_only_the_table(tmp_path):
    out = tmp_path / "run"
    args = [sys.executable, "run.py", "experiment", "--quiet", "--out", str(out)]
    for item in TINY:
        args += ["--set", item]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr
    noise = [line for line in done.stderr.splitlines()
             if re.match(r"(round|training|attack|attacking|wrote)\b", line) or "\r" in line]
    assert not noise, done.stderr  # no bar, no progress or log lines
    assert "Task-inference attacks" in done.stdout and "AUC" in done.stdout  # the final tables
    logged = (out / progress.LOG_NAME).read_text()
    assert logged_rounds(out) == 4 and "training done" in logged and "attack       strong" in logged


@pytest.mark.skipif(not HAS_TENSORBOARD, reason="tensorboard is not installed (pip install -e '.[tensorboard]')")
def test_tensorboard_gets_loss_update_norm_and_epsilon(tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = tiny("federation.tensorboard=true", "dp.enabled=true", "dp.noise_multiplier=1.0", rounds=5)
    results = pipeline.run_training(config, tmp_path / "run")
    events = EventAccumulator(str(tmp_path / "run" / progress.TENSORBOARD_DIR))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/aggregate_norm", "train/update_norm_mean", "privacy/epsilon"} <= tags
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4, 5]
    epsilon = [e.value for e in events.Scalars("privacy/epsilon")]
    assert epsilon[0] == 0.0 and epsilon == sorted(epsilon)  # nothing spent in the warm start, then more
    assert epsilon[-1] == pytest.approx(results["privacy"]["epsilon"], rel=1e-5)  # the accountant's own


def test_tensorboard_is_off_by_default(tmp_path, capsys):
    pipeline.run_training(tiny(), tmp_path / "run", on_round=None)
    assert not (tmp_path / "run" / progress.TENSORBOARD_DIR).exists()
    assert (tmp_path / "run" / progress.LOG_NAME).is_file()


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_epsilon_so_far_is_the_accountants(accountant):
    from strategies.accounting import epsilon_spent

    config = tiny("dp.enabled=true", "dp.noise_multiplier=1.2", f"dp.accountant='{accountant}'", rounds=6)
    tracker = progress.EpsilonSoFar(config)
    values = {r: tracker(r) for r in range(1, 7)}
    assert values[1] == 0.0  # the warm-start round touches no encoder
    assert values[6] == pytest.approx(epsilon_spent(noise_multiplier=1.2, sample_rate=config.sample_rate, steps=5,
                                                    delta=config.dp.delta, accountant=accountant), rel=1e-9)
    if accountant == "rdp":  # exact every round
        for r in range(2, 7):
            assert values[r] == pytest.approx(epsilon_spent(noise_multiplier=1.2, sample_rate=config.sample_rate,
                                                            steps=r - 1, delta=config.dp.delta), rel=1e-9)


def test_missing_tensorboard_exits_2_before_training(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import fails as if not installed
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    out = tmp_path / "run"
    args = ["--quiet", "train", "--out", str(out), "--set", "federation.tensorboard=true"]
    for item in TINY:
        args += ["--set", item]
    assert run.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: federation.tensorboard") and "pip install" in err[0], err
    assert not out.exists() and not Path(str(out) + ".incomplete").exists()
