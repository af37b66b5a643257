"""Task-level differential privacy for the shared encoder (CONTRACT §7).

The unit of privacy is a *task*: each round every IN task is sampled independently
with rate q (Poisson sampling, in ``strategies.sampling``, which is what the
subsampled-Gaussian accountant assumes), each sampled task's whole encoder update is
clipped to L2 norm C, the clipped updates are summed, N(0, (z*C)^2) noise is added per
coordinate, and the sum is divided by the *expected* number of sampled tasks q*N (a constant, so the
divisor itself reveals nothing about who was sampled).

Everything here is a pure function of tensors: updates arrive as one (n, p)
matrix (row i = task i's flattened update, rows in partition-id order), and all
randomness comes from an explicit ``torch.Generator``. No Flower import.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from strategies._checks import finite, is_real, shown

__all__ = [
    "DPAggregate",
    "clip_updates",
    "clipped_fraction",
    "dp_aggregate",
    "noised_sum",
    "update_norms",
]


def _check_generator(generator: torch.Generator) -> torch.Generator:
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator; got {type(generator).__name__}")
    return generator


def update_norms(updates: Tensor) -> Tensor:
    """L2 norm of each row of an (n, p) update matrix, shape (n,)."""
    if updates.dim() != 2:
        raise ValueError(f"updates must have shape (n, p); got {tuple(updates.shape)}")
    return torch.linalg.vector_norm(updates, dim=1)


def _clip_factors(updates: Tensor, clipping_norm: float) -> tuple[Tensor, Tensor]:
    """(per-row factors min(1, C/||row||), pre-clip norms)."""
    finite("clipping_norm", clipping_norm, strict=True)
    norms = update_norms(updates)
    bad = ~torch.isfinite(norms)
    if bool(bad.any()):
        # A NaN/inf update cannot be scaled to a finite norm: the sensitivity bound breaks.
        rows = torch.nonzero(bad).flatten().tolist()
        raise ValueError(f"updates has non-finite row(s) {rows[:10]}: no scaling bounds them by clipping_norm")
    # A zero row gives C/0 = inf -> factor 1, so it stays zero (no NaN).
    return (clipping_norm / norms).clamp(max=1.0).to(updates.dtype), norms


def _clip(updates: Tensor, clipping_norm: float) -> tuple[Tensor, Tensor]:
    """(clipped updates, pre-clip norms); rows scaled by min(1, C/||row||)."""
    factors, norms = _clip_factors(updates, clipping_norm)
    return updates * factors.unsqueeze(1), norms


def clip_updates(updates: Tensor, clipping_norm: float) -> Tensor:
    """Scale each row by min(1, C/||row||) so every task's update has L2 norm <= C.

    This bounds one task's contribution to the sum (the sensitivity) by C. Rows already
    within C are returned unchanged; zero rows stay zero. Raises ValueError on
    non-finite rows, which no scaling can bound.
    """
    return _clip(updates, clipping_norm)[0]


def clipped_fraction(norms: Tensor, clipping_norm: float) -> float:
    """Fraction of updates whose pre-clip norm exceeded C (0.0 for an empty round)."""
    return float((norms > clipping_norm).float().mean()) if norms.numel() else 0.0


def noised_sum(
    clipped: Tensor, noise_multiplier: float, clipping_norm: float, generator: torch.Generator
) -> Tensor:
    """Sum of the (already clipped) rows plus N(0, (z*C)^2) noise on every coordinate.

    The Gaussian mechanism for a sum of sensitivity C. With n == 0 (an empty Poisson
    sample) the release is pure noise: skipping it would reveal that nobody was sampled.
    Noise is drawn on the generator's device and moved to ``clipped``'s, so one seed gives
    the same noise wherever the updates live.
    """
    if clipped.dim() != 2:
        raise ValueError(f"clipped must have shape (n, p); got {tuple(clipped.shape)}")
    finite("noise_multiplier", noise_multiplier)
    finite("clipping_norm", clipping_norm, strict=True)
    _check_generator(generator)
    dtype = clipped.dtype if clipped.is_floating_point() else torch.get_default_dtype()
    total = clipped.sum(dim=0, dtype=dtype)
    if noise_multiplier == 0:
        return total
    noise = torch.randn(total.shape[0], generator=generator, device=generator.device, dtype=dtype)
    return total + noise.to(total.device) * (noise_multiplier * clipping_norm)


class DPAggregate(NamedTuple):
    """One round's private release: ``update`` (p,) plus diagnostics that are not released.

    ``norms`` are the pre-clip update norms (n,). They are for local metrics only: they
    are not privatized, so do not publish them per task.
    """

    update: Tensor
    norms: Tensor
    noise_std: float
    clipping_norm: float

    @property
    def num_sampled(self) -> int:
        return int(self.norms.shape[0])

    @property
    def clipped_fraction(self) -> float:
        return clipped_fraction(self.norms, self.clipping_norm)


def dp_aggregate(
    updates: Tensor,
    clipping_norm: float,
    noise_multiplier: float,
    expected_tasks: float,
    generator: torch.Generator,
) -> DPAggregate:
    """Clip each task's update to C, add N(0,(zC)^2) to the sum, divide by q*N.

    ``updates`` is (n, p), one row per sampled task in partition-id order (``(0, p)`` when
    none was sampled). ``expected_tasks`` = q * num_in_tasks (= tasks_per_round): dividing
    by this constant rather than by n keeps the mean unbiased and the noise std at
    z*C/expected_tasks whatever n turns out to be.
    """
    if not (is_real(expected_tasks) and math.isfinite(expected_tasks) and expected_tasks > 0):
        raise ValueError(f"expected_tasks (q * num_in_tasks) must be a finite number > 0; got {shown(expected_tasks)}")
    factors, norms = _clip_factors(updates, clipping_norm)
    # the clipped rows' sum as one matrix-vector product: no clipped copy of the (n, p) matrix,
    # which for a few hundred tasks costs more in fresh memory than the clipping itself
    clipped_sum = (factors @ updates).unsqueeze(0)
    total = noised_sum(clipped_sum, noise_multiplier, clipping_norm, generator)
    return DPAggregate(
        update=total / expected_tasks,
        norms=norms,
        noise_std=float(noise_multiplier * clipping_norm / expected_tasks),
        clipping_norm=float(clipping_norm),
    )
