"""The synthetic task distribution of the paper (Section 4 and Appendix A.8).

Task means mu_i ~ N(0, task_std^2 I_d); a task's inputs x ~ N(mu_i, sample_std^2 I_d);
one random projection H (projection_dim x d) shared by all tasks and a target vector
g_i per task label each sample y = 1[<g_i, H x> > 0]. Every task has a different
labelling but the same useful projection: the setting MTL is made for.
"""
from __future__ import annotations

import torch

from fedtask.data.base import TaskData, TaskSet


def make_synthetic_tasks(
    num_in_tasks: int,
    num_out_tasks: int,
    train_samples: int,
    holdout_samples: int,
    dim: int,
    projection_dim: int,
    task_std: float = 1.0,
    sample_std: float = 1.0,
    seed: int = 0,
    task_seed: int | None = None,
) -> TaskSet:
    """Draw 2T tasks; the first ``num_in_tasks`` are IN, the rest OUT (they are i.i.d.).

    ``seed`` fixes the distribution (the shared projection H) and, unless ``task_seed`` is
    given, the tasks too; with ``task_seed`` the tasks are fresh draws of the same
    distribution (the shadow adversary's public pool, fedtask/shadow.py).
    """
    gen = torch.Generator().manual_seed(seed)
    num_tasks = num_in_tasks + num_out_tasks
    n = train_samples + holdout_samples
    projection = torch.randn(projection_dim, dim, generator=gen) / dim**0.5
    if task_seed is not None:
        gen = torch.Generator().manual_seed(task_seed)
    task_means = task_std * torch.randn(num_tasks, 1, dim, generator=gen)
    targets = torch.randn(num_tasks, projection_dim, generator=gen)
    x = task_means + sample_std * torch.randn(num_tasks, n, dim, generator=gen)
    margins = torch.einsum("tnd,pd,tp->tn", x, projection, targets)
    y = (margins > 0).long()
    tasks = [
        TaskData(
            name=f"task{i:04d}",
            train_x=x[i, :train_samples].clone(),
            train_y=y[i, :train_samples].clone(),
            holdout_x=x[i, train_samples:].clone(),
            holdout_y=y[i, train_samples:].clone(),
        )
        for i in range(num_tasks)
    ]
    return TaskSet(
        in_tasks=tasks[:num_in_tasks],
        out_tasks=tasks[num_in_tasks:],
        num_classes=2,
        input_kind="vector",
        input_shape=(dim,),
    )


def load(config) -> TaskSet:
    data = config.data
    return make_synthetic_tasks(
        num_in_tasks=data.num_in_tasks,
        num_out_tasks=data.num_out_tasks,
        train_samples=data.train_samples_per_task,
        holdout_samples=data.holdout_samples_per_task,
        dim=data.dim,
        projection_dim=data.projection_dim,
        task_std=data.task_std,
        sample_std=data.sample_std,
        seed=config.seed,
    )
