"""The Flower ServerApp: FedSGD on the shared encoder, then utility and checkpoints.

``run_federation`` is the whole server side: it learns which node holds which
partition (task), drives :class:`strategies.flower_strategy.FedSGDStrategy` through
Flower's own round loop, asks every IN task for its held-out accuracy (each client
saves its own head), and returns the final encoder and the per-round metrics.
``app`` is the module-level ServerApp for ``flwr run .`` (config from run_config);
``build_server_app`` makes one bound to a config for ``run_simulation``.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Callable

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedtask.data import load_tasks
from fedtask.models import build_model
from strategies.fedsgd import EncoderAggregator
from strategies.flower_strategy import FedSGDStrategy, FederationError, check_replies

REPLY_TIMEOUT = 3600.0


def discover_partitions(grid: Grid, num_tasks: int, timeout: float = 300.0) -> dict[int, int]:
    """Map partition id -> node id by asking every node (node ids are random per run)."""
    deadline = time.monotonic() + timeout
    while len(node_ids := list(grid.get_node_ids())) < num_tasks:
        if time.monotonic() > deadline:
            raise FederationError(f"only {len(node_ids)} of {num_tasks} client nodes connected")
        time.sleep(0.2)
    messages = [Message(RecordDict({"config": ConfigRecord({})}), message_type="query", dst_node_id=node)
                for node in node_ids]
    replies = check_replies(grid.send_and_receive(messages, timeout=REPLY_TIMEOUT))
    mapping = {int(r.content["info"]["partition-id"]): r.metadata.src_node_id for r in replies}
    missing = sorted(set(range(num_tasks)) - set(mapping))
    if missing:
        raise FederationError(f"no client node holds partitions {missing[:5]}")
    return mapping


def evaluate_heads(grid: Grid, node_of_partition: dict[int, int], encoder: ArrayRecord, run_config_json: str,
                   heads_dir: str) -> list[dict]:
    """Every IN task's held-out accuracy on the final encoder; clients write their heads."""
    record = RecordDict({"encoder": encoder,
                         "config": ConfigRecord({"run-config": run_config_json, "heads-dir": heads_dir})})
    messages = [Message(content=record, message_type="evaluate", dst_node_id=node)
                for node in node_of_partition.values()]
    replies = check_replies(grid.send_and_receive(messages, timeout=REPLY_TIMEOUT))
    rows = [{k: v for k, v in r.content["metrics"].items()} for r in replies]
    return sorted(rows, key=lambda row: row["partition-id"])


def run_federation(grid: Grid, config: dict, out_dir: Path, progress: Callable[[dict], None] | None = None) -> dict:
    """Train the shared encoder over the grid's clients; returns the training outcome."""
    flwr_logger = logging.getLogger("flwr")
    flwr_logger.setLevel(max(flwr_logger.level, logging.WARNING))  # our progress lines replace Flower's
    config_json = json.dumps(config, sort_keys=True)
    fed, dp = config["federation"], config["dp"]
    num_tasks = config["data"]["num_in_tasks"]
    taskset = load_tasks(config)
    model = build_model(config, taskset)
    initial = model.shared_state()

    node_of_partition = discover_partitions(grid, num_tasks)
    aggregator = EncoderAggregator(initial, model.shared_parameter_names(), fed, dp, num_tasks, config["seed"])
    rounds_log: list[dict] = []

    def on_round(row: dict) -> None:
        rounds_log.append(row)
        if progress:
            progress(row)

    strategy = FedSGDStrategy(
        aggregator, node_of_partition, config_json, fed["tasks_per_round"], fed["warm_start_rounds"], config["seed"],
        dp_enabled=dp["enabled"], on_round=on_round)
    strategy.start(grid, ArrayRecord(torch_state_dict=initial), num_rounds=fed["rounds"], timeout=REPLY_TIMEOUT)
    final = aggregator.state()
    evaluation = evaluate_heads(grid, node_of_partition, ArrayRecord(torch_state_dict=final), config_json,
                                str(Path(out_dir) / "heads"))
    return {"initial_encoder": initial, "encoder": final, "rounds": rounds_log, "evaluation": evaluation}


def build_server_app(config: dict, out_dir: Path, outcome: dict, progress=None) -> ServerApp:
    """A ServerApp bound to ``config``; its outcome (or error) lands in ``outcome``."""
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            outcome.update(run_federation(grid, config, out_dir, progress))
        except BaseException as err:  # surfaced by the caller: run_simulation swallows it
            outcome["error"] = err

    return server


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """``flwr run .``: config path and overrides come from [tool.flwr.app.config]."""
    from fedtask.config import load_config
    from fedtask.pipeline import finish_training, prepare, print_round, resolve_out_dir

    run_config = context.run_config
    overrides = [item for item in str(run_config.get("overrides", "")).split(";") if item.strip()]
    config = prepare(load_config(str(run_config.get("config", "configs/synthetic.toml")), overrides))
    out_dir = resolve_out_dir(config, str(run_config.get("out", "")) or None, "flwr-run")
    outcome = run_federation(grid, config, out_dir, print_round)
    finish_training(config, out_dir, outcome)
