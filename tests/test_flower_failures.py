"""Failing and hanging clients: a real Flower simulation drops them from their round and goes on;
the strategy stops the run when more fail than federation.max_failed_fraction allows."""
import json
import sys
import time

import cloudpickle
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedtask import client_app as real_client
from fedtask.config import load_config
from fedtask.pipeline import run_training
from fedtask.simulation import FlowerSimulationEngine
from strategies.flower_strategy import FedSGDStrategy, FederationError

REPLY_TIMEOUT = 5.0
BROKEN, SLOW = 1, 2  # partition ids: one raises in every training round, one hangs once

failing_app = ClientApp()


@failing_app.query()
def query(msg, context):
    return real_client.query(msg, context)


@failing_app.train()
def train(msg, context):
    partition = int(context.node_config["partition-id"])
    training = not bool(msg.content["config"]["warm-start"])
    if partition == BROKEN and training:
        raise RuntimeError("injected failure")
    if partition == SLOW and training and "slept" not in context.state:
        context.state["slept"] = ConfigRecord({"yes": True})
        time.sleep(REPLY_TIMEOUT + 2)  # its reply comes too late for its round
    return real_client.train(msg, context)


@failing_app.evaluate()
def evaluate(msg, context):
    return real_client.evaluate(msg, context)


@pytest.mark.simulation
def test_failed_and_timed_out_clients_are_dropped_and_logged(tmp_path):
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import this test module
    config = load_config("configs/synthetic.toml", [
        "data.num_in_tasks=6", "data.num_out_tasks=2", "federation.tasks_per_round=3", "federation.rounds=7",
        "federation.warm_start_rounds=1", f"federation.reply_timeout={REPLY_TIMEOUT}",
        "federation.max_failed_fraction=0.7", "federation.server_optimizer=\"sgd\""])
    run_training(config, tmp_path / "run", engine=FlowerSimulationEngine(client_app=failing_app), on_round=None)

    rounds = json.loads((tmp_path / "run" / "metrics.json").read_text())["rounds"]
    assert len(rounds) == 7  # the run went on to the end
    failures = {pid: reason for row in rounds for pid, reason in row.get("failed", {}).items()}
    assert "injected failure" in failures[str(BROKEN)]
    assert "reply_timeout" in failures[str(SLOW)]
    for row in rounds:  # a failed task is never among the aggregated ones
        assert not set(row.get("failed", {})) & {str(t) for t in row["tasks"]}
    sampled_broken = [row for row in rounds[1:] if str(BROKEN) in row.get("failed", {})]
    assert sampled_broken and all(BROKEN not in row["tasks"] for row in sampled_broken)
    assert (tmp_path / "run" / "results.json").is_file()


class _Node:
    def __init__(self, node_id):
        self.src_node_id = node_id


def _reply(node_id: int, pid: int | None, error: str | None = None):
    """A stand-in for a reply Message: what aggregate_train reads of one."""
    class Reply:
        metadata = _Node(node_id)

        def has_error(self):
            return error is not None

        @property
        def error(self):
            return Error(code=0, reason=error)

        content = RecordDict({"metrics": MetricRecord({"partition-id": pid or 0, "loss": 1.0}),
                              "encoder-grad": ArrayRecord(torch_state_dict={"w": torch.ones(2)})})
    return Reply()


class _Aggregator:
    def step(self, grads, server_round):
        self.grads = grads
        return {}

    def state(self):
        return {"w": torch.zeros(2)}


@pytest.mark.parametrize("allowed, stops", [(0.0, True), (0.5, False)])
def test_too_many_failures_stop_the_run(allowed, stops):
    aggregator = _Aggregator()
    strategy = FedSGDStrategy(aggregator, node_of_partition={0: 100, 1: 101, 2: 102, 3: 103}, run_config_json="{}",
                              tasks_per_round=4, warm_start_rounds=0, seed=0, max_failed_fraction=allowed)
    strategy._sampled = [0, 1, 2, 3]
    replies = [_reply(100, 0), _reply(101, 1), _reply(102, None, error="boom")]  # 103 never answers
    if stops:
        with pytest.raises(FederationError, match=r"round 1: 2 of 4 sampled tasks failed .* task 2: boom"):
            strategy.aggregate_train(1, replies)
    else:
        strategy.aggregate_train(1, replies)
        assert len(aggregator.grads) == 2  # the two that answered
