"""Poisson task sampling (strategies.sampling.sample_poisson): the rate the DP accountant assumes.

These are the statistical checks that used to cover ``strategies.dp.poisson_sample``, now run on
the sampler every engine actually uses, which seeds each round from (seed, round) alone.
"""
import math

import pytest
import torch

from strategies.sampling import sample_poisson


def test_poisson_sampling_rate_is_right_on_average():
    n, q, rounds = 1000, 0.05, 400
    counts = torch.zeros(n)
    sizes = []
    for server_round in range(1, rounds + 1):
        ids = sample_poisson(n, q, 3, server_round)
        assert ids == sorted(set(ids))  # sorted ascending, no repeats
        assert all(isinstance(i, int) and 0 <= i < n for i in ids)
        counts[ids] += 1
        sizes.append(len(ids))
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
        return [sample_poisson(500, 0.1, seed, r) for r in range(1, 21)]

    a, b, c = draws(11), draws(11), draws(12)
    assert a == b
    assert a != c


def test_poisson_sampling_edge_rates():
    assert sample_poisson(50, 0.0, 0, 1) == []
    assert sample_poisson(50, 1.0, 0, 1) == list(range(50))
    with pytest.raises(ValueError, match=r"^rate must be in \[0, 1\]; got 1\.5$"):
        sample_poisson(50, 1.5, 0, 1)
    with pytest.raises(ValueError, match=r"^rate must be in \[0, 1\]; got nan$"):
        sample_poisson(50, math.nan, 0, 1)
