"""Leakage over training (the paper's Section 6.5, Figure 3): the attacks and the generalization
gaps at every encoder snapshot a run kept (``federation.snapshot_every``).

IN tasks' heads at a snapshot were not kept, and OUT tasks never had one, so every task, IN and
OUT alike, gets a *probe*: a linear head fit from zeros on the frozen snapshot's embeddings of the
task's training samples, with the clients' learning rate and weight decay, for as many full-batch
steps as an IN client took over the whole run on average. The same fit for IN and OUT keeps the
losses comparable; nothing flows back into the encoder, so probes cost no privacy.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from fedtask import rundir
from fedtask import task as task_math
from fedtask.config import Config, ConfigError, parameter_error
from fedtask.engines import RoundHook

LOSSES = ("in_train", "in_holdout", "out")
GAMES = ("strong", "weak", "null_control")


def snapshot_hook(on_round: RoundHook | None, *, run_dir: Path, every: int,
                  metadata: dict[str, str] | None = None) -> RoundHook:
    """``on_round`` preceded by keeping the released encoder every ``every`` rounds."""
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"every must be an integer >= 1; got {every!r}")

    def hook(server_round: int, encoder, row: dict) -> None:
        if server_round % every == 0:
            path = rundir.snapshot_path(run_dir, server_round)
            path.parent.mkdir(parents=True, exist_ok=True)
            rundir.save_state(encoder, path, {**(metadata or {}), "round": str(server_round)})
        if on_round:
            on_round(server_round, encoder, row)

    return hook


def default_probe_steps(config: Config) -> int:
    """Head steps an IN client takes over the run on average: head_steps x expected rounds it is
    sampled in (rounds x tasks_per_round / num_in_tasks, rounded up), plus the final head steps."""
    fed = config.federation
    return fed.head_steps * math.ceil(fed.rounds * config.sample_rate) + fed.final_head_steps


def _padded(embeddings: list[np.ndarray], labels: list[torch.Tensor], device) -> tuple[torch.Tensor, torch.Tensor]:
    """(tasks, most samples, d) embeddings and (tasks, most samples) labels; padding is unlabelled."""
    longest = max(len(e) for e in embeddings)
    dim = embeddings[0].shape[-1]
    emb = torch.zeros(len(embeddings), longest, dim, dtype=torch.float32, device=device)
    ys = torch.full((len(embeddings), longest), task_math.IGNORE_INDEX, dtype=torch.long, device=device)
    for index, (e, y) in enumerate(zip(embeddings, labels)):
        emb[index, :len(e)] = torch.as_tensor(e, dtype=torch.float32, device=device)
        ys[index, :len(y)] = y.to(device)
    return emb, ys


@contextmanager
def _one_torch_thread(device):
    """Probe steps are thousands of tiny ops: on a CPU extra intra-op threads only wait on each other
    (measured on the loaded 2-core dev machine: 33 ms per softmax of 64 x 32 x 2 with 2 threads, 0.3 ms with 1)."""
    threads = torch.get_num_threads()
    if torch.device(device).type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@torch.no_grad()
def _fit_and_score(train: tuple[torch.Tensor, torch.Tensor], evaluate: dict, *, num_classes: int, steps: int,
                   lr: float, weight_decay: float) -> tuple[dict, dict]:
    """Fit one probe per task on ``train``; mean over tasks of each set's loss and accuracy."""
    emb, ys = train
    tasks, _, dim = emb.shape
    zeros = {"head.weight": emb.new_zeros(tasks, num_classes, dim), "head.bias": emb.new_zeros(tasks, num_classes)}
    probe = task_math.head_steps_on_embeddings(zeros, emb, ys, lr, weight_decay, steps)
    losses, accuracies = {}, {}
    for name, (e, y) in evaluate.items():
        _, loss, _ = task_math.head_gradient(probe, e, y)
        logits = e @ probe["head.weight"].transpose(-1, -2) + probe["head.bias"].unsqueeze(-2)
        hits, labelled = task_math.labelled_hits(logits, y, task_dims=1)
        has = labelled > 0
        losses[name] = float(loss[has].mean()) if bool(has.any()) else None
        accuracies[name] = float((hits[has].float() / labelled[has].float()).mean()) if bool(has.any()) else None
    return losses, accuracies


