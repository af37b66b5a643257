"""Two bench sections: fedtask beside pfl-research on the same work, and three accountants on one mechanism.

``python run.py bench --peers``: seconds per round of Apple's pfl-research (PyPI ``pfl``; its
side is :mod:`fedtask.peers_pfl`, run by an interpreter that has pfl) and of fedtask's
vectorized engine, back to back, on the same workload: the synthetic tasks (one pfl user per
task, 32 samples of 64 features, 2 labels), the same MLP 64-512-8 with a 2-way linear head from
the same initial weights, FedSGD with one full-batch local step, the server's AdamW (lr 3e-3,
weight decay 1e-4) on the cohort's mean update, at 32 and 256 tasks per round; then both again
with DP: pfl's central Gaussian mechanism and fedtask's task-level DP at the same noise multiplier,
clipping bound and cohort. What still differs is :data:`DIFFERENCES`.

``python run.py bench --accountants`` (also part of the full bench): ε of one (q, z, T, δ) under
Opacus's RDP and PRV accountants and Google dp-accounting's PLD accountant (``dp.accountant``
"rdp", "prv", "pld"): the default DP sweep's settings, z calibrated by RDP to each budget.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PFL_REQUIREMENT = "pfl[pytorch]==0.6.0"
PEERS_PYTHON_ENV = "FEDTASK_PEERS_PYTHON"
PEERS_SCRIPT = Path(__file__).with_name("peers_pfl.py")
INSTALL_HINT = (f'install it in its own environment: python -m venv --system-site-packages .venv-peers && .venv-peers/bin/pip install "{PFL_REQUIREMENT}", '
                f"then pass --peers-python .venv-peers/bin/python (or set {PEERS_PYTHON_ENV})")

DP_SWEEP_CONFIG = "configs/synthetic.toml"
DP_SWEEP_BUDGETS = (16.0, 8.0, 4.0, 1.0)  # the README's `dp-sweep --epsilons inf,16,8,4,1`, finite ones
EXTRA_SETTING = {"sample_rate": 0.05, "noise_multiplier": 1.0, "steps": 100, "delta": 1e-5}  # Opacus's usual example

PEER_NOISE_MULTIPLIER = 1.0
PEER_CLIPPING_NORM = 1.0

DIFFERENCES = (
    "fedtask keeps each task's 2-way head private (one closed-form SGD step on it, then the encoder "
    "gradient at the updated head is the task's update), while pfl trains one shared head with the "
    "encoder (one SGD step on the whole model, learning rate 1, so a user's update is minus its "
    "gradient, head included); fedtask runs every task of the round through one encoder forward and "
    "one backward (with DP too, which keeps each task's own gradient: one batched product per layer "
    "gives all tasks' weight gradients), pfl trains users one after another; "
    "fedtask evaluates its loss before the head step each round, pfl computes no metrics after round 0; "
    "with DP, fedtask samples tasks by Poisson sampling with the cohort as expected size "
    "(q = cohort / tasks) and divides by that expected size, pfl takes a fixed cohort and divides by it; "
    "and with DP fedtask holds every task's encoder gradient (tasks x 37k floats) at once and clips them "
    "together, pfl clips one user's update at a time."
)


# ----------------------------------------------------------------------------------- accountants

def accountant_settings(config_path: str = DP_SWEEP_CONFIG, budgets=DP_SWEEP_BUDGETS) -> list[dict]:
    """The default DP sweep's (q, z, T, δ) per budget (z calibrated by RDP, as the sweep does), plus one more."""
    from fedtask.config import load_config
    from strategies.accounting import calibrate_noise_multiplier

    config = load_config(config_path)
    q, steps, delta = config.sample_rate, config.encoder_rounds, config.dp.delta
    settings = [{"target_epsilon": target, "calibrated_by": "rdp", "sample_rate": q, "steps": steps, "delta": delta,
                 "noise_multiplier": calibrate_noise_multiplier(target_epsilon=target, sample_rate=q, steps=steps,
                                                                delta=delta, accountant="rdp")}
                for target in budgets]
    return settings + [{"target_epsilon": None, "calibrated_by": None, **EXTRA_SETTING}]


