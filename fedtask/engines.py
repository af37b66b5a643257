"""The engine interface: one protocol every way of running the federation implements.

An engine takes the resolved config, the tasks and a fresh run directory, trains, and
returns a :class:`TrainingOutcome`; everything around it (checks, the atomic run
directory, the baseline, the outputs, the attack) is :func:`fedtask.pipeline.run_training`'s,
so every engine gets the same. ``ENGINES`` is the registry (``federation.engine``); its
modules are imported only when chosen, so picking the vectorized engine never starts Ray.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping, Protocol

if TYPE_CHECKING:
    import torch

    from fedtask.checkpoint import Checkpoint, Checkpointing
    from fedtask.config import Config
    from fedtask.data import TaskSet

# federation.engine -> "module:class" implementing Engine
ENGINES = {
    "flower": "fedtask.simulation:FlowerSimulationEngine",
    "vectorized": "fedtask.vectorized:VectorizedEngine",
}

# on_round(round index, encoder state after the round, the round's log row)
RoundHook = Callable[[int, "Mapping[str, torch.Tensor]", dict], None]


@dataclass
class TrainingOutcome:
    """What an engine hands back: the encoders, the per-round log, each IN task's evaluation.

    ``evaluation`` rows hold partition-id, accuracy (held-out), train-accuracy and
    num-examples, in partition-id order; each task's head was written under ``heads_dir``.
    """

    initial_encoder: dict[str, "torch.Tensor"]
    encoder: dict[str, "torch.Tensor"]
    rounds: list[dict]
    evaluation: list[dict]
    heads_dir: Path


class TrainingFailed(RuntimeError):
    """Training could not finish (too many clients failed, the loss diverged): one line says why."""


class Engine(Protocol):
    def check(self, config: "Config") -> None:
        """Refuse (ConfigError naming the key) what this engine cannot run, before anything starts."""

    def train(self, config: "Config", taskset: "TaskSet", out_dir: Path, *,
              on_round: RoundHook | None = None, checkpoints: "Checkpointing | None" = None,
              resume: "Checkpoint | None" = None) -> TrainingOutcome:
        """Train ``config``'s federation on ``taskset``; write each IN task's head under ``out_dir``.

        Every round ``checkpoints.due``, call ``checkpoints.save`` after the hook (with the
        heads, stacked or written by the clients); with ``resume``, continue after its round
        from its server state and heads (:mod:`fedtask.checkpoint`)."""


def get_engine(name: str) -> Engine:
    """A fresh engine registered as ``name``."""
    if name not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}; got {name!r}")
    module, cls = ENGINES[name].split(":")
    return getattr(importlib.import_module(module), cls)()


def encoder_aggregator(config: "Config", initial: dict, trainable: list[str]):
    """The server-side FedSGD (and task-level DP) math for ``config``, shared by every engine."""
    from fedtask.config import parameter_error
    from strategies.fedsgd import EncoderAggregator

    fed, dp = config.federation, config.dp
    try:
        return EncoderAggregator(
            initial, trainable, seed=config.seed, optimizer=fed.server_optimizer, lr=fed.server_lr,
            weight_decay=fed.server_weight_decay, momentum=fed.server_momentum, grad_clip=fed.grad_clip,
            normalize_task_gradients=fed.normalize_task_gradients, dp_enabled=dp.enabled,
            clipping_norm=dp.clipping_norm, noise_multiplier=dp.noise_multiplier, expected_tasks=fed.tasks_per_round)
    except ValueError as err:
        raise parameter_error(err, AGGREGATOR_KEYS) from None


# EncoderAggregator's parameters -> the configuration keys that feed them
AGGREGATOR_KEYS = {"seed": "seed", "optimizer": "federation.server_optimizer", "lr": "federation.server_lr",
                   "weight_decay": "federation.server_weight_decay", "momentum": "federation.server_momentum",
                   "grad_clip": "federation.grad_clip", "clipping_norm": "dp.clipping_norm",
                   "noise_multiplier": "dp.noise_multiplier", "expected_tasks": "federation.tasks_per_round"}
