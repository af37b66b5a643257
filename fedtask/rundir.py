"""A run directory's layout (CONTRACT §4), and the only code that writes or names its files.

Every file is written atomically (a temporary name, then a rename), and a run is built
in ``<out>.incomplete`` and renamed into place only once complete, so an interrupted
run never looks like a finished one. Tensors are safetensors, never pickle.
"""
from __future__ import annotations

import json
import math
import shutil
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

CONFIG = "config.toml"
ENCODER = "encoder.safetensors"
INITIAL_ENCODER = "encoder_init.safetensors"  # the null control's untrained encoder
HEADS = "heads"
METRICS = "metrics.json"
RESULTS = "results.json"
REPORT = "report.md"
TRAINED = (CONFIG, ENCODER, INITIAL_ENCODER, RESULTS)  # what a finished training run holds


def default_out_dir(name: str) -> Path:
    """``outputs/<name>-<timestamp>/`` (CONTRACT §2)."""
    return Path("outputs") / f"{name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def incomplete(out_dir: Path) -> Path:
    """Where a run into ``out_dir`` is built until it is complete."""
    out_dir = Path(out_dir)
    return out_dir.with_name(out_dir.name + ".incomplete")


def publish(work: Path, out_dir: Path) -> None:
    """Move a complete run from ``work`` into ``out_dir`` (which may exist, holding no run)."""
    work, out_dir = Path(work), Path(out_dir)
    if not out_dir.exists():
        work.replace(out_dir)
        return
    for item in work.iterdir():
        target = out_dir / item.name
        if target.is_dir():
            shutil.rmtree(target)
        item.replace(target)
    work.rmdir()


def write_json(path: Path, payload) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_finite(payload), indent=2, default=_jsonable, allow_nan=False) + "\n")
    tmp.replace(path)


def _finite(value):
    """JSON has no inf/nan: write an infinite epsilon as "inf" and a missing number as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _jsonable(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def save_state(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Tensors to safetensors, atomically. The metadata travels as one sorted JSON string:
    safetensors writes a metadata map in hash order, so two keys would make equal runs differ in bytes."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    header = {"fedtask": json.dumps(metadata, sort_keys=True)} if metadata else None
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp), metadata=header)
    tmp.replace(path)


def load_state(path: Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    return load_file(str(path))


def save_head(heads_dir: Path, partition_id: int, task_name: str, private: dict[str, torch.Tensor]) -> None:
    """A task's head (and adapter) as its client keeps it, named by partition id and task."""
    heads_dir = Path(heads_dir)
    heads_dir.mkdir(parents=True, exist_ok=True)
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in task_name)[:80]
    save_state(private, heads_dir / f"{partition_id:05d}_{safe}.safetensors",
               {"task": task_name, "partition_id": str(partition_id)})
