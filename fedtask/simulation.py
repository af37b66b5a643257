"""The ``flower`` engine: one ClientApp per IN task on Flower's simulation runtime (Ray),
locally or on a Ray cluster (``federation.ray_address``).

Two launchers, ``federation.launcher``:

``"flwr-run"`` (default): Flower's supported path. A private SuperLink in simulation mode
(``flower-superlink --simulation``, on a free loopback port, with its own ``FLWR_HOME`` in a
temporary directory) and ``flwr run`` of a generated one-file Flower App whose components
are this package's, so what runs is this checkout's code, not a copy. Flower's runtime starts
``flwr-simulation``, which runs :data:`job_app` (the ServerApp) and the ClientApps on Ray.
The only channel between this process and the ServerApp is a job directory: this process
writes the resolved configuration, the task spec and the run directory there (after every
check has passed here); the ServerApp trains with :func:`fedtask.federation.run_federation`,
runs the run's own per-round work where the encoder is (:class:`fedtask.pipeline.RunHook`:
divergence guard, snapshots, ``run.log``, TensorBoard, checkpoints), appends each round's row
to ``rounds.jsonl``, and writes the outcome (encoders, round log, evaluation) or the failure
there. This process follows ``rounds.jsonl`` for the caller's hook (the progress bar; a hook
that raises, e.g. Ctrl-C, stops the run) and reads the outcome back, so checks, run
directory, outputs and exit status stay :func:`fedtask.pipeline.run_training`'s. The
SuperLink and everything under it (flwr-simulation, Ray) stop when training ends, fails or is
interrupted.

``"run_simulation"``: :func:`flwr.simulation.run_simulation` in this process, which Flower
1.41 deprecates; its deprecation notice is shown.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from concurrent.futures import Future
from pathlib import Path

import torch
from flwr.app import Context
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedtask import rundir
from fedtask.client_app import app as default_client_app
from fedtask.config import ConfigError, from_dict
from fedtask.engines import RoundHook, TrainingFailed, TrainingOutcome
from fedtask.federation import run_federation

LAUNCHERS = ("flwr-run", "run_simulation")
JOB_APP = "fedtask.simulation:job_app"  # the ServerApp flwr-simulation runs for the flwr-run launcher
# the job directory, the only channel between run_with_flwr and job_app
JOB, STARTED, ROUNDS, OUTCOME, FAILURE = "job.json", "started", "rounds.jsonl", "outcome.json", "failure.json"
INITIAL_ENCODER, FINAL_ENCODER = "encoder_init.safetensors", "encoder.safetensors"
POLL_S = 0.05  # how often this process looks at the job directory
CONNECTION = "fedtask"  # the SuperLink connection's name in the private FLWR_HOME
STARTUP_TIMEOUT = 300.0  # seconds for the SuperLink to come up
STOP_GRACE = 5.0  # seconds to wait for what the launcher started to be gone


def backend_config(config) -> dict:
    """Ray resources per client; ``federation.ray_address`` joins an existing cluster."""
    fed = config.federation
    init_args: dict = {"include_dashboard": False, "logging_level": logging.ERROR, "log_to_driver": False}
    if fed.ray_address:
        init_args["address"] = fed.ray_address
    else:
        init_args["num_cpus"] = os.cpu_count() or 1
    return {"client_resources": {"num_cpus": fed.num_cpus_per_client, "num_gpus": fed.num_gpus_per_client},
            "init_args": init_args}


def federation_config_args(config) -> str:
    """``flwr run --federation-config``: the same Ray resources as :func:`backend_config`.

    Flower's simulation config takes whole CPUs per client; a fractional share (0.5: two clients
    per core) becomes one logical CPU per client on a Ray node of cores / share logical CPUs, which
    packs as many clients at once."""
    fed = config.federation
    cpus = fed.num_cpus_per_client
    args = {"num-supernodes": config.data.num_in_tasks, "client-resources-num-gpus": float(fed.num_gpus_per_client),
            "init-args-logging-level": "ERROR", "init-args-log-to-driver": False}
    if float(cpus).is_integer():
        args["client-resources-num-cpus"] = int(cpus)
        if not fed.ray_address:
            args["init-args-num-cpus"] = os.cpu_count() or 1
    else:  # only without a cluster (checked): its nodes' CPUs are not ours to rescale
        args["client-resources-num-cpus"] = 1
        args["init-args-num-cpus"] = max(1, int((os.cpu_count() or 1) // cpus))
    return " ".join(f"{key}={json.dumps(value)}" for key, value in args.items())


class FlowerSimulationEngine:
    def __init__(self, client_app: ClientApp | str = default_client_app):
        self.client_app = client_app  # tests inject failing clients here (an object, or "module:attribute")
        self.timings: dict = {}  # the flwr-run launcher's start-up marks (the bench reads them)

    def check(self, config) -> None:
        """Resources this machine cannot give: refused here, or Ray waits for them for ever."""
        fed = config.federation
        if fed.launcher == "flwr-run":
            self._check_flwr_run(config)
        if fed.ray_address:
            return  # a cluster's resources are known only once joined
        cpus = os.cpu_count() or 1
        if fed.num_cpus_per_client > cpus:
            raise ConfigError(f"federation.num_cpus_per_client: {fed.num_cpus_per_client:g} CPUs per client, "
                              f"but this machine has {cpus}")
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if fed.num_gpus_per_client > gpus:
            raise ConfigError(f"federation.num_gpus_per_client: {fed.num_gpus_per_client:g} GPUs per client, but "
                              f"this machine has {gpus}" + ("; set it to 0" if gpus == 0 else ""))

    def _check_flwr_run(self, config) -> None:
        missing = [name for name in ("flower-superlink", "flower-superexec", "flwr-simulation", "flwr")
                   if not _command(name)]
        if missing:
            raise ConfigError(f"federation.launcher: 'flwr-run' needs Flower's {', '.join(missing)} command"
                              f"{'s' if len(missing) > 1 else ''} (pip install \"flwr[simulation]\"); or set "
                              "federation.launcher = \"run_simulation\"")
        fed = config.federation
        if fed.ray_address and not float(fed.num_cpus_per_client).is_integer():
            raise ConfigError(f"federation.num_cpus_per_client: {fed.num_cpus_per_client:g}: flwr run gives each "
                              "client whole CPUs of a Ray cluster (federation.ray_address); use a whole number, "
                              "or federation.launcher = \"run_simulation\"")
        if app_reference(self.client_app) is None:
            raise ConfigError("federation.launcher: 'flwr-run' loads the ClientApp by module and name in Flower's "
                              "runtime process, and this one is not a module attribute; use "
                              "federation.launcher = \"run_simulation\"")

    def train(self, config, taskset, out_dir: Path, *, on_round: RoundHook | None = None,
              **extra) -> TrainingOutcome:
        """Run the FedSGD ServerApp against ``data.num_in_tasks`` simulated SuperNodes."""
        if config.federation.launcher == "run_simulation":
            return self._run_simulation(config, taskset, out_dir, on_round, extra)
        reference = app_reference(self.client_app)
        if reference is None:  # train() without check(): say what check() would have
            self._check_flwr_run(config)
        return run_with_flwr(config, taskset.spec, Path(out_dir), on_round=on_round, client_app=reference,
                             extra=extra, timings=self.timings)

    def _run_simulation(self, config, taskset, out_dir, on_round, extra) -> TrainingOutcome:
        from flwr.simulation import run_simulation

        result: Future = Future()  # run_simulation swallows the ServerApp's exceptions: carry them out
        server = ServerApp()

        @server.main()
        def main(grid: Grid, context: Context) -> None:
            try:
                result.set_result(run_federation(grid, config, taskset.spec, out_dir, on_round=on_round, **extra))
            except BaseException as err:
                result.set_exception(err)

        os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # Ray's GPU-env tip, not Flower's notice
        client_app = self.client_app if isinstance(self.client_app, ClientApp) else _load_app(self.client_app)
        flwr_logger = logging.getLogger("flwr")
        level, propagate = flwr_logger.level, flwr_logger.propagate
        # Flower's own handler prints its warnings, the deprecation notice among them, once; its DEBUG
        # lines (which a root handler, e.g. the one Opacus installs on import, would also print) stay out
        flwr_logger.setLevel(logging.WARNING)
        flwr_logger.propagate = False
        try:
            run_simulation(server_app=server, client_app=client_app, num_supernodes=config.data.num_in_tasks,
                           backend_config=backend_config(config))  # prints Flower's deprecation notice
        finally:
            flwr_logger.setLevel(level)
            flwr_logger.propagate = propagate
        if not result.done():
            raise RuntimeError("the Flower simulation ended without a result (see the log above)")
        return result.result()


# ---------------------------------------------------------------------------------------------
# the flwr-run launcher: this process's side


def run_with_flwr(config, spec, out_dir: Path, *, on_round: RoundHook | None, client_app: str,
                  extra: dict | None = None, timings: dict | None = None) -> TrainingOutcome:
    """Train through ``flwr run`` on a private local SuperLink; see the module's docstring.

    ``timings`` (the bench's) receives wall-clock marks from the start of this call:
    ``submitted_s`` (``flwr run`` has started the run), ``serverapp_s`` (the ServerApp has begun)."""
    from fedtask.pipeline import RunHook

    started = time.perf_counter()
    marks = timings if timings is not None else {}
    marks.clear()
    with tempfile.TemporaryDirectory(prefix="fedtask-flwr-") as tmp:
        tmp = Path(tmp)
        run_hook = on_round if isinstance(on_round, RunHook) else None
        job = write_job(tmp / "job", config, spec, Path(out_dir).resolve(), run_hook=run_hook, extra=extra or {})
        app_dir = _write_app(tmp / "app", client_app)
        env = _launch_env(config, tmp / "home")
        run_args = ["run", str(app_dir), CONNECTION, "--stream", "--run-config", f"job='{job}'",
                    "--federation-config", federation_config_args(config)]
        processes: list[subprocess.Popen] = []
        clock = lambda: time.perf_counter() - started  # noqa: E731
        try:
            cli, log = _start(tmp, env, run_args, processes, clock, marks)
            caller = run_hook.caller if run_hook is not None else on_round
            _follow(job, caller, cli, log, clock, marks)
            return read_outcome(job, log)
        finally:
            _stop(processes)


def write_job(job: Path, config, spec, out_dir: Path, *, run_hook, extra: dict) -> Path:
    """The job directory :data:`job_app` trains from (``job.json``: plain values only)."""
    from dataclasses import asdict

    job.mkdir(parents=True)
    (job / JOB).write_text(json.dumps({
        "config": config.to_dict(), "spec": asdict(spec), "out_dir": str(out_dir),
        "run_dir": str(run_hook.run_dir.resolve()) if run_hook is not None else None,
        "extra": _extra_to_json(extra), "launcher": _this_process()}))
    return job


def _this_process() -> dict:
    import psutil

    return {"pid": os.getpid(), "started": psutil.Process().create_time()}


def _alive(process: dict) -> bool:
    """The launching process is still there (the same one: a pid can be reused)."""
    import psutil

    try:
        return psutil.Process(process["pid"]).create_time() == process["started"]
    except psutil.NoSuchProcess:
        return False


def _follow(job: Path, caller: RoundHook | None, cli: subprocess.Popen, log: "_FlowerLog", clock,
            marks: dict) -> None:
    """Call ``caller`` on each round the ServerApp appends, until it writes its outcome or failure,
    or the run ends. The encoder stays in the ServerApp: a caller that reads it is told so."""
    rounds = _RoundsFile(job / ROUNDS)
    while True:
        if "serverapp_s" not in marks and (job / STARTED).exists():
            marks["serverapp_s"] = clock()
        finished = (job / OUTCOME).exists() or (job / FAILURE).exists() or cli.poll() is not None
        for server_round, row in rounds.new_rows():  # after the check: a finished run's rows are all there
            if caller is not None:
                caller(server_round, _ENCODER_ELSEWHERE, row)
        if finished:
            return
        time.sleep(POLL_S)


class _RoundsFile:
    """``rounds.jsonl`` as the ServerApp appends it: the complete lines not read yet."""

    def __init__(self, path: Path):
        self.path, self.offset, self.partial = path, 0, b""

    def new_rows(self) -> list[tuple[int, dict]]:
        try:
            with open(self.path, "rb") as handle:
                handle.seek(self.offset)
                data = handle.read()
        except FileNotFoundError:
            return []
        self.offset += len(data)
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()  # a line still being written
        return [(entry["round"], entry["row"]) for entry in map(json.loads, filter(None, lines))]


class _EncoderElsewhere(dict):
    """The encoder argument of a caller's hook under flwr-run: the encoder is in the ServerApp."""

    def _refuse(self, *args, **kwargs):
        raise RuntimeError("under federation.launcher = \"flwr-run\" a round's encoder stays in the ServerApp "
                           "(run.py writes snapshots with federation.snapshot_every); a hook that reads it needs "
                           "federation.launcher = \"run_simulation\"")

    __getitem__ = __iter__ = __len__ = keys = values = items = get = _refuse


_ENCODER_ELSEWHERE = _EncoderElsewhere()


def read_outcome(job: Path, log: "_FlowerLog") -> TrainingOutcome:
    """What the ServerApp wrote: its outcome, or the failure it raises here."""
    if (job / FAILURE).exists():
        failure = json.loads((job / FAILURE).read_text())
        if failure["kind"] == "failed":
            raise TrainingFailed(failure["message"])
        raise RuntimeError(f"the Flower ServerApp failed: {failure['message']}\n{failure['traceback']}")
    if not (job / OUTCOME).exists():
        log.join(timeout=5.0)
        raise TrainingFailed(f"the Flower run ended without a result ({log.last_error()})")
    from safetensors.torch import load_file

    outcome = json.loads((job / OUTCOME).read_text())
    return TrainingOutcome(initial_encoder=load_file(str(job / INITIAL_ENCODER)),
                           encoder=load_file(str(job / FINAL_ENCODER)), rounds=outcome["rounds"],
                           evaluation=outcome["evaluation"], heads_dir=Path(outcome["heads_dir"]))


def _extra_to_json(extra: dict) -> dict:
    """What ``run_training`` hands an engine besides the hook (checkpointing, a checkpoint to resume
    from), as plain values the ServerApp rebuilds them from."""
    out = {}
    for key, value in extra.items():
        if key == "checkpoints":
            out[key] = {"run_dir": str(Path(value.run_dir).resolve()), "every": value.every,
                        "fingerprint": value.fingerprint, "engine": value.engine, "earlier_s": value.earlier_s}
        elif key == "resume":
            out[key] = {"run_dir": str(Path(value.path).resolve().parent.parent)}  # <run>/checkpoints/round_N
        else:
            raise TypeError(f"the flwr-run launcher cannot pass {key!r} to the ServerApp")
    return out


def _extra_from_json(extra: dict) -> dict:
    out = {}
    if "checkpoints" in extra:
        from fedtask.checkpoint import Checkpointing

        c = extra["checkpoints"]
        out["checkpoints"] = Checkpointing(Path(c["run_dir"]), every=c["every"], fingerprint=c["fingerprint"],
                                           engine=c["engine"], earlier_s=c["earlier_s"])
    if "resume" in extra:
        from fedtask.checkpoint import load_checkpoint

        out["resume"] = load_checkpoint(Path(extra["resume"]["run_dir"]))
    return out


def _command(name: str) -> str | None:
    """A Flower console script: beside this interpreter, else on PATH."""
    beside = Path(sys.executable).with_name(name)
    return str(beside) if beside.is_file() else shutil.which(name)


def app_reference(app) -> str | None:
    """``module:attribute`` naming a ClientApp object (None when no imported module holds it)."""
    if isinstance(app, str):
        return app
    if app is default_client_app:
        return "fedtask.client_app:app"
    for name, module in list(sys.modules.items()):
        if name == "__main__" or module is None:
            continue
        for attribute, value in list(getattr(module, "__dict__", {}).items()):
            if value is app:
                return f"{name}:{attribute}"
    return None


def _load_app(reference: str):
    import importlib

    module, _, attribute = reference.partition(":")
    return getattr(importlib.import_module(module), attribute)


def _write_app(app_dir: Path, client_app: str) -> Path:
    """The Flower App ``flwr run`` submits: a pyproject.toml naming this package's components."""
    app_dir.mkdir(parents=True)
    (app_dir / "pyproject.toml").write_text(f"""\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "fedtask-run"
version = "1.0.0"
description = "A fedtask federation, launched by fedtask's flower engine (fedtask/simulation.py)"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "fedtask"

[tool.flwr.app.components]
serverapp = "{JOB_APP}"
clientapp = "{client_app}"

[tool.flwr.app.config]
job = ""
""")
    return app_dir


def _launch_env(config, home: Path) -> dict:
    """The SuperLink's environment, which flwr-simulation and its Ray workers inherit."""
    home.mkdir(parents=True)
    env = dict(os.environ)
    # the modules this process imports (this checkout, a test's module), found the same way there
    path = [Path(entry or os.getcwd()).resolve() for entry in sys.path]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(str(entry) for entry in path if entry.is_dir()))
    env.update({"FLWR_HOME": str(home), "FLWR_DISABLE_UPDATE_CHECK": "1"})
    env.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # Ray's GPU-env tip
    if config.federation.ray_address:
        env["RAY_ADDRESS"] = config.federation.ray_address  # Flower's simulation config has no address
    return env


