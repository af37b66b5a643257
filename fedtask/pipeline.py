"""The one-way flow: config -> task datasets -> federation -> checkpoint -> adversary -> report.

``run_training`` is the one training path: the CLI, the DP sweep, the bench and the
``flwr run`` ServerApp all call it, with whichever engine. It checks what the config
alone cannot (k against the real task sizes, the device), builds the run in an
``.incomplete`` directory, lets the engine train, adds the majority baseline and the
privacy accounting, and publishes the directory once complete. ``run_attack`` plays the
security games against a finished run through the black-box oracle.
"""
from __future__ import annotations

import json
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from fedtask import rundir
from fedtask.config import Config, ConfigError, load_config, parameter_error, to_toml, with_overrides
from fedtask.data import TaskSet, load_tasks
from fedtask.engines import Engine, RoundHook, TrainingOutcome, get_engine

# library parameter -> the configuration key that feeds it (for one-line errors at the edge)
ACCOUNTING_KEYS = {"target_epsilon": "dp.target_epsilon", "delta": "dp.delta", "accountant": "dp.accountant",
                   "noise_multiplier": "dp.noise_multiplier", "clipping_norm": "dp.clipping_norm",
                   "sample_rate": "federation.tasks_per_round", "steps": "federation.rounds"}
ATTACK_KEYS = {name: f"attack.{name}" for name in ("trials", "k_strong", "k_weak", "whiten_lambda", "bootstrap",
                                                  "batch_size")}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def print_round(server_round: int, encoder, row: dict) -> None:
    """The default per-round hook: one progress line."""
    extra = f" |g|={row['aggregate_norm']:.3f}" if "aggregate_norm" in row else ""
    log(f"round {server_round:>4} [{row['phase']:<10}] tasks={len(row['tasks']):>4} "
        f"loss={row['loss']:.4f}{extra} {row['seconds']:.2f}s")


def prepare(config: Config) -> Config:
    """Resolve what must be fixed before training: the DP noise for a target epsilon."""
    dp = config.dp
    if not dp.enabled or dp.target_epsilon is None:
        return config
    from strategies.accounting import calibrate_noise_multiplier

    try:
        z = calibrate_noise_multiplier(target_epsilon=dp.target_epsilon, sample_rate=config.sample_rate,
                                       steps=config.encoder_rounds, delta=dp.delta, accountant=dp.accountant)
    except ValueError as err:
        raise parameter_error(err, ACCOUNTING_KEYS) from None
    return with_overrides(config, {"dp.noise_multiplier": float(z)})


def load_taskset(config: Config) -> TaskSet:
    """Load the tasks, turning missing or malformed data into a one-line config error."""
    try:
        return load_tasks(config)
    except ConfigError:
        raise
    except (FileNotFoundError, ValueError, KeyError) as err:
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"data.path: {message}" if "data." not in message and "model." not in message
                          else message) from None


def check_task_sizes(config: Config, taskset: TaskSet) -> None:
    """k must fit in every task's challenge pool (real data can have uneven tasks)."""
    for access, key in (("strong", "k_strong"), ("weak", "k_weak")):
        k = getattr(config.attack, key)
        sizes = [len(t.challenge_pool(access)) for t in taskset.in_tasks + taskset.out_tasks]
        if sizes and min(sizes) < k:
            raise ConfigError(f"attack.{key}: k={k} is larger than the {min(sizes)} {access}-access samples "
                              "the smallest task has")


def check_device(config: Config) -> None:
    import torch

    if config.federation.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("federation.device: 'cuda' asked for, but this machine has no usable GPU")


def run_training(config: Config, out_dir: Path, *, engine: Engine | None = None,
                 on_round: RoundHook | None = print_round) -> dict:
    """Train one federation into ``out_dir`` (created; it must not hold a run already).

    ``engine`` defaults to ``federation.engine``'s; ``flwr run`` passes one bound to its grid.
    Returns results.json's content.
    """
    out_dir = Path(out_dir)
    if (out_dir / rundir.RESULTS).exists():
        raise ConfigError(f"{out_dir}: already holds a run ({rundir.RESULTS}); choose another --out")
    config = prepare(config)
    check_device(config)
    taskset = load_taskset(config)
    check_task_sizes(config, taskset)
    engine = engine or get_engine(config.federation.engine)
    work = rundir.incomplete(out_dir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    fed = config.federation
    log(f"training: {config.data.name} ({config.data.num_in_tasks} IN tasks), "
        f"{fed.rounds} rounds ({fed.warm_start_rounds} warm-start), {fed.tasks_per_round} tasks/round, "
        f"engine={fed.engine}" + (f", DP z={config.dp.noise_multiplier:.4g}" if config.dp.enabled else ""))
    started = time.perf_counter()
    try:
        outcome = engine.train(config, taskset, work, on_round=on_round)
        seconds = time.perf_counter() - started
        results = write_training(config, work, outcome, seconds=seconds, majority=majority_baseline(taskset))
        rundir.publish(work, out_dir)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)  # no half-written run is left behind
        raise
    log(f"training done in {seconds:.1f}s: in-task accuracy "
        f"{results['utility']['in_task_accuracy']:.3f} -> {out_dir}")
    return results


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


