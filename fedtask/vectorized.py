"""The vectorised engine: the same federation in one process, all sampled tasks at once.

Same sampling (strategies.sampling), same per-task math (fedtask.task.local_round,
``torch.func.vmap``-ed over the round's tasks instead of called once per Flower
client), same server aggregation, clipping, noise and optimizer
(strategies.fedsgd.EncoderAggregator), same seeds: a short run ends with the same
encoder and heads as the Flower engine, only without the per-client plumbing.
"""
from __future__ import annotations

import functools
import math
import time
from pathlib import Path

import torch
from torch.func import functional_call, vmap

from fedtask import task as task_math
from fedtask.checkpoint import save_head
from fedtask.config import ConfigError
from fedtask.data.base import TaskSet
from fedtask.models import build_model, initial_private_state
from strategies.fedsgd import EncoderAggregator
from strategies.sampling import sample_round


def _stack(tensors: list[torch.Tensor], what: str) -> torch.Tensor:
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) != 1:
        raise ConfigError(f"federation.engine: 'vectorized' needs tasks of equal size ({what} sizes differ: "
                          f"{sorted(shapes)[:3]}); use engine = 'flower'")
    return torch.stack(tensors)


def _gather_batches(x: torch.Tensor, y: torch.Tensor, pids: list[int], config: dict, server_round: int):
    """The round's inputs for the sampled tasks, with the same seeded minibatches as Flower."""
    batch = config["federation"]["batch_size"]
    rows = [task_math.batch_indices(x.shape[1], batch, config["seed"], server_round, pid) for pid in pids]
    index = torch.tensor(pids, device=x.device)
    if rows[0] is None:
        return x[index], y[index]
    cols = torch.stack(rows).to(x.device)
    return x[index[:, None], cols], y[index[:, None], cols]


def _mean_gradient_round(model, shared: dict, private: dict, x: torch.Tensor, y: torch.Tensor, fed: dict,
                         trainable: list[str]):
    """Each task's head steps, then the mean of the tasks' encoder gradients, in one pass.

    The gradient of the mean task loss equals the mean of the per-task gradients that
    Flower clients send (FedSGD), and one encoder forward serves the head steps, the
    loss and the backward pass: no per-task encoder gradient is ever materialised.
    """
    fixed = {name: value for name, value in shared.items() if name not in trainable}

    def embed_all(train: dict) -> torch.Tensor:
        params = {**fixed, **train}
        return vmap(lambda xb: task_math.embed(model, params, xb))(x)

    embeddings, pull_back = torch.func.vjp(embed_all, {name: shared[name] for name in trainable})
    frozen = embeddings.detach()
    with torch.no_grad():
        losses = vmap(task_math.head_loss)(private, frozen, y)
    steps = functools.partial(task_math.head_steps_on_embeddings, lr=fed["head_lr"],
                              weight_decay=fed["head_weight_decay"], steps=fed["head_steps"])
    new_private = vmap(steps)(private, frozen, y)
    heads = {name: value.detach() for name, value in new_private.items()}
    grad_embeddings = torch.func.grad(lambda e: vmap(task_math.head_loss)(heads, e, y).mean())(frozen)
    (mean_grads,) = pull_back(grad_embeddings)
    return new_private, mean_grads, losses


