"""Which tasks take part in a round: a function of (seed, round) alone.

Seeding each round on its own (instead of drawing from one running generator) lets
every engine, and a resumed run, pick the same tasks in the same round. Tasks are
identified by partition id, never by Flower's random node ids.
"""
from __future__ import annotations

import torch

from strategies._checks import is_real, shown


def round_generator(seed: int, server_round: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 7_919 + server_round)


def sample_fixed(num_tasks: int, tasks_per_round: int, seed: int, server_round: int) -> list[int]:
    """Exactly ``tasks_per_round`` distinct partition ids, uniformly, sorted."""
    perm = torch.randperm(num_tasks, generator=round_generator(seed, server_round))
    return sorted(perm[:tasks_per_round].tolist())


def sample_poisson(num_tasks: int, rate: float, seed: int, server_round: int) -> list[int]:
    """Each partition id independently with probability ``rate`` (DP's amplification needs this)."""
    if not (is_real(rate) and 0.0 <= rate <= 1.0):
        raise ValueError(f"rate must be in [0, 1]; got {shown(rate)}")
    keep = torch.rand(num_tasks, generator=round_generator(seed, server_round)) < rate
    return torch.nonzero(keep).flatten().tolist()


def sample_round(num_tasks: int, tasks_per_round: int, seed: int, server_round: int, warm_start: bool,
                 dp_enabled: bool) -> list[int]:
    """The round's tasks, as every engine picks them.

    Warm-start rounds do not touch the encoder, so they sample a fixed number; DP
    training rounds sample by Poisson at q = tasks_per_round / num_tasks, which is what
    the accountant's subsampled-Gaussian analysis assumes.
    """
    if dp_enabled and not warm_start:
        return sample_poisson(num_tasks, tasks_per_round / num_tasks, seed, server_round)
    return sample_fixed(num_tasks, tasks_per_round, seed, server_round)


def noise_generator(seed: int, server_round: int) -> torch.Generator:
    """The generator for a round's DP noise (seeded apart from sampling)."""
    return torch.Generator().manual_seed(seed * 104_729 + server_round + 1_000_000_007)
