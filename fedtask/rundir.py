"""A run directory's layout (CONTRACT §4), and the only code that writes or names its files.

Every file is written atomically (a temporary name, then a rename), and a run is built
in ``<out>.incomplete`` and renamed into place only once complete, so an interrupted
run never looks like a finished one. Tensors are safetensors, never pickle.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import shutil
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from fedtask.config import ConfigError

CONFIG = "config.toml"
ENCODER = "encoder.safetensors"
INITIAL_ENCODER = "encoder_init.safetensors"  # the null control's untrained encoder
HEADS = "heads"
METRICS = "metrics.json"
RESULTS = "results.json"
REPORT = "report.md"
TRAINED = (CONFIG, ENCODER, INITIAL_ENCODER, RESULTS)  # what a finished training run holds
SNAPSHOTS = "snapshots"  # the encoder every federation.snapshot_every rounds
TRAJECTORY = "trajectory.json"
TRAJECTORY_REPORT = "trajectory.md"
TRAJECTORY_PLOT = "trajectory.png"  # AUC and losses against round
TRAJECTORY_GAPS_PLOT = "trajectory_gaps.png"  # AUC against the generalization gaps (paper Figure 3)
HEADS_SUMMARY = "heads.json"
HEADS_PLOT = "heads.png"  # pairwise similarity of the task heads (paper Figure 5)


def snapshot_path(run_dir: Path, round_index: int) -> Path:
    return Path(run_dir) / SNAPSHOTS / f"encoder_round_{round_index:05d}.safetensors"


def list_snapshots(run_dir: Path) -> list[tuple[int, Path]]:
    """(round, path) of every encoder snapshot of a run, by round."""
    found = []
    for path in (Path(run_dir) / SNAPSHOTS).glob("encoder_round_*.safetensors"):
        digits = path.name[len("encoder_round_"):-len(".safetensors")]
        if digits.isdigit():
            found.append((int(digits), path))
    return sorted(found)


def write_text(path: Path, text: str) -> None:
    """A text file, atomically."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def default_out_dir(name: str) -> Path:
    """``outputs/<name>-<timestamp>/`` (CONTRACT §2)."""
    return Path("outputs") / f"{name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


LOCK = ".lock"  # inside the .incomplete directory, held (flock) by the process writing the run


def incomplete(out_dir: Path) -> Path:
    """Where a run into ``out_dir`` is built until it is complete."""
    out_dir = Path(out_dir)
    return out_dir.with_name(out_dir.name + ".incomplete")


def check_new_output(out_dir: Path) -> Path:
    """``out_dir`` resolved, if a new run may be written there: it must not exist, or be an empty
    directory, and its parent must be a writable directory. Nothing is created."""
    path = Path(out_dir).expanduser().resolve()
    if not path.name or path == Path.cwd() or path == Path.home():
        raise ConfigError(f"{out_dir}: --out must name a new directory for this run (not {path})")
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{out_dir}: exists and is not a directory; choose another --out")
    if path.is_dir() and any(path.iterdir()):
        what = "holds a finished run" if (path / RESULTS).is_file() else "exists and is not empty"
        raise ConfigError(f"{out_dir}: {what}; choose another --out (nothing is overwritten)")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"{out_dir}: {parent} is a file, so no directory can be created under it")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{out_dir}: {parent} is not writable")
    return path


class RunDirectory:
    """A run being written: ``<out>.incomplete`` held under an exclusive lock, renamed to ``<out>``
    by :meth:`publish` once complete, removed by :meth:`discard` if the run fails.

    A second run on the same ``--out`` finds the lock held and is refused; an ``.incomplete``
    directory whose lock is free is an interrupted run, left in place for the user to remove.
    """

    def __init__(self, out_dir: Path):
        self.out_dir = check_new_output(out_dir)
        self.work = incomplete(self.out_dir)
        try:
            self.work.parent.mkdir(parents=True, exist_ok=True)
            self.work.mkdir()
        except FileExistsError:
            self._refuse_existing()
        except OSError as err:
            raise ConfigError(f"{out_dir}: cannot create {self.work} ({err.strerror})") from None
        self._lock = open(self.work / LOCK, "w")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # another process made the directory first, a moment ago
            self._lock.close()
            raise ConfigError(f"{out_dir}: another run is writing to {self.work}") from None

    @classmethod
    def reopen(cls, out_dir: Path) -> "RunDirectory":
        """Take over an interrupted run's ``.incomplete`` directory (``--resume``) under the same lock."""
        self = cls.__new__(cls)
        self.out_dir = Path(out_dir).expanduser().resolve()
        self.work = incomplete(self.out_dir)
        if not self.work.is_dir():
            raise ConfigError(f"{out_dir}: no interrupted run to resume ({self.work} does not exist)")
        self._lock = open(self.work / LOCK, "a")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise ConfigError(f"{out_dir}: another run is writing to {self.work}") from None
        return self

    def _refuse_existing(self) -> None:
        with open(self.work / LOCK, "a") as probe:
            try:
                fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ConfigError(f"{self.out_dir}: another run is writing to {self.work}") from None
        raise ConfigError(f"{self.out_dir}: {self.work} holds an interrupted run; {interrupted_advice(self.out_dir)}")

    def publish(self) -> None:
        (self.work / LOCK).unlink()
        if self.out_dir.exists():
            self.out_dir.rmdir()  # empty (checked when the run started)
        self.work.replace(self.out_dir)
        self._lock.close()

    def discard(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)
        self._lock.close()

    def release(self) -> None:
        """Stop writing but keep ``.incomplete`` (it holds a checkpoint to resume from)."""
        self._lock.close()


def interrupted_advice(out_dir: Path) -> str:
    """What to do with an interrupted run: resume it from its checkpoint, or remove it."""
    from fedtask.checkpoint import latest_round

    work = incomplete(Path(out_dir))
    done = latest_round(work)
    if done is None:
        return (f"it has no checkpoint (federation.checkpoint_every was 0 or no checkpoint round was reached): "
                f"remove {work} to start again")
    return (f"it has a checkpoint at round {done}: continue it with `python run.py train --resume {out_dir}` "
            f"(or experiment --resume), or remove {work} to start again")


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
        raise ConfigError(f"{path}: checkpoint not found")
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors' own error type for truncated or foreign files
        raise ConfigError(f"{path}: not a readable safetensors file ({str(err).splitlines()[0][:120]})") from None


def read_json(path: Path) -> dict:
    """A JSON file the run wrote, or one line naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: missing") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"{path}: not valid JSON ({err})") from None


def file_digest(path: Path) -> str:
    """SHA-256 of a file, to tell later whether it is still the one a run wrote."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_head(heads_dir: Path, partition_id: int, task_name: str, private: dict[str, torch.Tensor]) -> None:
    """A task's head (and adapter) as its client keeps it, named by partition id and task."""
    heads_dir = Path(heads_dir)
    heads_dir.mkdir(parents=True, exist_ok=True)
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in task_name)[:80]
    save_state(private, heads_dir / f"{partition_id:05d}_{safe}.safetensors",
               {"task": task_name, "partition_id": str(partition_id)})
