"""The task-inference security game played against a black-box embedding oracle (CONTRACT §5).

The adversary sees only `oracle(inputs) -> embeddings`.  Each task's pool is embedded once;
every trial then draws, per task, a uniformly random k-subset of that pool and scores it.
All trials of all tasks are drawn and scored as single array operations.
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

import numpy as np

from .blas import on_one_blas_thread
from .grouping import pad_by_task, valid_mask
from .metrics import auc_bootstrap_ci, roc_metrics
from .statistics import STATISTICS, as_float_array
from .whitening import DEFAULT_WHITEN_LAMBDA, whiten_padded

DEFAULT_BOOTSTRAP = 1000
DEFAULT_BATCH_SIZE = 1024
_CHUNK_ELEMENTS = 1 << 23  # bound on the elements of one batch of gathered challenge data
_FULL_GRAM_ELEMENTS = 1 << 24  # per-task Gram matrices up to this size are precomputed


def embed_pools(oracle: Callable, pools: Sequence, batch_size: int = DEFAULT_BATCH_SIZE,
                on_batch: Callable[[int], object] | None = None):
    """Embed every sample of every pool once: -> (emb (N, d) float64, task_index (N,)).

    `pools` is a sequence of per-task inputs (tensors or arrays of shape (n_t, ...)); they are
    concatenated and sent to the oracle in chunks of `batch_size`; `on_batch(n)` is told of
    each chunk's n samples once embedded.
    """
    import torch

    tensors = [torch.as_tensor(pool) for pool in pools]
    sizes = np.array([len(t) for t in tensors], dtype=np.int64)
    inputs = torch.cat(tensors) if tensors else torch.empty(0)
    chunks = []
    with torch.no_grad():
        for start in range(0, len(inputs), batch_size):
            batch = inputs[start : start + batch_size]
            emb = as_float_array(oracle(batch))
            if emb.ndim != 2 or emb.shape[0] != len(batch):
                raise ValueError(f"oracle returned shape {emb.shape} for a batch of {len(batch)} inputs; expected (n, d)")
            chunks.append(emb)
            if on_batch is not None:
                on_batch(len(batch))
    emb = np.concatenate(chunks) if chunks else np.zeros((0, 0))
    if not np.all(np.isfinite(emb)):
        raise ValueError("oracle returned NaN or infinite embeddings")
    return emb, np.repeat(np.arange(len(sizes)), sizes)


def draw_subsets(counts: np.ndarray, k: int, trials: int, rng: np.random.Generator) -> np.ndarray:
    """Slots (trials, T, k): per trial and task, a uniform k-subset of range(counts[t]).

    Uniform random keys with +inf on padding; the k smallest keys pick a subset without
    replacement, uniformly (the order within a subset is irrelevant to the statistics).
    """
    counts = np.asarray(counts)
    if not 1 <= k <= counts.min():  # else padding slots would be drawn
        raise ValueError(f"k must lie in [1, smallest count = {counts.min()}]; got {k}")
    max_n = int(counts.max())
    padding = ~valid_mask(counts, max_n)
    per_chunk = max(1, _CHUNK_ELEMENTS // (counts.size * max_n))
    slots = np.empty((trials, counts.size, k), dtype=np.int64)
    for first in range(0, trials, per_chunk):
        keys = rng.random((min(per_chunk, trials - first), counts.size, max_n))
        keys[:, padding] = np.inf
        slots[first : first + len(keys)] = np.argpartition(keys, k - 1, axis=-1)[..., :k]
    return slots


def challenge_grams(padded: np.ndarray, slots: np.ndarray, task_grams: np.ndarray | None = None) -> np.ndarray:
    """Gram matrices (trials, T, k, k) of the challenge sets padded[t, slots[r, t]].

    With `task_grams` (T, n, n) = padded @ padded^T, the k x k blocks are gathered from it
    (cheaper when pools are small); otherwise the k rows are gathered and multiplied.
    """
    tasks = np.arange(padded.shape[0])[:, None]
    if task_grams is not None:
        return task_grams[tasks[..., None], slots[..., :, None], slots[..., None, :]]
    rows = padded[tasks, slots]
    return rows @ np.swapaxes(rows, -1, -2)


def _task_grams_if_small(padded: np.ndarray, k: int, trials: int) -> np.ndarray | None:
    tasks, n, d = padded.shape
    if tasks * n * n > _FULL_GRAM_ELEMENTS or n * n > trials * k * d:
        return None
    return padded @ np.swapaxes(padded, -1, -2)


def _check_k(k, counts: np.ndarray, n_in_tasks: int, k_name: str) -> None:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 2:
        raise ValueError(f"{k_name} must be an integer >= 2 (statistics need a pair); got {k!r}")
    if k > counts.min():
        smallest = int(np.argmin(counts))
        side = "IN" if smallest < n_in_tasks else "OUT"
        raise ValueError(f"{k_name} = {k} exceeds the smallest {side} pool ({counts[smallest]} samples)")


@on_one_blas_thread
def challenge_scores(
    emb,
    task_index,
    n_in_tasks: int,
    k: int,
    trials: int,
    rng: np.random.Generator,
    whiten: bool = False,
    cosine: bool = False,
    whiten_lambda: float = DEFAULT_WHITEN_LAMBDA,
    k_name: str = "k",
) -> dict[str, dict[str, np.ndarray]]:
    """Score `trials` random k-subsets of every task with every registered statistic.

    Returns {statistic: {"in": (n_in, trials), "out": (n_out, trials)}} in `STATISTICS` order.
    Tasks 0..n_in_tasks-1 of `task_index` are IN, the rest OUT.  With `whiten`, each task's
    embeddings first get its leave-one-task-out transform built from all the others.  `k_name`
    is the caller's name for k in error messages (e.g. "k_strong").
    """
    emb = as_float_array(emb)
    padded, counts = pad_by_task(emb, task_index)
    if not 0 < n_in_tasks < counts.size:
        raise ValueError(f"n_in_tasks must leave at least one IN and one OUT task; got {n_in_tasks} IN of {counts.size}")
    _check_k(k, counts, n_in_tasks, k_name)
    if whiten:
        padded = whiten_padded(padded, counts, whiten_lambda, symmetric=False)  # same scores, faster
    slots = draw_subsets(counts, k, trials, rng)
    statistics = list(STATISTICS.values())
    bases = {}  # centred? -> (rows, their per-task Grams or None), only those some statistic needs
    if any(s.centred for s in statistics):
        # Shift-invariant statistics see task-centred rows: centring first avoids cancellation.
        task_means = padded.sum(axis=1) / counts[:, None]
        centred = np.where(valid_mask(counts, padded.shape[1])[..., None], padded - task_means[:, None], 0.0)
        bases[True] = (centred, _task_grams_if_small(centred, k, trials))
    if not all(s.centred for s in statistics):
        bases[False] = (padded, _task_grams_if_small(padded, k, trials))
    d = padded.shape[-1]
    per_chunk = max(1, _CHUNK_ELEMENTS // (counts.size * k * max(k, d)))
    parts = {s.name: [] for s in statistics}
    for first in range(0, trials, per_chunk):
        chunk = slots[first : first + per_chunk]
        for is_centred, (rows, task_grams) in bases.items():
            grams = challenge_grams(rows, chunk, task_grams)
            for s in statistics:
                if s.centred == is_centred:
                    parts[s.name].append(s.from_gram(grams, d=d, cosine=cosine))
    scores = {name: np.concatenate(p).T for name, p in parts.items()}
    return {name: {"in": s[:n_in_tasks], "out": s[n_in_tasks:]} for name, s in scores.items()}


def game_metrics(scores_in: np.ndarray, scores_out: np.ndarray, k: int, n_boot: int, rng) -> dict:
    """CONTRACT §4 METRICS for one game and statistic; rows of the score arrays are tasks."""
    metrics = roc_metrics(scores_in, scores_out)
    return {
        "auc": metrics["auc"],
        "auc_ci95": auc_bootstrap_ci(scores_in, scores_out, n_boot, rng),
        "tpr_at_fpr": metrics["tpr_at_fpr"],
        "percentile": metrics["percentile"],
        "k": int(k),
        "trials": int(scores_in.shape[1]),
        "num_in_tasks": int(scores_in.shape[0]),
        "num_out_tasks": int(scores_out.shape[0]),
    }


def _check_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}")
    return int(value)


def _check_flag(name: str, value) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be True or False; got {value!r}")
    return bool(value)


def run_security_games(
    oracle: Callable,
    null_oracle: Callable,
    pools: dict,
    *,
    trials: int,
    k_strong: int,
    k_weak: int,
    seed: int,
    whiten: bool = False,
    cosine: bool = False,
    whiten_lambda: float = DEFAULT_WHITEN_LAMBDA,
    bootstrap: int = DEFAULT_BOOTSTRAP,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: Callable[[str], object] = print,
    advance: Callable[[int, int], object] | None = None,
):
    """Play the strong, weak and null-control games with every registered statistic.

    pools = {"strong": (in_pools, out_pools), "weak": (in_pools, out_pools)}: strong IN pools
    hold training samples, weak IN pools held-out ones.  null_control replays the strong game,
    with the very same subsets, against `null_oracle` (the untrained encoder).  Each game
    whitens with its own pooled IN and OUT embeddings.  Returns (results, raw_scores):
    results[statistic][game] is CONTRACT §4 METRICS, raw_scores[statistic][game] = {"in", "out"}.
    ValueError messages start with the offending parameter's name (k is checked per game by
    `challenge_scores`, against the pools).  `progress(message)` gets a line per game;
    `advance(done, total)`, if given, the samples embedded so far of all the games will embed.
    """
    trials = _check_int("trials", trials)
    bootstrap = _check_int("bootstrap", bootstrap)
    batch_size = _check_int("batch_size", batch_size)
    whiten, cosine = _check_flag("whiten", whiten), _check_flag("cosine", cosine)
    if (isinstance(whiten_lambda, bool) or not isinstance(whiten_lambda, (int, float, np.integer, np.floating))
            or not np.isfinite(whiten_lambda) or whiten_lambda < 0):
        raise ValueError(f"whiten_lambda must be a finite number >= 0; got {whiten_lambda!r}")
    whiten_lambda = float(whiten_lambda)
    subset_seed_strong, subset_seed_weak, bootstrap_seed = np.random.SeedSequence(seed).spawn(3)
    bootstrap_rng = np.random.default_rng(bootstrap_seed)
    plan = {
        "strong": (oracle, pools["strong"], k_strong, "k_strong", subset_seed_strong),
        "weak": (oracle, pools["weak"], k_weak, "k_weak", subset_seed_weak),
        "null_control": (null_oracle, pools["strong"], k_strong, "k_strong", subset_seed_strong),
    }
    embedded = {}  # (oracle, pool list) -> embeddings, so shared OUT pools are queried once

    def key_of(query, pool_list):
        return id(query), tuple(id(p) for p in pool_list)

    to_embed = {key_of(query, pool_list): sum(len(p) for p in pool_list)
                for query, sides, *_ in plan.values() for pool_list in sides}
    work = {"done": 0, "total": sum(to_embed.values())}

    def count(n: int) -> None:
        work["done"] += n
        advance(work["done"], work["total"])

    def embed(query, pool_list):
        key = key_of(query, pool_list)
        if key not in embedded:
            embedded[key] = embed_pools(query, pool_list, batch_size, on_batch=count if advance else None)[0]
        return embedded[key]

    results, raw_scores = {}, {}
    for game, (query, (in_pools, out_pools), k, k_name, subset_seed) in plan.items():
        started = time.perf_counter()
        emb = np.concatenate((embed(query, in_pools), embed(query, out_pools)))
        sizes = [len(p) for p in [*in_pools, *out_pools]]
        scores = challenge_scores(
            emb, np.repeat(np.arange(len(sizes)), sizes), len(in_pools), k, trials,
            np.random.default_rng(subset_seed), whiten, cosine, whiten_lambda, k_name,
        )
        for name, sides in scores.items():
            raw_scores.setdefault(name, {})[game] = sides
            results.setdefault(name, {})[game] = game_metrics(sides["in"], sides["out"], k, bootstrap, bootstrap_rng)
        aucs = ", ".join(f"{name} AUC {results[name][game]['auc']:.3f}" for name in scores)
        progress(
            f"attack {game:>12}: {len(in_pools)} IN + {len(out_pools)} OUT tasks x {trials} trials, "
            f"k={k}: {aucs} ({time.perf_counter() - started:.1f} s)"
        )
    return results, raw_scores


def task_mean_scores(raw_scores: dict) -> dict:
    """Each task's mean score over its trials, {statistic: {game: {"in": (n_in,), "out": (n_out,)}}}:
    which tasks look IN, from ``run_security_games``'s raw scores (rows are tasks)."""
    return {name: {game: {side: np.asarray(scores, dtype=np.float64).mean(axis=1) for side, scores in sides.items()}
                   for game, sides in games.items()} for name, games in raw_scores.items()}
