"""Encoders, heads and the per-task model that joins them.

A :class:`TaskModel` holds one shared encoder and one head *template*. Its parameters
are split in two named groups: ``shared`` (the encoder, what the server aggregates)
and ``private`` (the head, plus any LoRA adapter: what never leaves a client). The
per-task math in :mod:`fedtask.task` swaps a client's private parameters in with
``torch.func.functional_call``, so one module instance serves every task.

Encoders register themselves in ``ENCODERS`` by name (``model.encoder``); vision and
language encoders live in their own modules and are imported lazily.
"""
from __future__ import annotations

import importlib
from typing import Callable

import torch
from torch import nn

from fedtask.data.base import TaskSpec

# model.encoder -> builder(config, spec) -> nn.Module mapping inputs to (n, embedding_dim)
ENCODERS: dict[str, Callable[..., nn.Module]] = {}
# modules that register more encoders when imported (looked up on an unknown name)
ENCODER_MODULES = ("fedtask.models_vision", "fedtask.models_text")


def register_encoder(name: str):
    def decorate(builder):
        ENCODERS[name] = builder
        return builder

    return decorate


class MLPEncoder(nn.Module):
    """The paper's synthetic encoder: one hidden layer, then a linear projection."""

    def __init__(self, input_dim: int, hidden_dim: int, embedding_dim: int):
        super().__init__()
        self.hidden = nn.Linear(input_dim, hidden_dim)
        self.projection = nn.Linear(hidden_dim, embedding_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection(torch.relu(self.hidden(x)))


@register_encoder("mlp")
def _build_mlp(config, spec: TaskSpec) -> nn.Module:
    if spec.input_kind != "vector":
        raise ValueError(f"model.encoder: 'mlp' needs vector inputs, data gives {spec.input_kind}")
    return MLPEncoder(spec.input_shape[0], config.model.hidden_dim, config.model.embedding_dim)


class TaskModel(nn.Module):
    """Shared encoder + one task's head. ``private_prefixes`` name what stays local."""

    def __init__(self, encoder: nn.Module, embedding_dim: int, num_classes: int):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(embedding_dim, num_classes)

    # parameters whose names start with one of these are private to a task
    private_prefixes: tuple[str, ...] = ("head.",)

    def is_private(self, name: str) -> bool:
        return name.startswith(self.private_prefixes) or "lora_" in name

    @property
    def head_only(self) -> bool:
        """True when private parameters sit only on top of the embedding (no adapters)."""
        return all(name.startswith("head.") for name, _ in self.named_parameters() if self.is_private(name))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The shared representation the adversary's oracle exposes (no private adapter)."""
        # an encoder whose forward is not its embedding (a causal LM gives logits) names it
        encode = getattr(self.encoder, "pooled_embedding", self.encoder)
        disable = getattr(self.encoder, "disable_adapter", None)
        if disable is not None:
            with disable():
                return encode(x)
        return encode(x)

    def shared_state(self) -> dict[str, torch.Tensor]:
        """Encoder parameters and buffers: everything the server aggregates and releases."""
        state = {}
        for name, tensor in self.state_dict().items():
            if not self.is_private(name):
                state[name] = tensor.detach().clone()
        return state

    def private_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.named_parameters() if self.is_private(n)}

    def shared_parameter_names(self) -> list[str]:
        return [n for n, p in self.named_parameters() if not self.is_private(n) and p.requires_grad]


def check_encoder_name(name: str) -> None:
    """Raise ValueError naming model.encoder unless ``name`` is registered (importing the
    vision and language encoder modules only when the name is not a built-in)."""
    if name not in ENCODERS:
        for module in ENCODER_MODULES:
            try:
                importlib.import_module(module)
            except ModuleNotFoundError as err:
                if err.name != module:
                    raise
    if name not in ENCODERS:
        raise ValueError(f"model.encoder: unknown encoder {name!r}; known: {', '.join(sorted(ENCODERS))}")


def build_encoder(config, spec: TaskSpec) -> nn.Module:
    check_encoder_name(config.model.encoder)
    return ENCODERS[config.model.encoder](config, spec)


def build_model(config, spec: TaskSpec, seed: int | None = None) -> TaskModel:
    """The initial model for ``config``; the same seed gives the same weights."""
    torch.manual_seed(config.seed if seed is None else seed)
    encoder = build_encoder(config, spec)
    model = TaskModel(encoder, config.model.embedding_dim, spec.num_classes)
    if config.model.head == "lora":
        from fedtask.lora import add_lora_adapter  # peft; imported only when asked for

        model = add_lora_adapter(model, config)
    return model


def initial_private_state(model: TaskModel, task_index: int, seed: int) -> dict[str, torch.Tensor]:
    """A task's fresh head (and adapter), seeded by the task so engines agree."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + task_index)
    state = {}
    for name, param in model.named_parameters():
        if not model.is_private(name):
            continue
        if name.startswith("head.") and name.endswith("weight"):
            bound = 1.0 / param.shape[1] ** 0.5
            state[name] = (torch.rand(param.shape, generator=gen) * 2 - 1) * bound
        elif "lora_B" in name or name.startswith("head.") and name.endswith("bias"):
            state[name] = torch.zeros_like(param)
        else:  # lora_A and any other adapter weight: small uniform, as peft's default
            bound = 1.0 / param.shape[-1] ** 0.5
            state[name] = (torch.rand(param.shape, generator=gen) * 2 - 1) * bound
    return {k: v.to(next(model.parameters()).device) for k, v in state.items()}


def pick_device(wanted: str, *, gpu_share: float = 1.0) -> torch.device:
    """``federation.device``: 'cuda', 'cpu', or 'auto' = the GPU when there is one and this
    process has a share of it (a Flower client asks for ``num_gpus_per_client``)."""
    use_gpu = wanted == "cuda" or (wanted == "auto" and gpu_share > 0 and torch.cuda.is_available())
    return torch.device("cuda" if use_gpu else "cpu")
