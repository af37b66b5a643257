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
from fedtask.checkpoint import Checkpoint, Checkpointing
from fedtask.config import ConfigError
from fedtask.data.base import TaskSet
from fedtask.engines import RoundHook, TrainingOutcome, encoder_aggregator
from fedtask.models import build_model, initial_private_state, pick_device
from fedtask.rundir import HEADS, save_head
from strategies.fedsgd import round_row
from strategies.sampling import sample_round


def _stack(tensors: list[torch.Tensor], what: str) -> torch.Tensor:
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) != 1:
        raise ConfigError(f"federation.engine: 'vectorized' needs tasks of equal size ({what} sizes differ: "
                          f"{sorted(shapes)[:3]}); use engine = 'flower'")
    return torch.stack(tensors)


def engine_device(config) -> torch.device:
    """One process: the GPU whenever there is one, unless ``federation.device`` says cpu."""
    return pick_device(config.federation.device)


def _in_passes(batched, chunk: int, private: dict, *tensors: torch.Tensor):
    """``batched(private, *tensors)`` over ``chunk`` tasks at a time, outputs joined on the task axis."""
    heads = [dict(zip(private, parts)) for parts in zip(*(value.split(chunk) for value in private.values()))]
    return _join([batched(head, *rest) for head, *rest in zip(heads, *(t.split(chunk) for t in tensors))])


def _join(outputs: list):
    first = outputs[0]
    if isinstance(first, tuple):
        return tuple(_join([out[i] for out in outputs]) for i in range(len(first)))
    if isinstance(first, dict):  # an empty dict (warm start: no encoder gradient) stays empty
        return {name: torch.cat([out[name] for out in outputs]) for name in first}
    return torch.cat(outputs)


def _gather_batches(x: torch.Tensor, y: torch.Tensor, pids: list[int], config, server_round: int):
    """The round's inputs for the sampled tasks, with the same seeded minibatches as Flower."""
    batch = config.federation.batch_size
    rows = [task_math.batch_indices(x.shape[1], batch, config.seed, server_round, pid) for pid in pids]
    index = torch.tensor(pids, device=x.device)
    if rows[0] is None:
        return x[index], y[index]
    cols = torch.stack(rows).to(x.device)
    return x[index[:, None], cols], y[index[:, None], cols]


AUTO_SAMPLES_PER_PASS = {"cpu": 1024, "cuda": 8192}


