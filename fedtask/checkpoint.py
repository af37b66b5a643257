"""Checkpoints: everything training needs to continue, written every ``federation.checkpoint_every`` rounds.

A checkpoint lives in the run's working directory (``<out>.incomplete``) as
``checkpoints/round_NNNNN/`` and counts only once ``checkpoints/latest.json`` names it:
the pointer is replaced atomically after every file of the round is on disk, so a run
killed while writing one resumes from the previous. Older rounds are then removed.

What is in one: the released encoder and the initial one, the server optimizer's state
(:meth:`strategies.fedsgd.EncoderAggregator.checkpoint_state`), every task's head
(``heads.safetensors`` stacked by the vectorized engine, or ``heads/`` written by each
Flower client), the round log so far, the round index and the encoder rounds the
accountant has counted. Task sampling, minibatches, augmentation and DP noise are
seeded per (seed, round) (``strategies.sampling``, ``fedtask.task.batch_indices``), so
the round index *is* their generator state: a resumed run draws what the uninterrupted
one would have.
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from fedtask import rundir
from fedtask.config import ConfigError

CHECKPOINTS = "checkpoints"
LATEST = "latest.json"
ENCODER = "encoder.safetensors"
INITIAL_ENCODER = "encoder_init.safetensors"
SERVER = "server.safetensors"  # the aggregator: encoder parameters and optimizer state
HEADS_STACKED = "heads.safetensors"  # the vectorized engine's heads, one stacked tensor per name
HEADS_DIR = "heads"  # Flower clients' heads, one file per task (fedtask.rundir.save_head)
STATE = "state.json"
FORMAT = 1

# How each source of randomness continues after a resume (written into state.json for the reader).
GENERATORS = {
    "task_sampling": "strategies.sampling.round_generator(seed, round): seeded per round",
    "dp_noise": "strategies.sampling.noise_generator(seed, round): seeded per round",
    "minibatches": "fedtask.task.batch_indices(seed, round, task): seeded per round and task",
}


@dataclass
class Checkpoint:
    """A checkpoint read back: where it is and what the server side needs."""

    path: Path
    round: int
    rounds: list[dict]
    elapsed_s: float
    fingerprint: str
    engine: str
    initial_encoder: dict[str, torch.Tensor]
    server_state: dict[str, torch.Tensor]

    @property
    def heads_dir(self) -> Path:
        return self.path / HEADS_DIR

    def stacked_heads(self) -> dict[str, torch.Tensor]:
        return rundir.load_state(self.path / HEADS_STACKED)


class Checkpointing:
    """What an engine is handed to write checkpoints: where, how often, and what identifies the run.

    ``earlier_s`` is the training time before a resume, so the time a checkpoint records
    (and metrics.json's) is the run's total, not the last process's.
    """

    def __init__(self, run_dir: Path, *, every: int, fingerprint: str, engine: str, earlier_s: float = 0.0):
        self.run_dir, self.every, self.fingerprint, self.engine = Path(run_dir), every, fingerprint, engine
        self.earlier_s = earlier_s
        self.started = time.perf_counter()

    def elapsed_s(self) -> float:
        return self.earlier_s + time.perf_counter() - self.started

    def due(self, server_round: int) -> bool:
        return is_due(server_round, self.every)

    def save(self, server_round: int, *, rounds: list[dict], aggregator, initial_encoder: dict,
             stacked_heads: dict | None = None, write_heads=None) -> Path:
        return write_checkpoint(self.run_dir, server_round=server_round, rounds=rounds, elapsed_s=self.elapsed_s(),
                                fingerprint=self.fingerprint, engine=self.engine, initial_encoder=initial_encoder,
                                server_state=aggregator.checkpoint_state(), encoder=aggregator.state(),
                                stacked_heads=stacked_heads, write_heads=write_heads)


def round_dir(run_dir: Path, server_round: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"round_{server_round:05d}"


def is_due(server_round: int, every: int) -> bool:
    return every > 0 and server_round % every == 0


def encoder_rounds_done(rounds: list[dict]) -> int:
    """Rounds that released an encoder update: what the DP accountant counts."""
    return sum(1 for row in rounds if row.get("phase") == "train")


def write_checkpoint(run_dir: Path, *, server_round: int, rounds: list[dict], elapsed_s: float, fingerprint: str,
                     engine: str, initial_encoder: dict, server_state: dict, encoder: dict,
                     stacked_heads: dict | None = None, write_heads=None) -> Path:
    """Write round ``server_round``'s checkpoint and make it the latest.

    ``stacked_heads`` (vectorized) is saved here; ``write_heads(dir)`` (Flower) has the
    clients write theirs into ``dir`` before the checkpoint counts.
    """
    run_dir = Path(run_dir)
    target = round_dir(run_dir, server_round)
    shutil.rmtree(target, ignore_errors=True)  # a half-written one from before a kill
    target.mkdir(parents=True)
    rundir.save_state(encoder, target / ENCODER)
    rundir.save_state(initial_encoder, target / INITIAL_ENCODER)
    rundir.save_state(server_state, target / SERVER)
    if stacked_heads is not None:
        rundir.save_state(stacked_heads, target / HEADS_STACKED)
    if write_heads is not None:
        write_heads(target / HEADS_DIR)
    rundir.write_json(target / STATE, {
        "format": FORMAT, "round": server_round, "engine": engine, "fingerprint": fingerprint,
        "encoder_rounds_accounted": encoder_rounds_done(rounds), "elapsed_s": elapsed_s,
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "generators": GENERATORS, "rounds": rounds})
    rundir.write_json(run_dir / CHECKPOINTS / LATEST, {"round": server_round, "dir": target.name})
    for old in (run_dir / CHECKPOINTS).glob("round_*"):
        if old != target:
            shutil.rmtree(old, ignore_errors=True)
    return target


def latest_round(run_dir: Path) -> int | None:
    """The round of the run's latest complete checkpoint, or None."""
    pointer = Path(run_dir) / CHECKPOINTS / LATEST
    if not pointer.is_file():
        return None
    try:
        return int(json.loads(pointer.read_text())["round"])
    except (ValueError, KeyError, TypeError):
        return None


def load_checkpoint(run_dir: Path) -> Checkpoint:
    """The latest complete checkpoint of the run being built in ``run_dir``, or one line saying why not."""
    run_dir = Path(run_dir)
    pointer = rundir.read_json(run_dir / CHECKPOINTS / LATEST)
    path = run_dir / CHECKPOINTS / str(pointer.get("dir", ""))
    state = rundir.read_json(path / STATE)
    if state.get("format") != FORMAT:
        raise ConfigError(f"{path / STATE}: checkpoint format {state.get('format')!r}; this fedtask reads {FORMAT}")
    return Checkpoint(path=path, round=int(state["round"]), rounds=list(state["rounds"]),
                      elapsed_s=float(state.get("elapsed_s", 0.0)), fingerprint=str(state["fingerprint"]),
                      engine=str(state["engine"]), initial_encoder=rundir.load_state(path / INITIAL_ENCODER),
                      server_state=rundir.load_state(path / SERVER))


def remove_checkpoints(run_dir: Path) -> None:
    """A finished run needs none: the published directory holds the outputs only."""
    shutil.rmtree(Path(run_dir) / CHECKPOINTS, ignore_errors=True)
