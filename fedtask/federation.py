"""The Flower server side: FedSGD on the shared encoder over a Grid, then utility.

``run_federation`` is the whole server side on any Flower Grid (simulation or a real
deployment): it learns which node holds which partition (task), drives
:class:`strategies.flower_strategy.FedSGDStrategy` through Flower's own round loop, asks
every IN task for its held-out accuracy (each client saves its own head) and returns a
:class:`fedtask.engines.TrainingOutcome`. The model is built from the task spec: the
server never loads task data. :class:`GridEngine` is the engine for a Grid that exists
already (``flwr run``); :mod:`fedtask.simulation` makes one on Ray.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedtask.checkpoint import Checkpoint, Checkpointing
from fedtask.data.base import TaskSpec
from fedtask.engines import RoundHook, TrainingFailed, TrainingOutcome, encoder_aggregator
from fedtask.models import build_model
from fedtask.rundir import HEADS
from strategies.flower_strategy import FedSGDStrategy, FederationError, check_replies

DISCOVERY_TIMEOUT = 300.0  # seconds for every client node to connect


def run_config_json(config) -> str:
    """The resolved configuration as every message carries it to the clients."""
    return json.dumps(config.to_dict(), sort_keys=True)


def discover_partitions(grid: Grid, num_tasks: int, reply_timeout: float,
                        timeout: float = DISCOVERY_TIMEOUT, *, config_json: str = "") -> dict[int, int]:
    """Map partition id -> node id by asking every node which partitions it holds.

    Node ids are random per run and a node may hold one partition or a range of them, so
    each node is asked once, as it connects, until every partition below ``num_tasks`` has
    its node. Two nodes claiming one partition is an error; partitions beyond the run's tasks
    are left unused. With ``config_json`` the nodes also remember the run configuration, which
    a later :func:`save_heads` needs on nodes that were never sent a train message.
    """
    deadline = time.monotonic() + timeout
    claims: dict[int, int] = {}
    asked: set[int] = set()
    answered: set[int] = set()
    while missing := sorted(set(range(num_tasks)) - set(claims)):
        new = [node for node in grid.get_node_ids() if node not in asked]
        if not new:
            if time.monotonic() > deadline:
                raise FederationError(f"no client node holds partitions {missing[:5]} ({len(asked)} nodes "
                                      f"connected in {timeout:g} s, {len(asked - answered)} did not answer)")
            time.sleep(0.2)
            continue
        asked.update(new)
        settings = ConfigRecord({"run-config": config_json} if config_json else {})
        messages = [Message(RecordDict({"config": settings}), message_type="query", dst_node_id=node)
                    for node in new]
        # the first message a node gets also waits for it to start its ClientApp
        wait = max(reply_timeout, deadline - time.monotonic())
        for reply in check_replies(grid.send_and_receive(messages, timeout=wait)):
            answered.add(reply.metadata.src_node_id)
            for pid in (int(p) for p in reply.content["info"]["partition-ids"]):
                if claims.setdefault(pid, reply.metadata.src_node_id) != reply.metadata.src_node_id:
                    raise FederationError(f"partition {pid} is claimed by two client nodes "
                                          f"({claims[pid]} and {reply.metadata.src_node_id}): "
                                          "check their node config partition-range / partition-id")
    return {pid: node for pid, node in sorted(claims.items()) if pid < num_tasks}


def evaluate_heads(grid: Grid, node_of_partition: dict[int, int], encoder: ArrayRecord, config_json: str,
                   heads_dir: Path, reply_timeout: float) -> list[dict]:
    """Every IN task's held-out accuracy on the final encoder; clients write their heads.

    One message per task, naming its partition (a node may serve several).
    """
    messages = [Message(content=RecordDict({
        "encoder": encoder,  # one object, pushed once however many messages share it
        "config": ConfigRecord({"run-config": config_json, "heads-dir": str(heads_dir), "partition-id": pid})}),
        message_type="evaluate", dst_node_id=node) for pid, node in sorted(node_of_partition.items())]
    replies = check_replies(grid.send_and_receive(messages, timeout=reply_timeout))
    if len(replies) < len(messages):
        raise FederationError(f"{len(messages) - len(replies)} tasks sent no evaluation before "
                              "federation.reply_timeout")
    rows = [{k: v for k, v in r.content["metrics"].items()} for r in replies]
    return sorted(rows, key=lambda row: row["partition-id"])


def _heads_query(grid: Grid, node_of_partition: dict[int, int], action: str, heads_dir: Path,
                 reply_timeout: float, config_json: str) -> list[int]:
    """One ``action`` query per node, naming the node's partitions; every partition must be handled."""
    by_node: dict[int, list[int]] = {}
    for pid, node in sorted(node_of_partition.items()):
        by_node.setdefault(node, []).append(pid)
    extra = {"run-config": config_json} if config_json else {}
    messages = [Message(RecordDict({"config": ConfigRecord({"action": action, "dir": str(heads_dir),
                                                            "partition-ids": pids, **extra})}),
                        message_type="query", dst_node_id=node) for node, pids in by_node.items()]
    replies = check_replies(grid.send_and_receive(messages, timeout=reply_timeout))
    if len(replies) < len(messages):
        raise FederationError(f"{len(messages) - len(replies)} of {len(messages)} client nodes sent no reply "
                              f"to {action} before federation.reply_timeout")
    handled = sorted(int(p) for r in replies for p in r.content["info"]["partition-ids"])
    if handled != sorted(node_of_partition):
        raise FederationError(f"{action}: the client nodes handled {len(handled)} partitions, "
                              f"not the {len(node_of_partition)} asked")
    return handled


