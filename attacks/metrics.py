"""ROC summaries of a task-inference attack (CONTRACT §5; paper Appendix A.4).

IN is predicted when score > t.  Every (trial, task) point is pooled into one ROC; the AUC's
confidence interval resamples tasks, each resampled task keeping all of its trials.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np

from .blas import on_one_blas_thread

FPR_LEVELS = ("0.001", "0.01", "0.1")
PERCENTILES = ("50", "75", "90")


def _scores(x, name: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64).ravel()
    if x.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} contains NaN or infinite scores")
    return x


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of a 1-d array, tied values sharing the mean of their ranks."""
    order = np.argsort(values, kind="stable")
    sorted_values = values[order]
    starts_group = np.concatenate(([True], sorted_values[1:] != sorted_values[:-1]))
    group = np.cumsum(starts_group) - 1
    first = np.flatnonzero(starts_group)
    last = np.concatenate((first[1:], [values.size])) - 1
    ranks = np.empty(values.size)
    ranks[order] = (first + last)[group] / 2.0 + 1.0
    return ranks


def mann_whitney_auc(scores_in, scores_out) -> float:
    """P(IN score > OUT score) + P(equal)/2 over all (IN, OUT) pairs, via one joint ranking."""
    x, y = _scores(scores_in, "scores_in"), _scores(scores_out, "scores_out")
    rank_sum_in = average_ranks(np.concatenate((x, y)))[: x.size].sum()
    u_statistic = rank_sum_in - x.size * (x.size + 1) / 2.0
    return float(u_statistic / (x.size * y.size))


def threshold_at_fpr(scores_out: np.ndarray, alpha: str | float) -> float:
    """The (floor(alpha * n_out) + 1)-th largest OUT score.

    The floor uses alpha's exact decimal value, so 0.1 * 70 is 7 and not 7.000000000000001.
    """
    alpha_exact = Fraction(str(alpha))
    if not 0 <= alpha_exact < 1:
        raise ValueError(f"alpha must lie in [0, 1); got {alpha}")
    rank_from_top = int(alpha_exact * scores_out.size)  # floor, exactly
    return float(np.sort(scores_out)[scores_out.size - 1 - rank_from_top])


def roc_metrics(scores_in, scores_out) -> dict:
    """auc, tpr_at_fpr {"0.001","0.01","0.1"} and percentile {"50","75","90"} (CONTRACT §5).

    Inputs of any shape are flattened, pooling all (trial, task) points.
    """
    x, y = _scores(scores_in, "scores_in"), _scores(scores_out, "scores_out")
    tpr_at_fpr = {level: float(np.mean(x > threshold_at_fpr(y, level))) for level in FPR_LEVELS}
    pooled = np.concatenate((x, y))
    percentile = {}
    for q in PERCENTILES:
        threshold = np.percentile(pooled, float(q))
        tpr, fpr = float(np.mean(x > threshold)), float(np.mean(y > threshold))
        percentile[q] = {"tpr": tpr, "fpr": fpr, "balanced_accuracy": (tpr + 1.0 - fpr) / 2.0}
    return {"auc": mann_whitney_auc(x, y), "tpr_at_fpr": tpr_at_fpr, "percentile": percentile}


