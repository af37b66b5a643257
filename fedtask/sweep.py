"""Privacy/utility sweep: one federation per task-level DP budget, each attacked.

Answers "how much task-level DP before task inference stops working, and what does
it cost in accuracy?" in the layout of the paper's Table 3. Every budget is
calibrated before anything trains, so an impossible one fails fast (exit 2).
"""
from __future__ import annotations

import fcntl
import math
from pathlib import Path

from attacks import STATISTICS, markdown_table
from fedtask import pipeline, progress, rundir
from fedtask.config import ConfigError, with_overrides


def parse_epsilons(text: str) -> list[float]:
    """'inf,16,8' -> [inf, 16.0, 8.0]; each must be > 0."""
    budgets = []
    for item in (part.strip() for part in text.split(",")):
        try:
            value = float(item)
        except ValueError:
            raise ConfigError(f"--epsilons: {item!r} is not a number (use e.g. inf,16,8)") from None
        if not value > 0:
            raise ConfigError(f"--epsilons: every budget must be > 0 (inf = no noise); got {item}")
        budgets.append(value)
    if not budgets:
        raise ConfigError("--epsilons: give at least one budget")
    return budgets


def budget_config(config, epsilon: float):
    """The run for one budget: DP off for inf, else DP calibrated to ``epsilon``."""
    if math.isinf(epsilon):
        return with_overrides(config, {"dp.enabled": False})
    return pipeline.prepare(with_overrides(config, {"dp.enabled": True, "dp.target_epsilon": epsilon}))


def _label(epsilon: float) -> str:
    return "inf" if math.isinf(epsilon) else f"{epsilon:g}"


PLAN = "dp_sweep.plan.json"  # what the sweep in a directory is: re-running it with the same --out resumes it


