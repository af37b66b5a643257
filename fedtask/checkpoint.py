"""Checkpoints in safetensors (never pickle) and the black-box embedding oracle.

The oracle is how the adversary meets the model: a plain callable from a batch of
inputs to a numpy array of embeddings. Only this module (the challenger's side)
loads weights; the attack code receives the callable and nothing else.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from fedtask.data.base import TaskSet
from fedtask.models import build_model

Oracle = Callable[[torch.Tensor], np.ndarray]


def save_state(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write tensors atomically (temp file, then rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp), metadata=metadata)
    tmp.replace(path)


def load_state(path: Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    return load_file(str(path))


def embedding_oracle(config: dict, taskset: TaskSet, encoder_path: Path, device: str = "cpu") -> Oracle:
    """A black-box embedding function on the encoder saved at ``encoder_path``."""
    model = build_model(config, taskset)
    missing, unexpected = model.load_state_dict(load_state(encoder_path), strict=False)
    unexpected = [name for name in unexpected if not model.is_private(name)]
    missing = [name for name in missing if not model.is_private(name)]
    if missing or unexpected:
        raise ValueError(f"{encoder_path}: does not match model.encoder={config['model']['encoder']!r} "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    model = model.to(device).eval()

    @torch.no_grad()
    def oracle(inputs: torch.Tensor) -> np.ndarray:
        return model.embed(inputs.to(device)).float().cpu().numpy()

    return oracle
