"""The Flower ClientApp: a node serves one task or a range of tasks.

The node config says which partitions (tasks) a node holds: ``partition-id = N`` (one task; the
simulation sets it) or ``partition-range = "FIRST-LAST"`` (both ends inclusive: ``"0-3"`` is
tasks 0, 1, 2 and 3), so thousands of tasks need not be thousands of processes. Every train /
evaluate message names its partition in its ConfigRecord (``"partition-id"``), and each
partition's private head (and LoRA adapter, if any) lives in ``context.state`` under its own
key (``private-head-<pid>``) and persists across rounds. Each round a task receives the shared
encoder, runs the per-task math of :mod:`fedtask.task` and replies with its encoder gradient
only. The resolved run configuration travels in every message's ConfigRecord, so the same app
serves ``run_simulation`` and ``flwr run`` alike; the node also keeps the last one it saw in
``context.state`` for the checkpoint queries, which do not carry it.

A SuperNode handles its messages one at a time (flwr 1.41 pulls the next message only after
it pushed the reply to the last), so several messages to one node in one round update
``context.state`` in turn. The Ray simulation does not serialise a node's messages, which is
one reason it keeps one task per node.
"""
from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedtask import task as task_math
from fedtask.config import Config, from_dict
from fedtask.data import TaskSet, load_tasks
from fedtask.models import TaskModel, build_model, initial_private_state, pick_device
from fedtask.rundir import load_state, save_head

PARTITION_ID = "partition-id"  # node config: the one task a node holds; message config: the task meant
PARTITION_RANGE = "partition-range"  # node config: "FIRST-LAST", both ends inclusive
HEAD_PREFIX = "private-head-"  # context.state key of a partition's head: private-head-<pid>
RUN_KEY = "run"  # context.state: the last run config this node was sent (for save-heads)
QUERY_ACTIONS = ("", "save-heads", "load-heads")
_RANGE = re.compile(r"\s*(\d+)\s*-\s*(\d+)\s*")


def node_partitions(node_config) -> list[int]:
    """The partition ids a node serves, from its node config (one key or the other, not both)."""
    has_id, has_range = PARTITION_ID in node_config, PARTITION_RANGE in node_config
    if has_id == has_range:
        raise ValueError(f"node config: set either {PARTITION_ID} = N or {PARTITION_RANGE} = \"FIRST-LAST\" "
                         f"(both ends inclusive), not {'both' if has_id else 'neither'}")
    if has_id:
        value = node_config[PARTITION_ID]
        if isinstance(value, bool) or not str(value).strip().isdigit():
            raise ValueError(f"node config {PARTITION_ID}: expected a task index >= 0; got {value!r}")
        return [int(value)]
    value = node_config[PARTITION_RANGE]
    match = _RANGE.fullmatch(value) if isinstance(value, str) else None
    if match is None or int(match[1]) > int(match[2]):
        raise ValueError(f"node config {PARTITION_RANGE}: expected \"FIRST-LAST\" with FIRST <= LAST, both ends "
                         f"inclusive (e.g. \"0-3\"); got {value!r}")
    return list(range(int(match[1]), int(match[2]) + 1))


def head_key(partition_id: int) -> str:
    return f"{HEAD_PREFIX}{partition_id}"


def _span(served: list[int]) -> str:
    return f"{served[0]}" if len(served) == 1 else f"{served[0]}-{served[-1]}"


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


def _run_config(settings: ConfigRecord, context: Context) -> str:
    """The message's run config (remembered in context.state), else the last one this node was sent."""
    config_json = str(settings.get("run-config", ""))
    remembered = str(context.state[RUN_KEY]["run-config"]) if RUN_KEY in context.state else ""
    if config_json and config_json != remembered:
        context.state[RUN_KEY] = ConfigRecord({"run-config": config_json})
    if not (config_json or remembered):
        raise ValueError("run-config: this node has not been sent the run configuration yet")
    return config_json or remembered


def _runtime(settings: ConfigRecord, context: Context) -> ClientRuntime:
    return runtime_for(_run_config(settings, context))


def _message_partition(settings: ConfigRecord, context: Context) -> int:
    """The partition a train / evaluate message is meant for: one this node serves."""
    served = node_partitions(context.node_config)
    if PARTITION_ID not in settings:
        raise ValueError(f"message config has no {PARTITION_ID} (this node serves {_span(served)})")
    partition_id = int(settings[PARTITION_ID])
    if partition_id not in served:
        raise ValueError(f"message config {PARTITION_ID} = {partition_id}: not served by this node "
                         f"(it serves {_span(served)})")
    return partition_id


def _private_state(context: Context, runtime: ClientRuntime, partition_id: int) -> dict[str, torch.Tensor]:
    """The partition's head as last kept, or its seeded initial head if it was never trained."""
    key = head_key(partition_id)
    if key in context.state:
        return {k: v.to(runtime.device) for k, v in context.state[key].to_torch_state_dict().items()}
    return initial_private_state(runtime.model, partition_id, runtime.config.seed)