def save_heads(grid: Grid, node_of_partition: dict[int, int], heads_dir: Path, reply_timeout: float, *,
               config_json: str = "") -> list[int]:
    """Each node writes the current head of every partition it holds to ``heads_dir`` (on its own disk).

    Heads never trained yet are written as their seeded initial state, so the directory holds
    every task: a checkpoint to resume from. A node builds those from the run configuration it
    was last sent; ``config_json`` sends it along (needed when a node has had no train message
    and discovery did not carry it). Returns the partition ids written.
    """
    return _heads_query(grid, node_of_partition, "save-heads", Path(heads_dir), reply_timeout, config_json)


def load_heads(grid: Grid, node_of_partition: dict[int, int], heads_dir: Path, reply_timeout: float) -> list[int]:
    """Each node reads its partitions' heads back from ``heads_dir`` (as :func:`save_heads` wrote them)."""
    return _heads_query(grid, node_of_partition, "load-heads", Path(heads_dir), reply_timeout, "")


def run_federation(grid: Grid, config, spec: TaskSpec, out_dir: Path, *, on_round: RoundHook | None = None,
                   checkpoints: Checkpointing | None = None, resume: Checkpoint | None = None) -> TrainingOutcome:
    """Train the shared encoder over the grid's clients (from ``resume``'s round on, if given)."""
    flwr_logger = logging.getLogger("flwr")
    flwr_logger.setLevel(max(flwr_logger.level, logging.WARNING))  # our progress lines replace Flower's
    config_json = run_config_json(config)
    fed = config.federation
    model = build_model(config, spec)
    initial = model.shared_state()
    try:
        node_of_partition = discover_partitions(grid, config.data.num_in_tasks, fed.reply_timeout)
    except FederationError as err:
        raise TrainingFailed(str(err)) from None
    aggregator = encoder_aggregator(config, initial, model.shared_parameter_names())
    rounds_log: list[dict] = []
    done = 0
    if resume is not None:  # the server's state from the checkpoint; each client reads its heads back
        initial, done = resume.initial_encoder, resume.round
        aggregator.restore(resume.server_state)
        rounds_log = list(resume.rounds)
        try:
            load_heads(grid, node_of_partition, resume.heads_dir, fed.reply_timeout)
        except FederationError as err:
            raise TrainingFailed(f"resuming: {err}") from None

    def record_round(row: dict) -> None:
        rounds_log.append(row)
        if on_round:
            on_round(row["round"], aggregator.state(), row)
        if checkpoints is not None and checkpoints.due(row["round"]):
            checkpoints.save(row["round"], rounds=rounds_log, aggregator=aggregator, initial_encoder=initial,
                             write_heads=lambda heads_dir: save_heads(grid, node_of_partition, heads_dir,
                                                                      fed.reply_timeout, config_json=config_json))

    strategy = FedSGDStrategy(
        aggregator, node_of_partition=node_of_partition, run_config_json=config_json,
        tasks_per_round=fed.tasks_per_round, warm_start_rounds=fed.warm_start_rounds, seed=config.seed,
        dp_enabled=config.dp.enabled, max_failed_fraction=fed.max_failed_fraction, on_round=record_round,
        first_round=done + 1)
    try:
        if done < fed.rounds:
            strategy.start(grid, ArrayRecord(torch_state_dict=aggregator.state()), num_rounds=fed.rounds - done,
                           timeout=fed.reply_timeout)
        final = aggregator.state()
        heads_dir = Path(out_dir) / HEADS
        evaluation = evaluate_heads(grid, node_of_partition, ArrayRecord(torch_state_dict=final), config_json,
                                    heads_dir, fed.reply_timeout)
    except FederationError as err:
        raise TrainingFailed(str(err)) from None
    return TrainingOutcome(initial_encoder=initial, encoder=final, rounds=rounds_log, evaluation=evaluation,
                           heads_dir=heads_dir)


class GridEngine:
    """The ``flower`` engine on a Grid that already exists (the ``flwr run`` ServerApp's)."""

    def __init__(self, grid: Grid):
        self.grid = grid

    def check(self, config) -> None:
        """The SuperLink's nodes bring their own resources: nothing to check here."""

    def train(self, config, taskset, out_dir: Path, *, on_round: RoundHook | None = None,
              checkpoints: Checkpointing | None = None, resume: Checkpoint | None = None) -> TrainingOutcome:
        return run_federation(self.grid, config, taskset.spec, out_dir, on_round=on_round, checkpoints=checkpoints,
                              resume=resume)
