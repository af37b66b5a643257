"""The one shape every task dataset takes, whatever its source.

A *task* is what one Flower client holds: its private training samples and the
held-out samples of the same task that training never sees (the weak adversary's
pool). IN tasks are trained on; OUT tasks come from the same distribution and are
never trained on, but are split the same way so that the strong and weak games
draw OUT challenge sets from pools of the same size as the IN ones.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class TaskData:
    """One task: inputs and labels, split into train and held-out samples.

    ``train_challenge`` / ``holdout_challenge`` are optional index tensors into the
    train / held-out samples that an adversary may receive as challenge samples.
    They are ``None`` (all samples) for personalization; the multiple-learning-
    problems setting sets them to the task's positive examples.
    """

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    holdout_x: torch.Tensor
    holdout_y: torch.Tensor
    train_challenge: torch.Tensor | None = None
    holdout_challenge: torch.Tensor | None = None

    def challenge_pool(self, access: str) -> torch.Tensor:
        """Inputs an adversary can be handed: 'strong' = training samples, 'weak' = held-out."""
        if access == "strong":
            x, idx = self.train_x, self.train_challenge
        elif access == "weak":
            x, idx = self.holdout_x, self.holdout_challenge
        else:
            raise ValueError(f"access must be 'strong' or 'weak', got {access!r}")
        return x if idx is None else x[idx]


@dataclass(frozen=True)
class TaskSpec:
    """What a model needs to know about the tasks, without their data.

    ``input_kind`` is 'vector' (float features), 'image' (float C,H,W) or 'tokens'
    (int64 ids); ``input_shape`` is the per-sample shape; ``num_classes`` is the
    width of every task head; ``vocab_size`` and ``pad_token_id`` are set for token
    inputs, ``encoding`` says how text became tokens ('characters' or 'tokens').
    """

    num_classes: int
    input_kind: str
    input_shape: tuple[int, ...]
    vocab_size: int | None = None
    pad_token_id: int | None = None
    encoding: str | None = None


@dataclass
class TaskSet:
    """All tasks of one experiment plus what the models need to know about them.

    ``input_kind`` is 'vector' (float features), 'image' (float C,H,W) or 'tokens'
    (int64 ids); ``input_shape`` is the per-sample shape; ``num_classes`` is the
    width of every task head; ``vocab_size`` is set for token inputs.
    """

    in_tasks: list[TaskData]
    out_tasks: list[TaskData]
    num_classes: int
    input_kind: str
    input_shape: tuple[int, ...]
    vocab_size: int | None = None
    extra: dict = field(default_factory=dict)

    @property
    def spec(self) -> TaskSpec:
        pad = self.extra.get("pad_token_id")
        return TaskSpec(self.num_classes, self.input_kind, tuple(self.input_shape), self.vocab_size,
                        None if pad is None else int(pad), self.extra.get("encoding"))
