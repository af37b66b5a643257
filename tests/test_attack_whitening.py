"""Leave-one-task-out whitening (CONTRACT §5): moments from other tasks only, W = (Q + ridge)^(-1/2)."""

import numpy as np
import pytest

from attacks.grouping import pad_by_task
from attacks.whitening import leave_one_task_out_moments, regularised_inverse_sqrt, whiten_by_task, whiten_padded


def uneven_tasks(seed=0, d=4):
    """Embeddings of 6 tasks with 3..9 rows each, rows of tasks interleaved, with a large offset."""
    rng = np.random.default_rng(seed)
    counts = np.array([3, 9, 5, 4, 7, 6])
    task_index = rng.permutation(np.repeat(np.arange(counts.size), counts))
    mixing = rng.normal(size=(d, d))
    emb = rng.normal(size=(task_index.size, d)) @ mixing + 50.0 + 3.0 * task_index[:, None]
    return emb, task_index


def naive_whitening(emb, task_index, lam):
    out = np.empty_like(emb)
    d = emb.shape[1]
    for task in np.unique(task_index):
        others = emb[task_index != task]
        mean, cov = others.mean(axis=0), np.cov(others, rowvar=False, ddof=1)
        values, vectors = np.linalg.eigh(cov + lam * np.trace(cov) / d * np.eye(d))
        transform = vectors @ np.diag(values**-0.5) @ vectors.T
        out[task_index == task] = (emb[task_index == task] - mean) @ transform.T
    return out


@pytest.mark.parametrize("lam", [0.0, 1e-3, 0.5])
def test_matches_naive_concatenate_and_compute(lam):
    emb, task_index = uneven_tasks()
    np.testing.assert_allclose(whiten_by_task(emb, task_index, lam), naive_whitening(emb, task_index, lam),
                               rtol=1e-7, atol=1e-8)


def test_other_tasks_become_white_as_lambda_vanishes():
    emb, task_index = uneven_tasks(seed=1)
    padded, counts = pad_by_task(emb, task_index)
    means, covs = leave_one_task_out_moments(padded, counts)
    transforms = regularised_inverse_sqrt(covs, lam=1e-12)
    for task in range(counts.size):
        whitened_others = (emb[task_index != task] - means[task]) @ transforms[task].T
        np.testing.assert_allclose(whitened_others.mean(axis=0), 0.0, atol=1e-8)
        np.testing.assert_allclose(np.cov(whitened_others, rowvar=False), np.eye(emb.shape[1]), atol=1e-8)


def test_a_tasks_own_rows_do_not_change_its_transform():
    emb, task_index = uneven_tasks(seed=2)
    changed = emb.copy()
    own = task_index == 3
    changed[own] = np.random.default_rng(9).normal(-100.0, 20.0, size=(own.sum(), emb.shape[1]))
    moments_before = leave_one_task_out_moments(*pad_by_task(emb, task_index))
    moments_after = leave_one_task_out_moments(*pad_by_task(changed, task_index))
    np.testing.assert_allclose(moments_after[0][3], moments_before[0][3], rtol=1e-10)
    np.testing.assert_allclose(moments_after[1][3], moments_before[1][3], rtol=1e-8, atol=1e-10)
    # ... and task 3's whitened rows are the old affine map applied to the new rows.
    transform = regularised_inverse_sqrt(moments_before[1][3], 1e-3)
    expected = (changed[own] - moments_before[0][3]) @ transform.T
    np.testing.assert_allclose(whiten_by_task(changed, task_index)[own], expected, rtol=1e-7, atol=1e-9)


def test_ridge_is_relative_to_average_variance():
    cov = np.diag([4.0, 1.0, 1.0])  # tr/d = 2
    W = regularised_inverse_sqrt(cov, lam=0.5)
    np.testing.assert_allclose(W, np.diag(np.array([5.0, 2.0, 2.0]) ** -0.5), atol=1e-12)


def test_rejects_negative_lambda_and_too_little_data():
    with pytest.raises(ValueError, match="^lam "):
        regularised_inverse_sqrt(np.eye(2), lam=-1.0)
    with pytest.raises(ValueError, match="^counts must leave at least 2"):
        whiten_by_task(np.ones((3, 2)), np.array([0, 0, 1]))


@pytest.mark.parametrize("lam", [0.0, 1e-3])
def test_cholesky_form_preserves_every_within_task_gram_matrix(lam):
    emb, task_index = uneven_tasks(seed=3)
    padded, counts = pad_by_task(emb, task_index)
    symmetric = whiten_padded(padded, counts, lam, symmetric=True)
    cholesky = whiten_padded(padded, counts, lam, symmetric=False)
    assert not np.allclose(symmetric, cholesky)  # a different map ...
    np.testing.assert_allclose(cholesky @ np.swapaxes(cholesky, 1, 2), symmetric @ np.swapaxes(symmetric, 1, 2),
                               rtol=1e-8, atol=1e-9)  # ... with the same Gram matrices
