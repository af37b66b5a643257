"""Task-level DP aggregation (CONTRACT §7): clipping, noise scale, validation.

Poisson sampling of tasks lives in strategies/sampling.py (tested in test_fedsgd.py).
"""

import math

import pytest
import torch

import strategies.dp as dp
from strategies.dp import (
    clip_updates,
    clipped_fraction,
    dp_aggregate,
    noised_sum,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _updates_with_norms(norms, p=32, seed=0) -> torch.Tensor:
    """Rows with random directions and exactly the given L2 norms."""
    g = _gen(seed)
    d = torch.randn(len(norms), p, generator=g, dtype=torch.float64)
    d = d / torch.linalg.vector_norm(d, dim=1, keepdim=True)
    return d * torch.tensor(norms, dtype=torch.float64).unsqueeze(1)


def test_rows_above_c_end_at_c_and_rows_within_c_are_untouched():
    C = 1.0
    u = _updates_with_norms([0.25, 0.999, 1.5, 40.0])
    u = torch.cat([u, torch.zeros(1, u.shape[1], dtype=u.dtype)])  # a zero update
    out = clip_updates(u, C)
    norms = torch.linalg.vector_norm(out, dim=1)
    torch.testing.assert_close(norms, torch.tensor([0.25, 0.999, 1.0, 1.0, 0.0], dtype=u.dtype))
    assert torch.equal(out[:2], u[:2])  # within C: bit-for-bit unchanged
    assert torch.equal(out[4], u[4]) and torch.isfinite(out).all()  # zero row: no NaN
    cos = torch.nn.functional.cosine_similarity(out[2:4], u[2:4], dim=1)
    torch.testing.assert_close(cos, torch.ones(2, dtype=u.dtype))  # direction kept


def test_without_noise_aggregate_is_clipped_sum_over_expected_tasks():
    C, expected = 0.5, 8.0  # 5 sampled, 8 expected: divide by 8, not by 5
    u = _updates_with_norms([0.1, 0.4, 0.6, 3.0, 0.2])
    res = dp_aggregate(u, C, 0.0, expected, _gen(0))
    torch.testing.assert_close(res.update, clip_updates(u, C).sum(0) / expected)
    assert res.num_sampled == 5 and res.clipped_fraction == pytest.approx(2 / 5)
    torch.testing.assert_close(res.norms, torch.linalg.vector_norm(u, dim=1))
    assert res.noise_std == 0.0


def test_noise_has_std_z_c_over_expected_tasks_around_the_clipped_mean():
    z, C, expected, reps = 1.3, 0.7, 8.0, 2000
    u = _updates_with_norms([0.2, 0.5, 2.0, 9.0, 0.69], p=64).float()
    target_mean = clip_updates(u, C).sum(0) / expected
    g = _gen(1)
    draws = torch.stack([dp_aggregate(u, C, z, expected, g).update for _ in range(reps)])
    sigma = z * C / expected
    resid = draws - target_mean
    # Pooled over 64 x 2000 draws the sample std is known to ~0.3%; allow 2%.
    assert resid.std().item() == pytest.approx(sigma, rel=0.02)
    # Every coordinate's mean sits at the clipped mean (5 standard errors).
    assert resid.mean(0).abs().max().item() < 5 * sigma / math.sqrt(reps)
    # Each coordinate individually has the stated std (se ~1.6% per coordinate).
    assert (resid.std(0) / sigma - 1).abs().max().item() < 0.08
    # Coordinates are independent: off-diagonal correlations are small.
    corr = torch.corrcoef(resid.T)
    assert (corr - torch.eye(64)).abs().max().item() < 5 / math.sqrt(reps)
    assert dp_aggregate(u, C, z, expected, g).noise_std == pytest.approx(sigma)


def test_empty_sample_still_releases_pure_noise():
    z, C, expected, p = 2.0, 1.0, 4.0, 20000
    res = dp_aggregate(torch.empty(0, p), C, z, expected, _gen(2))
    assert res.update.shape == (p,) and res.num_sampled == 0 and res.clipped_fraction == 0.0
    assert res.update.mean().abs().item() < 5 * (z * C / expected) / math.sqrt(p)
    assert res.update.std().item() == pytest.approx(z * C / expected, rel=0.03)


def test_noised_sum_is_sum_plus_gaussian_and_seeded():
    c = clip_updates(_updates_with_norms([0.3, 3.0, 1.0]), 1.0)
    a = noised_sum(c, 0.8, 1.0, _gen(5))
    b = noised_sum(c, 0.8, 1.0, _gen(5))
    assert torch.equal(a, b)
    assert not torch.equal(a, noised_sum(c, 0.8, 1.0, _gen(6)))
    torch.testing.assert_close(noised_sum(c, 0.0, 1.0, _gen(5)), c.sum(0))


def test_same_seed_same_aggregate():
    u = _updates_with_norms([0.5, 2.0, 1.2])
    a = dp_aggregate(u, 1.0, 1.1, 3.0, _gen(7)).update
    assert torch.equal(a, dp_aggregate(u, 1.0, 1.1, 3.0, _gen(7)).update)


def test_invalid_inputs_are_rejected():
    u = _updates_with_norms([1.0, 2.0])
    with pytest.raises(ValueError, match=r"^updates has non-finite row\(s\) \[0\]"):
        clip_updates(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), 1.0)
    with pytest.raises(ValueError, match=r"^clipping_norm must be a finite number > 0; got 0\.0$"):
        clip_updates(u, 0.0)
    with pytest.raises(ValueError, match=r"^noise_multiplier must be a finite number >= 0; got -1\.0$"):
        dp_aggregate(u, 1.0, -1.0, 2.0, _gen(0))
    with pytest.raises(ValueError, match=r"^expected_tasks \(q \* num_in_tasks\) must be a finite number > 0; got 0\.0$"):
        dp_aggregate(u, 1.0, 1.0, 0.0, _gen(0))
    with pytest.raises(ValueError, match=r"^updates must have shape \(n, p\)"):
        clip_updates(torch.ones(3), 1.0)
    with pytest.raises(ValueError, match=r"^clipped must have shape \(n, p\)"):
        noised_sum(torch.ones(3), 1.0, 1.0, _gen(0))
    with pytest.raises(TypeError, match=r"^generator must be a torch\.Generator"):
        noised_sum(u, 1.0, 1.0, 0)


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda u: clip_updates(u, math.inf), r"clipping_norm must be a finite number > 0; got inf"),
        (lambda u: clip_updates(u, math.nan), r"clipping_norm must be a finite number > 0; got nan"),
        (lambda u: noised_sum(u, math.inf, 1.0, _gen(0)), r"noise_multiplier must be a finite number >= 0; got inf"),
        (lambda u: noised_sum(u, math.nan, 1.0, _gen(0)), r"noise_multiplier must be a finite number >= 0; got nan"),
        (lambda u: noised_sum(u, 1.0, math.inf, _gen(0)), r"clipping_norm must be a finite number > 0; got inf"),
        (lambda u: dp_aggregate(u, 1.0, 1.0, math.inf, _gen(0)),
         r"expected_tasks \(q \* num_in_tasks\) must be a finite number > 0; got inf"),
        (lambda u: dp_aggregate(u, 1.0, 1.0, None, _gen(0)),
         r"expected_tasks \(q \* num_in_tasks\) must be a finite number > 0; got None"),
        (lambda u: dp_aggregate(u, 0.0, 1.0, 2.0, _gen(0)), r"clipping_norm must be a finite number > 0; got 0\.0"),
    ],
)
def test_non_finite_parameters_are_refused_by_name(call, message):
    with pytest.raises(ValueError, match="^" + message + "$"):
        call(_updates_with_norms([1.0, 2.0]))


