"""A real Flower deployment on loopback: one flower-superlink, 4 flower-supernodes that serve 4 tasks
each (node config partition-range), and the app started with `flwr run` against that SuperLink.
Its encoder equals the vectorized engine's for the same configuration.

Every process the test starts runs in its own process group; the finalizer ends each group and every
descendant (the SuperLink starts its SuperExec in a session of its own), also when the test fails.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from fedtask.config import load_config
from fedtask.pipeline import run_training
from fedtask.simulation import free_ports

pytestmark = pytest.mark.simulation

ROOT = Path(__file__).resolve().parents[1]
NODES, TASKS_PER_NODE = 4, 4
CONNECTION = "fedtask-loopback"  # the SuperLink connection `flwr run` is pointed at
# seed 4 samples tasks [2, 7, 13, 14] then [0, 8, 12, 14]: each round sends one node two messages,
# and task 14 trains twice, its second round starting from the head a previous ClientApp process kept
OVERRIDES = [
    "seed=4", f"data.num_in_tasks={NODES * TASKS_PER_NODE}", "data.num_out_tasks=2", "data.dim=8", "data.projection_dim=2",
    "data.train_samples_per_task=8", "data.holdout_samples_per_task=4", "model.hidden_dim=16",
    "model.embedding_dim=4", "federation.rounds=2", "federation.warm_start_rounds=0",
    "federation.tasks_per_round=4", 'federation.server_optimizer="sgd"', "federation.server_lr=0.5",
    "attack.k_strong=4", "attack.k_weak=4",
]
RUN_TIMEOUT = 600  # seconds for the whole `flwr run`: on a 2-core CPU it takes about two minutes


def descendants(pid: int) -> list[int]:
    """Every living descendant of a process (Linux /proc), children before grandchildren."""
    found, queue = [], [pid]
    while queue:
        parent = queue.pop(0)
        for children in Path(f"/proc/{parent}/task").glob("*/children"):
            try:
                kids = [int(k) for k in children.read_text().split()]
            except OSError:  # the thread or process is gone
                continue
            found += kids
            queue += kids
    return found


class Processes:
    """The processes this test starts, each in a new process group, all ended by ``stop``."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.started: list[tuple[subprocess.Popen, Path]] = []

    def start(self, name: str, args: list[str], flwr_home: Path) -> subprocess.Popen:
        flwr_home.mkdir(parents=True, exist_ok=True)
        # (FLWR_SUPEREXEC_TASK_POLL_INTERVAL stays at its 1 s: polling at 0.1 s costs each node 4 % of a
        # core while idle, more on 2 cores than the ~0.5 s per message it saves)
        env = {**os.environ, "FLWR_HOME": str(flwr_home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
               "FLWR_TELEMETRY_ENABLED": "0", "OMP_NUM_THREADS": "1"}
        log = self.workdir / f"{name}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(args, cwd=self.workdir, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        self.started.append((proc, log))
        return proc

    def logs(self, lines: int = 15) -> str:
        return "\n".join(f"--- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
                         for _, log in self.started if log.is_file())

    def stop(self) -> None:
        """SIGTERM every group and descendant, then SIGKILL whatever is left after a grace period."""
        pids = [pid for proc, _ in self.started if proc.poll() is None
                for pid in [proc.pid, *descendants(proc.pid)]]
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for proc, _ in self.started:
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    pass
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() and not _zombie(pid)
                                                      for pid in pids):
                time.sleep(0.1)
        for proc, _ in self.started:
            proc.wait(timeout=5)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def wait_for_port(port: int, proc: subprocess.Popen, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the SuperLink exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {seconds:g} s")


@pytest.fixture
def loopback_federation(tmp_path):
    """flower-superlink + 4 flower-supernodes (tasks 0-3, 4-7, 8-11, 12-15), and the CLI's connection."""
    processes = Processes(tmp_path)
    try:
        link_port, *node_ports = free_ports(1 + NODES)
        link_home = tmp_path / "superlink-home"
        link = processes.start("superlink", ["flower-superlink", "--insecure", "--host", "127.0.0.1",
                                             "--port", str(link_port), "--disable-runtime-dependency-installation"],
                               link_home)
        wait_for_port(link_port, link)
        for i, port in enumerate(node_ports):
            first = i * TASKS_PER_NODE
            processes.start(f"supernode{i}", [
                "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{link_port}", "--port", str(port),
                "--node-config", f'partition-range="{first}-{first + TASKS_PER_NODE - 1}"'],
                tmp_path / f"supernode{i}-home")  # a home each: each installs the app for itself
        (link_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n'
            f'[superlink.{CONNECTION}]\naddress = "127.0.0.1:{link_port}"\ninsecure = true\n')
        yield processes, link_home
    finally:
        processes.stop()


def flwr_cli(args: list[str], link_home: Path, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "FLWR_HOME": str(link_home), "FLWR_TELEMETRY_ENABLED": "0"}
    return subprocess.run(["flwr", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_flwr_run_on_supernodes_serving_four_tasks_each_equals_the_vectorized_engine(loopback_federation, tmp_path):
    processes, link_home = loopback_federation
    started = time.perf_counter()
    out = tmp_path / "flwr-run"
    run_config = (f'config="{ROOT / "configs" / "synthetic.toml"}" out="{out}" '
                  f"overrides='{';'.join(OVERRIDES)}'")
    run = flwr_cli(["run", str(ROOT), CONNECTION, "--stream", "--run-config", run_config], link_home, RUN_TIMEOUT)
    listing = json.loads(flwr_cli(["ls", CONNECTION, "--format", "json"], link_home, 60).stdout)
    status = listing["runs"][0]
    assert status["status"] == "finished:completed", (
        f"{status['status']}: {status['status-details']}\n{run.stdout[-3000:]}\n{run.stderr[-2000:]}\n"
        f"{processes.logs()}")
    deployed_s = time.perf_counter() - started

    vector = tmp_path / "vectorized"
    run_training(load_config(ROOT / "configs" / "synthetic.toml", OVERRIDES + ['federation.engine="vectorized"']),
                 vector, on_round=None)

    diff = max_diff(load_file(str(out / "encoder.safetensors")), load_file(str(vector / "encoder.safetensors")))
    heads = sorted(p.name for p in (out / "heads").glob("*.safetensors"))
    assert heads == sorted(p.name for p in (vector / "heads").glob("*.safetensors")) and len(heads) == 16
    head_diff = max(max_diff(load_file(str(out / "heads" / h)), load_file(str(vector / "heads" / h)))
                    for h in heads)
    print(f"\nflwr run on 4 SuperNodes x 4 tasks: {deployed_s:.1f} s; max |encoder - vectorized| = {diff:.3g}, "
          f"max |head - vectorized| = {head_diff:.3g}", file=sys.stderr)
    assert diff <= 1e-5 and head_diff <= 1e-5
    assert max_diff(load_file(str(out / "encoder.safetensors")), load_file(str(out / "encoder_init.safetensors"))) > 1e-3

    rounds = json.loads((out / "metrics.json").read_text())["rounds"]
    assert [r["tasks"] for r in rounds] == [r["tasks"] for r in json.loads((vector / "metrics.json").read_text())["rounds"]]
    # every round sent some node several messages (two of its tasks were sampled together), and one task
    # trained in both rounds
    assert all(len({t // TASKS_PER_NODE for t in r["tasks"]}) < len(r["tasks"]) for r in rounds)
    assert set(rounds[0]["tasks"]) & set(rounds[1]["tasks"])
