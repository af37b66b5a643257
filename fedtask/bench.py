"""``python run.py bench``: where the time goes, side by side in one run.

Per round, on the synthetic config, at 32 and 256 tasks per round:
- the vectorised engine (all sampled tasks in one vmapped pass);
- the Flower engine (one ClientApp per task on Ray), and its per-client-round
  overhead over the pure compute of the same per-task calls made in one process;
- a minimal Flower app doing the same per-task work (bare ClientApp, no strategy, no
  config, no client state), to show what the framework itself costs;
- a plain PyTorch loop in the paper's reference style (one forward per task);
and the attack's throughput at 512 tasks x 128 trials, both attacks, both adversaries,
whitened. Writes bench.json and bench.md.
"""
from __future__ import annotations

import functools
import json
import os
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from fedtask import task as task_math
from fedtask import rundir
from fedtask.config import from_dict, load_config, with_overrides
from fedtask.data import load_tasks
from fedtask.models import build_model, initial_private_state
from fedtask.pipeline import RunHook, run_training
from fedtask.vectorized import engine_device
from strategies.sampling import sample_fixed


def bench_config(num_tasks: int, tasks_per_round: int, rounds: int) -> dict:
    return load_config("configs/synthetic.toml", [
        f"data.num_in_tasks={num_tasks}", "data.num_out_tasks=2", f"federation.tasks_per_round={tasks_per_round}",
        f"federation.rounds={rounds}", "federation.warm_start_rounds=0"])


def steady_seconds(rows: list[dict]) -> float:
    """Median round time after the first round (which pays for start-up and caching)."""
    return statistics.median(row["seconds"] for row in rows[1:]) if len(rows) > 1 else rows[0]["seconds"]


def time_engine(config, engine: str) -> float:
    """Seconds per round of a whole training run (``run_training``) on ``engine``."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        run_training(with_overrides(config, {"federation.engine": engine}), out, on_round=None)
        rows = json.loads((out / rundir.METRICS).read_text())["rounds"]
    return steady_seconds(rows)


def time_vectorized(config) -> float:
    return time_engine(config, "vectorized")


def time_flower(config) -> float:
    return time_engine(config, "flower")


def time_pure_compute(config, rounds: int) -> float:
    """The same per-task calls as the Flower clients make, one after another, in this process.

    Single-threaded, as each Flower client runs (``num_cpus_per_client`` = 1).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, int(config.federation.num_cpus_per_client)))
    try:
        return _pure_compute(config, rounds)
    finally:
        torch.set_num_threads(threads)