def _die_with_parent() -> None:
    """In the child, before it runs: on Linux, SIGTERM it when this process dies, even by kill -9
    (Flower's processes below the SuperLink, and Ray's below flwr-simulation, follow their parents)."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def free_ports(count: int) -> list[int]:
    """Loopback ports nothing listens on now (all bound at once, so they differ)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


# ``flwr run``, started beside the SuperLink: the command's entry point (what the ``flwr`` script
# calls) is imported while the SuperLink starts, and called once the SuperLink answers
_FLWR_AFTER_SUPERLINK = """
import sys, time, urllib.request
from flwr.cli.app import app
url, deadline = sys.argv[1], time.monotonic() + float(sys.argv[2])
while True:
    try:
        with urllib.request.urlopen(url, timeout=0.5) as reply:
            if reply.status == 200:
                break
    except OSError:
        if time.monotonic() > deadline:
            sys.exit("Flower's SuperLink did not answer at " + url)
        time.sleep(0.1)
sys.argv = ["flwr", *sys.argv[3:]]
sys.exit(app())
"""


def _start(tmp: Path, env: dict, run_args: list[str], processes: list, clock, marks: dict):
    """A SuperLink in simulation mode on a free loopback port, and ``flwr run`` against it."""
    for _ in range(3):  # a port taken between choosing and binding it: try another
        port, = free_ports(1)
        (tmp / "home" / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "127.0.0.1:{port}"\ninsecure = true\n')
        link = subprocess.Popen(
            [_command("flower-superlink"), "--insecure", "--simulation", "--isolation", "subprocess",
             "--disable-runtime-dependency-installation", "--host", "127.0.0.1", "--port", str(port),
             "--log-file", str(tmp / "superlink.log")],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C reaches this process only; it stops the SuperLink itself
            preexec_fn=_die_with_parent)
        processes.append(link)
        cli = subprocess.Popen(
            [sys.executable, "-c", _FLWR_AFTER_SUPERLINK, f"http://127.0.0.1:{port}/health", str(STARTUP_TIMEOUT),
             *run_args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, preexec_fn=_die_with_parent)
        processes.append(cli)
        log = _FlowerLog(cli.stdout, clock, marks)
        while link.poll() is None and cli.poll() is None and "submitted_s" not in marks:
            time.sleep(0.1)
        if link.poll() is None:
            return cli, log
        _stop([cli])
    raise TrainingFailed(f"Flower's SuperLink exited at start (exit status {link.returncode}; its log: "
                         f"{tmp / 'superlink.log'}); federation.launcher = \"run_simulation\" runs without it")


def _stop(processes: list[subprocess.Popen]) -> None:
    """Stop the SuperLink, flwr run and everything below them (flwr-simulation, Ray), and only those.

    SIGKILL, at once: the run's outputs are written or given up by now, and nothing below has
    state worth a graceful exit (a SIGTERM'd flwr-simulation would first try to report to the
    SuperLink that is going away)."""
    import psutil

    everything = []
    for process in processes:
        try:
            parent = psutil.Process(process.pid)
            everything += [parent, *parent.children(recursive=True)]
        except psutil.NoSuchProcess:
            pass
    for proc in everything:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    deadline = time.monotonic() + STOP_GRACE
    while everything and time.monotonic() < deadline:  # gone, or a zombie (killed; whoever adopted it reaps it)
        everything = [proc for proc in everything if is_running(proc)]
        time.sleep(0.05)
    for process in processes:
        try:
            process.wait(timeout=0.1)  # reap
        except subprocess.TimeoutExpired:
            pass


def is_running(proc) -> bool:
    import psutil

    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# Flower's own chatter in the run's log (its INFO lines, the federation-size notes) that says nothing
# the progress lines do not; warnings and errors, deprecations included, pass through
_QUIET = re.compile(r"^(INFO|DEBUG)\s*:|^Using SuperLink:|^Successfully started run|"
                    r"^Successfully installed fedtask-run to|default simulated SuperNodes changed|"
                    r"Manually terminating ClientAppActor")

_ERROR = re.compile(r"^(ERROR|CRITICAL)\b|Traceback|Error:|Exception")


class _FlowerLog:
    """``flwr run --stream``'s output, passed to stderr without Flower's INFO chatter."""

    def __init__(self, stream, clock=None, marks: dict | None = None):
        self.lines: deque[str] = deque(maxlen=200)
        self._clock, self._marks = clock, marks if marks is not None else {}
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream) -> None:
        for raw in iter(stream.readline, b""):
            line = _ANSI.sub("", raw.decode(errors="replace")).rstrip()
            text = re.sub(r"^\(\w+ pid=\d+\)\s*", "", line).strip()  # Ray's prefix on a worker's lines
            if not text:
                continue
            if text.startswith("Successfully started run") and self._clock:
                self._marks.setdefault("submitted_s", self._clock())
            self.lines.append(text)
            if _QUIET.search(text):
                continue
            from fedtask import progress

            if _ERROR.search(text):  # shown even with --quiet, and kept in run.log
                progress.error(line)
            else:  # above the progress bar; not with --quiet
                progress.log(line, files=False)

    def join(self, timeout: float = 5.0) -> None:
        self._thread.join(timeout)

    def last_error(self) -> str:
        for line in reversed(self.lines):
            if re.search(r"error|exception", line, re.IGNORECASE):
                return line[:300]
        return "see the log above"


def _plain(value):
    """numpy / torch scalars in a round's row, as JSON numbers."""
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, (set, tuple)):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _write_json(path: Path, value) -> None:
    """Written whole or not at all: the launching process takes a file's existence as its content's."""
    rundir.write_text(path, json.dumps(value, default=_plain))