def probe_losses(oracle, taskset, *, steps: int, lr: float, weight_decay: float, batch_size: int = 1024,
                 device: str | torch.device = "cpu") -> tuple[dict, dict]:
    """Figure 3's losses on the encoder behind ``oracle``: IN tasks' training and held-out loss, OUT
    tasks' held-out loss (and OUT training loss), each under its own task's probe. Returns (loss,
    accuracy) dicts; None where a task set has no such samples or labels are not one per sample."""
    from attacks import embed_pools

    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1; got {steps!r}")
    keys = (*LOSSES, "out_train")
    tasks = taskset.in_tasks + taskset.out_tasks
    if any(t.train_y.dim() != 1 or t.holdout_y.dim() > 1 for t in tasks):  # e.g. next-token sequences
        return dict.fromkeys(keys), dict.fromkeys(keys)
    pools = [t.train_x for t in tasks] + [t.holdout_x for t in tasks if len(t.holdout_x)]
    emb, index = embed_pools(oracle, pools, batch_size)
    parts = np.split(emb, np.cumsum(np.bincount(index, minlength=len(pools)))[:-1])
    holdout = iter(parts[len(tasks):])
    train_parts = parts[:len(tasks)]
    held_parts = [next(holdout) if len(t.holdout_x) else np.zeros((0, emb.shape[-1])) for t in tasks]
    n_in = len(taskset.in_tasks)
    losses, accuracies = {}, {}
    for side, members, offset in (("in", taskset.in_tasks, 0), ("out", taskset.out_tasks, n_in)):
        chosen = range(offset, offset + len(members))
        train = _padded([train_parts[i] for i in chosen], [tasks[i].train_y for i in chosen], device)
        evaluate = {"train": train}
        if all(len(held_parts[i]) for i in chosen):
            evaluate["holdout"] = _padded([held_parts[i] for i in chosen], [tasks[i].holdout_y for i in chosen],
                                          device)
        with _one_torch_thread(device):
            loss, acc = _fit_and_score(train, evaluate, num_classes=taskset.num_classes, steps=steps, lr=lr,
                                       weight_decay=weight_decay)
        names = {"in": {"train": "in_train", "holdout": "in_holdout"},
                 "out": {"train": "out_train", "holdout": "out"}}[side]
        for short, key in names.items():
            losses[key], accuracies[key] = loss.get(short), acc.get(short)
    return {k: losses.get(k) for k in keys}, {k: accuracies.get(k) for k in keys}


def correlation(x, y) -> dict:
    """Pearson and Spearman correlation across snapshots (None when either side is constant or missing)."""
    pairs = [(a, b) for a, b in zip(x, y) if a is not None and b is not None]
    if len(pairs) < 3:
        return {"pearson": None, "spearman": None, "points": len(pairs)}
    a, b = (np.array(v, dtype=np.float64) for v in zip(*pairs))

    def pearson(u, v):
        if np.ptp(u) == 0 or np.ptp(v) == 0:
            return None
        return float(np.corrcoef(u, v)[0, 1])

    from scipy.stats import rankdata

    return {"pearson": pearson(a, b), "spearman": pearson(rankdata(a), rankdata(b)), "points": len(pairs)}


def _gap(losses: dict, of: str) -> float | None:
    if losses.get("out") is None or losses.get(of) is None:
        return None
    return losses["out"] - losses[of]


def _points(run_dir: Path, config: Config) -> list[tuple[int, Path]]:
    """Round 0 (the initial encoder), every snapshot, and the final encoder if not a snapshot already."""
    snapshots = [(r, p) for r, p in rundir.list_snapshots(run_dir) if 0 < r <= config.federation.rounds]
    if not snapshots:
        raise ConfigError(f"{run_dir / rundir.SNAPSHOTS}: no encoder snapshots in this run; train it with "
                          "--set federation.snapshot_every=N to keep the encoder every N rounds")
    points = [(0, run_dir / rundir.INITIAL_ENCODER), *snapshots]
    if snapshots[-1][0] != config.federation.rounds:
        points.append((config.federation.rounds, run_dir / rundir.ENCODER))
    return points