def test_dead_helpers_are_gone():
    for name in ("poisson_sample", "flatten_tensors", "unflatten_like"):
        assert not hasattr(dp, name) and name not in dp.__all__
    assert all(hasattr(dp, name) for name in dp.__all__)


def test_clipped_fraction():
    assert clipped_fraction(torch.tensor([0.5, 1.0, 1.5, 3.0]), 1.0) == 0.5
    assert clipped_fraction(torch.empty(0), 1.0) == 0.0


def test_aggregating_per_task_parameter_dicts_matches_their_stacked_matrix():
    g = _gen(0)
    tasks = [{"w": torch.randn(3, 4, generator=g), "b": torch.randn(5, generator=g), "s": torch.randn((), generator=g)}
             for _ in range(4)]
    rows = torch.stack([torch.cat([t[k].reshape(-1) for k in ("w", "b", "s")]) for t in tasks])
    assert rows.shape == (4, 12 + 5 + 1)
    # the same matrix built parameter by parameter (the vectorised engine's stacked layout)
    stacked = torch.cat([torch.stack([t[k] for t in tasks]).reshape(4, -1) for k in ("w", "b", "s")], dim=1)
    assert torch.equal(rows, stacked)
    a = dp_aggregate(rows, 1.0, 0.7, 4.0, _gen(3)).update
    assert torch.equal(a, dp_aggregate(stacked, 1.0, 0.7, 4.0, _gen(3)).update)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_updates_with_cpu_generator_match_cpu():
    u = _updates_with_norms([0.5, 2.0, 1.2]).float()
    cpu = dp_aggregate(u, 1.0, 1.1, 3.0, _gen(7)).update
    gpu = dp_aggregate(u.cuda(), 1.0, 1.1, 3.0, _gen(7)).update
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu)