def train_vectorized(config: dict, taskset: TaskSet, out_dir: Path, progress=None) -> dict:
    """Train like the Flower engine does; return the same outcome dict."""
    fed, dp = config["federation"], config["dp"]
    # one process: use the GPU whenever there is one, unless told not to
    device = torch.device("cuda" if fed["device"] != "cpu" and torch.cuda.is_available() else "cpu")
    model = build_model(config, taskset).to(device)
    if not model.head_only:
        raise ConfigError("federation.engine: 'vectorized' supports linear heads only; use engine = 'flower' "
                          "for LoRA adapters")
    if any(isinstance(m, torch.nn.RNNBase) for m in model.modules()):
        raise ConfigError(f"federation.engine: 'vectorized' cannot batch the recurrent encoder "
                          f"{config['model']['encoder']!r} over tasks (torch.func has no vmap rule for it); "
                          "use engine = 'flower'")
    num_tasks = len(taskset.in_tasks)
    train_x = _stack([t.train_x for t in taskset.in_tasks], "train").to(device)
    train_y = _stack([t.train_y for t in taskset.in_tasks], "train").to(device)
    initial = model.shared_state()
    trainable = model.shared_parameter_names()
    aggregator = EncoderAggregator({k: v.cpu() for k, v in initial.items()}, trainable, fed, dp, num_tasks,
                                   config["seed"])
    heads = [initial_private_state(model, pid, config["seed"]) for pid in range(num_tasks)]
    heads = {name: torch.stack([h[name] for h in heads]).to(device) for name in heads[0]}

    rounds_log = []
    for server_round in range(1, fed["rounds"] + 1):
        started = time.perf_counter()
        warm = server_round <= fed["warm_start_rounds"]
        pids = sample_round(num_tasks, fed["tasks_per_round"], config["seed"], server_round, warm, dp["enabled"])
        shared = {k: v.to(device) for k, v in aggregator.state().items()}
        stats = {}
        if pids:
            x, y = _gather_batches(train_x, train_y, pids, config, server_round)
            augment = taskset.extra.get("augment")  # the clients' seeded training-time augmentation
            if augment is not None:
                x = torch.stack([augment(xb, config["seed"], server_round, pid) for xb, pid in zip(x, pids)])
            index = torch.tensor(pids, device=device)
            private = {name: value[index] for name, value in heads.items()}
            if aggregator.needs_task_updates or warm:
                one_task = functools.partial(task_math.local_round, model, shared, lr=fed["head_lr"],
                                             weight_decay=fed["head_weight_decay"], steps=fed["head_steps"],
                                             warm_start=warm, trainable=trainable)

                def batched(p, xb, yb):
                    new_p, g, task_loss = one_task(p, xb, yb)
                    return new_p, ({} if g is None else g), task_loss  # warm-start: no encoder gradient

                new_private, grads, losses = vmap(batched)(private, x, y)
                if not warm:
                    stats = aggregator.step({k: v.cpu() for k, v in grads.items()}, server_round)
            else:
                new_private, mean_grads, losses = _mean_gradient_round(model, shared, private, x, y, fed, trainable)
                stats = aggregator.step_mean({k: v.cpu() for k, v in mean_grads.items()})
            for name in heads:
                heads[name][index] = new_private[name]
            loss = float(losses.mean())
        else:  # an empty Poisson sample still releases the noised (zero) update
            loss = math.nan
            if not warm:
                stats = aggregator.step({name: torch.zeros(0, *initial[name].shape) for name in trainable},
                                        server_round)
        row = {"round": server_round, "phase": "warm_start" if warm else "train", "tasks": pids, "loss": loss,
               "seconds": time.perf_counter() - started, **stats}
        rounds_log.append(row)
        if progress:
            progress(row)

    final = aggregator.state()
    final_device = {k: v.to(device) for k, v in final.items()}
    if fed["final_head_steps"]:  # refresh every head on the final encoder, as each client does
        refresh = functools.partial(task_math.head_steps, model, final_device, lr=fed["head_lr"],
                                    weight_decay=fed["head_weight_decay"], steps=fed["final_head_steps"])
        heads = vmap(lambda p, xb, yb: refresh(p, xb, yb))(heads, train_x, train_y)
    evaluation = evaluate_all(model, final_device, heads, taskset, device)
    for pid, task in enumerate(taskset.in_tasks):
        save_head(Path(out_dir) / "heads", pid, task.name, {k: v[pid] for k, v in heads.items()})
    return {"initial_encoder": initial, "encoder": final, "rounds": rounds_log, "evaluation": evaluation,
            "heads": {k: v.cpu() for k, v in heads.items()}}


@torch.no_grad()
def evaluate_all(model, shared: dict, heads: dict, taskset: TaskSet, device) -> list[dict]:
    """Train and held-out accuracy of every IN task's head, all tasks in one batched pass."""

    def accuracy(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = vmap(lambda p, xb: functional_call(model, {**shared, **p}, (xb,)))(heads, x)
        return (logits.argmax(-1) == y).float().mean(dim=tuple(range(1, y.dim())))

    train_x = _stack([t.train_x for t in taskset.in_tasks], "train").to(device)
    train_y = _stack([t.train_y for t in taskset.in_tasks], "train").to(device)
    train_acc = accuracy(train_x, train_y)
    if all(len(t.holdout_y) for t in taskset.in_tasks):
        hold_acc = accuracy(_stack([t.holdout_x for t in taskset.in_tasks], "holdout").to(device),
                            _stack([t.holdout_y for t in taskset.in_tasks], "holdout").to(device))
    else:
        hold_acc = torch.full((len(taskset.in_tasks),), math.nan)
    return [{"partition-id": pid, "accuracy": float(hold_acc[pid]), "train-accuracy": float(train_acc[pid]),
             "num-examples": len(task.holdout_y)} for pid, task in enumerate(taskset.in_tasks)]
