"""Studies: a grid of settings x replicate seeds, each a normal run, summarised across seeds.

One trained model's bootstrap interval leaves out the variance between training runs, which
is often larger; a study trains every cell with several seeds (the task draw and the training
both reseeded) and reports each metric's mean, spread and Student-t interval across seeds
(CONTRACT §8). Runs are ordinary run directories, so a killed study resumes: finished runs are
kept, the rest run. Vectorized runs go to worker processes, which pay imports once.
"""
from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import math
import multiprocessing
import os
import re
import shutil
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedtask import progress, rundir
from fedtask.config import Config, ConfigError, load_config, read_toml, with_overrides

SPEC_KEYS = {"base", "set", "seeds", "axis", "grid", "workers"}
FPR_LEVELS = ("0.001", "0.01", "0.1")


@dataclass(frozen=True)
class Cell:
    """One setting of the study: the keys it sets and, for one-at-a-time studies, its axis."""

    settings: dict[str, Any]
    axis: str | None = None
    label: str = ""


@dataclass
class StudySpec:
    base: str
    overrides: dict[str, Any]
    seeds: int
    axes: list[dict]
    grid: bool = False
    raw: dict = field(default_factory=dict)


def load_spec(path: str | Path) -> StudySpec:
    """Read and check a study file (CONTRACT §8); errors name the file and the entry."""
    raw = read_toml(path)
    where = str(path)
    unknown = sorted(set(raw) - SPEC_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown study key {unknown[0]!r} (known: {', '.join(sorted(SPEC_KEYS))})")
    if not isinstance(raw.get("base"), str):
        raise ConfigError(f"{where}: base must name a config file (e.g. base = \"configs/synthetic.toml\")")
    seeds = raw.get("seeds", 1)
    if isinstance(seeds, bool) or not isinstance(seeds, int) or not 1 <= seeds <= 1000:
        raise ConfigError(f"{where}: seeds must be an integer in [1, 1000]; got {seeds!r}")
    overrides = raw.get("set", {})
    if not isinstance(overrides, dict):
        raise ConfigError(f"{where}: set must be a table of dotted keys")
    axes = raw.get("axis", [])
    if not isinstance(axes, list):
        raise ConfigError(f"{where}: axis must be an array of tables ([[axis]])")
    for number, axis in enumerate(axes, 1):
        if not isinstance(axis, dict) or not isinstance(axis.get("name"), str):
            raise ConfigError(f"{where}: axis {number} needs a name")
        values = axis.get("values")
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}: axis {axis['name']!r}: values must be a non-empty array")
        if any(not isinstance(v, dict) for v in values) and not isinstance(axis.get("key"), str):
            raise ConfigError(f"{where}: axis {axis['name']!r}: scalar values need a key (key = \"data.x\")")
    grid = raw.get("grid", False)
    if not isinstance(grid, bool):
        raise ConfigError(f"{where}: grid must be true or false")
    return StudySpec(raw["base"], dict(overrides), seeds, axes, grid, raw)


def _value_settings(axis: dict, value) -> dict[str, Any]:
    return dict(value) if isinstance(value, dict) else {axis["key"]: value}


def _label(settings: dict) -> str:
    return ", ".join(f"{key}={value}" for key, value in settings.items())


def cells(spec: StudySpec) -> list[Cell]:
    """One cell per value of each axis, the others at the base (the paper's one-at-a-time
    ablations), or with ``grid`` every combination; no axis: the base alone."""
    if not spec.axes:
        return [Cell({}, None, "base")]
    if spec.grid:
        out = []
        for combo in itertools.product(*([_value_settings(a, v) for v in a["values"]] for a in spec.axes)):
            settings = {k: v for part in combo for k, v in part.items()}
            out.append(Cell(settings, None, _label(settings)))
        return out
    return [Cell(_value_settings(axis, value), axis["name"], _label(_value_settings(axis, value)))
            for axis in spec.axes for value in axis["values"]]


def _slug(index: int, cell: Cell) -> str:
    text = re.sub(r"[^A-Za-z0-9_.=-]+", "_", cell.label)[:80].strip("_") or "base"
    return f"{index:03d}-{text}"


@dataclass(frozen=True)
class PlannedRun:
    cell: int
    seed: int
    config: Config
    directory: Path


def plan(spec: StudySpec, out_dir: Path) -> list[PlannedRun]:
    """Every (cell, seed) run, each config checked now: a bad cell stops the study before training."""
    base = load_config(spec.base, spec.overrides)
    runs = []
    trained: dict[Config, Path] = {}  # cells that resolve to the same config share their runs (the base, per axis)
    for index, cell in enumerate(cells(spec)):
        try:
            cell_config = with_overrides(base, cell.settings)
        except ConfigError as err:
            raise ConfigError(f"study cell {cell.label!r}: {err}") from None
        for offset in range(spec.seeds):
            seed = base.seed + offset
            config = with_overrides(cell_config, {"seed": seed})
            directory = trained.setdefault(config, out_dir / "runs" / _slug(index, cell) / f"seed_{seed}")
            runs.append(PlannedRun(index, seed, config, directory))
    return runs


