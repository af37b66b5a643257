"""Task-level differential privacy for the shared encoder (CONTRACT §7).

The unit of privacy is a *task*: each round every IN task is sampled independently
with rate q (Poisson sampling, which is what the subsampled-Gaussian accountant
assumes), each sampled task's whole encoder update is clipped to L2 norm C, the
clipped updates are summed, N(0, (z*C)^2) noise is added per coordinate, and the
sum is divided by the *expected* number of sampled tasks q*N (a constant, so the
divisor itself reveals nothing about who was sampled).

Everything here is a pure function of tensors: updates arrive as one (n, p)
matrix (row i = task i's flattened update, rows in partition-id order), and all
randomness comes from an explicit ``torch.Generator``. No Flower import.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "DPAggregate",
    "clip_updates",
    "clipped_fraction",
    "dp_aggregate",
    "flatten_tensors",
    "noised_sum",
    "poisson_sample",
    "unflatten_like",
    "update_norms",
]


def _check_generator(generator: torch.Generator) -> torch.Generator:
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator; got {type(generator).__name__}")
    return generator


def poisson_sample(num_tasks: int, rate: float, generator: torch.Generator) -> Tensor:
    """Ids of the tasks sampled this round, each independently with probability ``rate``.

    Poisson (not fixed-size) sampling is what the subsampled-Gaussian RDP/PRV analysis
    assumes, so the number sampled varies and may be 0. Returns a sorted CPU int64 tensor,
    reproducible for a given generator state.
    """
    if num_tasks < 0:
        raise ValueError(f"num_tasks must be >= 0; got {num_tasks}")
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"sampling rate must be in [0, 1]; got {rate}")
    _check_generator(generator)
    draws = torch.rand(num_tasks, generator=generator, device=generator.device)
    return torch.nonzero(draws < rate).flatten().to("cpu", torch.long)


def update_norms(updates: Tensor) -> Tensor:
    """L2 norm of each row of an (n, p) update matrix, shape (n,)."""
    if updates.dim() != 2:
        raise ValueError(f"updates must have shape (n, p); got {tuple(updates.shape)}")
    return torch.linalg.vector_norm(updates, dim=1)


def _clip(updates: Tensor, clipping_norm: float) -> tuple[Tensor, Tensor]:
    """(clipped updates, pre-clip norms); rows scaled by min(1, C/||row||)."""
    if not clipping_norm > 0:
        raise ValueError(f"dp.clipping_norm must be > 0; got {clipping_norm}")
    norms = update_norms(updates)
    bad = ~torch.isfinite(norms)
    if bool(bad.any()):
        # A NaN/inf update cannot be scaled to a finite norm: the sensitivity bound breaks.
        rows = torch.nonzero(bad).flatten().tolist()
        raise ValueError(f"non-finite update in row(s) {rows[:10]}: cannot clip to dp.clipping_norm")
    # A zero row gives C/0 = inf -> factor 1, so it stays zero (no NaN).
    factors = (clipping_norm / norms).clamp(max=1.0)
    return updates * factors.unsqueeze(1).to(updates.dtype), norms


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
    if not noise_multiplier >= 0:
        raise ValueError(f"dp.noise_multiplier must be >= 0; got {noise_multiplier}")
    if not clipping_norm > 0:
        raise ValueError(f"dp.clipping_norm must be > 0; got {clipping_norm}")
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
    if not expected_tasks > 0:
        raise ValueError(f"expected_tasks (q * num_in_tasks) must be > 0; got {expected_tasks}")
    clipped, norms = _clip(updates, clipping_norm)
    total = noised_sum(clipped, noise_multiplier, clipping_norm, generator)
    return DPAggregate(
        update=total / expected_tasks,
        norms=norms,
        noise_std=float(noise_multiplier * clipping_norm / expected_tasks),
        clipping_norm=float(clipping_norm),
    )


TensorsLike = Sequence[Tensor] | Mapping[str, Tensor]


def flatten_tensors(tensors: TensorsLike) -> Tensor:
    """Concatenate tensors (a list, or a dict in its key order) into one flat vector (p,).

    Accepts numpy arrays too (e.g. Flower's ``ArrayRecord.to_numpy_ndarrays()``). Stack
    several tasks with ``torch.stack([flatten_tensors(d) for d in dicts])``.
    """
    values = list(tensors.values()) if isinstance(tensors, Mapping) else list(tensors)
    if not values:
        return torch.empty(0)
    return torch.cat([torch.as_tensor(t).reshape(-1) for t in values])


def unflatten_like(vec: Tensor, template: TensorsLike) -> dict[str, Tensor] | list[Tensor]:
    """Inverse of ``flatten_tensors``: split ``vec`` into the template's shapes and dtypes.

    Returns a dict with the template's keys (same order) for a dict template, else a list.
    """
    is_map = isinstance(template, Mapping)
    values = [torch.as_tensor(t) for t in (template.values() if is_map else template)]
    sizes = [t.numel() for t in values]
    if vec.dim() != 1 or vec.numel() != sum(sizes):
        raise ValueError(f"vector of shape {tuple(vec.shape)} does not match template with {sum(sizes)} values")
    parts = [p.reshape(t.shape).to(t.dtype) for p, t in zip(torch.split(vec, sizes), values)]
    return dict(zip(template.keys(), parts)) if is_map else parts
