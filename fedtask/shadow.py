"""The calibrated adversary's shadow federations (``attack.calibration = "shadow"``).

The adversary knows the training recipe (the resolved config: model, rounds, sampling, DP
noise) but not which tasks were IN. It owns a public pool of tasks from the same distribution,
disjoint from the target's IN and OUT tasks, and is handed the challenge tasks (the target's
IN and OUT tasks, unlabelled). It trains ``attack.shadow_models`` federations of the target's
size (``data.num_in_tasks`` tasks) with the recipe:

* online: shadows come in pairs; each pair splits the challenge tasks at random into two
  halves, one IN for each shadow, so every challenge task is IN for exactly half the shadows;
  public tasks fill each federation up to ``data.num_in_tasks`` (none when the challenge half
  already has that many, as with as many OUT as IN tasks);
* offline: no challenge task is ever IN; each pair splits a public pool of
  2 x ``data.num_in_tasks`` tasks into its two federations.

Shadows train in this process with the vectorized engine (the same algorithm as the Flower
engine), each with its own seed, and are queried only through the black-box embedding oracle
(fedtask/oracle.py), with the very subsets the reference-free game drew. The scorers are
attacks/calibration.py's.

Where the public pool comes from: synthetic tasks are fresh draws of the same distribution
(the same shared projection H, other task means and labellings, from a seed derived from the
run's). The real-data loaders have no reserved split of users that training could never have
touched, so ``attack.calibration = "shadow"`` is refused for them (config.validate).
"""
from __future__ import annotations

import contextlib
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

from fedtask.config import Config, ConfigError, with_overrides
from fedtask.data.base import TaskData, TaskSet

GAMES = ("strong", "weak")
_SALT = 0x5AD0  # shadow seeds and the public pool derive from (config.seed, _SALT)


