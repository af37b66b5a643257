"""The black-box embedding oracle: where the adversary meets the model (the security boundary).

The challenger loads the released encoder here; the attack code receives only the
returned callable, from a batch of inputs to a numpy array of embeddings. It never sees
weights, heads, losses or labels.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch

from fedtask.data.base import TaskSpec
from fedtask.rundir import load_state

Oracle = Callable[[torch.Tensor], np.ndarray]


def embedding_oracle(config, spec: TaskSpec, encoder_path: Path, device: str | torch.device = "cpu") -> Oracle:
    """A black-box embedding function on the encoder saved at ``encoder_path``."""
    from fedtask.models import build_model

    model = build_model(config, spec)
    state = load_state(encoder_path)
    expected = model.state_dict()
    wrong = [name for name, tensor in state.items() if name in expected and tensor.shape != expected[name].shape]
    if wrong:
        name = wrong[0]
        raise ValueError(f"{encoder_path}: shapes do not match config.toml's model ({name}: file "
                         f"{list(state[name].shape)}, model {list(expected[name].shape)})")
    missing, unexpected = model.load_state_dict(state, strict=False)
    unexpected = [name for name in unexpected if not model.is_private(name)]
    missing = [name for name in missing if not model.is_private(name)]
    if missing or unexpected:
        raise ValueError(f"{encoder_path}: does not match model.encoder={config.model.encoder!r} "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    model = model.to(device).eval()

    @torch.no_grad()
    def oracle(inputs: torch.Tensor) -> np.ndarray:
        return model.embed(inputs.to(device)).float().cpu().numpy()

    return oracle
