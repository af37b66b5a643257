"""Task datasets: one loader per ``data.name``, all returning a :class:`TaskSet`."""
from __future__ import annotations

import functools
import importlib
import json

from fedtask.data.base import TaskData, TaskSet

# data.name -> module in fedtask.data exposing ``load(config) -> TaskSet``
LOADERS = {
    "synthetic": "fedtask.data.synthetic",
    "femnist": "fedtask.data.femnist",
    "celeba": "fedtask.data.celeba",
    "shakespeare": "fedtask.data.shakespeare",
    "stackoverflow": "fedtask.data.stackoverflow",
    "reddit": "fedtask.data.reddit",
}


def load_tasks(config: dict) -> TaskSet:
    """Build the experiment's tasks (cached per process: clients share one copy)."""
    return _load_cached(json.dumps({"seed": config["seed"], "data": config["data"],
                                    "model": config["model"]}, sort_keys=True))


@functools.lru_cache(maxsize=4)
def _load_cached(key: str) -> TaskSet:
    config = json.loads(key)
    module = importlib.import_module(LOADERS[config["data"]["name"]])
    return module.load(config)


__all__ = ["TaskData", "TaskSet", "load_tasks", "LOADERS"]
