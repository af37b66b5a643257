"""Task-level DP aggregation (CONTRACT §7): clipping, noise scale, Poisson sampling."""

import math

import pytest
import torch

from strategies.dp import (
    clip_updates,
    clipped_fraction,
    dp_aggregate,
    flatten_tensors,
    noised_sum,
    poisson_sample,
    unflatten_like,
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


def test_poisson_sampling_rate_is_right_on_average():
    n, q, rounds = 1000, 0.05, 400
    g = _gen(3)
    counts = torch.zeros(n)
    sizes = []
    for _ in range(rounds):
        ids = poisson_sample(n, q, g)
        assert ids.dtype == torch.long
        assert torch.equal(ids, ids.unique())  # sorted ascending, no repeats
        assert ids.numel() == 0 or (0 <= ids.min() and ids.max() < n)
        counts[ids] += 1
        sizes.append(ids.numel())
    sizes = torch.tensor(sizes, dtype=torch.float64)
    # mean sample size n*q, with its standard error sqrt(n q (1-q) / rounds) ~ 0.34
    assert abs(sizes.mean().item() - n * q) < 4 * math.sqrt(n * q * (1 - q) / rounds)
    # sizes vary binomially (Poisson sampling, not a fixed tasks_per_round)
    assert sizes.var().item() == pytest.approx(n * q * (1 - q), rel=0.2)
    # every task is included at rate q: per-task frequencies are Binomial(rounds, q)
    freq = counts / rounds
    assert (freq - q).abs().max().item() < 5 * math.sqrt(q * (1 - q) / rounds)


def test_poisson_sampling_is_reproducible_with_the_same_seed():
    def draws(seed):
        g = _gen(seed)
        return [poisson_sample(500, 0.1, g) for _ in range(20)]

    a, b, c = draws(11), draws(11), draws(12)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_poisson_sampling_edge_rates():
    assert poisson_sample(50, 0.0, _gen(0)).numel() == 0
    assert torch.equal(poisson_sample(50, 1.0, _gen(0)), torch.arange(50))
    with pytest.raises(ValueError):
        poisson_sample(50, 1.5, _gen(0))


def test_invalid_inputs_are_rejected():
    u = _updates_with_norms([1.0, 2.0])
    with pytest.raises(ValueError, match="non-finite"):
        clip_updates(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), 1.0)
    with pytest.raises(ValueError, match="dp.clipping_norm"):
        clip_updates(u, 0.0)
    with pytest.raises(ValueError, match="dp.noise_multiplier"):
        dp_aggregate(u, 1.0, -1.0, 2.0, _gen(0))
    with pytest.raises(ValueError, match="expected_tasks"):
        dp_aggregate(u, 1.0, 1.0, 0.0, _gen(0))
    with pytest.raises(ValueError, match=r"\(n, p\)"):
        clip_updates(torch.ones(3), 1.0)


def test_clipped_fraction():
    assert clipped_fraction(torch.tensor([0.5, 1.0, 1.5, 3.0]), 1.0) == 0.5
    assert clipped_fraction(torch.empty(0), 1.0) == 0.0


def test_flatten_and_unflatten_round_trip():
    g = _gen(0)
    params = {
        "w": torch.randn(3, 4, generator=g),
        "b": torch.randn(5, generator=g, dtype=torch.float64),
        "s": torch.randn((), generator=g),
    }
    vec = flatten_tensors(params)
    assert vec.shape == (12 + 5 + 1,)
    back = unflatten_like(vec, params)
    assert list(back) == ["w", "b", "s"]
    for k in params:
        assert back[k].shape == params[k].shape and back[k].dtype == params[k].dtype
        torch.testing.assert_close(back[k], params[k])
    as_list = unflatten_like(vec, list(params.values()))
    assert isinstance(as_list, list) and torch.equal(flatten_tensors(as_list), vec)
    with pytest.raises(ValueError):
        unflatten_like(vec[:-1], params)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_updates_with_cpu_generator_match_cpu():
    u = _updates_with_norms([0.5, 2.0, 1.2]).float()
    cpu = dp_aggregate(u, 1.0, 1.1, 3.0, _gen(7)).update
    gpu = dp_aggregate(u.cuda(), 1.0, 1.1, 3.0, _gen(7)).update
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu)