def privacy_block(config: Config) -> dict:
    """results.json's privacy block: the accountant's epsilon for the rounds that touched the encoder."""
    from strategies.accounting import privacy_report

    dp = config.dp
    try:
        return privacy_report(enabled=dp.enabled, noise_multiplier=dp.noise_multiplier, clipping_norm=dp.clipping_norm,
                              delta=dp.delta, sample_rate=config.sample_rate, steps=config.encoder_rounds,
                              accountant=dp.accountant)
    except ValueError as err:
        raise parameter_error(err, ACCOUNTING_KEYS) from None


def write_training(config: Config, out_dir: Path, outcome: TrainingOutcome, *, seconds: float,
                   majority: float | None) -> dict:
    """Write the training outputs (CONTRACT §4) and return results.json's content."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / rundir.CONFIG).write_text(to_toml(config))
    meta = {"encoder": config.model.encoder, "embedding_dim": str(config.model.embedding_dim)}
    rundir.save_state(outcome.encoder, out_dir / rundir.ENCODER, meta)
    rundir.save_state(outcome.initial_encoder, out_dir / rundir.INITIAL_ENCODER, meta)
    rundir.write_json(out_dir / rundir.METRICS, {"rounds": outcome.rounds, "seconds": seconds,
                                                 "per_task_evaluation": outcome.evaluation})
    accuracies = [row["accuracy"] for row in outcome.evaluation if not math.isnan(row["accuracy"])]
    train_acc = [row["train-accuracy"] for row in outcome.evaluation]
    utility = {
        "in_task_accuracy": float(np.mean(accuracies)) if accuracies else None,
        "out_task_accuracy": None,  # OUT tasks have no head; see the leakage-over-training issue
        "in_task_train_accuracy": float(np.mean(train_acc)) if train_acc else None,
        "majority_baseline_accuracy": majority,
    }
    results = {"config": config.to_dict(), "utility": utility, "privacy": privacy_block(config)}
    rundir.write_json(out_dir / rundir.RESULTS, results)
    from attacks import write_report

    write_report(results, None, out_dir)
    return results


def run_attack(run_dir: Path, overrides: list[str] | None = None) -> dict:
    """Play the security games against a finished run, post-training, through the oracle."""
    run_dir = Path(run_dir)
    for name in rundir.TRAINED:
        if not (run_dir / name).is_file():
            raise ConfigError(f"{run_dir / name}: missing; --run must be a finished training run")
    for item in overrides or []:
        key = item.split("=", 1)[0].strip()
        if not (key.startswith("attack.") or key == "federation.device"):
            raise ConfigError(f"{key}: only attack.* keys can change when attacking a finished run")
    config = load_config(run_dir / rundir.CONFIG, overrides)
    check_device(config)
    taskset = load_taskset(config)
    check_task_sizes(config, taskset)
    from fedtask.models import pick_device
    from fedtask.oracle import embedding_oracle

    device = pick_device(config.federation.device)
    oracle = embedding_oracle(config, taskset.spec, run_dir / rundir.ENCODER, device)
    null_oracle = embedding_oracle(config, taskset.spec, run_dir / rundir.INITIAL_ENCODER, device)
    pools = {access: ([t.challenge_pool(access) for t in taskset.in_tasks],
                      [t.challenge_pool(access) for t in taskset.out_tasks]) for access in ("strong", "weak")}
    from attacks import format_tables, run_security_games, write_report

    attack = config.attack
    log(f"attacking {run_dir}: {len(taskset.in_tasks)} IN + {len(taskset.out_tasks)} OUT tasks, "
        f"{attack.trials} trials")
    try:
        attack_results, raw_scores = run_security_games(
            oracle, null_oracle, pools, trials=attack.trials, k_strong=attack.k_strong, k_weak=attack.k_weak,
            seed=config.seed, whiten=attack.whiten, cosine=attack.cosine, whiten_lambda=attack.whiten_lambda,
            bootstrap=attack.bootstrap, batch_size=attack.batch_size, progress=log)
    except ValueError as err:
        raise parameter_error(err, ATTACK_KEYS) from None
    results = json.loads((run_dir / rundir.RESULTS).read_text())
    results["config"] = config.to_dict()
    results["attacks"] = attack_results
    rundir.write_json(run_dir / rundir.RESULTS, results)
    write_report(results, raw_scores, run_dir)
    print(format_tables(results), flush=True)
    return results


def run_experiment(config: Config, out_dir: Path, *, engine: Engine | None = None) -> dict:
    run_training(config, out_dir, engine=engine)
    return run_attack(out_dir)