def _keep_head(context: Context, partition_id: int, private: dict[str, torch.Tensor]) -> None:
    context.state[head_key(partition_id)] = ArrayRecord(
        torch_state_dict={k: v.detach().cpu() for k, v in private.items()})


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


def _settings(msg: Message) -> ConfigRecord:
    return msg.content["config"] if "config" in msg.content else ConfigRecord()


def _asked_partitions(settings: ConfigRecord, served: list[int], action: str) -> list[int]:
    """The partitions a checkpoint query names (all this node serves if it names none)."""
    asked = [int(p) for p in settings.get("partition-ids", served)]
    foreign = sorted(set(asked) - set(served))
    if foreign:
        raise ValueError(f"query {action} partition-ids: {foreign[:5]} not served by this node "
                         f"(it serves {_span(served)})")
    return asked


def _heads_dir(settings: ConfigRecord, action: str) -> Path:
    directory = str(settings.get("dir", ""))
    if not directory:
        raise ValueError(f"query {action}: config key dir is missing")
    return Path(directory)


def _save_heads(context: Context, runtime: ClientRuntime, partitions: list[int], directory: Path) -> None:
    """Write each partition's current head (its initial one if never trained) as the run writes heads."""
    tasks = runtime.taskset.in_tasks
    for pid in partitions:
        if pid >= len(tasks):
            raise ValueError(f"query save-heads partition-ids: {pid} is not an IN task of this run "
                             f"(data.num_in_tasks = {len(tasks)})")
        save_head(directory, pid, tasks[pid].name, _private_state(context, runtime, pid))


def _load_heads(context: Context, partitions: list[int], directory: Path) -> None:
    """Read each partition's head back (file <pid:05d>_*.safetensors) into context.state."""
    for pid in partitions:
        found = sorted(directory.glob(f"{pid:05d}_*.safetensors"))
        if len(found) != 1:
            raise ValueError(f"query load-heads dir: {len(found)} files {directory / f'{pid:05d}_*.safetensors'} "
                             f"for partition {pid}; expected one")
        context.state[head_key(pid)] = ArrayRecord(torch_state_dict=load_state(found[0]))


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Discovery (no action): which partitions this node holds; or save / load their heads.

    ConfigRecord "action": "" (discovery), "save-heads" or "load-heads", the latter two with
    "dir" and optionally "partition-ids" (default: all this node serves). The reply's
    MetricRecord "info" lists the partition ids handled ("partition-ids").
    """
    settings = _settings(msg)
    action = str(settings.get("action", ""))
    served = node_partitions(context.node_config)
    if action not in QUERY_ACTIONS:
        raise ValueError(f"query action: expected one of {QUERY_ACTIONS}; got {action!r}")
    handled = served
    if action == "":
        if "run-config" in settings:
            _run_config(settings, context)  # remembered for a later save-heads
    elif action == "save-heads":
        handled = _asked_partitions(settings, served, action)
        _save_heads(context, _runtime(settings, context), handled, _heads_dir(settings, action))
    else:
        handled = _asked_partitions(settings, served, action)
        _load_heads(context, handled, _heads_dir(settings, action))
    return Message(RecordDict({"info": MetricRecord({"partition-ids": handled})}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One local round of the message's task: head steps, then the encoder gradient (outside warm-start)."""
    settings = msg.content["config"]
    partition_id = _message_partition(settings, context)
    runtime = _runtime(settings, context)
    server_round = int(settings["server-round"])
    warm_start = bool(settings["warm-start"])
    fed = runtime.config.federation

    shared = {k: v.to(runtime.device) for k, v in msg.content["encoder"].to_torch_state_dict().items()}
    private = _private_state(context, runtime, partition_id)
    x, y = _task_batch(runtime, partition_id, server_round)
    private, grads, loss = task_math.local_round(
        runtime.model, shared, private, x, y, fed.head_lr, fed.head_weight_decay, fed.head_steps,
        warm_start, runtime.trainable)
    _keep_head(context, partition_id, private)

    reply = RecordDict({"metrics": MetricRecord({"partition-id": partition_id, "loss": float(loss),
                                                 "num-examples": int(len(y))})})
    if grads is not None:
        reply["encoder-grad"] = ArrayRecord(torch_state_dict={k: v.detach().cpu() for k, v in grads.items()})
    return Message(reply, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Held-out accuracy of the message's task head on the final encoder; save the head locally."""
    settings = msg.content["config"]
    partition_id = _message_partition(settings, context)
    runtime = _runtime(settings, context)
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
        _keep_head(context, partition_id, private)
    train_acc = task_math.accuracy(runtime.model, shared, private, task.train_x.to(dev), task.train_y.to(dev))
    holdout_acc = (task_math.accuracy(runtime.model, shared, private, task.holdout_x.to(dev), task.holdout_y.to(dev))
                   if len(task.holdout_y) else float("nan"))
    heads_dir = str(settings.get("heads-dir", ""))
    if heads_dir:
        save_head(Path(heads_dir), partition_id, task.name, private)
    metrics = MetricRecord({"partition-id": partition_id, "accuracy": holdout_acc, "train-accuracy": train_acc,
                            "num-examples": int(len(task.holdout_y))})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)
