"""Task-inference test statistics over a challenge set of embeddings (CONTRACT §5), and their registry.

Every statistic is a function of the challenge set's Gram matrix G = E E^T alone.  The public
functions take embeddings; the `*_from_gram` variants take Gram matrices, so the security game
can gather k x k blocks of one precomputed per-task Gram matrix instead of multiplying a fresh
k x d challenge set in every trial.

`STATISTICS` is the one list of attacks: the game scores, the results, the report and the
sweep's columns all iterate over it, so a new statistic is one `register_statistic` call here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np


def as_float_array(x) -> np.ndarray:
    """Return `x` (numpy array, torch tensor or nested sequence) as a float64 numpy array."""
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def _check_challenge_shape(E: np.ndarray) -> None:
    if E.ndim < 2:
        raise ValueError(f"E must have shape (..., k, d); got {E.shape}")
    if E.shape[-2] < 2:
        raise ValueError(f"E must hold k >= 2 embeddings per challenge set; got k={E.shape[-2]}")


def variance_statistic(E) -> np.ndarray:
    """Coordinate-wise variance attack: tr(Q)/d, Q the unbiased sample covariance of E's rows.

    E has shape (..., k, d); the result has shape (...).  Computed by centring first (not from
    the Gram matrix) so that embeddings with a large common offset lose no precision.
    """
    E = as_float_array(E)
    _check_challenge_shape(E)
    k, d = E.shape[-2:]
    centred = E - E.mean(axis=-2, keepdims=True)
    return np.einsum("...kd,...kd->...", centred, centred) / ((k - 1) * d)


def unit_rows(E: np.ndarray) -> np.ndarray:
    """Scale each row of E (..., k, d) to unit L2 norm; all-zero rows stay zero."""
    norms = np.linalg.norm(E, axis=-1, keepdims=True)
    return E / np.where(norms > 0, norms, 1.0)


def inner_product_statistic(E, cosine: bool = False) -> np.ndarray:
    """Pairwise inner-product attack: mean over pairs i<j of |<e_i, e_j>|.

    E has shape (..., k, d); the result has shape (...).  With `cosine`, rows are first scaled
    to unit norm (zero rows stay zero, contributing 0 to every pair).
    """
    E = as_float_array(E)
    _check_challenge_shape(E)
    if cosine:
        E = unit_rows(E)
    return _mean_abs_off_diagonal(E @ np.swapaxes(E, -1, -2))


def _mean_abs_off_diagonal(G: np.ndarray) -> np.ndarray:
    """Mean of |G_ij| over i<j for symmetric G (..., k, k), without building pair lists."""
    k = G.shape[-1]
    abs_g = np.abs(G)
    off_diagonal_sum = abs_g.sum(axis=(-2, -1)) - np.trace(abs_g, axis1=-2, axis2=-1)
    return off_diagonal_sum / (k * (k - 1))


def variance_from_gram(G: np.ndarray, d: int) -> np.ndarray:
    """`variance_statistic` of E from G = E E^T (..., k, k): tr(Q) = (tr(G) - sum(G)/k)/(k-1).

    Exact in arithmetic; to avoid cancellation pass the Gram matrix of embeddings centred by
    any per-challenge-set constant (the statistic is shift invariant).
    """
    k = G.shape[-1]
    if k < 2:
        raise ValueError(f"G must be (..., k, k) with k >= 2; got k={k}")
    trace_q = (np.trace(G, axis1=-2, axis2=-1) - G.sum(axis=(-2, -1)) / k) / (k - 1)
    return trace_q / d


def inner_product_from_gram(G: np.ndarray, cosine: bool = False) -> np.ndarray:
    """`inner_product_statistic` of E from G = E E^T (..., k, k).

    With `cosine`, G_ij becomes G_ij / (|e_i| |e_j|), the norms read off G's diagonal; pairs
    involving a zero row count as 0, as in `unit_rows`.
    """
    if G.shape[-1] < 2:
        raise ValueError(f"G must be (..., k, k) with k >= 2; got k={G.shape[-1]}")
    if cosine:
        norms = np.sqrt(np.maximum(np.diagonal(G, axis1=-2, axis2=-1), 0.0))
        inverse = np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)
        G = G * inverse[..., :, None] * inverse[..., None, :]
    return _mean_abs_off_diagonal(G)


@dataclass(frozen=True)
class Statistic:
    """One attack statistic.

    from_gram(G, *, d, cosine) scores Gram matrices (..., k, k) of challenge sets of
    d-dimensional embeddings; on_embeddings(E, *, cosine) is the same statistic of E (..., k, d),
    the reference the game is tested against.  With `centred`, the game passes the Gram matrix
    of task-centred embeddings (less cancellation), which is only valid for statistics that a
    common shift of a challenge set leaves unchanged.  Statistics without a cosine variant ignore
    `cosine`.
    """

    name: str
    title: str
    from_gram: Callable[..., np.ndarray]
    on_embeddings: Callable[..., np.ndarray]
    centred: bool


STATISTICS: dict[str, Statistic] = {}


def register_statistic(name: str, title: str, *, from_gram: Callable, on_embeddings: Callable,
                       centred: bool) -> Statistic:
    """Add a statistic to `STATISTICS` (results and report follow registration order)."""
    if not isinstance(name, str) or not name or "/" in name:
        raise ValueError(f"name must be a non-empty string without '/' (raw-score files key on it); got {name!r}")
    if name in STATISTICS:
        raise ValueError(f"name {name!r} is already a registered statistic")
    statistic = Statistic(name, title, from_gram, on_embeddings, bool(centred))
    STATISTICS[name] = statistic
    return statistic


register_statistic(
    "variance", "Coordinate-wise variance attack", centred=True,
    from_gram=lambda G, *, d, cosine=False: variance_from_gram(G, d),
    on_embeddings=lambda E, *, cosine=False: variance_statistic(E),
)
register_statistic(
    "inner_product", "Pairwise inner-product attack", centred=False,
    from_gram=lambda G, *, d, cosine=False: inner_product_from_gram(G, cosine),
    on_embeddings=lambda E, *, cosine=False: inner_product_statistic(E, cosine),
)
