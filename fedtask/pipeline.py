"""The one-way flow: config -> task datasets -> federation -> checkpoint -> adversary -> report.

``run_training`` is the one training path: the CLI, the DP sweep, the bench and the
``flwr run`` ServerApp all call it, with whichever engine. It checks what the config
alone cannot (k against the real task sizes, the device), builds the run in an
``.incomplete`` directory, lets the engine train, adds the majority baseline and the
privacy accounting, and publishes the directory once complete. ``run_attack`` plays the
security games against a finished run through the black-box oracle.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from pathlib import Path

import numpy as np

from fedtask import progress, rundir
from fedtask.config import Config, ConfigError, load_config, parameter_error, to_toml, with_overrides
from fedtask.data import TaskSet, load_tasks
from fedtask.engines import Engine, RoundHook, TrainingFailed, TrainingOutcome, get_engine

# library parameter -> the configuration key that feeds it (for one-line errors at the edge)
ACCOUNTING_KEYS = {"target_epsilon": "dp.target_epsilon", "delta": "dp.delta", "accountant": "dp.accountant",
                   "noise_multiplier": "dp.noise_multiplier", "clipping_norm": "dp.clipping_norm",
                   "sample_rate": "federation.tasks_per_round", "steps": "federation.rounds"}
ATTACK_KEYS = {name: f"attack.{name}" for name in ("trials", "k_strong", "k_weak", "whiten_lambda", "bootstrap",
                                                  "batch_size")}


def log(message: str) -> None:
    """A progress message: stderr unless --quiet, and the open run's run.log (fedtask/progress.py)."""
    progress.log(message)


print_round = progress.DEFAULT  # the default per-round hook: run_training shows the training bar (or lines)


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


def check_model(config: Config) -> None:
    from fedtask.models import check_encoder_name

    try:
        check_encoder_name(config.model.encoder)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def check_memory(config: Config) -> None:
    """Synthetic tasks are made in memory at once: refuse sizes this machine cannot hold
    (an allocation that size is not an error on Linux, the kernel kills the process later)."""
    data = config.data
    if data.name != "synthetic":
        return
    samples = (data.num_in_tasks + data.num_out_tasks) * (data.train_samples_per_task + data.holdout_samples_per_task)
    needed = 4 * samples * data.dim * 3  # inputs, plus the copies training and the attack make
    available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if needed > available:
        raise ConfigError(f"data.num_in_tasks: {samples:,} synthetic samples of data.dim={data.dim} need about "
                          f"{needed / 2**30:.0f} GiB, more than this machine's {available / 2**30:.0f} GiB")


# federation keys that change how a run is kept or shown, never the model it trains (the hash of
# earlier runs must not change: a key added here is one that did not exist when they were made)
RUNTIME_KEYS = ("device", "snapshot_every", "checkpoint_every", "tensorboard", "launcher")


def training_fingerprint(config: Config, *, also_ignore: tuple[str, ...] = ()) -> str:
    """What makes a trained model: every key but the attack's and the device's, hashed.

    ``also_ignore`` leaves out more dotted keys (a resume may change where a run executes)."""
    tree = config.to_dict()
    tree.pop("attack")
    for key in RUNTIME_KEYS:  # how and where the run is kept or shown, not what is trained
        tree["federation"].pop(key, None)
    for key in also_ignore:
        section, name = key.split(".", 1)
        tree[section].pop(name, None)
    return hashlib.sha256(json.dumps(tree, sort_keys=True).encode()).hexdigest()


def resume_fingerprint(config: Config) -> str:
    """What a checkpoint must match to be continued: the training, not where it runs."""
    return training_fingerprint(config, also_ignore=RESUMABLE_KEYS)


def check_device(config: Config) -> None:
    import torch

    if config.federation.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("federation.device: 'cuda' asked for, but this machine has no usable GPU")