def dp_sweep(config, epsilons: list[float], out_dir: Path) -> list[dict]:
    """Train and attack one run per budget; re-run with the same ``out_dir`` to resume.

    Finished budgets are kept, an interrupted one continues from its checkpoint
    (``federation.checkpoint_every``), the rest run.
    """
    out_dir = Path(out_dir)
    configs = [budget_config(config, eps) for eps in epsilons]  # all budgets checked before any training
    plan = {"training": pipeline.resume_fingerprint(config), "attack": config.to_dict()["attack"],
            "epsilons": [_label(eps) for eps in epsilons]}
    if (out_dir / PLAN).is_file():
        if rundir.read_json(out_dir / PLAN) != plan:
            raise ConfigError(f"{out_dir}: holds a DP sweep of other settings or budgets; choose another --out "
                              "(the same command resumes it)")
        pipeline.log(f"resuming the DP sweep in {out_dir}: finished budgets are kept")
    else:
        rundir.check_new_output(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        rundir.write_json(out_dir / PLAN, plan)
    lock = open(out_dir / "dp_sweep.lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise ConfigError(f"{out_dir}: another DP sweep is running there") from None
    rows = []
    budgets = progress.Progress(len(epsilons), "dp-sweep", unit="budget")  # a bar above each run's own
    with lock:
        for number, (epsilon, run_config) in enumerate(zip(epsilons, configs), 1):
            pipeline.log(f"== budget epsilon={_label(epsilon)} ({number}/{len(epsilons)}) ==")
            run_dir = out_dir / f"eps_{_label(epsilon)}"
            results = pipeline.train_or_resume(run_config, run_dir)
            if not results.get("attacks"):
                results = pipeline.run_attack(run_dir)
            progress.close_log()  # this budget's run.log holds its training and attack, no more
            rows.append(sweep_row(epsilon, results, run_dir))
            rundir.write_json(out_dir / "dp_sweep.json", rows)  # partial progress survives an interruption
            budgets.update(number, line=f"dp-sweep: {number}/{len(epsilons)} budgets done "
                                        f"(epsilon={_label(epsilon)})")
        (out_dir / "dp_sweep.md").write_text(format_sweep(rows))
        plot_sweep(rows, out_dir / "dp_sweep.png")
        plot_epsilon_audit(rows, out_dir / "dp_audit.png")
    print(format_sweep(rows), flush=True)
    return rows


def sweep_row(target_epsilon: float, results: dict, run_dir: Path) -> dict:
    privacy, attacks = results["privacy"], results["attacks"]
    return {
        "target_epsilon": target_epsilon,
        "epsilon": privacy["epsilon"] if privacy["enabled"] else math.inf,
        "noise_multiplier": privacy["noise_multiplier"] if privacy["enabled"] else 0.0,
        "in_task_accuracy": results["utility"]["in_task_accuracy"],
        "auc": {name: {access: attacks[name][access]["auc"] for access in ("strong", "weak")} for name in STATISTICS},
        # a 95 % lower bound on epsilon from the attacks (attacks/audit.py), beside the accountant's upper bound
        "empirical_epsilon_lower_bound": (privacy.get("empirical_epsilon_lower_bound") or {}).get("value"),
        "empirical_epsilon_audit": privacy.get("empirical_epsilon_lower_bound"),
        "run": str(run_dir),
    }


def format_sweep(rows: list[dict]) -> str:
    def eps(value) -> str:
        return "∞ (no noise)" if value in ("inf", None) or (isinstance(value, float) and math.isinf(value)) \
            else f"{value:.3g}"

    columns = [(name, access) for name in STATISTICS for access in ("strong", "weak")]
    header = ["target ε", "ε spent", "empirical ε ≥ (95%)", "noise z", "in-task acc.",
              *(f"{name.replace('_', '-')} AUC {access}" for name, access in columns)]
    table = [[eps(row["target_epsilon"]), eps(row["epsilon"]), _bound(row), f"{row['noise_multiplier']:.3g}",
              f"{row['in_task_accuracy']:.3f}", *(f"{row['auc'][name][access]:.3f}" for name, access in columns)]
             for row in rows]
    return "# Task-level DP sweep\n\n" + markdown_table(header, table) + "\n"


def _bound(row: dict) -> str:
    value = row.get("empirical_epsilon_lower_bound")
    return "n/a" if value is None else f"{value:.3g}"


def plot_epsilon_audit(rows: list[dict], path: Path) -> None:
    """Accountant epsilon (an upper bound) against the attacks' empirical 95 % lower bound, per budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [_label(float(r["target_epsilon"])) for r in rows]
    xs = range(len(rows))
    spent = [float(r["epsilon"]) if not math.isinf(float(r["epsilon"])) else math.nan for r in rows]
    bound = [r.get("empirical_epsilon_lower_bound") for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(xs, spent, "o-", color="black", label="accountant ε (upper bound)")
    ax.plot(xs, [math.nan if b is None else b for b in bound], "s--", color="tab:red",
            label="empirical ε (95 % lower bound)")
    ceiling = [(r.get("empirical_epsilon_audit") or {}).get("max_certifiable") for r in rows]
    ax.plot(xs, [math.nan if c is None else c for c in ceiling], ":", color="0.5",
            label="most a perfect attack could certify with these tasks")
    ax.set(title="Task-level DP audit", xlabel="target ε (task-level)", ylabel="ε", yscale="symlog")
    ax.set_xticks(list(xs), labels)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_sweep(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [_label(float(r["target_epsilon"])) for r in rows]
    xs = range(len(rows))
    fig, (ax_acc, ax_auc) = plt.subplots(1, 2, figsize=(11, 4))
    ax_acc.plot(xs, [r["in_task_accuracy"] for r in rows], "o-", color="black")
    ax_acc.set(title="Utility", xlabel="target ε (task-level)", ylabel="in-task accuracy")
    for name, marker in zip(STATISTICS, ("o", "s", "^", "D", "v")):
        for access, style in (("strong", "-"), ("weak", "--")):
            ax_auc.plot(xs, [r["auc"][name][access] for r in rows], marker=marker, linestyle=style,
                        label=f"{name.replace('_', ' ')} / {access}")
    ax_auc.axhline(0.5, color="grey", linewidth=0.8, linestyle=":")
    ax_auc.set(title="Task-inference attack", xlabel="target ε (task-level)", ylabel="AUC", ylim=(0.3, 1.0))
    ax_auc.legend(fontsize=8)
    for ax in (ax_acc, ax_auc):
        ax.set_xticks(list(xs), labels)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