def _federation_losses(run_dir: Path) -> dict[int, float]:
    """Each round's mean loss as the federation logged it (the real heads, before the round's steps)."""
    try:
        rounds = rundir.read_json(run_dir / rundir.METRICS).get("rounds", [])
    except ConfigError:
        return {}
    return {int(row["round"]): row.get("loss") for row in rounds if "round" in row}


def run_trajectory(run_dir: Path, *, overrides: list[str] | None = None, head_steps: int | None = None,
                   progress=None) -> dict:
    """Attack and probe every snapshot of a finished run; write trajectory.json, .md and the plots."""
    from attacks import STATISTICS, run_security_games
    from fedtask import pipeline
    from fedtask.models import pick_device
    from fedtask.oracle import embedding_oracle

    progress = progress or pipeline.log
    run_dir = Path(run_dir)
    config, _ = pipeline.load_finished_run(run_dir, overrides)
    points = _points(run_dir, config)
    steps = default_probe_steps(config) if head_steps is None else head_steps
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"--head-steps: must be an integer >= 1; got {steps!r}")
    taskset = pipeline.load_taskset(config)
    pipeline.check_task_sizes(config, taskset)
    device = pick_device(config.federation.device)
    attack, fed = config.attack, config.federation

    def oracle_of(path: Path):
        try:
            return embedding_oracle(config, taskset.spec, path, device)
        except (ValueError, RuntimeError) as err:  # a checkpoint whose shapes do not fit config.toml
            raise ConfigError(str(err).strip().splitlines()[0][:300]) from None

    null_oracle = oracle_of(run_dir / rundir.INITIAL_ENCODER)
    pools = {access: ([t.challenge_pool(access) for t in taskset.in_tasks],
                      [t.challenge_pool(access) for t in taskset.out_tasks]) for access in ("strong", "weak")}
    federation_loss = _federation_losses(run_dir)
    progress(f"trajectory of {run_dir}: {len(points)} encoders (rounds {points[0][0]}..{points[-1][0]}), "
             f"{len(taskset.in_tasks)} IN + {len(taskset.out_tasks)} OUT tasks, probes of {steps} head steps")
    snapshots = []
    for server_round, path in points:
        oracle = null_oracle if server_round == 0 else oracle_of(path)
        try:
            games, _ = run_security_games(
                oracle, null_oracle, pools, trials=attack.trials, k_strong=attack.k_strong, k_weak=attack.k_weak,
                seed=config.seed, whiten=attack.whiten, cosine=attack.cosine, whiten_lambda=attack.whiten_lambda,
                bootstrap=attack.bootstrap, batch_size=attack.batch_size, progress=lambda message: None)
            losses, accuracy = probe_losses(oracle, taskset, steps=steps, lr=fed.head_lr,
                                            weight_decay=fed.head_weight_decay, batch_size=attack.batch_size,
                                            device=device)
        except ValueError as err:
            raise parameter_error(err, {**pipeline.ATTACK_KEYS, "steps": "--head-steps"}) from None
        phase = "initial" if server_round == 0 else ("warm_start" if server_round <= fed.warm_start_rounds
                                                     else "train")
        point = {
            "round": server_round, "phase": phase, "encoder": str(path.relative_to(run_dir)),
            "loss": losses, "accuracy": accuracy,
            "gap": {"strong": _gap(losses, "in_train"), "weak": _gap(losses, "in_holdout")},
            "federation_loss": federation_loss.get(server_round),
            "attacks": {name: {game: {"auc": m["auc"], "auc_ci95": m["auc_ci95"], "tpr_at_fpr": m["tpr_at_fpr"]}
                               for game, m in per_game.items()} for name, per_game in games.items()},
        }
        snapshots.append(point)
        aucs = ", ".join(f"{name} {point['attacks'][name]['strong']['auc']:.3f}/"
                         f"{point['attacks'][name]['weak']['auc']:.3f}" for name in STATISTICS if name in games)
        progress(f"round {server_round:>5}: loss IN train {_fmt(losses['in_train'])} IN held-out "
                 f"{_fmt(losses['in_holdout'])} OUT {_fmt(losses['out'])}; AUC strong/weak {aucs}")
    result = {
        "run": run_dir.name,
        "rounds": fed.rounds, "snapshot_every": fed.snapshot_every, "seed": config.seed,
        "probe": {"head_steps": steps, "head_lr": fed.head_lr, "head_weight_decay": fed.head_weight_decay,
                  "init": "zeros", "batch": "all of the task's training samples (full batch)",
                  "fit_on": "each task's training samples, IN and OUT alike, on the frozen encoder",
                  "out_loss": "OUT tasks' held-out samples under their own probe"},
        "attack": {key: getattr(attack, key) for key in ("trials", "k_strong", "k_weak", "whiten", "cosine")},
        "snapshots": snapshots,
        "correlation": correlations(snapshots),
    }
    rundir.write_json(run_dir / rundir.TRAJECTORY, result)
    rundir.write_text(run_dir / rundir.TRAJECTORY_REPORT, format_trajectory(result))
    plot_trajectory(result, run_dir / rundir.TRAJECTORY_PLOT)
    plot_gaps(result, run_dir / rundir.TRAJECTORY_GAPS_PLOT)
    return result