# ---------------------------------------------------------------------------------------------
# the flwr-run launcher: the ServerApp's side, in flwr-simulation

job_app = ServerApp()


class _Orphaned(BaseException):
    """The process that launched this run is gone (killed): the run stops at the next round."""


@job_app.main()
def _run_job(grid: Grid, context: Context) -> None:
    """Train the job in the directory the run config names; leave the outcome or the failure there."""
    from fedtask.data.base import TaskSpec
    from fedtask.pipeline import RunHook

    job = Path(str(context.run_config["job"]))
    (job / STARTED).touch()
    try:
        spec_job = json.loads((job / JOB).read_text())
        config = from_dict(spec_job["config"], check=False)  # validated by the launching process
        spec = TaskSpec(**{**spec_job["spec"], "input_shape": tuple(spec_job["spec"]["input_shape"])})
        own = RunHook(config, Path(spec_job["run_dir"]), None) if spec_job["run_dir"] else None
        launcher = spec_job["launcher"]
        with open(job / ROUNDS, "a", encoding="utf-8") as rounds:
            def on_round(server_round: int, encoder, row: dict) -> None:
                if not _alive(launcher):  # run.py was killed: write nothing more into its run directory
                    raise _Orphaned()
                if own is not None:
                    own(server_round, encoder, row)
                rounds.write(json.dumps({"round": server_round, "row": row}, default=_plain) + "\n")
                rounds.flush()

            outcome = run_federation(grid, config, spec, Path(spec_job["out_dir"]), on_round=on_round,
                                     **_extra_from_json(spec_job["extra"]))
        rundir.save_state(outcome.initial_encoder, job / INITIAL_ENCODER)
        rundir.save_state(outcome.encoder, job / FINAL_ENCODER)
        _write_json(job / OUTCOME, {"rounds": outcome.rounds, "evaluation": outcome.evaluation,
                                    "heads_dir": str(outcome.heads_dir)})
    except _Orphaned:
        return
    except TrainingFailed as err:
        _write_json(job / FAILURE, {"kind": "failed", "message": str(err)})
    except Exception as err:  # noqa: BLE001 - raised by the launching process, which reads it here
        import traceback

        _write_json(job / FAILURE, {"kind": "error", "message": f"{type(err).__name__}: {err}",
                                    "traceback": traceback.format_exc()})
    finally:
        from fedtask import progress

        progress.close_all()
