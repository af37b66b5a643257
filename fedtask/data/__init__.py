"""Task datasets: one loader per ``data.name``, all returning a :class:`TaskSet`.

``LOADERS`` is the registry: adding a dataset is one module exposing
``load(config) -> TaskSet`` plus its line here; ``data.name`` accepts exactly these names.
"""
from __future__ import annotations

import functools
import importlib

from fedtask.data.base import TaskData, TaskSet, TaskSpec

# data.name -> module in fedtask.data exposing ``load(config) -> TaskSet``
LOADERS = {
    "synthetic": "fedtask.data.synthetic",
    "femnist": "fedtask.data.femnist",
    "celeba": "fedtask.data.celeba",
    "shakespeare": "fedtask.data.shakespeare",
    "stackoverflow": "fedtask.data.stackoverflow",
    "reddit": "fedtask.data.reddit",
}
DATASETS = tuple(LOADERS)


def load_tasks(config) -> TaskSet:
    """Build the experiment's tasks (cached per process: clients share one copy)."""
    return _load_cached(config.seed, config.data, config.model)


@functools.lru_cache(maxsize=4)
def _load_cached(seed, data, model) -> TaskSet:
    from fedtask.config import Config

    module = importlib.import_module(LOADERS[data.name])
    return module.load(Config(seed=seed, data=data, model=model))


__all__ = ["DATASETS", "LOADERS", "TaskData", "TaskSet", "TaskSpec", "load_tasks"]
