"""The one-way flow: config -> task datasets -> federation -> checkpoint -> adversary -> report.

``train`` runs a federation (Flower or the vectorised engine) into a fresh output
directory, ``attack`` plays the security games against a finished run's saved
encoder through a black-box oracle, ``experiment`` does both. Every output lands
atomically: a run directory appears only once its results are complete.
"""
from __future__ import annotations

import json
import math
import shutil
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np

from fedtask.checkpoint import embedding_oracle, save_state
from fedtask.config import ConfigError, load_config, to_toml, with_overrides
from fedtask.data import TaskSet, load_tasks
from strategies.accounting import calibrate_noise_multiplier, privacy_report


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def print_round(row: dict) -> None:
    extra = f" |g|={row['aggregate_norm']:.3f}" if "aggregate_norm" in row else ""
    log(f"round {row['round']:>4} [{row['phase']:<10}] tasks={len(row['tasks']):>4} "
        f"loss={row['loss']:.4f}{extra} {row['seconds']:.2f}s")


def resolve_out_dir(config: dict, out: str | None, config_name: str) -> Path:
    if out:
        return Path(out)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("outputs") / f"{config_name}-{stamp}"


def write_json(path: Path, payload) -> None:
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    tmp.write_text(json.dumps(_finite(payload), indent=2, default=_jsonable, allow_nan=False) + "\n")
    tmp.replace(path)


def _finite(value):
    """JSON has no inf/nan: write an infinite epsilon as "inf" and a missing number as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _jsonable(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def training_rounds(config: dict) -> int:
    """Rounds that touch the encoder (warm-start rounds do not, so DP does not count them)."""
    return config["federation"]["rounds"] - config["federation"]["warm_start_rounds"]


def sample_rate(config: dict) -> float:
    return config["federation"]["tasks_per_round"] / config["data"]["num_in_tasks"]


def prepare(config: dict) -> dict:
    """Resolve what must be fixed before training: the DP noise for a target epsilon."""
    dp = config["dp"]
    if not dp["enabled"] or "target_epsilon" not in dp:
        return config
    try:
        z = calibrate_noise_multiplier(dp["target_epsilon"], sample_rate(config), training_rounds(config),
                                       dp["delta"], dp["accountant"])
    except ValueError as err:
        message = str(err)
        raise ConfigError(message if message.startswith("dp.") else f"dp.target_epsilon: {message}") from None
    return with_overrides(config, {"dp.noise_multiplier": float(z)})


def load_taskset(config: dict) -> TaskSet:
    """Load the tasks, turning missing or malformed data into a one-line config error."""
    try:
        return load_tasks(config)
    except ConfigError:
        raise
    except (FileNotFoundError, ValueError, KeyError) as err:
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"data.path: {message}" if "data." not in message and "model." not in message
                          else message) from None


def train(config: dict, out_dir: Path, progress=print_round) -> dict:
    """Train one federation into ``out_dir`` (created; it must not hold a run already)."""
    out_dir = Path(out_dir)
    if (out_dir / "results.json").exists():
        raise ConfigError(f"{out_dir}: already holds a run (results.json); choose another --out")
    config = prepare(config)
    taskset = load_taskset(config)
    _check_task_sizes(config, taskset)
    work = out_dir.with_name(out_dir.name + ".incomplete")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    fed = config["federation"]
    log(f"training: {config['data']['name']} ({config['data']['num_in_tasks']} IN tasks), "
        f"{fed['rounds']} rounds ({fed['warm_start_rounds']} warm-start), {fed['tasks_per_round']} tasks/round, "
        f"engine={fed['engine']}" + (f", DP z={config['dp']['noise_multiplier']:.4g}" if config["dp"]["enabled"] else ""))
    started = time.perf_counter()
    try:
        if fed["engine"] == "flower":
            from fedtask.simulation import simulate

            outcome = simulate(config, work, progress)
        else:
            from fedtask.vectorized import train_vectorized

            outcome = train_vectorized(config, taskset, work, progress)
        outcome["seconds"] = time.perf_counter() - started
        outcome["majority_baseline"] = majority_baseline(taskset)
        results = finish_training(config, work, outcome)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)  # no half-written run is left behind
        raise
    if out_dir.exists():
        for item in work.iterdir():
            target = out_dir / item.name
            if target.is_dir():
                shutil.rmtree(target)
            item.replace(target)
        work.rmdir()
    else:
        work.replace(out_dir)
    log(f"training done in {outcome['seconds']:.1f}s: in-task accuracy "
        f"{results['utility']['in_task_accuracy']:.3f} -> {out_dir}")
    return results


def _check_task_sizes(config: dict, taskset: TaskSet) -> None:
    """k must fit in every task's challenge pool (real data can have uneven tasks)."""
    for access, key in (("strong", "attack.k_strong"), ("weak", "attack.k_weak")):
        k = config["attack"][key.split(".")[1]]
        sizes = [len(t.challenge_pool(access)) for t in taskset.in_tasks + taskset.out_tasks]
        if sizes and min(sizes) < k:
            raise ConfigError(f"{key}: k={k} is larger than the {min(sizes)} {access}-access samples "
                              "the smallest task has")


