"""The flower engine on a Ray cluster: ``ray start --head`` on loopback (2 CPUs, its own temp dir
and ports), a tiny training joined to it with ``federation.ray_address``, and the encoder it ends
with equals the vectorized engine's on the same config.

The cluster is stopped by stopping the processes this test started (the ``ray start --block``
process and everything below it), never by ``ray stop``, which stops every Ray process on the
machine: other tests' and other users' included.
"""
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from fedtask.config import load_config
from fedtask.pipeline import run_training
from fedtask.simulation import free_ports, is_running

pytestmark = pytest.mark.simulation

TINY = ["data.num_in_tasks=4", "data.num_out_tasks=2", "federation.tasks_per_round=2", "federation.rounds=4",
        "federation.warm_start_rounds=1", "model.hidden_dim=32", 'federation.server_optimizer="sgd"']
START_TIMEOUT = 120.0


def ray_command() -> str:
    beside = Path(sys.executable).with_name("ray")
    return str(beside) if beside.is_file() else (shutil.which("ray") or pytest.skip("no `ray` command"))


def stop_cluster(head: subprocess.Popen) -> None:
    """SIGTERM the `ray start --block` process and everything in its session (GCS, raylet, agents,
    workers), then SIGKILL what is left: this cluster only."""
    import psutil

    def cluster() -> list:  # its own session (start_new_session): agents Ray re-parents to init stay in it
        found = []
        for proc in psutil.process_iter():
            try:
                if os.getsid(proc.pid) == head.pid:
                    found.append(proc)
            except (ProcessLookupError, PermissionError, psutil.NoSuchProcess):
                pass
        return found

    tree = cluster()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        tree = list({proc.pid: proc for proc in [*tree, *cluster()]}.values())
        for proc in tree:
            try:
                proc.send_signal(sig)
            except psutil.NoSuchProcess:
                pass
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            tree = [p for p in tree if is_running(p)]
            if not tree:
                break
            time.sleep(0.1)
    try:
        head.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


@pytest.fixture
def ray_cluster(request):
    """A one-node Ray cluster on 127.0.0.1 with 2 CPUs; yields its address and temp dir."""
    temp_dir = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # short: Ray's socket paths live under it
    gcs, client, agent, agent_grpc, runtime_env, metrics, node_manager, object_manager = free_ports(8)
    log = open(temp_dir / "ray-start.log", "w")
    head = subprocess.Popen(
        [ray_command(), "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
         "--num-cpus", "2", "--num-gpus", "0", "--temp-dir", str(temp_dir), "--include-dashboard", "false",
         "--disable-usage-stats", "--ray-client-server-port", str(client),
         "--dashboard-agent-listen-port", str(agent), "--dashboard-agent-grpc-port", str(agent_grpc),
         "--runtime-env-agent-port", str(runtime_env), "--metrics-export-port", str(metrics),
         "--node-manager-port", str(node_manager), "--object-manager-port", str(object_manager)],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "RAY_ADDRESS": ""})

    def finish():
        stop_cluster(head)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)

    request.addfinalizer(finish)  # also when the test (or the start below) fails
    deadline = time.monotonic() + START_TIMEOUT
    while "Ray runtime started" not in (temp_dir / "ray-start.log").read_text():
        if head.poll() is not None or time.monotonic() > deadline:
            pytest.fail("ray start --head did not start:\n" + (temp_dir / "ray-start.log").read_text()[-2000:])
        time.sleep(0.5)
    yield f"127.0.0.1:{gcs}", temp_dir


def test_flower_on_a_ray_cluster_ends_where_the_vectorized_engine_does(ray_cluster, tmp_path):
    address, temp_dir = ray_cluster
    flower = load_config("configs/synthetic.toml", TINY + ['federation.engine="flower"',
                                                          f'federation.ray_address="{address}"'])
    vector = load_config("configs/synthetic.toml", TINY + ['federation.engine="vectorized"'])
    started = time.perf_counter()
    run_training(flower, tmp_path / "flower", on_round=None)
    seconds = time.perf_counter() - started
    run_training(vector, tmp_path / "vector", on_round=None)

    # the clients ran on this cluster: its session logged a driver (Flower's runtime joining it)
    logs = temp_dir / "session_latest" / "logs"
    assert any(p.name.startswith("python-core-driver") for p in logs.iterdir()), sorted(p.name for p in logs.iterdir())
    a = load_file(str(tmp_path / "flower" / "encoder.safetensors"))
    b = load_file(str(tmp_path / "vector" / "encoder.safetensors"))
    difference = max(float((a[k] - b[k]).abs().max()) for k in a)
    print(f"flower on the Ray cluster: {seconds:.1f} s; max |encoder difference| vs vectorized: {difference:.3g}")
    assert a.keys() == b.keys() and difference <= 1e-5