def _out_before_in_counts(is_in: np.ndarray, task: np.ndarray, n_in_tasks: int, n_out_tasks: int) -> np.ndarray:
    """C[a, b] = #(IN point of task a, OUT point of task b) with the OUT point earlier in the sequence.

    The sequence is cut into blocks of s points.  Pairs in different blocks follow from
    per-block task counts (one matrix product with an exclusive cumsum over blocks); pairs in
    the same block are enumerated.  Cost ~ n_in n_out P/s + P s instead of P^2.
    """
    size = int(np.clip(round(np.sqrt(n_in_tasks * n_out_tasks) / 8), 8, 256))
    blocks = -(-is_in.size // size)
    side = np.full(blocks * size, 2, dtype=np.int8)  # 0 IN, 1 OUT, 2 padding
    side[: is_in.size] = np.where(is_in, 0, 1)
    task_padded = np.zeros(blocks * size, dtype=np.int64)
    task_padded[: is_in.size] = task
    block_of = np.arange(blocks * size) // size

    def per_block_counts(which: int, n_tasks: int) -> np.ndarray:
        chosen = side == which
        flat = task_padded[chosen] * blocks + block_of[chosen]
        return np.bincount(flat, minlength=n_tasks * blocks).reshape(n_tasks, blocks).astype(np.float64)

    in_counts, out_counts = per_block_counts(0, n_in_tasks), per_block_counts(1, n_out_tasks)
    across = in_counts @ (np.cumsum(out_counts, axis=1) - out_counts).T  # OUT in strictly earlier blocks
    later, earlier = np.tril_indices(size, -1)
    side, task_padded = side.reshape(blocks, size), task_padded.reshape(blocks, size)
    block, pair = np.nonzero((side[:, later] == 0) & (side[:, earlier] == 1))
    codes = task_padded[block, later[pair]] * n_out_tasks + task_padded[block, earlier[pair]]
    within = np.bincount(codes, minlength=n_in_tasks * n_out_tasks).reshape(n_in_tasks, n_out_tasks)
    return across + within


def task_pair_u_matrix(scores_in, scores_out) -> np.ndarray:
    """U[a, b] = sum over IN task a's and OUT task b's trials of [x > y] + [x == y]/2.

    scores_in (n_in_tasks, trials_in), scores_out (n_out_tasks, trials_out).  In the sequence
    of all scores sorted ascending, OUT-before-IN pairs count [x > y] when ties put IN first,
    and [x >= y] when ties put OUT first; U is their mean (the second sort only if IN and OUT
    share a value).
    """
    x_tasks = np.asarray(scores_in, dtype=np.float64)
    y_tasks = np.asarray(scores_out, dtype=np.float64)
    for name, array in (("scores_in", x_tasks), ("scores_out", y_tasks)):
        if array.ndim != 2:
            raise ValueError(f"{name} must be a (tasks, trials) array; got shape {array.shape}")
    (n_in_tasks, trials_in), (n_out_tasks, trials_out) = x_tasks.shape, y_tasks.shape
    in_part = (x_tasks.ravel(), np.ones(x_tasks.size, bool), np.arange(x_tasks.size) // trials_in)
    out_part = (y_tasks.ravel(), np.zeros(y_tasks.size, bool), np.arange(y_tasks.size) // trials_out)

    def sorted_sequence(first, second):  # a stable sort keeps `first` ahead among equal values
        values, is_in, task = (np.concatenate(pair) for pair in zip(first, second))
        order = np.argsort(values, kind="stable")
        return values[order], is_in[order], task[order]

    values, is_in, task = sorted_sequence(in_part, out_part)
    strictly_greater = _out_before_in_counts(is_in, task, n_in_tasks, n_out_tasks)
    if not np.any((values[1:] == values[:-1]) & (is_in[1:] != is_in[:-1])):
        return strictly_greater
    _, is_in, task = sorted_sequence(out_part, in_part)
    return (strictly_greater + _out_before_in_counts(is_in, task, n_in_tasks, n_out_tasks)) / 2.0


def _resample_counts(n_items: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """(n_boot, n_items): how often each item is drawn in n_items draws with replacement."""
    draws = rng.integers(0, n_items, size=(n_boot, n_items)) + n_items * np.arange(n_boot)[:, None]
    return np.bincount(draws.ravel(), minlength=n_boot * n_items).reshape(n_boot, n_items)


def bootstrap_aucs(u_matrix: np.ndarray, trials_in: int, trials_out: int, n_boot: int, rng) -> np.ndarray:
    """AUC of `n_boot` resamples of tasks (with replacement), IN and OUT independently.

    A resample is a pair of count vectors c_in, c_out (how often each task was drawn); its AUC is
    c_in^T U c_out / (n_in trials_in * n_out trials_out), so nothing is re-sorted.
    """
    n_in_tasks, n_out_tasks = u_matrix.shape
    counts_in = _resample_counts(n_in_tasks, n_boot, rng).astype(np.float64)
    counts_out = _resample_counts(n_out_tasks, n_boot, rng).astype(np.float64)
    pair_wins = np.einsum("bi,bi->b", counts_in @ u_matrix, counts_out)
    return pair_wins / (n_in_tasks * trials_in * n_out_tasks * trials_out)


@on_one_blas_thread
def auc_bootstrap_ci(scores_in, scores_out, n_boot: int = 1000, rng=None) -> list[float]:
    """95% percentile-bootstrap interval [lo, hi] of the AUC, resampling tasks.

    scores_in (n_in_tasks, trials), scores_out (n_out_tasks, trials): rows are tasks.
    """
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1 (bootstrap resamples); got {n_boot}")
    rng = np.random.default_rng(rng)
    u_matrix = task_pair_u_matrix(scores_in, scores_out)
    aucs = bootstrap_aucs(u_matrix, np.shape(scores_in)[1], np.shape(scores_out)[1], n_boot, rng)
    low, high = np.percentile(aucs, [2.5, 97.5])
    return [float(low), float(high)]


def roc_curve_points(scores_in, scores_out):
    """(fpr, tpr) arrays of the empirical ROC, one point per distinct threshold, from (0, 0)."""
    x, y = _scores(scores_in, "scores_in"), _scores(scores_out, "scores_out")
    scores = np.concatenate((x, y))
    is_in = np.concatenate((np.ones(x.size), np.zeros(y.size)))
    order = np.argsort(-scores, kind="stable")
    scores, is_in = scores[order], is_in[order]
    last_of_group = np.concatenate((scores[1:] != scores[:-1], [True]))
    true_pos = np.cumsum(is_in)[last_of_group]
    false_pos = np.cumsum(1.0 - is_in)[last_of_group]
    return np.concatenate(([0.0], false_pos / y.size)), np.concatenate(([0.0], true_pos / x.size))