def correlations(snapshots: list[dict]) -> dict:
    """Per statistic: strong AUC against the train-vs-OUT gap, weak AUC against the held-out-vs-OUT gap."""
    names = list(snapshots[0]["attacks"]) if snapshots else []
    out = {}
    for name in names:
        out[name] = {
            game: correlation([s["attacks"][name][game]["auc"] for s in snapshots], [s["gap"][game] for s in snapshots])
            for game in ("strong", "weak")}
    return out


def _fmt(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def format_trajectory(result: dict) -> str:
    from attacks.report import markdown_table

    snapshots = result["snapshots"]
    names = list(snapshots[0]["attacks"]) if snapshots else []
    header = ["round", "IN train loss", "IN held-out loss", "OUT loss", "strong gap", "weak gap",
              *(f"{name} {game}" for name in names for game in ("strong", "weak", "null"))]
    rows = [[str(s["round"]), _fmt(s["loss"]["in_train"]), _fmt(s["loss"]["in_holdout"]), _fmt(s["loss"]["out"]),
             _fmt(s["gap"]["strong"]), _fmt(s["gap"]["weak"]),
             *(f"{s['attacks'][name][game]['auc']:.3f}" for name in names for game in GAMES)] for s in snapshots]
    probe = result["probe"]
    lines = [
        "# Leakage over training",
        f"Run `{result['run']}`, seed {result['seed']}, {result['rounds']} rounds, a snapshot every "
        f"{result['snapshot_every']} rounds (round 0 = the initial encoder). AUCs: the security game with the run's "
        f"attack settings ({', '.join(f'{k} = {v}' for k, v in result['attack'].items())}); the null control is "
        "the initial encoder at every row.",
        f"Losses (cross-entropy, mean over tasks): each task, IN and OUT alike, gets a linear probe fit from zeros "
        f"on the frozen encoder's embeddings of its training samples: {probe['head_steps']} full-batch steps, "
        f"lr {probe['head_lr']}, weight decay {probe['head_weight_decay']}. IN train / IN held-out: IN tasks' "
        "training and held-out samples; OUT: OUT tasks' held-out samples. Strong gap = OUT - IN train, "
        "weak gap = OUT - IN held-out (the paper's Figure 3).",
        markdown_table(header, rows),
        "## Correlation across snapshots",
        markdown_table(["statistic", "strong AUC vs strong gap (Pearson, Spearman)",
                        "weak AUC vs weak gap (Pearson, Spearman)"],
                       [[name, *(f"{_fmt(c[g]['pearson'], 2)}, {_fmt(c[g]['spearman'], 2)}" for g in ("strong", "weak"))]
                        for name, c in result["correlation"].items()]),
        f"![AUC and losses against round]({rundir.TRAJECTORY_PLOT})\n\n"
        f"![AUC against the generalization gaps]({rundir.TRAJECTORY_GAPS_PLOT})",
    ]
    return "\n\n".join(lines) + "\n"


def _title(statistic: str) -> str:
    from attacks import STATISTICS

    return STATISTICS[statistic].title if statistic in STATISTICS else statistic


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


STYLES = {"strong": dict(color="tab:red", ls="-", marker="o"), "weak": dict(color="tab:blue", ls="-", marker="s"),
          "null_control": dict(color="0.4", ls="--", marker="")}
LABELS = {"strong": "strong", "weak": "weak", "null_control": "null control (initial encoder)"}


def plot_trajectory(result: dict, path: Path) -> None:
    """AUC against round per statistic, and the three losses against round."""
    plt = _pyplot()
    snapshots = result["snapshots"]
    names = list(snapshots[0]["attacks"])
    rounds = [s["round"] for s in snapshots]
    fig, axes = plt.subplots(1, len(names) + 1, figsize=(5 * (len(names) + 1), 4), constrained_layout=True)
    for ax, name in zip(axes, names):
        for game in GAMES:
            ax.plot(rounds, [s["attacks"][name][game]["auc"] for s in snapshots], ms=3, lw=1.5, label=LABELS[game],
                    **STYLES[game])
        ax.axhline(0.5, color="0.75", lw=1, ls=":")
        ax.set(xlabel="round", ylabel="AUC", title=_title(name))
        ax.legend(fontsize=8)
    ax = axes[-1]
    for key, label, color in (("in_train", "IN train", "tab:red"), ("in_holdout", "IN held-out", "tab:blue"),
                              ("out", "OUT", "tab:green")):
        values = [s["loss"][key] for s in snapshots]
        if any(v is not None for v in values):
            ax.plot(rounds, [np.nan if v is None else v for v in values], color=color, lw=1.5, label=label)
    ax.set(xlabel="round", ylabel="probe loss (cross-entropy)", title="Losses")
    ax.legend(fontsize=8)
    fig.suptitle(f"Leakage over training (seed {result['seed']})")
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_gaps(result: dict, path: Path) -> None:
    """The paper's Figure 3: strong AUC against OUT - IN train loss, weak AUC against OUT - IN held-out."""
    plt = _pyplot()
    snapshots = result["snapshots"]
    names = list(snapshots[0]["attacks"])
    rounds = np.array([s["round"] for s in snapshots])
    fig, axes = plt.subplots(len(names), 2, figsize=(10, 3.8 * len(names)), squeeze=False, constrained_layout=True)
    xlabels = {"strong": "generalization gap: OUT loss - IN train loss",
               "weak": "gap: OUT loss - IN held-out loss"}
    for row, name in enumerate(names):
        for col, game in enumerate(("strong", "weak")):
            ax = axes[row, col]
            gaps = np.array([np.nan if s["gap"][game] is None else s["gap"][game] for s in snapshots])
            aucs = np.array([s["attacks"][name][game]["auc"] for s in snapshots])
            ax.plot(gaps, aucs, color="0.8", lw=1, zorder=1)
            points = ax.scatter(gaps, aucs, c=rounds, cmap="viridis", s=22, zorder=2)
            ax.axhline(0.5, color="0.75", lw=1, ls=":")
            r = result["correlation"][name][game]["pearson"]
            ax.set(xlabel=xlabels[game], ylabel=f"{game} AUC",
                   title=f"{_title(name)}, {game}\nPearson r = {_fmt(r, 2)} across snapshots")
        fig.colorbar(points, ax=axes[row, 1], label="round")
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summarize(paths: list[Path]) -> dict:
    """Correlations from several runs' trajectory.json (e.g. replicate seeds): per run, their mean, and
    pooled over every snapshot of every run; and the null control's range over all snapshots."""
    runs = []
    for path in paths:
        path = Path(path)
        path = path / rundir.TRAJECTORY if path.is_dir() else path
        trajectory = rundir.read_json(path)
        if not trajectory.get("snapshots"):
            raise ConfigError(f"{path}: no snapshots in this trajectory")
        runs.append((str(path), trajectory))
    pooled = [s for _, t in runs for s in t["snapshots"]]
    names = list(pooled[0]["attacks"])
    summary = {"runs": [{"trajectory": p, "seed": t.get("seed"), "correlation": t["correlation"], **_series(t)}
                        for p, t in runs],
               "pooled": correlations(pooled), "mean_of_runs": {}, "null_control_auc": {}}
    for name in names:
        for game in ("strong", "weak"):
            values = [t["correlation"][name][game]["pearson"] for _, t in runs]
            values = [v for v in values if v is not None]
            summary["mean_of_runs"].setdefault(name, {})[game] = {
                "pearson": float(np.mean(values)) if values else None,
                "min": float(np.min(values)) if values else None, "max": float(np.max(values)) if values else None}
        nulls = [s["attacks"][name]["null_control"] for s in pooled]
        summary["null_control_auc"][name] = {
            "min": float(min(n["auc"] for n in nulls)), "max": float(max(n["auc"] for n in nulls)),
            "ci95_contains_half": float(np.mean([n["auc_ci95"][0] <= 0.5 <= n["auc_ci95"][1] for n in nulls]))}
    return summary


def _series(trajectory: dict) -> dict:
    """A run's curves, compactly: rounds, each game's AUC per statistic, the gaps, the null control."""
    snapshots = trajectory["snapshots"]
    names = list(snapshots[0]["attacks"])
    return {"rounds": [s["round"] for s in snapshots],
            "auc": {name: {game: [s["attacks"][name][game]["auc"] for s in snapshots] for game in ("strong", "weak")}
                    for name in names},
            "gap": {game: [s["gap"][game] for s in snapshots] for game in ("strong", "weak")},
            "null_control": {name: {key: snapshots[0]["attacks"][name]["null_control"][key]
                                    for key in ("auc", "auc_ci95")} for name in names}}


def format_summary(summary: dict) -> str:
    from attacks.report import markdown_table

    rows = []
    for run in summary["runs"]:
        for name, games in run["correlation"].items():
            rows.append([str(run["seed"]), name, *(_fmt(games[g]["pearson"], 2) for g in ("strong", "weak"))])
    for name, games in summary["pooled"].items():
        rows.append(["pooled", name, *(_fmt(games[g]["pearson"], 2) for g in ("strong", "weak"))])
    for name, games in summary["mean_of_runs"].items():
        rows.append(["mean of seeds", name, *(f"{_fmt(games[g]['pearson'], 2)} [{_fmt(games[g]['min'], 2)}, "
                                               f"{_fmt(games[g]['max'], 2)}]" for g in ("strong", "weak"))])
    table = markdown_table(["seed", "statistic", "strong AUC vs OUT - IN train (Pearson r)",
                            "weak AUC vs OUT - IN held-out (Pearson r)"], rows)
    nulls = "; ".join(f"{name} {v['min']:.3f} to {v['max']:.3f} (95% interval holds 0.5 at "
                      f"{100 * v['ci95_contains_half']:.0f}% of snapshots)" for name, v in summary["null_control_auc"].items())
    return f"{table}\n\nNull-control AUC over every snapshot: {nulls}"


def main(argv: list[str] | None = None) -> int:
    """``python -m fedtask.trajectory DIR ... [--out FILE]``: correlations across runs' trajectories."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m fedtask.trajectory", description=main.__doc__)
    parser.add_argument("runs", nargs="+", help="run directories (or trajectory.json files)")
    parser.add_argument("--out", default=None, help="write the summary as JSON here")
    args = parser.parse_args(argv)
    try:
        summary = summarize(args.runs)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.out:
        rundir.write_json(Path(args.out), summary)
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
