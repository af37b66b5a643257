"""The vectorised engine: the same federation in one process, all sampled tasks at once.

Same sampling (strategies.sampling), same per-task math (fedtask.task: the head steps
on embeddings, the encoder gradient of a task's loss) run for all of the round's tasks at
once instead of once per Flower client, same server aggregation, clipping, noise and
optimizer (strategies.fedsgd.EncoderAggregator), same seeds: a short run ends with the same
encoder and heads as the Flower engine, only without the per-client plumbing. Without DP a
round needs only the mean encoder gradient (:func:`_mean_gradient_round`); with DP or
normalised updates each task's own gradient is a row of one matrix (:func:`_task_updates_round`).
"""
from __future__ import annotations

import functools
import math
import time
import weakref
from pathlib import Path

import torch
from torch.func import functional_call, vmap

from fedtask import task as task_math
from fedtask.checkpoint import Checkpoint, Checkpointing
from fedtask.config import ConfigError
from fedtask.data.base import TaskSet
from fedtask.engines import RoundHook, TrainingOutcome, encoder_aggregator
from fedtask.models import MLPEncoder, build_model, initial_private_state, pick_device
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
    The MLP encoder's forward and backward are written out (:class:`_MLPRound`).
    """
    weights = _mlp_weights(model, shared, trainable, x)
    if weights is not None:
        mlp = _MLPRound(model, weights, x, chunk)
        new_private, losses, grad_embeddings = task_math.head_round_on_embeddings(
            private, mlp.embeddings, y, fed.head_lr, fed.head_weight_decay, fed.head_steps)
        return new_private, mlp.mean_gradient(grad_embeddings / len(x)), losses
    fixed = {name: value for name, value in shared.items() if name not in trainable}
    train = {name: shared[name].detach().requires_grad_() for name in trainable}
    params = {**fixed, **train}
    passes = [task_math.embed(model, params, part.flatten(0, 1)).unflatten(0, part.shape[:2])
              for part in x.split(chunk)]
    frozen = torch.cat([embeddings.detach() for embeddings in passes])
    # the head's closed-form gradient takes leading task dimensions: no vmap needed
    new_private, losses, grad_embeddings = task_math.head_round_on_embeddings(
        private, frozen, y, fed.head_lr, fed.head_weight_decay, fed.head_steps)
    # one backward through every pass: autograd adds the passes' shares of the mean gradient
    grads = torch.autograd.grad(passes, list(train.values()), list((grad_embeddings / len(x)).split(chunk)))
    return new_private, dict(zip(train, grads)), losses


def _task_updates_round(model, shared: dict, private: dict, x: torch.Tensor, y: torch.Tensor, fed: dict,
                        trainable: list[str], chunk: int, warm: bool):
    """Each task's head steps and (unless warm-starting) its own encoder gradient, for DP or normalisation.

    Returns (new heads, a (tasks, parameters) matrix whose row i is task i's gradient flattened in
    ``trainable`` order, or None when warm-starting, losses before the round). One encoder
    forward per task (:func:`fedtask.task.linear_head_round` under ``vmap``, ``chunk`` tasks at a
    time, or the MLP's written-out passes), where :func:`fedtask.task.local_round` takes three;
    the rows go straight into a matrix kept across rounds (:func:`_scratch`).
    """
    weights = _mlp_weights(model, shared, trainable, x)
    if weights is not None:
        mlp = _MLPRound(model, weights, x, chunk)
        new_private, losses, grad_embeddings = task_math.head_round_on_embeddings(
            private, mlp.embeddings, y, fed.head_lr, fed.head_weight_decay, fed.head_steps)
        return new_private, None if warm else mlp.task_gradients(grad_embeddings), losses
    task_round = functools.partial(task_math.linear_head_round, model, shared, lr=fed.head_lr,
                                   weight_decay=fed.head_weight_decay, steps=fed.head_steps, warm_start=warm,
                                   trainable=trainable)

    @vmap
    def one_task(p, xb, yb):
        new_p, grads, task_loss = task_round(p, xb, yb)
        return new_p, ({} if grads is None else grads), task_loss  # warm-start: no encoder gradient

    heads = [dict(zip(private, parts)) for parts in zip(*(value.split(chunk) for value in private.values()))]
    updates, new_heads, losses, start = None, [], [], 0
    for head, xb, yb in zip(heads, x.split(chunk), y.split(chunk)):
        new_head, grads, loss = one_task(head, xb, yb)
        if grads:
            if updates is None:
                columns = sum(grads[name][0].numel() for name in trainable)
                updates = _scratch(model, "updates", (len(x), columns), grads[trainable[0]])
            torch.cat([grads[name].flatten(1) for name in trainable], dim=1, out=updates[start:start + len(xb)])
        new_heads.append(new_head)
        losses.append(loss)
        start += len(xb)
    return _join(new_heads), updates, torch.cat(losses)


# Scratch tensors kept per model across rounds. The C allocator hands large blocks back to the
# system when they are freed and maps them anew, so a round that allocates its per-task gradients
# (256 tasks x 37k floats: 38 MB) or its activations afresh pays a page fault per 4 kB touched,
# which on a CPU costs as much as computing them.
_SCRATCH: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()


def _scratch(model, name: str, shape: tuple, like: torch.Tensor) -> torch.Tensor:
    """A tensor of ``shape`` (``like``'s dtype and device) kept for ``model`` under ``name``; contents undefined.

    Only the leading dimension may change between calls: a smaller one reuses the kept tensor's rows.
    """
    kept = _SCRATCH.setdefault(model, {})
    buffer = kept.get(name)
    if (buffer is None or buffer.shape[1:] != tuple(shape[1:]) or buffer.shape[0] < shape[0]
            or buffer.dtype != like.dtype or buffer.device != like.device):
        rows = shape[0] if buffer is None or buffer.shape[1:] != tuple(shape[1:]) else max(shape[0], buffer.shape[0])
        buffer = torch.empty((rows, *shape[1:]), dtype=like.dtype, device=like.device)
        kept[name] = buffer
    return buffer[:shape[0]]


MLP_PARAMETERS = ("encoder.hidden.weight", "encoder.hidden.bias", "encoder.projection.weight",
                  "encoder.projection.bias")


def _mlp_weights(model, shared: dict, trainable: list[str], x: torch.Tensor):
    """The MLP encoder's (hidden weight, bias, projection weight, bias) when its round is written
    out by hand (:class:`_MLPRound`): the encoder is exactly :class:`fedtask.models.MLPEncoder`
    with all four trainable, and the tasks' inputs are (tasks, samples, features) of its dtype.
    Otherwise None: autograd and ``torch.func`` compute the same numbers, more slowly."""
    if type(model.encoder) is not MLPEncoder or tuple(trainable) != MLP_PARAMETERS or x.dim() != 3:
        return None
    weights = [shared[name] for name in MLP_PARAMETERS]
    return weights if all(w.dtype == x.dtype and w.device == x.device for w in weights) else None


class _MLPRound:
    """MLPEncoder (``projection(relu(hidden(x)))``) forward and backward written out, for all tasks at once.

    The products are the ones autograd runs (``addmm`` as ``F.linear`` does, ReLU's backward at its
    output), with the hidden activations and their gradient in scratch tensors kept across rounds
    (:func:`_scratch`) and ReLU applied in place; ``chunk`` tasks' samples per pass keep each pass's
    activations in cache between the product and the ReLU (or its mask).
    """

    def __init__(self, model, weights, x: torch.Tensor, chunk: int):
        self.model, self.weights = model, weights
        hidden_weight, hidden_bias, projection_weight, projection_bias = weights
        self.tasks, self.samples = x.shape[:2]
        self.inputs = x.reshape(self.tasks * self.samples, -1)
        self.rows = max(1, chunk) * self.samples
        self.hidden = _scratch(model, "hidden", (len(self.inputs), hidden_weight.shape[0]), hidden_weight)
        embeddings = hidden_weight.new_empty(len(self.inputs), projection_weight.shape[0])
        for part, h, e in zip(self.inputs.split(self.rows), self.hidden.split(self.rows), embeddings.split(self.rows)):
            torch.addmm(hidden_bias, part, hidden_weight.t(), out=h).clamp_min_(0)
            torch.addmm(projection_bias, h, projection_weight.t(), out=e)
        self.embeddings = embeddings.view(self.tasks, self.samples, -1)

    def _passes(self, grad_embeddings: torch.Tensor):
        """Per pass: (its inputs, hidden activations, embeddings' gradient, gradient before the ReLU)."""
        projection_weight = self.weights[2]
        grad_out = grad_embeddings.reshape(len(self.inputs), -1)
        scratch = _scratch(self.model, "grad_hidden", (min(self.rows, len(self.inputs)), self.hidden.shape[1]),
                           self.hidden)
        for part, h, g in zip(self.inputs.split(self.rows), self.hidden.split(self.rows), grad_out.split(self.rows)):
            grad_hidden = torch.mm(g, projection_weight, out=scratch[:len(g)])
            torch.ops.aten.threshold_backward.grad_input(grad_hidden, h, 0, grad_input=grad_hidden)
            yield part, h, g, grad_hidden

    def mean_gradient(self, grad_embeddings: torch.Tensor) -> dict[str, torch.Tensor]:
        """The encoder gradient of the summed loss whose embeddings' gradient is ``grad_embeddings``."""
        hidden_weight, hidden_bias, projection_weight, _ = self.weights
        grad_hidden_weight_t = hidden_weight.new_zeros(hidden_weight.shape[::-1])
        grad_hidden_bias = torch.zeros_like(hidden_bias)
        grad_projection_weight = torch.zeros_like(projection_weight)
        for part, h, g, grad_hidden in self._passes(grad_embeddings):
            grad_projection_weight.addmm_(g.t(), h)
            grad_hidden_weight_t.addmm_(part.t(), grad_hidden)
            grad_hidden_bias += grad_hidden.sum(0)
        grads = (grad_hidden_weight_t.t(), grad_hidden_bias, grad_projection_weight,
                 grad_embeddings.reshape(len(self.inputs), -1).sum(0))
        return {name: grad.contiguous() for name, grad in zip(MLP_PARAMETERS, grads)}

    def task_gradients(self, grad_embeddings: torch.Tensor) -> torch.Tensor:
        """Each task's encoder gradient (its embeddings' gradient ``grad_embeddings[i]`` pulled back)
        as row i of a (tasks, parameters) scratch matrix, flattened in :data:`MLP_PARAMETERS` order."""
        out = _scratch(self.model, "updates", (self.tasks, sum(w.numel() for w in self.weights)), self.hidden)
        start, samples = 0, self.samples
        for part, h, g, grad_hidden in self._passes(grad_embeddings):
            count = len(part) // samples
            rows = out[start:start + count].split([w.numel() for w in self.weights], dim=1)
            views = [row.view(count, *w.shape) for row, w in zip(rows, self.weights)]
            g = g.view(count, samples, -1)
            torch.bmm(g.transpose(1, 2), h.view(count, samples, -1), out=views[2])
            torch.sum(g, 1, out=views[3])
            grad_hidden = grad_hidden.view(count, samples, -1)
            torch.bmm(grad_hidden.transpose(1, 2), part.view(count, samples, -1), out=views[0])
            torch.sum(grad_hidden, 1, out=views[1])
            start += count
        return out


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
                new_private, updates, losses = _task_updates_round(model, shared, private, x, y, fed, trainable,
                                                                   chunk, warm)
                if not warm:
                    stats = aggregator.step(updates.cpu(), server_round)
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
