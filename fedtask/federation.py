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
                        timeout: float = DISCOVERY_TIMEOUT) -> dict[int, int]:
    """Map partition id -> node id by asking every node (node ids are random per run)."""
    deadline = time.monotonic() + timeout
    while len(node_ids := list(grid.get_node_ids())) < num_tasks:
        if time.monotonic() > deadline:
            raise FederationError(f"only {len(node_ids)} of {num_tasks} client nodes connected")
        time.sleep(0.2)
    messages = [Message(RecordDict({"config": ConfigRecord({})}), message_type="query", dst_node_id=node)
                for node in node_ids]
    # the first message a worker gets also waits for it to start and load its tasks
    replies = check_replies(grid.send_and_receive(messages, timeout=max(reply_timeout, timeout)))
    mapping = {int(r.content["info"]["partition-id"]): r.metadata.src_node_id for r in replies}
    missing = sorted(set(range(num_tasks)) - set(mapping))
    if missing:
        raise FederationError(f"no client node holds partitions {missing[:5]}")
    return mapping


def evaluate_heads(grid: Grid, node_of_partition: dict[int, int], encoder: ArrayRecord, config_json: str,
                   heads_dir: Path, reply_timeout: float) -> list[dict]:
    """Every IN task's held-out accuracy on the final encoder; clients write their heads."""
    record = RecordDict({"encoder": encoder,
                         "config": ConfigRecord({"run-config": config_json, "heads-dir": str(heads_dir)})})
    messages = [Message(content=record, message_type="evaluate", dst_node_id=node)
                for node in node_of_partition.values()]
    replies = check_replies(grid.send_and_receive(messages, timeout=reply_timeout))
    if len(replies) < len(messages):
        raise FederationError(f"{len(messages) - len(replies)} tasks sent no evaluation before "
                              "federation.reply_timeout")
    rows = [{k: v for k, v in r.content["metrics"].items()} for r in replies]
    return sorted(rows, key=lambda row: row["partition-id"])


def run_federation(grid: Grid, config, spec: TaskSpec, out_dir: Path, *,
                   on_round: RoundHook | None = None) -> TrainingOutcome:
    """Train the shared encoder over the grid's clients."""
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

    def record_round(row: dict) -> None:
        rounds_log.append(row)
        if on_round:
            on_round(row["round"], aggregator.state(), row)

    strategy = FedSGDStrategy(
        aggregator, node_of_partition=node_of_partition, run_config_json=config_json,
        tasks_per_round=fed.tasks_per_round, warm_start_rounds=fed.warm_start_rounds, seed=config.seed,
        dp_enabled=config.dp.enabled, max_failed_fraction=fed.max_failed_fraction, on_round=record_round)
    try:
        strategy.start(grid, ArrayRecord(torch_state_dict=initial), num_rounds=fed.rounds, timeout=fed.reply_timeout)
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

    def train(self, config, taskset, out_dir: Path, *, on_round: RoundHook | None = None) -> TrainingOutcome:
        return run_federation(self.grid, config, taskset.spec, out_dir, on_round=on_round)