def membership_plan(*, shadow_models: int, challenge_tasks: int, federation_size: int, mode: str,
                    rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(challenge_in (S, C), public_in (S, P)): which challenge and public tasks each shadow trains on.

    Every row holds ``federation_size`` tasks in all; online, each column of challenge_in has
    exactly S/2 True (pairs split the challenges in halves); public tasks are split by the pairs
    too, so each is IN for at most half of the shadows.
    """
    if shadow_models < 4 or shadow_models % 2:
        raise ValueError(f"shadow_models must be an even number >= 4; got {shadow_models}")
    if mode not in ("online", "offline"):
        raise ValueError(f"mode must be 'online' or 'offline'; got {mode!r}")
    half = (challenge_tasks + 1) // 2 if mode == "online" else 0
    if half > federation_size:
        raise ValueError(f"challenge_tasks: half of {challenge_tasks} challenge tasks do not fit in a shadow "
                         f"federation of {federation_size} tasks")
    fill = federation_size - (challenge_tasks // 2 if mode == "online" else 0)  # the most public tasks one needs
    public = 2 * fill
    challenge_in = np.zeros((shadow_models, challenge_tasks), dtype=bool)
    public_in = np.zeros((shadow_models, public), dtype=bool)
    for pair in range(shadow_models // 2):
        first, second = 2 * pair, 2 * pair + 1
        if mode == "online":
            order = rng.permutation(challenge_tasks)
            challenge_in[first, order[:half]] = True
            challenge_in[second, order[half:]] = True
        order = rng.permutation(public)
        for row, pool in ((first, order[:fill]), (second, order[fill:])):
            need = federation_size - int(challenge_in[row].sum())
            public_in[row, pool[:need]] = True
    return challenge_in, public_in


def public_pool(config: Config, count: int, task_seed: int) -> list[TaskData]:
    """``count`` fresh synthetic tasks of the run's distribution, disjoint from its IN and OUT tasks."""
    from fedtask.data.synthetic import make_synthetic_tasks

    data = config.data
    if data.name != "synthetic":  # config.validate refuses this first
        raise ConfigError(f"attack.calibration: the adversary needs tasks of its own from the task distribution; "
                          f"data.name = {data.name!r} has no reserved split of users; only 'synthetic' can draw them")
    if count == 0:
        return []
    tasks = make_synthetic_tasks(num_in_tasks=count, num_out_tasks=0, train_samples=data.train_samples_per_task,
                                 holdout_samples=data.holdout_samples_per_task, dim=data.dim,
                                 projection_dim=data.projection_dim, task_std=data.task_std,
                                 sample_std=data.sample_std, seed=config.seed, task_seed=task_seed).in_tasks
    return [TaskData(name=f"public{i:04d}", train_x=t.train_x, train_y=t.train_y, holdout_x=t.holdout_x,
                     holdout_y=t.holdout_y) for i, t in enumerate(tasks)]


@contextlib.contextmanager
def _one_torch_thread():
    """Shadows train on one intra-op thread: small per-round kernels gain little from a second one, and
    on a busy 2-core machine OpenMP threads spinning against other processes cost far more (measured
    here under load: one default-preset federation 2.3 s on 1 thread, 41 s on 2)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _game_seeds(seed: int):
    """The reference-free game's subset seeds (attacks.game.run_security_games: strong, weak, bootstrap)."""
    strong, weak, _ = np.random.SeedSequence(seed).spawn(3)
    return {"strong": strong, "weak": weak}


def _features(oracle: Callable, pools: dict, seeds: dict, config: Config) -> dict:
    """{game: (tasks, trials, F)} features of the challenge sets the oracle's encoder gives."""
    from attacks.calibration import challenge_features
    from attacks.game import embed_pools

    attack = config.attack
    out = {}
    for game in GAMES:
        emb, index = embed_pools(oracle, pools[game], attack.batch_size)
        out[game] = challenge_features(emb, index, k=attack.k_strong if game == "strong" else attack.k_weak,
                                       trials=attack.trials, rng=np.random.default_rng(seeds[game]),
                                       whiten=attack.whiten, cosine=attack.cosine, whiten_lambda=attack.whiten_lambda,
                                       k_name=f"k_{game}")
    return out


def run_calibrated(config: Config, taskset: TaskSet, oracle: Callable, null_oracle: Callable, *,
                   progress: Callable[[str], object] = print) -> tuple[dict, dict]:
    """Train the shadows, query them, score the target: (results.json's "calibrated" block,
    {"lira/<statistic>/<game>" | "metaclassifier/<game>": {"in", "out"}} raw scores for the audit)."""
    from attacks.calibration import feature_names, lira_scores, metaclassifier_scores
    from attacks.game import game_metrics
    from attacks.statistics import STATISTICS
    from fedtask.engines import get_engine
    from fedtask.models import pick_device
    from fedtask.oracle import embedding_oracle
    from fedtask.rundir import save_state

    started = time.perf_counter()
    attack = config.attack
    shadows, mode = attack.shadow_models, attack.shadow_mode
    challenge_tasks = [*taskset.in_tasks, *taskset.out_tasks]
    n_in, n_challenge, size = len(taskset.in_tasks), len(challenge_tasks), config.data.num_in_tasks
    root = np.random.SeedSequence([config.seed, _SALT])
    plan_seed, pool_seed, shadow_seed, fit_seed = root.spawn(4)
    try:
        challenge_in, public_in = membership_plan(shadow_models=shadows, challenge_tasks=n_challenge,
                                                  federation_size=size, mode=mode,
                                                  rng=np.random.default_rng(plan_seed))
    except ValueError as err:
        raise ConfigError(f"attack.shadow_mode: {err}") from None
    pool = public_pool(config, public_in.shape[1], int(pool_seed.generate_state(1, np.uint32)[0]))
    seeds = [int(s) for s in shadow_seed.generate_state(shadows, np.uint32)]
    progress(f"calibration: {shadows} {mode} shadow federations of {size} tasks ({len(pool)} public tasks), "
             f"vectorized engine, {config.federation.rounds} rounds each")

    game_seeds = _game_seeds(config.seed)
    pools = {game: [t.challenge_pool(game) for t in challenge_tasks] for game in GAMES}
    public_pools = {game: [t.challenge_pool(game) for t in pool] for game in GAMES}
    public_seeds = dict(zip(GAMES, fit_seed.spawn(2)))
    shadow_features = {game: [] for game in GAMES}
    public_features = {game: [] for game in GAMES}
    engine, device = get_engine("vectorized"), pick_device(config.federation.device)
    train_seconds = []
    with tempfile.TemporaryDirectory(prefix="fedtask-shadow-") as tmp, _one_torch_thread():
        for s in range(shadows):
            members = [challenge_tasks[i] for i in np.flatnonzero(challenge_in[s])]
            members += [pool[i] for i in np.flatnonzero(public_in[s])]
            shadow_config = with_overrides(config, {"seed": seeds[s], "federation.engine": "vectorized"})
            shadow_set = TaskSet(in_tasks=members, out_tasks=[], num_classes=taskset.num_classes,
                                 input_kind=taskset.input_kind, input_shape=taskset.input_shape,
                                 vocab_size=taskset.vocab_size, extra=taskset.extra)
            work = Path(tmp) / f"shadow{s:03d}"
            tick = time.perf_counter()
            outcome = engine.train(shadow_config, shadow_set, work, on_round=None)
            train_seconds.append(time.perf_counter() - tick)
            save_state(outcome.encoder, work / "encoder.safetensors")
            shadow_oracle = embedding_oracle(shadow_config, taskset.spec, work / "encoder.safetensors", device)
            for game, array in _features(shadow_oracle, pools, game_seeds, config).items():
                shadow_features[game].append(array)
            if mode == "offline":
                for game, array in _features(shadow_oracle, public_pools, public_seeds, config).items():
                    public_features[game].append(array)
            progress(f"shadow {s + 1:>3}/{shadows}: trained in {train_seconds[-1]:.1f} s, queried "
                     f"({time.perf_counter() - started:.0f} s so far)")

    target = _features(oracle, pools, game_seeds, config)
    null = _features(null_oracle, pools, game_seeds, config)
    bootstrap_rng = np.random.default_rng(fit_seed.spawn(1)[0])
    names = feature_names(target["strong"].shape[-1] - len(STATISTICS) - 1)
    block = {"lira": {name: {} for name in STATISTICS}, "metaclassifier": {}, "shadow_models": shadows, "mode": mode}
    raw = {}

    def metrics(scores: np.ndarray, game: str) -> dict:
        k = attack.k_strong if game == "strong" else attack.k_weak
        return game_metrics(scores[:n_in], scores[n_in:], k, attack.bootstrap, bootstrap_rng)

    for game in GAMES:
        reference = np.stack(shadow_features[game])  # (S, C, R, F)
        for j, name in enumerate(STATISTICS):
            for label, features in (("target", target[game]), ("null", null[game])):
                scores = lira_scores(target=features[..., j], shadows=reference[..., j], shadow_in=challenge_in,
                                     mode=mode)
                key = game if label == "target" else "null_control"
                if label == "target" or game == "strong":
                    block["lira"][name][key] = metrics(scores, game)
                if label == "target":
                    raw[f"lira/{name}/{game}"] = {"in": scores[:n_in], "out": scores[n_in:]}
        if mode == "online":
            train, train_in = reference, challenge_in
        else:
            train, train_in = np.stack(public_features[game]), public_in
        target_scores, null_scores = metaclassifier_scores(
            train_features=train, train_in=train_in, reference_features=reference, reference_in=challenge_in,
            targets=[target[game], null[game]], seed=config.seed)
        block["metaclassifier"][game] = metrics(target_scores, game)
        if game == "strong":
            block["metaclassifier"]["null_control"] = metrics(null_scores, game)
        raw[f"metaclassifier/{game}"] = {"in": target_scores[:n_in], "out": target_scores[n_in:]}
        progress(f"calibrated {game:>6}: " + ", ".join(
            f"LiRA {name} AUC {block['lira'][name][game]['auc']:.3f}" for name in STATISTICS)
            + f", metaclassifier AUC {block['metaclassifier'][game]['auc']:.3f}")
    for name in STATISTICS:  # strong, weak, null_control: the reference-free order
        block["lira"][name] = {g: block["lira"][name][g] for g in ("strong", "weak", "null_control")}
    block["metaclassifier"] = {g: block["metaclassifier"][g] for g in ("strong", "weak", "null_control")}
    block["public_tasks"] = len(pool)
    block["features"] = names
    block["cost"] = {"seconds_per_shadow": float(np.mean(train_seconds)), "train_seconds": float(np.sum(train_seconds)),
                     "total_seconds": time.perf_counter() - started}
    return block, raw
