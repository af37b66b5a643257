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


def save_head(heads_dir: Path, partition_id: int, task_name: str, private: dict[str, torch.Tensor]) -> None:
    """A task's head (and adapter) as its client keeps it, named by partition id and task."""
    heads_dir = Path(heads_dir)
    heads_dir.mkdir(parents=True, exist_ok=True)
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in task_name)[:80]
    save_state(private, heads_dir / f"{partition_id:05d}_{safe}.safetensors",
               {"task": task_name, "partition_id": str(partition_id)})


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