def run_training(config: Config, out_dir: Path, *, engine: Engine | None = None,
                 on_round: RoundHook | None = progress.DEFAULT, resume: bool = False) -> dict:
    """Train one federation into ``out_dir`` (created; it must not hold a run already).

    ``engine`` defaults to ``federation.engine``'s; ``flwr run`` passes one bound to its grid.
    With ``resume``, ``out_dir`` is an interrupted run's ``--out`` and ``config`` its own
    (:func:`resume_config`): training continues from its latest checkpoint.
    Returns results.json's content.
    """
    if not resume:
        rundir.check_new_output(out_dir)  # before anything slow: a bad --out costs nothing
    config = prepare(config)
    check_device(config)
    progress.check_tensorboard(config)
    check_model(config)
    check_memory(config)
    taskset = load_taskset(config)
    check_task_sizes(config, taskset)
    engine = engine or get_engine(config.federation.engine)
    engine.check(config)  # what only the engine can tell (resources it cannot get)
    fed = config.federation
    if resume:
        run = rundir.RunDirectory.reopen(out_dir)
        try:
            checkpoint = checkpoint_to_resume(run.work, config)
        except BaseException:
            run.release()
            raise
    else:
        run, checkpoint = rundir.RunDirectory(out_dir), None
        rundir.write_text(run.work / rundir.CONFIG, to_toml(config))  # what --resume reads back
    hook = RunHook(config, run.work, on_round)  # opens run.log: everything from here on goes there too
    log(f"training: {config.data.name} ({config.data.num_in_tasks} IN tasks), "
        f"{fed.rounds} rounds ({fed.warm_start_rounds} warm-start), {fed.tasks_per_round} tasks/round, "
        f"engine={fed.engine}" + (f", DP z={config.dp.noise_multiplier:.4g}" if config.dp.enabled else "")
        + (f", resuming after round {checkpoint.round}" if checkpoint else ""))
    started = time.perf_counter()
    earlier_s = checkpoint.elapsed_s if checkpoint else 0.0
    try:
        extra = {}  # only when used, so an engine without checkpoint support still trains
        if fed.checkpoint_every:
            from fedtask.checkpoint import Checkpointing

            extra["checkpoints"] = Checkpointing(run.work, every=fed.checkpoint_every,
                                                 fingerprint=resume_fingerprint(config), engine=fed.engine,
                                                 earlier_s=earlier_s)
        if checkpoint:
            extra["resume"] = checkpoint
        outcome = engine.train(config, taskset, run.work, on_round=hook, **extra)
        seconds = earlier_s + time.perf_counter() - started
        results = write_training(config, run.work, outcome, seconds=seconds, majority=majority_baseline(taskset))
        from fedtask.checkpoint import remove_checkpoints

        remove_checkpoints(run.work)  # the finished run's outputs are all a reader needs
        run.publish()
    except BaseException:
        from fedtask.checkpoint import latest_round

        if latest_round(run.work) is None:
            run.discard()  # no half-written run is left behind
        else:  # a checkpoint is worth keeping: the run can continue from it
            run.release()
            progress.error(f"{out_dir}: kept {run.work}; {rundir.interrupted_advice(out_dir).split(': ', 1)[1]}")
        raise
    log(f"training done in {seconds:.1f}s: in-task accuracy "
        f"{results['utility']['in_task_accuracy']:.3f} -> {out_dir}")
    return results


RESUMABLE_KEYS = ("federation.device", "federation.launcher", "federation.checkpoint_every", "federation.tensorboard",
                  "federation.reply_timeout", "federation.ray_address", "federation.num_cpus_per_client",
                  "federation.num_gpus_per_client", "federation.max_failed_fraction")


