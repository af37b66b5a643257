"""The per-task math of federated multitask learning, free of any federation code.

Each function takes the shared (encoder) parameters and one task's private (head /
adapter) parameters as plain dicts of tensors and is written with ``torch.func`` so
that the Flower ClientApp can call it for one task and the vectorised engine can
``vmap`` the very same function over a batch of tasks.

One round for one task (the paper's Algorithm 3, FedRep order): ``head_steps`` SGD
steps on the private parameters with the encoder fixed, then the gradient of the
task's loss with respect to the shared encoder at the updated head. The server
averages those encoder gradients (FedSGD) and applies its optimizer.
"""
from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad_and_value, vjp

from fedtask.models import TaskModel

Params = Mapping[str, torch.Tensor]
IGNORE_INDEX = -100


def logits_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over every labelled position (sequence outputs are flattened)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=IGNORE_INDEX)


def task_loss(model: TaskModel, shared: Params, private: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if model.head_only:
        return head_loss(private, embed(model, shared, x), y)
    return logits_loss(functional_call(model, {**shared, **private}, (x,)), y)


def head_loss(private: Params, embeddings: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The loss of a linear head on given embeddings (``F.linear`` is what ``nn.Linear`` computes;
    calling it directly avoids ``functional_call``'s module swapping, costly under ``vmap``)."""
    return logits_loss(F.linear(embeddings, private["head.weight"], private["head.bias"]), y)


def embed(model: TaskModel, shared: Params, x: torch.Tensor) -> torch.Tensor:
    """Embeddings under the given shared parameters (the encoder alone)."""
    encoder = {name[len("encoder."):]: value for name, value in shared.items() if name.startswith("encoder.")}
    return functional_call(model.encoder, encoder, (x,))


def head_steps(model: TaskModel, shared: Params, private: Params, x: torch.Tensor, y: torch.Tensor,
               lr: float, weight_decay: float, steps: int) -> dict[str, torch.Tensor]:
    """``steps`` SGD steps (decoupled weight decay) on a task's private parameters.

    With a linear head only, the embeddings are computed once: the encoder is fixed
    during these steps, so recomputing them would only cost time.
    """
    frozen = {name: value.detach() for name, value in shared.items()}
    if model.head_only:
        return head_steps_on_embeddings(private, embed(model, frozen, x).detach(), y, lr, weight_decay, steps)
    return _sgd_steps(grad_and_value(lambda p: task_loss(model, frozen, p, x, y)), private, lr, weight_decay, steps)


def head_steps_on_embeddings(private: Params, embeddings: torch.Tensor, y: torch.Tensor, lr: float,
                             weight_decay: float, steps: int) -> dict[str, torch.Tensor]:
    """:func:`head_steps` for a linear head, given the task's (fixed) embeddings."""
    return _sgd_steps(lambda p: head_gradient(p, embeddings, y)[:2], private, lr, weight_decay, steps)


def head_round_on_embeddings(private: Params, embeddings: torch.Tensor, y: torch.Tensor, lr: float,
                             weight_decay: float, steps: int):
    """A linear head's part of a round, given the task's embeddings (leading task dimensions allowed).

    Returns (the head after :func:`head_steps_on_embeddings`, the loss before them, the gradient of
    the loss at the new head with respect to the embeddings). The loss before the round and the
    first step's gradient are one :func:`head_gradient` call.
    """
    grads, loss_before, grad_embeddings = head_gradient(private, embeddings, y)
    private = dict(private)
    if steps > 0:
        private = head_steps_on_embeddings(_sgd_update(private, grads, lr, weight_decay), embeddings, y, lr,
                                           weight_decay, steps - 1)
        grad_embeddings = head_gradient(private, embeddings, y)[2]
    return private, loss_before, grad_embeddings


def head_gradient(private: Params, embeddings: torch.Tensor, y: torch.Tensor):
    """:func:`head_loss`'s gradient in closed form: (gradients of the head, loss, gradient of the embeddings).

    For softmax cross-entropy the gradient of the logits is ``(softmax - onehot) / n`` over
    the labelled positions: a handful of small ops, where autograd costs dozens, and the head
    steps are most of a small model's round. Leading dimensions of the head's weight are task
    dimensions (``[..., classes, dim]`` with embeddings ``[..., n, (length,) dim]``), so the
    vectorised engine calls this on all tasks at once without ``vmap``'s per-op overhead.
    """
    weight, bias = private["head.weight"], private["head.bias"]
    tasks = weight.shape[:-2]
    flat = embeddings.reshape(*tasks, -1, embeddings.shape[-1])
    labels = y.reshape(*tasks, -1)
    log_probs = (flat @ weight.transpose(-1, -2) + bias.unsqueeze(-2)).log_softmax(-1)
    onehot = (labels.unsqueeze(-1) == torch.arange(weight.shape[-2], device=labels.device)).to(log_probs.dtype)
    labelled = (labels != IGNORE_INDEX).to(log_probs.dtype)  # an ignored label matches no class: onehot row 0
    count = labelled.sum(-1, keepdim=True)
    loss = -(log_probs * onehot).sum((-2, -1)) / count.squeeze(-1)
    residual = (log_probs.exp() - onehot) * (labelled / count).unsqueeze(-1)
    grads = {"head.weight": residual.transpose(-1, -2) @ flat, "head.bias": residual.sum(-2)}
    return grads, loss, (residual @ weight).reshape(embeddings.shape)


def _sgd_steps(step, private: Params, lr: float, weight_decay: float, steps: int) -> dict[str, torch.Tensor]:
    private = dict(private)
    for _ in range(steps):
        grads, _ = step(private)
        private = _sgd_update(private, grads, lr, weight_decay)
    return private


def _sgd_update(private: Params, grads: Params, lr: float, weight_decay: float) -> dict[str, torch.Tensor]:
    """One SGD step with decoupled weight decay."""
    return {name: value - lr * (grads[name] + weight_decay * value) for name, value in private.items()}


def encoder_gradient(model: TaskModel, shared: Params, private: Params, x: torch.Tensor, y: torch.Tensor,
                     trainable: list[str] | None = None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Gradient of the task's loss with respect to the trainable shared parameters."""
    names = list(trainable) if trainable is not None else list(shared)
    fixed = {name: value for name, value in shared.items() if name not in names}
    frozen_private = {name: value.detach() for name, value in private.items()}

    def loss_of(train: Params) -> torch.Tensor:
        return task_loss(model, {**fixed, **train}, frozen_private, x, y)

    grads, loss = grad_and_value(loss_of)({name: shared[name] for name in names})
    return grads, loss


def local_round(model: TaskModel, shared: Params, private: Params, x: torch.Tensor, y: torch.Tensor,
                lr: float, weight_decay: float, steps: int, warm_start: bool,
                trainable: list[str] | None = None):
    """One task's round: head steps, then (unless warm-starting) its encoder gradient.

    Returns (new private params, encoder gradient dict or None, loss before the round).
    """
    with torch.no_grad():
        loss_before = task_loss(model, shared, private, x, y)
    private = head_steps(model, shared, private, x, y, lr, weight_decay, steps)
    if warm_start:
        return private, None, loss_before
    grads, _ = encoder_gradient(model, shared, private, x, y, trainable)
    return private, grads, loss_before


def linear_head_round(model: TaskModel, shared: Params, private: Params, x: torch.Tensor, y: torch.Tensor,
                      lr: float, weight_decay: float, steps: int, warm_start: bool,
                      trainable: list[str] | None = None):
    """:func:`local_round` for a linear head (``model.head_only``), with one encoder forward.

    ``local_round`` embeds the task's samples three times (the loss before the round, the
    head steps, the encoder gradient). A linear head needs them once: the loss, the head
    steps and the embeddings' gradient at the updated head are closed-form functions of the
    embeddings (:func:`head_gradient`), and the encoder gradient is that gradient pulled back
    through the one forward (``torch.func.vjp``). The same results up to float rounding, and
    written with ``torch.func`` so that ``vmap`` over tasks gives every task's own encoder
    gradient from one batched forward and one batched backward.
    """
    if not model.head_only:
        raise ValueError("linear_head_round needs a linear head (model.head_only); use local_round")
    names = list(trainable) if trainable is not None else list(shared)
    fixed = {name: value.detach() for name, value in shared.items() if name not in names}
    if warm_start:
        embeddings, pull_back = embed(model, {name: value.detach() for name, value in shared.items()}, x), None
    else:
        embeddings, pull_back = vjp(lambda train: embed(model, {**fixed, **train}, x),
                                    {name: shared[name] for name in names})
    private = {name: value.detach() for name, value in private.items()}
    private, loss_before, grad_embeddings = head_round_on_embeddings(private, embeddings, y, lr, weight_decay, steps)
    if warm_start:
        return private, None, loss_before
    (grads,) = pull_back(grad_embeddings)
    return private, grads, loss_before


def labelled_hits(logits: torch.Tensor, y: torch.Tensor, task_dims: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(right predictions, labelled positions), summed over all but the ``task_dims`` leading dimensions."""
    labelled = y != IGNORE_INDEX
    hits = (logits.argmax(-1) == y) & labelled
    dims = tuple(range(task_dims, y.dim()))
    return hits.sum(dims), labelled.sum(dims)


@torch.no_grad()
def accuracy(model: TaskModel, shared: Params, private: Params, x: torch.Tensor, y: torch.Tensor,
             batch_size: int = 512) -> float:
    """Fraction of labelled positions predicted right (batched to bound memory)."""
    correct, total = 0, 0
    for start in range(0, len(x), batch_size):
        logits = functional_call(model, {**shared, **private}, (x[start:start + batch_size],))
        hits, labelled = labelled_hits(logits, y[start:start + batch_size])
        correct, total = correct + int(hits), total + int(labelled)
    return correct / max(total, 1)


def batch_indices(num_samples: int, batch_size: int, seed: int, server_round: int, task_index: int) -> torch.Tensor | None:
    """A task's minibatch for a round, seeded by (seed, round, task) so engines agree.

    ``None`` means the whole task (batch_size 0 or not smaller than the task).
    """
    if batch_size <= 0 or batch_size >= num_samples:
        return None
    gen = torch.Generator().manual_seed((seed * 1_000_003 + server_round) * 1_000_033 + task_index)
    return torch.randperm(num_samples, generator=gen)[:batch_size]


def flat_norm(tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return torch.sqrt(sum((t.float() ** 2).sum() for t in tensors.values()))
