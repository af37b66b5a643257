"""Leave-one-task-out whitening of embeddings (CONTRACT §5, paper Appendix A.7.1).

For each task t, the mean m_t and unbiased covariance Q_t come from every OTHER task's
embeddings, so the transform never depends on the challenge task's own data:
    W_t = (Q_t + lambda * tr(Q_t)/d * I)^(-1/2),   e -> W_t (e - m_t).
All T leave-one-out moments come from pooled sufficient statistics (counts, sums, sums of
outer products) minus the task's own, in O(T d^2) instead of T re-concatenations.
"""

from __future__ import annotations

import numpy as np

from .blas import on_one_blas_thread
from .grouping import pad_by_task, slot_within_task, valid_mask

DEFAULT_WHITEN_LAMBDA = 1e-3


def leave_one_task_out_moments(padded: np.ndarray, counts: np.ndarray):
    """Per-task (mean (T, d), unbiased covariance (T, d, d)) of all OTHER tasks' rows.

    `padded` (T, max_n, d) / `counts` (T,) as from `pad_by_task`.  Sums are taken around the
    global mean, which leaves the covariance unchanged but avoids cancellation in
    sum(x x^T) - n m m^T when embeddings share a large offset.
    """
    padded = np.asarray(padded, dtype=np.float64)
    counts = np.asarray(counts, dtype=np.int64)
    others = counts.sum() - counts
    if np.any(others < 2):
        raise ValueError("counts must leave at least 2 embeddings outside every task (whitening estimates a covariance)")
    mask = valid_mask(counts, padded.shape[1])[..., None]
    centre = padded.sum(axis=(0, 1)) / counts.sum()
    centred = np.where(mask, padded - centre, 0.0)
    task_sums = centred.sum(axis=1)
    other_means = (task_sums.sum(axis=0) - task_sums) / others[:, None]
    scatter = np.swapaxes(centred, 1, 2) @ centred  # per-task sums of outer products ...
    np.subtract(scatter.sum(axis=0), scatter, out=scatter)  # ... turned into the other tasks' sums
    scatter -= (others[:, None, None] * other_means[:, :, None]) * other_means[:, None, :]
    scatter /= (others - 1)[:, None, None]
    return other_means + centre, scatter


def _regularised(cov: np.ndarray, lam: float) -> np.ndarray:
    """Q + lam * tr(Q)/d * I for a batch of covariances (..., d, d)."""
    if lam < 0:
        raise ValueError(f"lam (the whitening ridge) must be >= 0; got {lam}")
    d = cov.shape[-1]
    ridge = lam * np.trace(cov, axis1=-2, axis2=-1) / d
    return cov + ridge[..., None, None] * np.eye(d)


def regularised_inverse_sqrt(cov: np.ndarray, lam: float = DEFAULT_WHITEN_LAMBDA) -> np.ndarray:
    """(Q + lam * tr(Q)/d * I)^(-1/2) for a batch of symmetric PSD matrices Q (..., d, d).

    Symmetric inverse square root by batched eigh.  Eigenvalues are floored at a tiny
    multiple of the largest so that lam = 0 on a singular Q stays finite.
    """
    regularised = _regularised(cov, lam)
    d = cov.shape[-1]
    eigenvalues, eigenvectors = np.linalg.eigh(regularised)
    floor = eigenvalues[..., -1:] * d * np.finfo(np.float64).eps
    eigenvalues = np.maximum(eigenvalues, np.maximum(floor, np.finfo(np.float64).tiny))
    return (eigenvectors * eigenvalues[..., None, :] ** -0.5) @ np.swapaxes(eigenvectors, -1, -2)


def _cholesky_whitened(centred: np.ndarray, covs: np.ndarray, lam: float):
    """Rows of `centred` (T, n, d) mapped by L_t^(-1); None if some Sigma_t is not positive definite."""
    try:
        factors = np.linalg.cholesky(_regularised(covs, lam))
    except np.linalg.LinAlgError:
        return None
    return np.swapaxes(np.linalg.solve(factors, np.swapaxes(centred, -1, -2)), -1, -2)


@on_one_blas_thread
def whiten_padded(padded: np.ndarray, counts: np.ndarray, lam: float = DEFAULT_WHITEN_LAMBDA, symmetric: bool = True):
    """Apply each task's leave-one-task-out transform to its own rows; padding stays zero.

    symmetric=True applies W = Sigma^(-1/2) exactly (CONTRACT §5).  symmetric=False applies
    L^(-1), Sigma = L L^T (Cholesky), which equals U W for an orthogonal U: every Gram matrix,
    hence both attack statistics, is unchanged, and a batched Cholesky solve is far cheaper
    and steadier than batched eigh (which can stall for seconds when BLAS threads contend).
    """
    means, covs = leave_one_task_out_moments(padded, counts)
    centred = padded - means[:, None, :]
    whitened = None if symmetric else _cholesky_whitened(centred, covs, lam)
    if whitened is None:
        whitened = centred @ regularised_inverse_sqrt(covs, lam)  # W symmetric: rows e W = (W e)^T
    return np.where(valid_mask(counts, padded.shape[1])[..., None], whitened, 0.0)


def whiten_by_task(emb, task_index, lam: float = DEFAULT_WHITEN_LAMBDA) -> np.ndarray:
    """Flat-array form of `whiten_padded`: emb (N, d), task_index (N,) -> whitened (N, d)."""
    emb = np.asarray(emb, dtype=np.float64)
    task_index = np.asarray(task_index, dtype=np.int64)
    padded, counts = pad_by_task(emb, task_index)
    return whiten_padded(padded, counts, lam)[task_index, slot_within_task(task_index)]