def resume_config(out_dir: Path, overrides: list[str] | None = None) -> Config:
    """The configuration an interrupted run was started with (its ``config.toml``), with the
    overrides a resume may make: where and how it runs and is kept, and attack.* keys."""
    work = rundir.incomplete(Path(out_dir).expanduser().resolve())
    for item in overrides or []:
        key = item.split("=", 1)[0].strip()
        if not (key.startswith("attack.") or key in RESUMABLE_KEYS):
            raise ConfigError(f"{key}: cannot change when resuming (the run continues as it started); "
                              f"only attack.* and {', '.join(RESUMABLE_KEYS)} can")
    if not work.is_dir():
        finished = (Path(out_dir) / rundir.RESULTS).is_file()
        raise ConfigError(f"{out_dir}: " + ("finished already: nothing to resume" if finished else
                                            f"no interrupted run to resume ({work} does not exist)"))
    if not (work / rundir.CONFIG).is_file():
        raise ConfigError(f"{work / rundir.CONFIG}: missing; {work} was not started by this fedtask's train "
                          "(remove it to start again)")
    return load_config(work / rundir.CONFIG, overrides)


def train_or_resume(config: Config, out_dir: Path, *, on_round: RoundHook | None = print_round) -> dict:
    """Train ``config`` into ``out_dir``, or continue what an earlier attempt left there.

    For sweeps and studies re-run on the same ``--out``: a finished training of the same
    configuration is kept (its results returned), an interrupted one whose checkpoint this
    configuration made resumes, and one without a usable checkpoint starts again.
    """
    from fedtask.checkpoint import latest_round, load_checkpoint

    out_dir = Path(out_dir)
    work = rundir.incomplete(out_dir.expanduser().resolve())
    if (out_dir / rundir.RESULTS).is_file() and not work.exists():
        done, results = load_finished_run(out_dir)
        if resume_fingerprint(done) != resume_fingerprint(config):
            raise ConfigError(f"{out_dir}: holds a run of another configuration; choose another --out")
        return results
    if work.exists():
        if latest_round(work) is not None and load_checkpoint(work).fingerprint == resume_fingerprint(prepare(config)):
            return run_training(config, out_dir, on_round=on_round, resume=True)
        log(f"{work}: an interrupted attempt without a usable checkpoint; starting this run again")
        rundir.RunDirectory.reopen(out_dir).discard()  # refused while another process writes it
    return run_training(config, out_dir, on_round=on_round)


def checkpoint_to_resume(work: Path, config: Config):
    """The interrupted run's latest checkpoint, if it was made by this configuration."""
    from fedtask.checkpoint import latest_round, load_checkpoint

    if latest_round(work) is None:
        raise ConfigError(f"{work}: {rundir.interrupted_advice(work.with_name(work.name[:-len('.incomplete')]))}")
    checkpoint = load_checkpoint(work)
    if checkpoint.fingerprint != resume_fingerprint(config):
        raise ConfigError(f"{work / rundir.CONFIG}: differs from the configuration the checkpoint was trained "
                          "with; resuming would continue another run")
    return checkpoint


class TrainingDiverged(TrainingFailed):
    """Training produced a non-finite loss or update; the message names the round and what to change."""


class RunHook:
    """The per-round hook ``run_training`` hands its engine: the run's own work (the divergence
    guard, snapshots every ``federation.snapshot_every`` rounds, the round's line in ``run.log``,
    TensorBoard), then ``caller`` (``run_training``'s ``on_round``; the training bar by default).

    It is data (``config``, ``run_dir``, ``caller``) as well as a callable, so an engine whose
    server runs in another process (the ``flwr-run`` launcher) rebuilds the run's own part there
    with ``RunHook(config, run_dir, None)``, where the encoder is, and calls only ``caller`` here."""

    def __init__(self, config: Config, run_dir: Path, caller: RoundHook | None = progress.DEFAULT):
        self.config, self.run_dir = config, Path(run_dir)
        self.caller = progress.caller_hook(config, caller)
        progress.open_log(self.run_dir / progress.LOG_NAME)
        self._own: RoundHook | None = None  # built at the first round: a TensorBoard writer only where rounds run

    def own(self) -> RoundHook:
        if self._own is None:
            fed = self.config.federation
            hook = progress.training_hook(self.config, self.run_dir, None)
            if fed.snapshot_every:  # composed only when asked for: no cost otherwise
                from fedtask.trajectory import snapshot_hook

                hook = snapshot_hook(hook, run_dir=self.run_dir, every=fed.snapshot_every,
                                     metadata={"encoder": self.config.model.encoder,
                                               "embedding_dim": str(self.config.model.embedding_dim)})
            self._own = divergence_guard(hook)
        return self._own

    def with_caller(self, caller: RoundHook | None) -> "RunHook":
        """The same run's hook with another caller (a bench's timer around this one's)."""
        return RunHook(self.config, self.run_dir, caller)

    def __call__(self, server_round: int, encoder, row: dict) -> None:
        self.own()(server_round, encoder, row)
        if self.caller is not None:
            self.caller(server_round, encoder, row)