def majority_baseline(taskset: TaskSet) -> float | None:
    """Held-out accuracy of always predicting each task's most frequent training label.

    The floor a head must beat: on unbalanced tasks it is far above 1/num_classes.
    """
    scores = []
    for task in taskset.in_tasks:
        train, held = task.train_y.reshape(-1), task.holdout_y.reshape(-1)
        train, held = train[train >= 0], held[held >= 0]
        if len(train) and len(held):
            scores.append(float((held == train.bincount().argmax()).float().mean()))
    return float(np.mean(scores)) if scores else None


def finish_training(config: dict, out_dir: Path, outcome: dict) -> dict:
    """Write the training outputs (CONTRACT §4) and return results.json's content."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.toml").write_text(to_toml(config))
    meta = {"encoder": config["model"]["encoder"], "embedding_dim": str(config["model"]["embedding_dim"])}
    save_state(outcome["encoder"], out_dir / "encoder.safetensors", meta)
    save_state(outcome["initial_encoder"], out_dir / "encoder_init.safetensors", meta)
    write_json(out_dir / "metrics.json", {"rounds": outcome["rounds"], "seconds": outcome.get("seconds"),
                                          "per_task_evaluation": outcome["evaluation"]})
    accuracies = [row["accuracy"] for row in outcome["evaluation"] if not math.isnan(row["accuracy"])]
    train_acc = [row["train-accuracy"] for row in outcome["evaluation"]]
    utility = {
        "in_task_accuracy": float(np.mean(accuracies)) if accuracies else None,
        "out_task_accuracy": None,
        "in_task_train_accuracy": float(np.mean(train_acc)) if train_acc else None,
        "majority_baseline_accuracy": outcome.get("majority_baseline"),
    }
    results = {"config": config, "utility": utility,
               "privacy": privacy_report(config["dp"], sample_rate(config), training_rounds(config),
                                         noise_multiplier=config["dp"]["noise_multiplier"])}
    write_json(out_dir / "results.json", results)
    from attacks import write_report

    write_report(results, None, out_dir)
    return results


def attack(run_dir: Path, overrides: list[str] | None = None) -> dict:
    """Play the security games against a finished run, post-training, through the oracle."""
    run_dir = Path(run_dir)
    for name in ("config.toml", "encoder.safetensors", "encoder_init.safetensors", "results.json"):
        if not (run_dir / name).is_file():
            raise ConfigError(f"{run_dir / name}: missing; --run must be a finished training run")
    for item in overrides or []:
        key = item.split("=", 1)[0].strip()
        if not (key.startswith("attack.") or key in ("federation.device",)):
            raise ConfigError(f"{key}: only attack.* keys can change when attacking a finished run")
    config = load_config(run_dir / "config.toml", overrides)
    taskset = load_taskset(config)
    _check_task_sizes(config, taskset)
    device = "cuda" if config["federation"]["device"] != "cpu" and _cuda() else "cpu"
    oracle = embedding_oracle(config, taskset, run_dir / "encoder.safetensors", device)
    null_oracle = embedding_oracle(config, taskset, run_dir / "encoder_init.safetensors", device)
    pools = {access: ([t.challenge_pool(access) for t in taskset.in_tasks],
                      [t.challenge_pool(access) for t in taskset.out_tasks]) for access in ("strong", "weak")}
    from attacks import format_tables, run_security_games, write_report

    log(f"attacking {run_dir}: {len(taskset.in_tasks)} IN + {len(taskset.out_tasks)} OUT tasks, "
        f"{config['attack']['trials']} trials")
    attack_results, raw_scores = run_security_games(oracle, null_oracle, pools, config["attack"], config["seed"],
                                                    progress=log)
    results = json.loads((run_dir / "results.json").read_text())
    results["config"] = config
    results["attacks"] = attack_results
    write_json(run_dir / "results.json", results)
    write_report(results, raw_scores, run_dir)
    print(format_tables(results), flush=True)
    return results


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def experiment(config: dict, out_dir: Path) -> dict:
    train(config, out_dir)
    return attack(out_dir)

