"""The flower engine's two launchers: ``flwr run`` on a private SuperLink (flwr-run, the default)
and ``flwr.simulation.run_simulation`` (deprecated by Flower 1.41). The job directory, the only
channel between the launching process and the ServerApp, is tested with a thread writing what the
ServerApp writes; one real run of each launcher shows they train the same encoder, heads and
snapshots, byte for byte."""
import io
import json
import re
import os
import threading
import time
from pathlib import Path

import pytest
import torch
from flwr.clientapp import ClientApp

from fedtask import simulation
from fedtask.config import ConfigError, load_config, with_overrides
from fedtask.engines import TrainingFailed
from fedtask.pipeline import RUNTIME_KEYS, run_training, training_fingerprint
from fedtask.simulation import FlowerSimulationEngine, federation_config_args

TINY = ["data.num_in_tasks=6", "data.num_out_tasks=2", "federation.tasks_per_round=3", "federation.rounds=4",
        "federation.warm_start_rounds=1", "model.hidden_dim=32", 'federation.server_optimizer="sgd"',
        'federation.engine="flower"']

named_app = ClientApp()  # a ClientApp a module holds: flwr-run can name it


def tiny(*extra):
    return load_config("configs/synthetic.toml", TINY + list(extra))


def test_launcher_is_a_checked_runtime_key():
    assert tiny().federation.launcher == "flwr-run"
    with pytest.raises(ConfigError, match=r"^federation\.launcher: must be 'flwr-run' or 'run_simulation'"):
        tiny('federation.launcher="flwr"')
    assert "launcher" in RUNTIME_KEYS  # how the run is launched, not what it trains
    assert training_fingerprint(tiny()) == training_fingerprint(tiny('federation.launcher="run_simulation"'))


def test_federation_config_carries_the_same_resources():
    cpus = os.cpu_count() or 1
    args = federation_config_args(tiny())
    assert "num-supernodes=6" in args and "client-resources-num-cpus=1 " in args
    assert f"init-args-num-cpus={cpus}" in args and "init-args-log-to-driver=false" in args
    # Flower's simulation config takes whole CPUs: half a CPU per client packs as many clients at once
    half = federation_config_args(tiny("federation.num_cpus_per_client=0.5"))
    assert "client-resources-num-cpus=1 " in half and f"init-args-num-cpus={2 * cpus}" in half
    cluster = federation_config_args(tiny('federation.ray_address="127.0.0.1:6379"'))
    assert "init-args-num-cpus" not in cluster  # the cluster's nodes bring their own


def test_check_refuses_what_flwr_run_cannot_launch():
    engine = FlowerSimulationEngine()
    with pytest.raises(ConfigError, match=r"^federation\.num_cpus_per_client: 0\.5: flwr run gives each client whole"):
        engine.check(tiny("federation.num_cpus_per_client=0.5", 'federation.ray_address="127.0.0.1:6379"'))
    unnamed = FlowerSimulationEngine(client_app=ClientApp())  # held by no module: cannot be loaded by name
    with pytest.raises(ConfigError, match=r"^federation\.launcher: 'flwr-run' loads the ClientApp by module"):
        unnamed.check(tiny())
    unnamed.check(tiny('federation.launcher="run_simulation"'))  # the in-process launcher takes it as it is
    assert simulation.app_reference(named_app) == f"{__name__}:named_app"
    assert simulation.app_reference(FlowerSimulationEngine().client_app) == "fedtask.client_app:app"


def test_flower_log_passes_warnings_and_errors_but_not_flower_chatter(capsys):
    lines = ["\x1b[92mINFO \x1b[0m:      Starting Flower Simulation",
             "\x1b[93mWARNING \x1b[0m:   Since flwr 1.32, default simulated SuperNodes changed from 10 to 2.",
             "Successfully started run 123", "Using SuperLink: fedtask (127.0.0.1:1)",
             "\x1b[93mWARNING \x1b[0m:   DEPRECATED FEATURE: something Flower will remove",
             "(ClientAppActor pid=7) ERROR :     a client raised", "Traceback (most recent call last):"]
    log = simulation._FlowerLog(io.BytesIO("\n".join(lines).encode() + b"\n"))
    log.join()
    shown = capsys.readouterr().err.splitlines()
    assert shown == ["WARNING :   DEPRECATED FEATURE: something Flower will remove",
                     "(ClientAppActor pid=7) ERROR :     a client raised", "Traceback (most recent call last):"]
    assert log.last_error() == "ERROR :     a client raised"

    from fedtask import progress

    progress.set_quiet(True)  # --quiet: Flower's errors still show, its warnings do not
    try:
        simulation._FlowerLog(io.BytesIO("\n".join(lines).encode() + b"\n")).join()
    finally:
        progress.set_quiet(False)
    assert capsys.readouterr().err.splitlines() == shown[1:]


class _Alive:
    """A stand-in for the ``flwr run`` process: running until the test says otherwise."""

    def __init__(self):
        self.ended = False

    def poll(self):
        return 0 if self.ended else None


