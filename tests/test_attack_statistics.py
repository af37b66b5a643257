"""The two task-inference statistics against direct loop-based definitions (CONTRACT §5)."""

import itertools

import numpy as np
import pytest
import torch

from attacks import inner_product_statistic, variance_statistic
from attacks.statistics import inner_product_from_gram, variance_from_gram


def loop_variance(E):
    k, d = E.shape
    mean = sum(E[i] for i in range(k)) / k
    covariance = sum(np.outer(E[i] - mean, E[i] - mean) for i in range(k)) / (k - 1)
    return np.trace(covariance) / d


def loop_inner_product(E, cosine=False):
    rows = [e / np.linalg.norm(e) if cosine and np.linalg.norm(e) > 0 else e for e in E]
    pairs = list(itertools.combinations(range(len(rows)), 2))
    return sum(abs(float(rows[i] @ rows[j])) for i, j in pairs) / len(pairs)


def loop_over_batch(function, E, **kwargs):
    flat = E.reshape(-1, *E.shape[-2:])
    return np.array([function(e, **kwargs) for e in flat]).reshape(E.shape[:-2])


@pytest.mark.parametrize("shape", [(6, 4), (3, 5, 6, 4), (2, 2, 7)])
def test_variance_matches_unbiased_covariance_trace(shape):
    E = np.random.default_rng(0).normal(2.0, 1.5, size=shape)
    result = variance_statistic(E)
    assert result.shape == shape[:-2]
    np.testing.assert_allclose(result, loop_over_batch(loop_variance, E), rtol=1e-12)


@pytest.mark.parametrize("cosine", [False, True])
@pytest.mark.parametrize("shape", [(6, 4), (3, 5, 8, 3), (2, 7)])
def test_inner_product_matches_pair_loop(shape, cosine):
    E = np.random.default_rng(1).normal(0.3, 1.0, size=shape)
    result = inner_product_statistic(E, cosine=cosine)
    assert result.shape == shape[:-2]
    np.testing.assert_allclose(result, loop_over_batch(loop_inner_product, E, cosine=cosine), rtol=1e-12)


def test_cosine_is_scale_invariant_and_bounded():
    E = np.random.default_rng(2).normal(size=(5, 9, 6))
    scales = np.random.default_rng(3).uniform(0.1, 10, size=(5, 9, 1))
    cos = inner_product_statistic(E, cosine=True)
    np.testing.assert_allclose(inner_product_statistic(E * scales, cosine=True), cos, rtol=1e-12)
    assert np.all((cos >= 0) & (cos <= 1))


def test_cosine_zero_row_contributes_zero_not_nan():
    E = np.array([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0]])
    # pairs: (0,1) -> 0, (0,2) -> 0, (1,2) -> cos 1
    assert inner_product_statistic(E, cosine=True) == pytest.approx(1.0 / 3.0)


def test_variance_known_value_and_shift_invariance():
    E = np.array([[0.0, 0.0], [2.0, 4.0]])  # per-coordinate unbiased variances 2 and 8
    assert variance_statistic(E) == pytest.approx(5.0)
    assert variance_statistic(E + 1e6) == pytest.approx(5.0)


def test_torch_input_accepted():
    E = torch.randn(4, 5, 3, generator=torch.Generator().manual_seed(0))
    np.testing.assert_allclose(variance_statistic(E), variance_statistic(E.numpy().astype(np.float64)), rtol=1e-6)
    np.testing.assert_allclose(inner_product_statistic(E), inner_product_statistic(E.numpy().astype(np.float64)), rtol=1e-6)


@pytest.mark.parametrize("statistic", [variance_statistic, inner_product_statistic])
def test_single_embedding_is_rejected(statistic):
    with pytest.raises(ValueError, match="k >= 2"):
        statistic(np.ones((1, 3)))


@pytest.mark.parametrize("cosine", [False, True])
def test_gram_forms_equal_embedding_forms(cosine):
    E = np.random.default_rng(4).normal(1.0, 1.0, size=(3, 4, 5, 7))
    E[0, 0, 0] = 0.0  # a zero row exercises the cosine guard
    G = E @ np.swapaxes(E, -1, -2)
    np.testing.assert_allclose(variance_from_gram(G, 7), variance_statistic(E), rtol=1e-10)
    np.testing.assert_allclose(inner_product_from_gram(G, cosine), inner_product_statistic(E, cosine), rtol=1e-12)
