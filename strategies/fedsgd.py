"""FedSGD on the shared encoder: the server side of the paper's Algorithm 3.

``EncoderAggregator`` is the whole server-side math, with no federation code: it
takes the sampled tasks' encoder gradients in partition-id order, averages them
(or, with task-level DP, clips each, sums, adds Gaussian noise and divides by the
expected number of tasks), optionally clips the result, and applies the server
optimizer. The Flower strategy and the vectorised engine both drive this one class.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch

from strategies._checks import finite, flag, integer, is_real, shown
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


OPTIMIZERS = ("sgd", "adamw")  # the server optimizers EncoderAggregator knows


class EncoderAggregator:
    """Holds the released encoder and its optimizer; one ``step`` per training round.

    Takes plain values, checked once here (a ValueError names the parameter):
    ``optimizer`` ("sgd" or "adamw") with ``lr``, ``weight_decay`` and (SGD only) ``momentum``;
    ``grad_clip`` bounds the aggregate's L2 norm (0 = off); ``normalize_task_gradients``
    scales each task's gradient to unit norm before averaging. With ``dp_enabled`` each task's
    update is clipped to ``clipping_norm``, N(0, (noise_multiplier * clipping_norm)^2) noise is
    added to the sum, and the sum is divided by ``expected_tasks`` (q * N = tasks_per_round).
    ``seed`` seeds each round's noise (``strategies.sampling.noise_generator``).
    """

    def __init__(self, shared_state: Mapping[str, torch.Tensor], trainable: Sequence[str], *, seed: int,
                 optimizer: str = "adamw", lr: float, weight_decay: float = 0.0, momentum: float = 0.0,
                 grad_clip: float = 0.0, normalize_task_gradients: bool = False, dp_enabled: bool = False,
                 clipping_norm: float = 1.0, noise_multiplier: float = 0.0, expected_tasks: float | None = None):
        self.seed = integer("seed", seed, minimum=0)
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be 'sgd' or 'adamw'; got {optimizer!r}")
        lr = finite("lr", lr, strict=True)
        weight_decay = finite("weight_decay", weight_decay)
        momentum = finite("momentum", momentum)
        self.grad_clip = finite("grad_clip", grad_clip)
        self.normalize = flag("normalize_task_gradients", normalize_task_gradients)
        self.dp_enabled = flag("dp_enabled", dp_enabled)
        self.clipping_norm = finite("clipping_norm", clipping_norm, strict=True)
        self.noise_multiplier = finite("noise_multiplier", noise_multiplier)
        valid = is_real(expected_tasks) and math.isfinite(expected_tasks) and expected_tasks > 0
        if self.dp_enabled and not valid:
            raise ValueError(f"expected_tasks must be > 0 when dp_enabled; got {shown(expected_tasks)}")
        if expected_tasks is not None and not valid:
            raise ValueError(f"expected_tasks must be a finite number > 0; got {shown(expected_tasks)}")
        self.expected_tasks = None if expected_tasks is None else float(expected_tasks)  # q * N
        self.names = list(trainable)
        missing = [name for name in self.names if name not in shared_state]
        if missing:
            raise ValueError(f"trainable names tensors that shared_state lacks: {missing[:10]}")
        self.params = {name: torch.nn.Parameter(shared_state[name].detach().clone().float()) for name in self.names}
        self.fixed = {name: t.detach().clone() for name, t in shared_state.items() if name not in self.params}
        params = list(self.params.values())
        if optimizer == "adamw":
            self.optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        else:
            self.optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)

    def state(self) -> dict[str, torch.Tensor]:
        """The encoder as released: trainable parameters and fixed tensors, detached."""
        return {**self.fixed, **{name: p.detach().clone() for name, p in self.params.items()}}

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        """Everything the next round depends on, as flat tensors (safetensors holds no pickle):
        ``param/<name>``, ``fixed/<name>`` and the optimizer's ``optimizer/<index>/<key>``."""
        state = {f"param/{name}": p.detach().clone() for name, p in self.params.items()}
        state.update({f"fixed/{name}": t.clone() for name, t in self.fixed.items()})
        for index, per_param in self.optimizer.state_dict()["state"].items():
            for key, value in per_param.items():
                if isinstance(value, torch.Tensor):
                    state[f"optimizer/{index}/{key}"] = value.detach().clone()
                elif value is not None:  # a plain number (older optimizers keep the step as one)
                    state[f"optimizer/{index}/{key}"] = torch.tensor(value, dtype=torch.float64)
        return state

    def restore(self, state: Mapping[str, torch.Tensor]) -> None:
        """Continue from :meth:`checkpoint_state`'s output (same parameters, same optimizer kind)."""
        expected = {f"param/{name}" for name in self.params} | {f"fixed/{name}" for name in self.fixed}
        missing = sorted(expected - set(state))
        if missing:
            raise ValueError(f"state lacks {missing[:5]}: it was saved for another encoder")
        with torch.no_grad():
            for name, param in self.params.items():
                param.copy_(state[f"param/{name}"])
        self.fixed = {name: state[f"fixed/{name}"].clone() for name in self.fixed}
        per_param: dict[int, dict] = {}
        for key, value in state.items():
            if key.startswith("optimizer/"):
                _, index, field = key.split("/", 2)
                per_param.setdefault(int(index), {})[field] = value.clone()
        saved = self.optimizer.state_dict()
        self.optimizer.load_state_dict({"state": per_param, "param_groups": saved["param_groups"]})

    @property
    def needs_task_updates(self) -> bool:
        """Whether each task's update must be seen on its own (DP clipping, normalisation).

        Otherwise FedSGD only needs their mean, which an engine may compute directly as the
        gradient of the mean task loss (the same number, far cheaper than per-task gradients).
        """
        return self.dp_enabled or self.normalize

    def step(self, grads: Sequence[Mapping[str, torch.Tensor]] | Mapping[str, torch.Tensor] | torch.Tensor,
             server_round: int) -> dict[str, float]:
        """Aggregate the round's task gradients (given in partition-id order) and update.

        ``grads`` is what :func:`flatten` takes, or already its (tasks, parameters) matrix (row i
        task i's update, in ``names`` order), which is then used as it is.
        """
        size = sum(p.numel() for p in self.params.values())
        if isinstance(grads, torch.Tensor):
            if grads.dim() != 2 or grads.shape[1] != size:
                raise ValueError(f"grads as a matrix must have shape (tasks, {size}); got {tuple(grads.shape)}")
            updates = grads.float()
        else:
            updates = flatten(grads, self.names)
        if updates.numel() == 0:
            updates = torch.zeros(0, size)
        if self.dp_enabled:
            release = dp_aggregate(updates, self.clipping_norm, self.noise_multiplier, self.expected_tasks,
                                   noise_generator(self.seed, server_round))
            mean, norms = release.update, release.norms
            metrics = {"update_norm_mean": float(norms.mean()) if len(norms) else 0.0,
                       "clipped_fraction": release.clipped_fraction}
        else:
            norms = updates.norm(dim=1) if len(updates) else torch.zeros(0)
            metrics = {"update_norm_mean": float(norms.mean()) if len(norms) else 0.0}
            if self.normalize:
                updates = updates / norms.clamp_min(1e-12)[:, None]
            mean = updates.mean(0) if len(updates) else torch.zeros(size)
        return {**metrics, **self._apply(mean)}

    def step_mean(self, mean_grads: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """Apply an already averaged gradient (only valid when not ``needs_task_updates``)."""
        if self.needs_task_updates:
            raise ValueError("mean_grads cannot be used with DP or normalised task gradients, which need "
                             "each task's update: use step()")
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


def round_row(server_round: int, *, warm: bool, tasks: Sequence[int], loss: float, seconds: float,
              stats: Mapping[str, float]) -> dict:
    """One round's line of the training log (metrics.json), the same from every engine."""
    return {"round": server_round, "phase": "warm_start" if warm else "train", "tasks": list(tasks), "loss": loss,
            "seconds": seconds, **stats}