def compare_accountants(settings: list[dict]) -> list[dict]:
    """ε of each setting under every accountant ``dp.accountant`` offers, the seconds each took, the tightest."""
    import warnings

    from strategies.accounting import ACCOUNTANTS, epsilon_spent

    rows = []
    for setting in settings:
        epsilon, seconds = {}, {}
        for name in ACCOUNTANTS:
            started = time.perf_counter()
            with warnings.catch_warnings():  # RDP at large z: its best order is its largest (it is looser there)
                warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
                epsilon[name] = epsilon_spent(noise_multiplier=setting["noise_multiplier"],
                                              sample_rate=setting["sample_rate"], steps=setting["steps"],
                                              delta=setting["delta"], accountant=name)
            seconds[name] = time.perf_counter() - started
        rows.append({**setting, "epsilon": epsilon, "seconds": seconds, "tightest": min(epsilon, key=epsilon.get)})
    return rows


def format_accountants(rows: list[dict]) -> str:
    from attacks import markdown_table

    names = list(rows[0]["epsilon"]) if rows else []
    table = markdown_table(
        ["budget (z calibrated by RDP)", "q", "noise z", "steps T", "δ", *(f"{n.upper()} ε" for n in names), "tightest"],
        [["—" if r["target_epsilon"] is None else f"{r['target_epsilon']:g}", f"{r['sample_rate']:g}",
          f"{r['noise_multiplier']:.4g}", r["steps"], f"{r['delta']:g}", *(f"{r['epsilon'][n]:.4g}" for n in names),
          r["tightest"].upper()] for r in rows])
    return ("Privacy accounting of the same Poisson-subsampled Gaussian mechanism (q, z, T, δ): Opacus's RDP "
            "and PRV accountants and Google dp-accounting's PLD accountant. Each ε is an upper bound on the "
            "mechanism's true ε (PLD pessimistic, PRV with its error bound, RDP by conversion); the smallest "
            "is the tightest.\n\n" + table)


# ----------------------------------------------------------------------------------------- peers

def peers_python(explicit: str | None = None) -> str:
    """The interpreter that runs pfl's side: ``--peers-python``, else $FEDTASK_PEERS_PYTHON, else this one."""
    return explicit or os.environ.get(PEERS_PYTHON_ENV) or sys.executable


def check_pfl(python: str) -> str:
    """pfl's version under ``python``, or a one-line ConfigError saying how to install it."""
    from fedtask.config import ConfigError

    probe = "import importlib.metadata as m, pfl.algorithm, pfl.model.pytorch; print(m.version('pfl'))"
    try:
        done = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise ConfigError(f"--peers: cannot run {python} ({type(err).__name__}); {INSTALL_HINT}") from None
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        reason = lines[-1] if lines else f"exit status {done.returncode}"
        raise ConfigError(f"--peers: pfl-research is not importable by {python} ({reason}); {INSTALL_HINT}")
    return done.stdout.strip()


def peer_config(num_tasks: int, tasks_per_round: int, rounds: int, dp: bool):
    """The fedtask side: the bench's synthetic federation with one head step, no aggregate clipping."""
    from fedtask.config import load_config

    return load_config(DP_SWEEP_CONFIG, [
        f"data.num_in_tasks={num_tasks}", "data.num_out_tasks=2", f"federation.tasks_per_round={tasks_per_round}",
        f"federation.rounds={rounds}", "federation.warm_start_rounds=0", "federation.engine=vectorized",
        "federation.head_steps=1", "federation.grad_clip=0.0", "federation.final_head_steps=0",
        f"dp.enabled={'true' if dp else 'false'}", f"dp.noise_multiplier={PEER_NOISE_MULTIPLIER}",
        f"dp.clipping_norm={PEER_CLIPPING_NORM}"])


def pfl_job(config, settings: list[dict]) -> dict:
    """What pfl's side needs: the same users' data and initial weights (encoder + a head), the settings."""
    import torch

    from fedtask.data import load_tasks
    from fedtask.models import build_model, initial_private_state

    taskset = load_tasks(config)
    model = build_model(config, taskset.spec)
    state = {**model.shared_state(), **initial_private_state(model, 0, config.seed)}
    fed = config.federation
    return {"x": torch.stack([t.train_x for t in taskset.in_tasks]), "y": torch.stack([t.train_y for t in taskset.in_tasks]),
            "state": state, "seed": config.seed, "server_lr": fed.server_lr, "server_weight_decay": fed.server_weight_decay,
            "noise_multiplier": PEER_NOISE_MULTIPLIER, "clipping_norm": PEER_CLIPPING_NORM,
            "threads": torch.get_num_threads(), "settings": settings}