def tasks_per_pass(config, samples_per_task: int, num_tasks: int, device: torch.device) -> int:
    """Whole tasks per encoder pass under ``federation.samples_per_pass`` (at least one).

    A pass over a few hundred tasks at once holds every activation of the round: gigabytes
    for a ResNet, and on a CPU even a small MLP's 16 MB activations fall out of cache and
    cost page faults on every allocation, so passes of about a thousand samples are faster
    there. A GPU wants the opposite: few, large passes, each kernel launch doing more work.
    ``0`` (the default) picks per device; a big encoder on a small GPU may need fewer.
    """
    limit = config.federation.samples_per_pass or AUTO_SAMPLES_PER_PASS.get(torch.device(device).type, 1024)
    return max(1, min(num_tasks, limit // max(1, samples_per_task)))


def _mean_gradient_round(model, shared: dict, private: dict, x: torch.Tensor, y: torch.Tensor, fed: dict,
                         trainable: list[str], chunk: int):
    """Each task's head steps, then the mean of the tasks' encoder gradients.

    The gradient of the mean task loss equals the mean of the per-task gradients that
    Flower clients send (FedSGD), and one encoder forward serves the head steps, the
    loss and the backward pass: no per-task encoder gradient is ever materialised.
    Every encoder here maps each sample on its own (no batch statistics: group or frozen
    batch norm, transformers without dropout), so ``chunk`` tasks' samples at a time go
    through :func:`fedtask.task.embed` as one batch, exactly as each client's do. The head
    steps then run on all tasks' embeddings at once, and each pass's backward adds its share.
    """
    fixed = {name: value for name, value in shared.items() if name not in trainable}
    train = {name: shared[name].detach().requires_grad_() for name in trainable}
    params = {**fixed, **train}
    passes = [task_math.embed(model, params, part.flatten(0, 1)).unflatten(0, part.shape[:2])
              for part in x.split(chunk)]
    frozen = torch.cat([embeddings.detach() for embeddings in passes])
    # the head's closed-form gradient takes leading task dimensions: no vmap needed
    _, losses, _ = task_math.head_gradient(private, frozen, y)
    new_private = task_math.head_steps_on_embeddings(private, frozen, y, fed.head_lr, fed.head_weight_decay,
                                                     fed.head_steps)
    _, _, grad_embeddings = task_math.head_gradient(new_private, frozen, y)
    # one backward through every pass: autograd adds the passes' shares of the mean gradient
    grads = torch.autograd.grad(passes, list(train.values()), list((grad_embeddings / len(x)).split(chunk)))
    return new_private, dict(zip(train, grads)), losses


class VectorizedEngine:
    """The ``vectorized`` engine (see the module docstring)."""

    def check(self, config) -> None:
        """One process needs no per-client resources; what it cannot batch is refused in ``train``."""

    def train(self, config, taskset: TaskSet, out_dir: Path, *, on_round: RoundHook | None = None,
              checkpoints: Checkpointing | None = None, resume: Checkpoint | None = None) -> TrainingOutcome:
        return train_vectorized(config, taskset, out_dir, on_round=on_round, checkpoints=checkpoints, resume=resume)


def train_vectorized(config, taskset: TaskSet, out_dir: Path, *, on_round: RoundHook | None = None,
                     checkpoints: Checkpointing | None = None, resume: Checkpoint | None = None) -> TrainingOutcome:
    """Train like the Flower engine does, to the same outcome; from ``resume``'s round on if given."""
    fed, dp = config.federation, config.dp
    device = engine_device(config)
    model = build_model(config, taskset.spec).to(device)
    if not model.head_only:
        raise ConfigError("federation.engine: 'vectorized' supports linear heads only; use engine = 'flower' "
                          "for LoRA adapters")
    if any(isinstance(m, torch.nn.RNNBase) for m in model.modules()):
        raise ConfigError(f"federation.engine: 'vectorized' cannot batch the recurrent encoder "
                          f"{config.model.encoder!r} over tasks (torch.func has no vmap rule for it); "
                          "use engine = 'flower'")
    num_tasks = len(taskset.in_tasks)
    train_x = _stack([t.train_x for t in taskset.in_tasks], "train").to(device)
    train_y = _stack([t.train_y for t in taskset.in_tasks], "train").to(device)
    initial = {name: value.cpu() for name, value in model.shared_state().items()}  # as the Flower engine returns it
    trainable = model.shared_parameter_names()
    aggregator = encoder_aggregator(config, dict(initial), trainable)
    heads = [initial_private_state(model, pid, config.seed) for pid in range(num_tasks)]
    heads = {name: torch.stack([h[name] for h in heads]).to(device) for name in heads[0]}
    rounds_log, first_round = [], 1
    if resume is not None:  # continue where the checkpoint left off: same state, same per-round seeds
        initial = resume.initial_encoder
        aggregator.restore(resume.server_state)
        heads = {name: value.to(device) for name, value in resume.stacked_heads().items()}
        rounds_log, first_round = list(resume.rounds), resume.round + 1

    released = aggregator.state()  # the encoder as of the last round: one copy per round, shared with the hook
    for server_round in range(first_round, fed.rounds + 1):
        started = time.perf_counter()
        warm = server_round <= fed.warm_start_rounds
        pids = sample_round(num_tasks, fed.tasks_per_round, config.seed, server_round, warm, dp.enabled)
        shared = {k: v.to(device) for k, v in released.items()}
        stats = {}
        if pids:
            x, y = _gather_batches(train_x, train_y, pids, config, server_round)
            augment = taskset.extra.get("augment")  # the clients' seeded training-time augmentation
            if augment is not None:
                x = torch.stack([augment(xb, config.seed, server_round, pid) for xb, pid in zip(x, pids)])
            index = torch.tensor(pids, device=device)
            private = {name: value[index] for name, value in heads.items()}
            chunk = tasks_per_pass(config, x.shape[1], len(pids), device)
            if aggregator.needs_task_updates or warm:
                one_task = functools.partial(task_math.local_round, model, shared, lr=fed.head_lr,
                                             weight_decay=fed.head_weight_decay, steps=fed.head_steps,
                                             warm_start=warm, trainable=trainable)

                def batched(p, xb, yb):
                    new_p, g, task_loss = one_task(p, xb, yb)
                    return new_p, ({} if g is None else g), task_loss  # warm-start: no encoder gradient

                new_private, grads, losses = _in_passes(vmap(batched), chunk, private, x, y)
                if not warm:
                    stats = aggregator.step({k: v.cpu() for k, v in grads.items()}, server_round)
            else:
                new_private, mean_grads, losses = _mean_gradient_round(model, shared, private, x, y, fed, trainable,
                                                                       chunk)
                stats = aggregator.step_mean({k: v.cpu() for k, v in mean_grads.items()})
            for name in heads:
                heads[name][index] = new_private[name]
            loss = float(losses.mean())
        else:  # an empty Poisson sample still releases the noised (zero) update
            loss = math.nan
            if not warm:
                stats = aggregator.step({name: torch.zeros(0, *initial[name].shape) for name in trainable},
                                        server_round)
        row = round_row(server_round, warm=warm, tasks=pids, loss=loss, seconds=time.perf_counter() - started,
                        stats=stats)
        rounds_log.append(row)
        released = aggregator.state()
        if on_round:
            on_round(server_round, released, row)
        if checkpoints is not None and checkpoints.due(server_round):
            checkpoints.save(server_round, rounds=rounds_log, aggregator=aggregator, initial_encoder=initial,
                             stacked_heads=heads)

    final = released
    final_device = {k: v.to(device) for k, v in final.items()}
    chunk = tasks_per_pass(config, train_x.shape[1], num_tasks, device)
    if fed.final_head_steps:  # refresh every head on the final encoder, as each client does
        refresh = functools.partial(task_math.head_steps, model, final_device, lr=fed.head_lr,
                                    weight_decay=fed.head_weight_decay, steps=fed.final_head_steps)
        heads = _in_passes(vmap(lambda p, xb, yb: refresh(p, xb, yb)), chunk, heads, train_x, train_y)
    evaluation = evaluate_all(model, final_device, heads, taskset, device, chunk)
    heads_dir = Path(out_dir) / HEADS
    for pid, task in enumerate(taskset.in_tasks):
        save_head(heads_dir, pid, task.name, {k: v[pid] for k, v in heads.items()})
    return TrainingOutcome(initial_encoder=initial, encoder=final, rounds=rounds_log, evaluation=evaluation,
                           heads_dir=heads_dir)


@torch.no_grad()
def evaluate_all(model, shared: dict, heads: dict, taskset: TaskSet, device, chunk: int = 0) -> list[dict]:
    """Train and held-out accuracy of every IN task's head, ``chunk`` tasks (0: all) per batched pass."""
    chunk = chunk or len(taskset.in_tasks)

    def task_accuracy(private: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = vmap(lambda p, xb: functional_call(model, {**shared, **p}, (xb,)))(private, x)
        hits, labelled = task_math.labelled_hits(logits, y, task_dims=1)
        return hits.float() / labelled.float()

    def accuracy(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return _in_passes(task_accuracy, chunk, heads, x, y)

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