def divergence_guard(on_round: RoundHook | None) -> RoundHook:
    """The per-round hook that stops training at the first non-finite loss or update."""

    def guard(server_round: int, encoder, row: dict) -> None:
        loss_bad = bool(row["tasks"]) and not math.isfinite(row["loss"])  # an empty DP round has no loss
        update_bad = not math.isfinite(row.get("aggregate_norm", 0.0))
        if loss_bad or update_bad:
            what = "loss" if loss_bad else "encoder update"
            raise TrainingDiverged(
                f"training diverged at round {server_round}: non-finite {what}; lower federation.server_lr "
                "or federation.head_lr, or clip with federation.grad_clip")
        if on_round:
            on_round(server_round, encoder, row)

    return guard


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
    results = {"config": config.to_dict(), "utility": utility, "privacy": privacy_block(config),
               "fingerprint": {"training_config": training_fingerprint(config),
                               "encoder": rundir.file_digest(out_dir / rundir.ENCODER),
                               "initial_encoder": rundir.file_digest(out_dir / rundir.INITIAL_ENCODER)}}
    rundir.write_json(out_dir / rundir.RESULTS, results)
    from attacks import write_report

    write_report(results, None, out_dir)
    return results


def load_finished_run(run_dir: Path, overrides: list[str] | None = None) -> tuple[Config, dict]:
    """A finished run's config (with ``attack.*`` overrides) and results, checked against what was
    trained, ready to be queried: the edge of every post-training command."""
    run_dir = Path(run_dir)
    for name in rundir.TRAINED:
        if not (run_dir / name).is_file():
            raise ConfigError(f"{run_dir / name}: missing; --run must be a finished training run")
    for item in overrides or []:
        key = item.split("=", 1)[0].strip()
        if not (key.startswith("attack.") or key == "federation.device"):
            raise ConfigError(f"{key}: only attack.* keys can change for a finished run")
    config = load_config(run_dir / rundir.CONFIG, overrides)
    results = rundir.read_json(run_dir / rundir.RESULTS)
    verify_trained(run_dir, config, results)
    check_device(config)
    check_model(config)
    return config, results


