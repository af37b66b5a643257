"""Flat (N, d) embeddings with a task index  <->  a zero-padded (tasks, max_n, d) array.

Pools differ in size from task to task; the padded layout lets every per-task computation
(moments, whitening, subset sampling, Gram matrices) run as one batched array operation.
"""

from __future__ import annotations

import numpy as np


def pad_by_task(emb: np.ndarray, task_index: np.ndarray, num_tasks: int | None = None):
    """Group rows of `emb` (N, d) by `task_index` (N,) into (padded (T, max_n, d), counts (T,)).

    Within a task, rows keep their order in `emb`; slots past a task's count are zero.
    """
    emb = np.asarray(emb)
    task_index = np.asarray(task_index, dtype=np.int64)
    if emb.ndim != 2:
        raise ValueError(f"emb must have shape (N, d); got {emb.shape}")
    if task_index.shape != (emb.shape[0],):
        raise ValueError(f"task_index must have shape ({emb.shape[0]},) to match emb; got {task_index.shape}")
    if task_index.size and task_index.min() < 0:
        raise ValueError("task_index must be non-negative")
    num_tasks = int(task_index.max()) + 1 if num_tasks is None else num_tasks
    counts = np.bincount(task_index, minlength=num_tasks)
    padded = np.zeros((num_tasks, int(counts.max(initial=0)), emb.shape[1]), dtype=emb.dtype)
    padded[task_index, slot_within_task(task_index)] = emb
    return padded, counts


def slot_within_task(task_index: np.ndarray) -> np.ndarray:
    """For each row, its rank among the rows of its task (0, 1, ... in order of appearance)."""
    task_index = np.asarray(task_index, dtype=np.int64)
    order = np.argsort(task_index, kind="stable")
    counts = np.bincount(task_index)
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    slot = np.empty_like(task_index)
    slot[order] = np.arange(task_index.size) - starts[task_index[order]]
    return slot


def valid_mask(counts: np.ndarray, max_n: int) -> np.ndarray:
    """Boolean (T, max_n): True where a padded slot holds a real row."""
    return np.arange(max_n)[None, :] < np.asarray(counts)[:, None]