def _finished(directory: Path) -> bool:
    path = directory / rundir.RESULTS
    if not path.is_file():
        return False
    try:
        return bool(json.loads(path.read_text()).get("attacks"))
    except (OSError, json.JSONDecodeError):
        return False


def _clear_partial(directory: Path) -> None:
    """A run directory of this study left without results (the study holds its lock, so no one is
    writing it); an ``.incomplete`` one is left to :func:`fedtask.pipeline.train_or_resume`."""
    if directory.exists() and not (directory / rundir.RESULTS).is_file():
        shutil.rmtree(directory)


def _worker_init(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _run_one(config: Config, directory: Path, log_path: Path) -> tuple[float, str | None]:
    """Train and attack one run, its output to its own log; returns (seconds, error or None)."""
    from fedtask.engines import TrainingFailed
    from fedtask.pipeline import run_attack, train_or_resume

    started = time.perf_counter()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log), \
            progress.redirected(log):
        try:
            if not train_or_resume(config, directory, on_round=None).get("attacks"):  # kept, resumed or new
                run_attack(directory)
        except (ConfigError, TrainingFailed) as err:
            print(f"error: {err}", file=log)
            return time.perf_counter() - started, str(err)
    return time.perf_counter() - started, None


def run_study(spec_path: str | Path, out_dir: Path, *, workers: int = 0) -> dict:
    """Run (or resume) the study in ``spec_path`` into ``out_dir``; returns study.json's content."""
    spec = load_spec(spec_path)
    out_dir = Path(out_dir)
    if out_dir.exists() and not (out_dir / "study.lock").exists() and any(out_dir.iterdir()):
        raise ConfigError(f"{out_dir}: exists and is not a study; choose another --out")
    runs = plan(spec, out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lock = open(out_dir / "study.lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise ConfigError(f"{out_dir}: another study is running there") from None
    (out_dir / "study.spec.toml").write_text(Path(spec_path).read_text())
    flower = any(run.config.federation.engine == "flower" for run in runs)
    workers = 1 if flower else (workers or min(len(runs), os.cpu_count() or 1))
    todo = list({run.directory: run for run in runs if not _finished(run.directory)}.values())
    for run in todo:
        _clear_partial(run.directory)
    started = time.perf_counter()
    seconds: dict[Path, float] = {}
    errors: dict[Path, str] = {}
    total = len({run.directory for run in runs})
    bar = progress.Progress(total, "study", unit="run", initial=total - len(todo), every=max(1, total // 10))
    bar.update(total - len(todo))
    logs = out_dir / "logs"
    if workers == 1:
        for run in todo:
            seconds[run.directory], error = _run_one(run.config, run.directory, logs / _log_name(run))
            _note(errors, run, error)
            bar.update(total - len(todo) + len(seconds))
    else:
        threads = max(1, (os.cpu_count() or 1) // workers)
        context = multiprocessing.get_context("spawn")  # forking a process that holds torch's threads is unsafe
        with ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_init, initargs=(threads,)) as pool:
            futures = {pool.submit(_run_one, run.config, run.directory, logs / _log_name(run)): run for run in todo}
            for future in as_completed(futures):
                run = futures[future]
                seconds[run.directory], error = future.result()
                _note(errors, run, error)
                bar.update(total - len(todo) + len(seconds))
    bar.close()
    result = summarise(spec, runs, out_dir, errors)
    result["timing"] = {"total_s": time.perf_counter() - started, "workers": workers, "runs_done_now": len(todo),
                        "per_run_s": float(np.mean(list(seconds.values()))) if seconds else None}
    rundir.write_json(out_dir / "study.json", result)
    (out_dir / "study.md").write_text(format_study(result))
    plot_study(result, out_dir)
    lock.close()
    return result


def _log_name(run: PlannedRun) -> str:
    return f"{run.directory.parent.name}-{run.directory.name}.log"


def _note(errors: dict, run: PlannedRun, error: str | None) -> None:
    if error:
        errors[run.directory] = error
        progress.error(f"run {run.directory}: {error}")  # shown with --quiet too; the study goes on


def summary(values: list[float]) -> dict:
    """Mean, sample std and a Student-t 95 % interval across seeds (CONTRACT §8 SUMMARY)."""
    from scipy import stats

    clean = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not clean:
        return {"mean": None, "std": None, "ci95": [None, None], "values": list(values)}
    mean = float(np.mean(clean))
    if len(clean) < 2:
        return {"mean": mean, "std": None, "ci95": [None, None], "values": list(values)}
    std = float(np.std(clean, ddof=1))
    half = float(stats.t.ppf(0.975, len(clean) - 1) * std / math.sqrt(len(clean)))
    return {"mean": mean, "std": std, "ci95": [mean - half, mean + half], "values": list(values)}


def summarise(spec: StudySpec, runs: list[PlannedRun], out_dir: Path, errors: dict) -> dict:
    from attacks import STATISTICS

    out = []
    for index, cell in enumerate(cells(spec)):
        members = [run for run in runs if run.cell == index]
        results = [json.loads((r.directory / rundir.RESULTS).read_text()) if _finished(r.directory) else None
                   for r in members]
        done = [res for res in results if res]

        def collect(get):
            return [get(res) if res else None for res in results]

        attacks = {}
        for statistic in STATISTICS:
            attacks[statistic] = {}
            for game in ("strong", "weak", "null_control"):
                pick = (lambda s, g: lambda res: res["attacks"][s][g])(statistic, game)
                attacks[statistic][game] = {
                    "auc": summary(collect(lambda res: pick(res)["auc"])),
                    "tpr_at_fpr": {level: summary(collect(lambda res, lv=level: pick(res)["tpr_at_fpr"][lv]))
                                   for level in FPR_LEVELS},
                }
        out.append({
            "settings": cell.settings, "axis": cell.axis, "label": cell.label,
            "seeds": [r.seed for r in members],
            "runs": [str(r.directory.relative_to(out_dir)) for r in members],
            "failed": {str(r.directory.relative_to(out_dir)): errors[r.directory] for r in members
                       if r.directory in errors},
            "summary": {"in_task_accuracy": summary(collect(lambda res: res["utility"]["in_task_accuracy"])),
                        "majority_baseline_accuracy": summary(
                            collect(lambda res: res["utility"].get("majority_baseline_accuracy"))),
                        "attacks": attacks},
            "complete": len(done) == len(members),
        })
    return {"spec": spec.raw, "cells": out}


def _cell_text(stat: dict) -> str:
    if stat["mean"] is None:
        return "n/a"
    if stat["ci95"][0] is None:
        return f"{stat['mean']:.3f}"
    return f"{stat['mean']:.3f} [{stat['ci95'][0]:.3f}, {stat['ci95'][1]:.3f}]"


def format_study(result: dict) -> str:
    from attacks import STATISTICS, markdown_table

    seeds = result["cells"][0]["seeds"] if result["cells"] else []
    parts = [f"# Study ({len(result['cells'])} cells x {len(seeds)} seeds: {', '.join(map(str, seeds))})",
             "Mean across seeds [Student-t 95 % interval].", ]
    for statistic, entry in STATISTICS.items():
        header = ["cell", "in-task acc.", "strong AUC", "weak AUC", "null-control AUC"]
        rows = []
        for cell in result["cells"]:
            games = cell["summary"]["attacks"][statistic]
            rows.append([cell["label"], _cell_text(cell["summary"]["in_task_accuracy"]),
                         *(_cell_text(games[g]["auc"]) for g in ("strong", "weak", "null_control"))])
        parts += [f"## {entry.title}", markdown_table(header, rows)]
    failed = {run: error for cell in result["cells"] for run, error in cell["failed"].items()}
    if failed:
        parts += ["## Failed runs", "\n".join(f"- `{run}`: {error}" for run, error in failed.items())]
    return "\n\n".join(parts) + "\n"


def plot_study(result: dict, out_dir: Path) -> list[Path]:
    """Figure 6 of the paper: strong, weak and null-control AUC against each axis, bands across seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from attacks import STATISTICS

    axes_names = list(dict.fromkeys(cell["axis"] for cell in result["cells"] if cell["axis"]))
    if not axes_names:
        return []
    paths = []
    styles = {"strong": "tab:red", "weak": "tab:blue", "null_control": "0.45"}
    for statistic, entry in STATISTICS.items():
        fig, panels = plt.subplots(1, len(axes_names), figsize=(4.6 * len(axes_names), 3.8), squeeze=False,
                                   constrained_layout=True)
        for panel, name in zip(panels[0], axes_names):
            members = [cell for cell in result["cells"] if cell["axis"] == name]
            labels = [", ".join(str(v) for v in cell["settings"].values()) for cell in members]
            xs = np.arange(len(members))
            for game, color in styles.items():
                stats_ = [cell["summary"]["attacks"][statistic][game]["auc"] for cell in members]
                mean = np.array([s["mean"] if s["mean"] is not None else np.nan for s in stats_], float)
                low = np.array([s["ci95"][0] if s["ci95"][0] is not None else np.nan for s in stats_], float)
                high = np.array([s["ci95"][1] if s["ci95"][1] is not None else np.nan for s in stats_], float)
                panel.plot(xs, mean, marker="o", color=color, label=game.replace("_", " "),
                           linestyle="--" if game == "null_control" else "-")
                panel.fill_between(xs, low, high, color=color, alpha=0.15)
            panel.axhline(0.5, color="0.7", lw=0.8, ls=":")
            panel.set_xticks(xs, labels, rotation=30 if max(map(len, labels)) > 6 else 0)
            panel.set(title=name, ylabel="AUC", ylim=(0.3, 1.0))
            panel.grid(alpha=0.3)
        panels[0][0].legend(fontsize=8)
        seeds = result["cells"][0]["seeds"]
        fig.suptitle(f"{entry.title}: mean and 95 % interval over seeds {', '.join(map(str, seeds))}")
        path = out_dir / f"study_{statistic}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
