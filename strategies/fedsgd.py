"""FedSGD on the shared encoder: the server side of the paper's Algorithm 3.

``EncoderAggregator`` is the whole server-side math, with no federation code: it
takes the sampled tasks' encoder gradients in partition-id order, averages them
(or, with task-level DP, clips each, sums, adds Gaussian noise and divides by the
expected number of tasks), optionally clips the result, and applies the server
optimizer. The Flower strategy and the vectorised engine both drive this one class.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch

from strategies.dp import dp_aggregate
from strategies.sampling import noise_generator


def flatten(grads: Sequence[Mapping[str, torch.Tensor]] | Mapping[str, torch.Tensor], names: Sequence[str]) -> torch.Tensor:
    """One (tasks, parameters) matrix from per-task gradient dicts or from stacked tensors.

    A mapping holds each parameter's gradients stacked over tasks (the vectorised
    engine); a sequence holds one dict per task (Flower replies).
    """
    if isinstance(grads, Mapping):
        return torch.cat([grads[name].reshape(grads[name].shape[0], -1).float() for name in names], dim=1)
    if not grads:
        return torch.zeros(0, 0)
    return torch.stack([torch.cat([g[name].reshape(-1).float() for name in names]) for g in grads])


class EncoderAggregator:
    """Holds the released encoder and its optimizer; one ``step`` per training round."""

    def __init__(self, shared_state: Mapping[str, torch.Tensor], trainable: Sequence[str], federation: dict,
                 dp: dict, num_tasks: int, seed: int, noise_multiplier: float | None = None):
        self.names = list(trainable)
        self.params = {name: torch.nn.Parameter(shared_state[name].detach().clone().float()) for name in self.names}
        self.fixed = {name: t.detach().clone() for name, t in shared_state.items() if name not in self.params}
        self.grad_clip = federation["grad_clip"]
        self.normalize = federation["normalize_task_gradients"]
        self.dp_enabled = dp["enabled"]
        self.clipping_norm = dp["clipping_norm"]
        self.noise_multiplier = dp["noise_multiplier"] if noise_multiplier is None else noise_multiplier
        self.expected_tasks = federation["tasks_per_round"]  # q * N with q = tasks_per_round / N
        self.num_tasks = num_tasks
        self.seed = seed
        params = list(self.params.values())
        if federation["server_optimizer"] == "adamw":
            self.optimizer = torch.optim.AdamW(params, lr=federation["server_lr"],
                                               weight_decay=federation["server_weight_decay"])
        else:
            self.optimizer = torch.optim.SGD(params, lr=federation["server_lr"], momentum=federation["server_momentum"],
                                             weight_decay=federation["server_weight_decay"])

    def state(self) -> dict[str, torch.Tensor]:
        """The encoder as released: trainable parameters and fixed tensors, detached."""
        return {**self.fixed, **{name: p.detach().clone() for name, p in self.params.items()}}

    @property
    def needs_task_updates(self) -> bool:
        """Whether each task's update must be seen on its own (DP clipping, normalisation).

        Otherwise FedSGD only needs their mean, which an engine may compute directly as the
        gradient of the mean task loss (the same number, far cheaper than per-task gradients).
        """
        return self.dp_enabled or self.normalize

    def step(self, grads: Sequence[Mapping[str, torch.Tensor]] | Mapping[str, torch.Tensor],
             server_round: int) -> dict[str, float]:
        """Aggregate the round's task gradients (given in partition-id order) and update."""
        updates = flatten(grads, self.names)
        size = sum(p.numel() for p in self.params.values())
        if updates.numel() == 0:
            updates = torch.zeros(0, size)
        norms = updates.norm(dim=1) if len(updates) else torch.zeros(0)
        metrics = {"update_norm_mean": float(norms.mean()) if len(norms) else 0.0}
        if self.dp_enabled:
            release = dp_aggregate(updates, self.clipping_norm, self.noise_multiplier, self.expected_tasks,
                                   noise_generator(self.seed, server_round))
            mean = release.update
            metrics["clipped_fraction"] = release.clipped_fraction
        else:
            if self.normalize:
                updates = updates / norms.clamp_min(1e-12)[:, None]
            mean = updates.mean(0) if len(updates) else torch.zeros(size)
        return {**metrics, **self._apply(mean)}

    def step_mean(self, mean_grads: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """Apply an already averaged gradient (only valid when not ``needs_task_updates``)."""
        if self.needs_task_updates:
            raise ValueError("DP and normalised task gradients need each task's update: use step()")
        return self._apply(torch.cat([mean_grads[name].reshape(-1).float() for name in self.names]))

    def _apply(self, mean: torch.Tensor) -> dict[str, float]:
        """Clip the aggregate to ``grad_clip`` and take one server optimizer step."""
        mean_norm = float(mean.norm())
        if self.grad_clip > 0 and mean_norm > self.grad_clip:
            mean = mean * (self.grad_clip / mean_norm)
        offset = 0
        for name, param in self.params.items():
            count = param.numel()
            param.grad = mean[offset:offset + count].view_as(param).to(param.dtype)
            offset += count
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"aggregate_norm": mean_norm}
