"""Throughput of the attack pipeline after embedding: subsets, whitening, statistics, metrics."""

from __future__ import annotations

import time

import numpy as np

from .game import challenge_scores
from .metrics import auc_bootstrap_ci, roc_metrics
from .statistics import STATISTICS


def _one_pass(emb, task_index, n_in_tasks, trials, ks, n_boot, rng) -> dict:
    seconds = {"scores": 0.0, "metrics": 0.0, "bootstrap": 0.0}
    for k in ks:
        started = time.perf_counter()
        scores = challenge_scores(emb, task_index, n_in_tasks, k, trials, rng, whiten=True)
        seconds["scores"] += time.perf_counter() - started
        for name in STATISTICS:
            started = time.perf_counter()
            roc_metrics(scores[name]["in"], scores[name]["out"])
            seconds["metrics"] += time.perf_counter() - started
            started = time.perf_counter()
            auc_bootstrap_ci(scores[name]["in"], scores[name]["out"], n_boot, rng)
            seconds["bootstrap"] += time.perf_counter() - started
    return seconds


def attack_throughput(n_tasks=512, trials=128, d=32, k_strong=8, k_weak=4, samples=16, seed=0, n_boot=1000,
                      repeats=3) -> dict:
    """Time both adversaries x both statistics, whitened, on random embeddings.

    Half the tasks are IN.  Of `repeats` passes the fastest is reported (the usual guard
    against a busy machine): seconds for scoring, point metrics and the bootstrap CI, their
    total with and without the bootstrap, and (task, trial) points per second overall.
    """
    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((n_tasks * samples, d))
    task_index = np.repeat(np.arange(n_tasks), samples)
    passes = [_one_pass(emb, task_index, n_tasks // 2, trials, (k_strong, k_weak), n_boot, rng) for _ in range(repeats)]
    seconds = min(passes, key=lambda p: sum(p.values()))
    total = sum(seconds.values())
    points = 2 * n_tasks * trials  # two adversaries; both statistics come from one scoring pass
    return {**{f"{key}_s": value for key, value in seconds.items()},
            "total_s": total, "total_without_bootstrap_s": total - seconds["bootstrap"],
            "task_trials_per_s": points / total}


if __name__ == "__main__":
    for key, value in attack_throughput().items():
        print(f"{key:>26}: {value:.3f}")