def parallel_clients(config) -> int:
    """How many Flower clients run at once on this machine (Ray packs them by CPU)."""
    return max(1, int((os.cpu_count() or 1) // config.federation.num_cpus_per_client))


def _pure_compute(config, rounds: int) -> float:
    taskset = load_tasks(config)
    model = build_model(config, taskset.spec)
    shared = model.shared_state()
    trainable = model.shared_parameter_names()
    fed = config.federation
    heads = {}
    times = []
    for server_round in range(1, rounds + 1):
        started = time.perf_counter()
        for pid in sample_fixed(len(taskset.in_tasks), fed.tasks_per_round, config.seed, server_round):
            task = taskset.in_tasks[pid]
            private = heads.get(pid) or initial_private_state(model, pid, config.seed)
            heads[pid], _, _ = task_math.local_round(model, shared, private, task.train_x, task.train_y,
                                                     fed.head_lr, fed.head_weight_decay, fed.head_steps,
                                                     False, trainable)
        times.append({"seconds": time.perf_counter() - started})
    return steady_seconds(times)


def time_reference_loop(config, rounds: int) -> float:
    """The paper's reference style: a centralised model, one forward pass per task, AdamW."""
    taskset = load_tasks(config)
    device = engine_device(config)  # timed where the vectorised engine runs
    torch.manual_seed(config.seed)
    model = build_model(config, taskset.spec).to(device)
    heads = torch.nn.ModuleList(torch.nn.Linear(config.model.embedding_dim, taskset.num_classes)
                                for _ in taskset.in_tasks).to(device)
    data = [(task.train_x.to(device), task.train_y.to(device)) for task in taskset.in_tasks]
    encoder_opt = torch.optim.AdamW(model.encoder.parameters(), lr=1e-3, weight_decay=1e-4)
    head_opt = torch.optim.AdamW(heads.parameters(), lr=1e-3, weight_decay=1e-3)
    fed = config.federation
    times = []
    for server_round in range(1, rounds + 1):
        started = time.perf_counter()
        sampled = sample_fixed(len(taskset.in_tasks), fed.tasks_per_round, config.seed, server_round)
        loss = 0.0
        for pid in sampled:
            x, y = data[pid]
            loss = loss + torch.nn.functional.cross_entropy(heads[pid](model.encoder(x)), y) / len(sampled)
        encoder_opt.zero_grad()
        head_opt.zero_grad()
        loss.backward()
        encoder_opt.step()
        head_opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append({"seconds": time.perf_counter() - started})
    return steady_seconds(times)


def time_minimal_flower(config, rounds: int) -> float:
    """A bare Flower app doing the same per-task work: the framework's own floor."""
    from flwr.app import ArrayRecord, Context, Message, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from fedtask.simulation import backend_config

    config_json = json.dumps(config.to_dict(), sort_keys=True)
    times: list[dict] = []
    client = ClientApp()

    @client.train()
    def train(msg: Message, context: Context) -> Message:
        runtime = _minimal_runtime(config_json)
        model, taskset, trainable, fed = runtime
        pid = int(context.node_config["partition-id"])
        task = taskset.in_tasks[pid]
        shared = msg.content["arrays"].to_torch_state_dict()
        private = initial_private_state(model, pid, 0)
        _, grads, _ = task_math.local_round(model, shared, private, task.train_x, task.train_y, fed.head_lr,
                                            fed.head_weight_decay, fed.head_steps, False, trainable)
        return Message(RecordDict({"arrays": ArrayRecord(torch_state_dict=grads)}), reply_to=msg)

    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        model, _, _, _ = _minimal_runtime(config_json)
        arrays = ArrayRecord(torch_state_dict=model.shared_state())
        while len(nodes := list(grid.get_node_ids())) < config.data.num_in_tasks:
            time.sleep(0.1)
        rng = random.Random(0)  # node ids are uint64: sample them as Python ints
        for _ in range(rounds):
            started = time.perf_counter()
            chosen = rng.sample(nodes, config.federation.tasks_per_round)
            replies = grid.send_and_receive([Message(RecordDict({"arrays": arrays}), message_type="train",
                                                     dst_node_id=int(node)) for node in chosen])
            _ = [r.content["arrays"].to_numpy_ndarrays() for r in replies]
            times.append({"seconds": time.perf_counter() - started})

    run_simulation(server_app=server, client_app=client, num_supernodes=config.data.num_in_tasks,
                   backend_config=backend_config(config))
    return steady_seconds(times)


@functools.lru_cache(maxsize=1)
def _minimal_runtime(config_json: str):
    config = from_dict(json.loads(config_json), check=False)
    torch.set_num_threads(1)
    taskset = load_tasks(config)
    model = build_model(config, taskset.spec)
    return model, taskset, model.shared_parameter_names(), config.federation


LAUNCHERS = ("flwr-run", "run_simulation")


def launcher_config(tasks: int, rounds: int):
    """A tiny model (16 -> 32 -> 4) on ``tasks`` tasks, every task every round: Flower's overhead dominates."""
    return load_config("configs/synthetic.toml", [
        f"data.num_in_tasks={tasks}", "data.num_out_tasks=2", f"federation.tasks_per_round={tasks}",
        f"federation.rounds={rounds}", "federation.warm_start_rounds=0", "data.dim=16", "model.hidden_dim=32",
        "model.embedding_dim=4", "federation.head_steps=1", "federation.engine=\"flower\""])


class _TimedEngine:
    """The Flower engine with the wall clock read where it starts, at each round's end, and where it returns."""

    def __init__(self):
        from fedtask.simulation import FlowerSimulationEngine

        self.engine = FlowerSimulationEngine()
        self.marks: dict = {}

    def check(self, config) -> None:
        self.engine.check(config)

    def train(self, config, taskset, out_dir, *, on_round=None, **extra):
        started = time.perf_counter()
        hooks: list[float] = []

        caller = on_round.caller if isinstance(on_round, RunHook) else on_round

        def timer(server_round, encoder, row):
            hooks.append(time.perf_counter() - started)
            if caller:
                caller(server_round, encoder, row)

        # the run's own per-round work stays where the engine runs it (the ServerApp, under flwr-run)
        hook = on_round.with_caller(timer) if isinstance(on_round, RunHook) else timer
        outcome = self.engine.train(config, taskset, out_dir, on_round=hook, **extra)
        self.marks = {"hooks_s": hooks, "total_s": time.perf_counter() - started, **self.engine.timings}
        return outcome


def time_launcher(config, launcher: str) -> dict:
    """Start-up, seconds per round and wind-down of one Flower training run through ``launcher``.

    ``startup_s``: from the engine's start to the first round's start (the first hook's time less
    that round's own seconds); ``round_s``: the median round after the first; ``teardown_s``: from
    the last round to the engine's return (the final evaluation, then stopping Ray / the SuperLink)."""
    engine = _TimedEngine()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        run_training(with_overrides(config, {"federation.launcher": launcher}), out, engine=engine, on_round=None)
        rows = json.loads((out / rundir.METRICS).read_text())["rounds"]
    marks = engine.marks
    result = {"launcher": launcher, "startup_s": marks["hooks_s"][0] - rows[0]["seconds"],
              "round_s": steady_seconds(rows), "first_round_s": rows[0]["seconds"],
              "teardown_s": marks["total_s"] - marks["hooks_s"][-1], "total_s": marks["total_s"],
              "rounds": len(rows)}
    for key in ("superlink_s", "serverapp_s"):  # flwr-run's own marks
        if key in marks:
            result[key] = marks[key]
    return result


def launcher_bench(quick: bool = False) -> dict:
    """The Flower engine through both launchers, alternating which goes first, at two sizes."""
    # rounds per size: enough steady rounds that a shared machine's slow spells do not decide the median
    rounds = {8: 6, 32: 6} if quick else {32: 30, 256: 12}
    repeats = 1 if quick else 3  # the machine's slow spells move a single run by 30 %
    rows = []
    for tasks, rounds_here in rounds.items():
        config = launcher_config(tasks, rounds_here)
        runs: dict[str, list[dict]] = {name: [] for name in LAUNCHERS}
        for repeat in range(repeats):
            order = LAUNCHERS if (repeat + len(rows)) % 2 == 0 else LAUNCHERS[::-1]
            for launcher in order:
                print(f"bench: launchers, {launcher}, {tasks} tasks/round, {rounds_here} rounds (run {repeat + 1} "
                      f"of {repeats})", flush=True)
                runs[launcher].append(time_launcher(config, launcher))
        row = {"tasks_per_round": tasks, "rounds": rounds_here, "runs": runs}
        for launcher in LAUNCHERS:
            for key in ("startup_s", "round_s", "teardown_s", "total_s"):
                row[f"{launcher}:{key}"] = statistics.median(r[key] for r in runs[launcher])
        row["round_difference_s"] = row["flwr-run:round_s"] - row["run_simulation:round_s"]
        row["startup_difference_s"] = row["flwr-run:startup_s"] - row["run_simulation:startup_s"]
        rows.append(row)
    return {"quick": quick, "repeats": repeats, "model": "mlp 16 -> 32 -> 4, 1 head step",
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count()}, "sizes": rows}


def format_launchers(report: dict) -> str:
    from attacks import markdown_table

    table = markdown_table(
        ["tasks/round", "rounds", "launcher", "start-up (s)", "s / round", "ms / client-round", "wind-down (s)",
         "whole run (s)"],
        [[row["tasks_per_round"], row["rounds"], launcher, f"{row[f'{launcher}:startup_s']:.1f}", f"{row[f'{launcher}:round_s']:.3f}",
          f"{1000 * row[f'{launcher}:round_s'] / row['tasks_per_round']:.1f}",
          f"{row[f'{launcher}:teardown_s']:.1f}", f"{row[f'{launcher}:total_s']:.1f}"]
         for row in report["sizes"] for launcher in LAUNCHERS])
    differences = "; ".join(
        f"{row['tasks_per_round']} tasks/round: {row['round_difference_s']:+.3f} s/round, "
        f"{row['startup_difference_s']:+.1f} s start-up" for row in report["sizes"])
    return (f"## Flower's launchers: `flwr run` (flwr-run) vs `run_simulation`\n\n"
            f"The flower engine, {report['model']}, every task every round, "
            f"median of {report['repeats']} run(s) each (alternating which launcher goes first), "
            f"{report['machine']['cpus']} CPUs. Start-up: from the engine's start to the first round's start "
            "(flwr-run: a private SuperLink, `flwr run`, flwr-simulation, Ray; run_simulation: Ray). "
            "s / round: median after the first round. Wind-down: the final evaluation, then stopping what "
            f"the launcher started.\n\n{table}\n\nflwr-run minus run_simulation: {differences}.\n")


def write_launchers(out_dir: Path, quick: bool = False) -> dict:
    """The launcher comparison alone, as bench_launchers.json and bench_launchers.md in ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = launcher_bench(quick)
    (out_dir / "bench_launchers.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / "bench_launchers.md").write_text(format_launchers(report))
    print(format_launchers(report), flush=True)
    return report


def run_bench(out_dir: Path, quick: bool = False) -> dict:
    import logging

    logging.getLogger("flwr").setLevel(logging.WARNING)  # its warnings (run_simulation's deprecation) show
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    num_tasks = 64 if quick else 256
    sizes = (8, 32) if quick else (32, 256)
    rounds = 4 if quick else 6  # Flower rounds take seconds; the in-process timings get more rounds
    fast_rounds = 4 if quick else 21
    repeats = 1 if quick else 3
    rows = []
    # every in-process timing first: Ray's daemons, once started, keep a share of the CPUs
    for tasks_per_round in sizes:
        fast = bench_config(num_tasks, tasks_per_round, fast_rounds)
        print(f"bench: in-process engines, {tasks_per_round} tasks/round ({num_tasks} tasks), {fast_rounds} rounds",
              flush=True)
        # alternate the two in-process engines a few times: a shared machine's slow spells then hit both
        vectorized, loop = [], []
        for _ in range(repeats):
            vectorized.append(time_vectorized(fast))
            loop.append(time_reference_loop(fast, fast_rounds))
        rows.append({"tasks_per_round": tasks_per_round,
                     "vectorized_s": statistics.median(vectorized), "vectorized_repeats_s": vectorized,
                     "reference_loop_s": statistics.median(loop), "reference_loop_repeats_s": loop,
                     "pure_compute_s": time_pure_compute(fast, fast_rounds)})
    for row in rows:
        tasks_per_round = row["tasks_per_round"]
        config = bench_config(num_tasks, tasks_per_round, rounds)
        print(f"bench: Flower, {tasks_per_round} tasks/round ({num_tasks} tasks), {rounds} rounds", flush=True)
        row["flower_s"] = time_flower(config)
        row["minimal_flower_s"] = time_minimal_flower(config, rounds)
        # clients run `parallel` at a time, so the compute's share of a round is pure/parallel
        parallel = parallel_clients(config)
        compute_share = row["pure_compute_s"] / parallel
        row["parallel_clients"] = parallel
        row["flower_overhead_per_client_ms"] = 1000 * (row["flower_s"] - compute_share) / tasks_per_round
        row["minimal_flower_overhead_per_client_ms"] = 1000 * (row["minimal_flower_s"] - compute_share) / tasks_per_round
        row["speedup_vs_flower"] = row["flower_s"] / row["vectorized_s"]
        row["speedup_vs_reference_loop"] = row["reference_loop_s"] / row["vectorized_s"]
        print("  " + ", ".join(f"{k}={v:.4g}" for k, v in row.items() if isinstance(v, float)), flush=True)
    from attacks.bench import attack_throughput

    print("bench: attack throughput (512 tasks x 128 trials, both attacks, both adversaries, whitened)", flush=True)
    attack = attack_throughput(n_tasks=128 if quick else 512, trials=128, repeats=1 if quick else 3)
    from fedtask.bench_peers import accountant_settings, compare_accountants

    print("bench: accountants (RDP, PRV, PLD) on the default DP sweep's settings", flush=True)
    accountants = compare_accountants(accountant_settings())
    launchers = launcher_bench(quick)
    report = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                          "torch_threads": torch.get_num_threads(),
                          "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
              "quick": quick, "num_tasks": num_tasks, "rounds": rounds, "in_process_rounds": fast_rounds, "repeats": repeats,
              "vectorized_device": str(engine_device(config)), "engines": rows, "attack": attack,
              "accountants": accountants, "launchers": launchers}
    (out_dir / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / "bench.md").write_text(format_bench(report))
    print(format_bench(report), flush=True)
    return report


def format_bench(report: dict) -> str:
    from attacks import markdown_table

    engines = markdown_table(
        ["tasks/round", "vectorized", "Flower", "minimal Flower app", "pure compute (same calls, 1 thread, 1 process)",
         "reference loop", "Flower overhead / client-round", "minimal app overhead / client-round",
         "vectorized vs Flower", "vectorized vs reference"],
        [[r["tasks_per_round"], f"{r['vectorized_s']:.4f}", f"{r['flower_s']:.3f}", f"{r['minimal_flower_s']:.3f}",
          f"{r['pure_compute_s']:.4f}", f"{r['reference_loop_s']:.4f}", f"{r['flower_overhead_per_client_ms']:.1f} ms",
          f"{r['minimal_flower_overhead_per_client_ms']:.1f} ms", f"{r['speedup_vs_flower']:.1f}x",
          f"{r['speedup_vs_reference_loop']:.1f}x"] for r in report["engines"]])
    a = report["attack"]
    attack = markdown_table(
        ["scoring", "metrics", "bootstrap CI", "total", "total without bootstrap", "task-trials / s"],
        [[f"{a['scores_s']:.3f} s", f"{a['metrics_s']:.3f} s", f"{a['bootstrap_s']:.3f} s", f"{a['total_s']:.3f} s",
          f"{a['total_without_bootstrap_s']:.3f} s", f"{a['task_trials_per_s']:,.0f}"]])
    intro = (f"# fedtask bench ({report['machine']['cpus']} CPUs, CUDA: {report['machine']['cuda'] or 'none'})\n\n"
             f"Seconds per round (median after the first round; for the two in-process engines, the median of "
             f"{report.get('repeats', 1)} alternating runs), synthetic config, {report['num_tasks']} tasks; "
             f"vectorized engine and reference loop on {report.get('vectorized_device', 'cpu')}, "
             "Flower clients on CPU. Flower overhead per client-round = (Flower round - pure compute / clients "
             "running in parallel) / tasks per round.")
    text = (f"{intro}\n\n{engines}\n\nAttack evaluation after embedding (both attacks, strong + weak, whitened):"
            f"\n\n{attack}\n")
    if report.get("accountants"):
        from fedtask.bench_peers import format_accountants

        text += f"\n{format_accountants(report['accountants'])}\n"
    if report.get("launchers"):
        text += f"\n{format_launchers(report['launchers'])}"
    return text


if __name__ == "__main__":  # python -m fedtask.bench --launchers [--quick] [--out DIR]
    import argparse

    parser = argparse.ArgumentParser(prog="python -m fedtask.bench")
    parser.add_argument("--launchers", action="store_true", help="only the launcher comparison")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    from fedtask.rundir import default_out_dir

    out = Path(args.out) if args.out else default_out_dir("bench")
    if args.launchers:
        write_launchers(out, quick=args.quick)
    else:
        run_bench(out, quick=args.quick)