def run_attack(run_dir: Path, overrides: list[str] | None = None) -> dict:
    """Play the security games against a finished run, post-training, through the oracle."""
    run_dir = Path(run_dir)
    config, previous = load_finished_run(run_dir, overrides)
    taskset = load_taskset(config)
    check_task_sizes(config, taskset)
    from fedtask.models import pick_device
    from fedtask.oracle import embedding_oracle

    device = pick_device(config.federation.device)
    try:
        oracle = embedding_oracle(config, taskset.spec, run_dir / rundir.ENCODER, device)
        null_oracle = embedding_oracle(config, taskset.spec, run_dir / rundir.INITIAL_ENCODER, device)
    except (ValueError, RuntimeError) as err:  # a checkpoint whose shapes do not fit config.toml
        raise ConfigError(str(err).strip().splitlines()[0][:300]) from None
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
            bootstrap=attack.bootstrap, batch_size=attack.batch_size, progress=log,
            advance=progress.counter("attack: embedding", "sample"))
    except ValueError as err:
        raise parameter_error(err, ATTACK_KEYS) from None
    calibrated, calibrated_scores = None, {}
    if attack.calibration == "shadow":  # the shadow-calibrated adversary (fedtask/shadow.py)
        from fedtask.shadow import run_calibrated

        try:
            calibrated, calibrated_scores = run_calibrated(config, taskset, oracle, null_oracle, progress=log)
        except ValueError as err:
            raise parameter_error(err, ATTACK_KEYS) from None
    if previous.get("attacks"):
        log(f"replacing the attacks in {run_dir / rundir.RESULTS} (made with "
            f"{_attack_settings(previous.get('config', {}).get('attack', {}))}) by the new ones")
    from attacks.leakage import per_task_leakage

    per_task = per_task_leakage(raw_scores, in_names=[t.name for t in taskset.in_tasks],
                                out_names=[t.name for t in taskset.out_tasks],
                                sizes={access: [len(p) for p in ins + outs] for access, (ins, outs) in pools.items()})
    results = {**previous, "config": config.to_dict(), "attacks": attack_results, "per_task": per_task}
    results.pop("calibrated", None)  # a previous attack's, if this one has none
    if calibrated:
        results["calibrated"] = calibrated
    from attacks.audit import DEFAULT_AUDIT_DELTA, audit_candidates, empirical_epsilon_lower_bound

    results["privacy"] = {**previous.get("privacy", {}), "empirical_epsilon_lower_bound": empirical_epsilon_lower_bound(
        scores={**audit_candidates(raw_scores), **calibrated_scores}, seed=config.seed,
        delta=config.dp.delta if config.dp.enabled else DEFAULT_AUDIT_DELTA)}
    rundir.write_json(run_dir / rundir.RESULTS, results)
    from attacks.calibration import with_calibrated_curves

    write_report(results, with_calibrated_curves(raw_scores, calibrated, calibrated_scores), run_dir)
    print(format_tables(results), flush=True)
    return results


def verify_trained(run_dir: Path, config: Config, results: dict) -> None:
    """The run directory's config and encoders must be those it was trained with."""
    fingerprint = results.get("fingerprint")
    if not fingerprint:
        log(f"{run_dir}: made by an older fedtask, without a fingerprint: config.toml and the encoders "
            "cannot be checked against training")
        return
    if training_fingerprint(config) != fingerprint["training_config"]:
        trained = _flat(results.get("config", {}))
        now = _flat(config.to_dict())
        changed = [key for key in sorted(set(trained) | set(now)) if not key.startswith("attack.")
                   and key.removeprefix("federation.") not in RUNTIME_KEYS
                   and trained.get(key) != now.get(key)]
        detail = (f"{changed[0]} is {now.get(changed[0])!r} in config.toml but the model was trained with "
                  f"{trained.get(changed[0])!r}") if changed else "it differs from the configuration trained with"
        raise ConfigError(f"{run_dir / rundir.CONFIG}: {detail}; attacking it would test other tasks than "
                          "the model saw")
    for name, key in ((rundir.ENCODER, "encoder"), (rundir.INITIAL_ENCODER, "initial_encoder")):
        if rundir.file_digest(run_dir / name) != fingerprint[key]:
            raise ConfigError(f"{run_dir / name}: not the file this run wrote (its SHA-256 differs from "
                              f"{rundir.RESULTS}'s fingerprint)")


def _flat(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        flat.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return flat


def _attack_settings(attack: dict) -> str:
    return ", ".join(f"{key}={attack[key]}" for key in ("k_strong", "k_weak", "trials", "whiten", "cosine")
                     if key in attack) or "unknown settings"


def run_experiment(config: Config, out_dir: Path, *, engine: Engine | None = None) -> dict:
    run_training(config, out_dir, engine=engine)
    return run_attack(out_dir)
