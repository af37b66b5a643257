"""The Flower ClientApp: one client is one task.

The client's private head (and LoRA adapter, if any) lives in ``context.state`` and
persists across rounds; each round it receives the shared encoder, runs the per-task
math of :mod:`fedtask.task` and replies with its encoder gradient only. The resolved
run configuration travels in every message's ConfigRecord, so the same app serves
``run_simulation`` and ``flwr run`` alike.
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedtask import task as task_math
from fedtask.config import Config, from_dict
from fedtask.data import TaskSet, load_tasks
from fedtask.models import TaskModel, build_model, initial_private_state, pick_device
from fedtask.rundir import save_head

HEAD_KEY = "private-head"


@dataclass
class ClientRuntime:
    """What every client in one worker process shares: config, tasks, one model."""

    config: Config
    taskset: TaskSet
    model: TaskModel
    device: torch.device
    trainable: list[str]


@functools.lru_cache(maxsize=2)
def runtime_for(config_json: str) -> ClientRuntime:
    """Build (once per worker process and run) the tasks and the model template."""
    config = from_dict(json.loads(config_json), check=False)  # checked by the server already
    threads = max(1, int(config.federation.num_cpus_per_client))
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)  # Ray runs one actor per CPU slot: avoid over-subscription
    taskset = load_tasks(config)
    device = pick_device(config.federation.device, gpu_share=config.federation.num_gpus_per_client)
    model = build_model(config, taskset.spec).to(device)
    return ClientRuntime(config, taskset, model, device, model.shared_parameter_names())


def _private_state(context: Context, runtime: ClientRuntime, partition_id: int) -> dict[str, torch.Tensor]:
    if HEAD_KEY in context.state:
        return {k: v.to(runtime.device) for k, v in context.state[HEAD_KEY].to_torch_state_dict().items()}
    return initial_private_state(runtime.model, partition_id, runtime.config.seed)


def _task_batch(runtime: ClientRuntime, partition_id: int, server_round: int):
    task = runtime.taskset.in_tasks[partition_id]
    idx = task_math.batch_indices(len(task.train_x), runtime.config.federation.batch_size,
                                  runtime.config.seed, server_round, partition_id)
    x, y = (task.train_x, task.train_y) if idx is None else (task.train_x[idx], task.train_y[idx])
    x, y = x.to(runtime.device), y.to(runtime.device)
    augment = runtime.taskset.extra.get("augment")  # vision data: seeded training-time augmentation
    if augment is not None:
        x = augment(x, runtime.config.seed, server_round, partition_id)
    return x, y


app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Tell the server which partition (task) this node holds."""
    info = MetricRecord({"partition-id": int(context.node_config["partition-id"])})
    return Message(RecordDict({"info": info}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    partition_id = int(context.node_config["partition-id"])
    settings = msg.content["config"]
    runtime = runtime_for(str(settings["run-config"]))
    server_round = int(settings["server-round"])
    warm_start = bool(settings["warm-start"])
    fed = runtime.config.federation

    shared = {k: v.to(runtime.device) for k, v in msg.content["encoder"].to_torch_state_dict().items()}
    private = _private_state(context, runtime, partition_id)
    x, y = _task_batch(runtime, partition_id, server_round)
    private, grads, loss = task_math.local_round(
        runtime.model, shared, private, x, y, fed.head_lr, fed.head_weight_decay, fed.head_steps,
        warm_start, runtime.trainable)
    context.state[HEAD_KEY] = ArrayRecord(torch_state_dict={k: v.detach().cpu() for k, v in private.items()})

    reply = RecordDict({"metrics": MetricRecord({"partition-id": partition_id, "loss": float(loss),
                                                 "num-examples": int(len(y))})})
    if grads is not None:
        reply["encoder-grad"] = ArrayRecord(torch_state_dict={k: v.detach().cpu() for k, v in grads.items()})
    return Message(reply, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Held-out accuracy of this task's head on the final encoder; save the head locally."""
    partition_id = int(context.node_config["partition-id"])
    settings = msg.content["config"]
    runtime = runtime_for(str(settings["run-config"]))
    task = runtime.taskset.in_tasks[partition_id]
    shared = {k: v.to(runtime.device) for k, v in msg.content["encoder"].to_torch_state_dict().items()}
    private = _private_state(context, runtime, partition_id)
    dev = runtime.device
    fed = runtime.config.federation
    if fed.final_head_steps:
        # a head was last trained when its task was last sampled; refresh it on the final encoder
        # (the encoder is untouched, so this costs no privacy)
        private = task_math.head_steps(runtime.model, shared, private, task.train_x.to(dev), task.train_y.to(dev),
                                       fed.head_lr, fed.head_weight_decay, fed.final_head_steps)
        context.state[HEAD_KEY] = ArrayRecord(torch_state_dict={k: v.detach().cpu() for k, v in private.items()})
    train_acc = task_math.accuracy(runtime.model, shared, private, task.train_x.to(dev), task.train_y.to(dev))
    holdout_acc = (task_math.accuracy(runtime.model, shared, private, task.holdout_x.to(dev), task.holdout_y.to(dev))
                   if len(task.holdout_y) else float("nan"))
    heads_dir = str(settings.get("heads-dir", ""))
    if heads_dir:
        save_head(Path(heads_dir), partition_id, task.name, private)
    metrics = MetricRecord({"partition-id": partition_id, "accuracy": holdout_acc, "train-accuracy": train_acc,
                            "num-examples": int(len(task.holdout_y))})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)