def write_job(job: dict, path: Path) -> None:
    """The job for pfl's side, never pickled: tensors to ``path.safetensors``, the rest to ``path.json``."""
    from safetensors.torch import save_file

    tensors = {"x": job["x"], "y": job["y"], **{f"state.{k}": v for k, v in job["state"].items()}}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path) + ".safetensors")
    Path(str(path) + ".json").write_text(json.dumps({k: v for k, v in job.items() if k not in ("x", "y", "state")}))


def run_pfl(python: str, job: dict) -> dict:
    """Run :mod:`fedtask.peers_pfl` under ``python`` on ``job``; its JSON report."""
    from fedtask.engines import TrainingFailed

    with tempfile.TemporaryDirectory() as tmp:
        job_path, out_path = Path(tmp) / "job", Path(tmp) / "pfl.json"
        write_job(job, job_path)
        done = subprocess.run([python, str(PEERS_SCRIPT), str(job_path), str(out_path)], capture_output=True, text=True)
        if done.returncode != 0 or not out_path.exists():
            lines = done.stderr.strip().splitlines()
            raise TrainingFailed(f"pfl's side failed under {python}: {lines[-1] if lines else done.returncode}")
        return json.loads(out_path.read_text())


def time_peers(*, python: str, quick: bool = False, threads: int | None = None) -> dict:
    """Seconds per round of pfl and of the vectorized engine on the same work, without and with DP.

    Both sides run with ``threads`` torch threads (default: this process's count). On a machine
    whose cores are busy with other work, one thread each is the reliable setting: two OpenMP
    threads on two shared cores wait for each other, and rounds then take 10-100x longer.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        return _time_peers(python=python, quick=quick)
    finally:
        torch.set_num_threads(before)


def _time_peers(*, python: str, quick: bool) -> dict:
    import torch

    from fedtask.bench import time_engine
    from fedtask.vectorized import engine_device

    num_tasks = 64 if quick else 256
    sizes = (8, 32) if quick else (32, 256)
    rounds = 4 if quick else 21
    repeats = 1 if quick else 5  # alternating; single runs of either side move by 30 % on a shared machine
    cases = [(size, dp) for dp in (False, True) for size in sizes]
    settings = [{"tasks_per_round": size, "dp": dp, "rounds": rounds} for size, dp in cases]
    job = pfl_job(peer_config(num_tasks, sizes[-1], rounds, False), settings)
    fedtask_s = {case: [] for case in cases}
    pfl_s = {case: [] for case in cases}
    pfl_report = {}
    for repeat in range(repeats):  # alternate the two: a slow spell of a shared machine then hits both
        for size, dp in cases:
            print(f"bench --peers: fedtask vectorized, {size} tasks/round, DP {'on' if dp else 'off'} "
                  f"(repeat {repeat + 1}/{repeats})", flush=True)
            fedtask_s[(size, dp)].append(time_engine(peer_config(num_tasks, size, rounds, dp), "vectorized"))
        print(f"bench --peers: pfl, all settings (repeat {repeat + 1}/{repeats})", flush=True)
        pfl_report = run_pfl(python, job)
        for row in pfl_report["rows"]:
            pfl_s[(row["tasks_per_round"], row["dp"])].append(row["seconds"])
    rows = []
    for case in cases:
        fed, pfl = statistics.median(fedtask_s[case]), statistics.median(pfl_s[case])
        rows.append({"tasks_per_round": case[0], "dp": case[1], "pfl_s": pfl, "pfl_repeats_s": pfl_s[case],
                     "fedtask_s": fed, "fedtask_repeats_s": fedtask_s[case], "speedup": pfl / fed})
    state = job["state"]
    (hidden, features), embedding = state["encoder.hidden.weight"].shape, state["encoder.projection.weight"].shape[0]
    return {"pfl_version": pfl_report.get("pfl_version"), "pfl_python": python, "pfl_device": pfl_report.get("device"),
            "pfl_torch_threads": pfl_report.get("torch_threads"), "torch_threads": torch.get_num_threads(),
            "fedtask_device": str(engine_device(peer_config(num_tasks, sizes[-1], rounds, False))),
            "num_tasks": num_tasks, "samples_per_task": int(job["x"].shape[1]), "features": int(job["x"].shape[2]),
            "model": f"MLP {features}-{hidden}-{embedding} + linear {embedding}-{state['head.weight'].shape[0]}",
            "rounds": rounds, "repeats": repeats,
            "noise_multiplier": PEER_NOISE_MULTIPLIER, "clipping_norm": PEER_CLIPPING_NORM,
            "server": f"AdamW lr {job['server_lr']:g}, weight decay {job['server_weight_decay']:g}",
            "rows": rows, "differences": DIFFERENCES}


def format_peers(peers: dict) -> str:
    from attacks import markdown_table

    dp_label = f"z={peers['noise_multiplier']:g}, C={peers['clipping_norm']:g}"
    table = markdown_table(
        ["tasks/round", "DP", f"pfl {peers.get('pfl_version') or ''} (s/round)".replace("  ", " "),
         "fedtask vectorized (s/round)", "fedtask vs pfl"],
        [[r["tasks_per_round"], dp_label if r["dp"] else "off", f"{r['pfl_s']:.4f}", f"{r['fedtask_s']:.4f}",
          f"{r['speedup']:.1f}x"] for r in peers["rows"]])
    intro = (f"Side by side with pfl-research, same work: {peers['num_tasks']} tasks (one pfl user each) of "
             f"{peers['samples_per_task']} samples, {peers['model']} from the same initial weights, FedSGD with one "
             f"full-batch local step, server {peers['server']}; median seconds per round after the first of "
             f"{peers['rounds']} rounds, median of {peers['repeats']} alternating runs; fedtask on "
             f"{peers.get('fedtask_device', 'cpu')}, pfl on {peers.get('pfl_device') or 'cpu'}, "
             f"{peers['torch_threads']} torch thread{'' if peers['torch_threads'] == 1 else 's'} each. DP: pfl's central Gaussian mechanism vs fedtask's task-level "
             f"DP, same noise multiplier, clipping bound and cohort.")
    return f"{intro}\n\n{table}\n\nWhat differs: {peers['differences']}"


# ------------------------------------------------------------------------------------ the command

def machine() -> dict:
    import torch

    return {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def run_sections(out_dir: Path, *, peers: bool, accountants: bool, quick: bool = False,
                 python: str | None = None, threads: int | None = None) -> dict:
    """``bench --peers`` / ``--accountants``: only those sections, into bench.json and bench.md."""
    from fedtask.config import ConfigError

    if threads is not None and not (isinstance(threads, int) and threads >= 1):
        raise ConfigError(f"--threads: must be an integer >= 1; got {threads!r}")
    python = peers_python(python)
    pfl_version = check_pfl(python) if peers else None  # before anything runs: one line, exit 2
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report: dict = {"machine": {**machine(), "load_average_at_start": os.getloadavg()}, "quick": quick}
    if accountants:
        print("bench: accountants (RDP, PRV, PLD) on the default DP sweep's settings", flush=True)
        report["accountants"] = compare_accountants(accountant_settings())
    if peers:
        print(f"bench: side by side with pfl {pfl_version} ({python})", flush=True)
        report["peers"] = time_peers(python=python, quick=quick, threads=threads)
    report["machine"]["load_average_at_end"] = os.getloadavg()  # a shared machine's other work shows here
    text = format_sections(report)
    (out_dir / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / "bench.md").write_text(text)
    print(text, flush=True)
    return report


def format_sections(report: dict) -> str:
    m = report["machine"]
    loads = [f"{m[key][0]:.2f} at {key.split('_')[-1]}" for key in ("load_average_at_start", "load_average_at_end")
             if m.get(key)]
    load = f"; 1-min load average {', '.join(loads)}" if loads else ""
    parts = [f"# fedtask bench ({m['cpus']} CPUs, CUDA: {m['cuda'] or 'none'}; {m['platform']}{load})"]
    if "peers" in report:
        parts.append(format_peers(report["peers"]))
    if "accountants" in report:
        parts.append(format_accountants(report["accountants"]))
    return "\n\n".join(parts) + "\n"