def _fake_serverapp(job: Path, rounds: int, *, fail=None, crash=False, cli=None):
    """What :data:`simulation.job_app` leaves in the job directory, without Flower: rows appended
    a piece at a time, then the outcome or the failure (or nothing, the process having died)."""
    from safetensors.torch import save_file

    (job / simulation.STARTED).touch()
    with open(job / simulation.ROUNDS, "a") as handle:
        for server_round in range(1, rounds + 1):
            line = json.dumps({"round": server_round, "row": {"round": server_round, "loss": 0.5, "tasks": [0, 1]}})
            half = len(line) // 2
            handle.write(line[:half])  # a reader must wait for the end of the line
            handle.flush()
            time.sleep(2 * simulation.POLL_S)
            handle.write(line[half:] + "\n")
            handle.flush()
    if crash:
        cli.ended = True
        return
    if fail:
        simulation._write_json(job / simulation.FAILURE, {"kind": "failed", "message": fail})
        return
    save_file({"w": torch.zeros(3)}, str(job / simulation.INITIAL_ENCODER))
    save_file({"w": torch.full((3,), float(rounds))}, str(job / simulation.FINAL_ENCODER))
    simulation._write_json(job / simulation.OUTCOME, {
        "rounds": [{"round": r, "loss": 0.5, "tasks": [0, 1]} for r in range(1, rounds + 1)],
        "evaluation": [{"partition-id": 0, "accuracy": 1.0}], "heads_dir": str(job)})


def _follow(tmp_path, caller, **fake):
    job = tmp_path / "job"
    job.mkdir()
    cli = _Alive()
    thread = threading.Thread(target=_fake_serverapp, args=(job, 3), kwargs={**fake, "cli": cli}, daemon=True)
    thread.start()
    marks = {}
    log = simulation._FlowerLog(io.BytesIO(b""))
    try:
        simulation._follow(job, caller, cli, log, time.perf_counter, marks)
        return simulation.read_outcome(job, log), marks
    finally:
        thread.join(10)


def test_the_caller_sees_every_round_once_and_the_outcome_is_read_back(tmp_path):
    seen = []
    outcome, marks = _follow(tmp_path, lambda server_round, encoder, row: seen.append((server_round, row)))
    assert [r for r, _ in seen] == [1, 2, 3] and [row["round"] for _, row in seen] == [1, 2, 3]
    assert torch.equal(outcome.encoder["w"], torch.full((3,), 3.0)) and torch.equal(outcome.initial_encoder["w"],
                                                                                    torch.zeros(3))
    assert [row["round"] for row in outcome.rounds] == [1, 2, 3] and outcome.heads_dir == tmp_path / "job"
    assert "serverapp_s" in marks


def test_the_encoder_stays_in_the_serverapp(tmp_path):
    def reads_encoder(server_round, encoder, row):
        encoder["w"]

    with pytest.raises(RuntimeError, match="encoder stays in the ServerApp"):
        _follow(tmp_path, reads_encoder)


def test_a_caller_that_raises_stops_following(tmp_path):
    def interrupted(server_round, encoder, row):
        if server_round == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _follow(tmp_path, interrupted)


def test_a_training_failure_in_the_serverapp_is_raised_here(tmp_path):
    with pytest.raises(TrainingFailed, match="^round 3: 2 of 3 sampled tasks failed$"):
        _follow(tmp_path, None, fail="round 3: 2 of 3 sampled tasks failed")


def test_a_serverapp_that_dies_without_a_word_is_a_failed_run(tmp_path):
    with pytest.raises(TrainingFailed, match="^the Flower run ended without a result"):
        _follow(tmp_path, None, crash=True)


def test_the_job_holds_plain_values_only(tmp_path):
    from fedtask.data.base import TaskSpec
    from fedtask.pipeline import RunHook

    config = tiny()
    spec = TaskSpec(num_classes=2, input_kind="vector", input_shape=(16,))
    job = simulation.write_job(tmp_path / "job", config, spec, tmp_path / "run",
                               run_hook=RunHook(config, tmp_path / "run", None), extra={})
    written = json.loads((job / simulation.JOB).read_text())
    assert written["run_dir"] == str((tmp_path / "run").resolve()) and written["extra"] == {}
    from fedtask.config import from_dict

    assert from_dict(written["config"], check=False) == config


@pytest.mark.simulation
def test_both_launchers_train_the_same_bytes(tmp_path):
    """The supported launcher changes nothing that is trained: same encoder, heads and round log."""
    runs = {}
    for launcher in ("flwr-run", "run_simulation"):
        out = tmp_path / launcher
        run_training(with_overrides(tiny("federation.snapshot_every=2"), {"federation.launcher": launcher}), out,
                     on_round=None)
        runs[launcher] = out
    a, b = runs["flwr-run"], runs["run_simulation"]
    files = sorted(p.relative_to(a) for p in a.rglob("*.safetensors"))
    assert len(files) == 10  # two encoders, six heads, the snapshots of rounds 2 and 4 (written in the ServerApp)
    assert re.search(r"round +4/4", (a / "run.log").read_text())  # the ServerApp's rounds reach the run's log
    for name in files:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name

    def log(run):
        rows = json.loads((run / "metrics.json").read_text())["rounds"]
        return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]

    assert log(a) == log(b)


def _table_rows(text: str) -> list[list[str]]:
    return [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in text.splitlines()
            if line.startswith("|") and not set(line) <= set("|-: ")]


def test_readme_launcher_table_is_the_committed_bench_file():
    """README's launcher table is a copy of docs/bench_launchers.md, which bench.format_launchers wrote
    from docs/bench_launchers.json (python run.py bench --launchers --out docs)."""
    from fedtask.bench import format_launchers

    root = Path(__file__).resolve().parents[1]
    doc = (root / "docs" / "bench_launchers.md").read_text()
    assert doc == format_launchers(json.loads((root / "docs" / "bench_launchers.json").read_text()))
    readme = _table_rows((root / "README.md").read_text())
    rows = _table_rows(doc)
    assert len(rows) == 5  # the header, then 2 sizes x 2 launchers
    for row in rows:
        assert row in readme, row
