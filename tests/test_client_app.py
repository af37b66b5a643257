"""The ClientApp in-process (no Ray): heads persist in context.state, one per task a node serves, and only
the encoder gradient leaves; the server side's discovery, evaluation and head checkpoints over a grid."""
import json
from uuid import uuid4

import pytest
import torch
from safetensors.torch import load_file
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict

from fedtask import client_app
from fedtask import task as task_math
from fedtask.config import load_config
from fedtask.data import load_tasks
from fedtask.engines import encoder_aggregator
from fedtask.federation import discover_partitions, evaluate_heads, load_heads, run_config_json, save_heads
from fedtask.models import build_model, initial_private_state
from strategies.flower_strategy import FedSGDStrategy, FederationError


pytestmark = pytest.mark.usefixtures("flower_identity")
SMALL = ["data.num_in_tasks=4", "data.num_out_tasks=2", "federation.tasks_per_round=2"]


def make_message(config, encoder, server_round, partition_id, warm_start=False, message_type="train"):
    record = RecordDict({"encoder": ArrayRecord(torch_state_dict=encoder),
                         "config": ConfigRecord({"run-config": json.dumps(config.to_dict(), sort_keys=True),
                                                 "server-round": server_round, "warm-start": warm_start,
                                                 "partition-id": partition_id})})
    return Message(content=record, dst_node_id=1, message_type=message_type)


def node(node_config, node_id=1):
    return Context(run_id=1, node_id=node_id, node_config=node_config, state=RecordDict(), run_config={})


def head(context, pid):
    return context.state[client_app.head_key(pid)].to_torch_state_dict()


class LoopbackGrid:
    """A Grid stand-in that hands every message to the real ClientApp functions of its node, in process
    and one at a time (as a SuperNode does); a raising client becomes an error reply, as in Flower."""

    def __init__(self, node_configs: dict[int, dict], fail=lambda msg: False):
        self.contexts = {nid: node(cfg, nid) for nid, cfg in node_configs.items()}
        self.fail = fail
        self.sent: list[Message] = []

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, *, timeout=None):
        handlers = {"query": client_app.query, "train": client_app.train, "evaluate": client_app.evaluate}
        replies = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid4().hex  # what Flower's grids do on sending
            self.sent.append(msg)
            try:
                if self.fail(msg):
                    raise RuntimeError("injected failure")
                replies.append(handlers[msg.metadata.message_type](msg, self.contexts[msg.metadata.dst_node_id]))
            except Exception as err:
                replies.append(Message(Error(code=0, reason=str(err)), reply_to=msg))
        return replies


@pytest.mark.parametrize("node_config, expected", [
    ({"partition-id": 2, "num-partitions": 8}, [2]),  # what the simulation sets
    ({"partition-range": "0-3"}, [0, 1, 2, 3]),
    ({"partition-range": " 12 - 12 "}, [12]),
])
def test_node_config_names_one_task_or_an_inclusive_range(node_config, expected):
    assert client_app.node_partitions(node_config) == expected


@pytest.mark.parametrize("node_config, key", [
    ({}, "partition-id"), ({"partition-id": 1, "partition-range": "0-3"}, "partition-range"),
    ({"partition-range": "3-1"}, "partition-range"), ({"partition-range": "0..3"}, "partition-range"),
    ({"partition-range": 4}, "partition-range"), ({"partition-id": "x"}, "partition-id"),
    ({"partition-id": -1}, "partition-id"),
])
def test_bad_node_config_is_one_line_naming_the_key(node_config, key):
    with pytest.raises(ValueError) as err:
        client_app.node_partitions(node_config)
    assert key in str(err.value) and "\n" not in str(err.value)


def test_head_persists_across_rounds_and_only_encoder_gradients_are_returned():
    config = load_config(None, SMALL + ["federation.head_steps=3"])
    taskset = load_tasks(config)
    model = build_model(config, taskset.spec)
    encoder = model.shared_state()
    context = node({"partition-id": 2})

    reply1 = client_app.train(make_message(config, encoder, 1, 2), context)
    head1 = head(context, 2)
    reply2 = client_app.train(make_message(config, encoder, 2, 2), context)
    assert int(reply2.content["metrics"]["partition-id"]) == 2 and "encoder-grad" in reply2.content
    head2 = head(context, 2)

    # only metrics and the encoder gradient travel back; the gradient covers the encoder alone
    assert set(reply1.content.keys()) == {"metrics", "encoder-grad"}
    grad_names = set(reply1.content["encoder-grad"].keys())
    assert grad_names == set(model.shared_parameter_names())
    assert not any(name.startswith("head.") for name in grad_names)
    assert int(reply1.content["metrics"]["partition-id"]) == 2

    # round 2 starts from round 1's head (reloaded from context.state), and moves it on
    fed = config.federation
    task = taskset.in_tasks[2]
    fresh = initial_private_state(model, 2, config.seed)
    expect1, _, _ = task_math.local_round(model, encoder, fresh, task.train_x, task.train_y, fed.head_lr,
                                          fed.head_weight_decay, fed.head_steps, False)
    expect2, _, _ = task_math.local_round(model, encoder, expect1, task.train_x, task.train_y, fed.head_lr,
                                          fed.head_weight_decay, fed.head_steps, False)
    assert all(torch.allclose(head1[k], expect1[k], atol=1e-6) for k in expect1)
    assert all(torch.allclose(head2[k], expect2[k], atol=1e-6) for k in expect2)
    assert not torch.allclose(head1["head.weight"], head2["head.weight"])


def test_a_node_serving_a_range_keeps_one_head_per_task_and_refuses_others():
    config = load_config(None, SMALL + ["federation.head_steps=2"])
    taskset = load_tasks(config)
    model = build_model(config, taskset.spec)
    encoder = model.shared_state()
    context = node({"partition-range": "0-3"})
    for pid in (1, 3, 1):  # several messages to one node in one round, and a task trained twice
        reply = client_app.train(make_message(config, encoder, 1, pid), context)
        assert int(reply.content["metrics"]["partition-id"]) == pid

    fed = config.federation
    for pid, times in ((1, 2), (3, 1)):
        expected = initial_private_state(model, pid, config.seed)
        task = taskset.in_tasks[pid]
        for _ in range(times):
            expected, _, _ = task_math.local_round(model, encoder, expected, task.train_x, task.train_y,
                                                   fed.head_lr, fed.head_weight_decay, fed.head_steps, False)
        assert all(torch.allclose(head(context, pid)[k], expected[k], atol=1e-6) for k in expected)
    assert {k for k in context.state.keys() if k.startswith(client_app.HEAD_PREFIX)} == {
        client_app.head_key(1), client_app.head_key(3)}

    with pytest.raises(ValueError, match="partition-id = 5: not served by this node"):
        client_app.train(make_message(config, encoder, 2, 5), context)
    unnamed = make_message(config, encoder, 2, 0)
    del unnamed.content["config"]["partition-id"]
    with pytest.raises(ValueError, match="no partition-id"):
        client_app.train(unnamed, context)


def test_discovery_maps_every_partition_and_refuses_a_partition_claimed_twice():
    grid = LoopbackGrid({11: {"partition-range": "0-3"}, 12: {"partition-range": "4-7"}, 13: {"partition-id": 8}})
    assert discover_partitions(grid, 9, reply_timeout=1.0) == {**{p: 11 for p in range(4)},
                                                               **{p: 12 for p in range(4, 8)}, 8: 13}
    assert discover_partitions(grid, 6, reply_timeout=1.0) == {**{p: 11 for p in range(4)}, 4: 12, 5: 12}

    clash = LoopbackGrid({11: {"partition-range": "0-3"}, 12: {"partition-range": "3-5"}})
    with pytest.raises(FederationError, match="partition 3 is claimed by two client nodes"):
        discover_partitions(clash, 6, reply_timeout=1.0)
    short = LoopbackGrid({11: {"partition-range": "0-3"}})
    with pytest.raises(FederationError, match=r"no client node holds partitions \[4, 5\]"):
        discover_partitions(short, 6, reply_timeout=1.0, timeout=0.3)
    broken = LoopbackGrid({11: {"partition-range": "0-x"}})
    with pytest.raises(FederationError, match="node config partition-range"):
        discover_partitions(broken, 4, reply_timeout=1.0)


def test_two_tasks_on_one_node_in_one_round_and_a_failure_is_blamed_on_its_own_task():
    config = load_config(None, ["data.num_in_tasks=4", "data.num_out_tasks=2", "federation.tasks_per_round=4",
                                "federation.warm_start_rounds=0"])
    model = build_model(config, load_tasks(config).spec)
    grid = LoopbackGrid({100: {"partition-range": "0-1"}, 101: {"partition-range": "2-3"}},
                        fail=lambda msg: msg.metadata.message_type == "train" and msg.content["config"]["partition-id"] == 1)
    rows = []
    strategy = FedSGDStrategy(
        encoder_aggregator(config, model.shared_state(), model.shared_parameter_names()),
        node_of_partition=discover_partitions(grid, 4, reply_timeout=1.0), run_config_json=run_config_json(config),
        tasks_per_round=4, warm_start_rounds=0, seed=0, max_failed_fraction=0.5, on_round=rows.append)
    messages = list(strategy.configure_train(1, ArrayRecord(torch_state_dict=model.shared_state()), ConfigRecord(),
                                             grid))
    assert sorted(int(m.content["config"]["partition-id"]) for m in messages) == [0, 1, 2, 3]
    assert sorted(m.metadata.dst_node_id for m in messages) == [100, 100, 101, 101]
    strategy.aggregate_train(1, grid.send_and_receive(messages))
    assert rows[0]["tasks"] == [0, 2, 3] and list(rows[0]["failed"]) == ["1"]
    assert "injected failure" in rows[0]["failed"]["1"]


def test_heads_are_saved_and_loaded_per_partition_by_each_node(tmp_path):
    config = load_config(None, SMALL + ["federation.final_head_steps=0"])
    taskset = load_tasks(config)
    model = build_model(config, taskset.spec)
    encoder = model.shared_state()
    nodes = {21: {"partition-range": "0-1"}, 22: {"partition-range": "2-3"}}
    grid = LoopbackGrid(nodes)
    node_of_partition = discover_partitions(grid, 4, reply_timeout=1.0, config_json=run_config_json(config))
    client_app.train(make_message(config, encoder, 1, 1), grid.contexts[21])  # task 1 trained, the rest not
    trained = head(grid.contexts[21], 1)

    assert save_heads(grid, node_of_partition, tmp_path / "ckpt", reply_timeout=1.0) == [0, 1, 2, 3]
    files = sorted((tmp_path / "ckpt").glob("*.safetensors"))
    assert [f.name[:5] for f in files] == ["00000", "00001", "00002", "00003"]
    assert all(torch.equal(load_file(str(files[1]))[k], trained[k]) for k in trained)
    fresh = initial_private_state(model, 2, config.seed)
    assert all(torch.equal(load_file(str(files[2]))[k], fresh[k]) for k in fresh)

    restarted = LoopbackGrid(nodes)  # new processes: empty context.state
    restarted_map = discover_partitions(restarted, 4, reply_timeout=1.0)
    assert load_heads(restarted, restarted_map, tmp_path / "ckpt", reply_timeout=1.0) == [0, 1, 2, 3]
    assert all(torch.equal(head(restarted.contexts[21], 1)[k], trained[k]) for k in trained)
    # evaluation uses the loaded heads: the same accuracies as the original nodes give
    before = evaluate_heads(grid, node_of_partition, ArrayRecord(torch_state_dict=encoder), run_config_json(config),
                            tmp_path / "heads_a", reply_timeout=1.0)
    after = evaluate_heads(restarted, restarted_map, ArrayRecord(torch_state_dict=encoder), run_config_json(config),
                           tmp_path / "heads_b", reply_timeout=1.0)
    assert [r["partition-id"] for r in after] == [0, 1, 2, 3] and before == after

    (tmp_path / "partial").mkdir()
    for f in files[:2] + files[3:]:
        (tmp_path / "partial" / f.name).write_bytes(f.read_bytes())
    with pytest.raises(FederationError, match=r"load-heads dir: 0 files .*00002_\*\.safetensors for partition 2"):
        load_heads(restarted, restarted_map, tmp_path / "partial", reply_timeout=1.0)
    unconfigured = LoopbackGrid(nodes)  # never sent the run config: save-heads cannot build initial heads
    with pytest.raises(FederationError, match="run-config: this node has not been sent the run configuration"):
        save_heads(unconfigured, discover_partitions(unconfigured, 4, reply_timeout=1.0), tmp_path / "x", 1.0)
    assert save_heads(unconfigured, node_of_partition={0: 21, 1: 21, 2: 22, 3: 22}, heads_dir=tmp_path / "y",
                      reply_timeout=1.0, config_json=run_config_json(config)) == [0, 1, 2, 3]


def test_warm_start_rounds_return_no_encoder_update():
    config = load_config(None, SMALL)
    taskset = load_tasks(config)
    encoder = build_model(config, taskset.spec).shared_state()
    context = node({"partition-id": 0})
    reply = client_app.train(make_message(config, encoder, 1, 0, warm_start=True), context)
    assert "encoder-grad" not in reply.content
    assert client_app.head_key(0) in context.state


def test_evaluation_refreshes_a_stale_head_on_the_final_encoder(tmp_path):
    config = load_config(None, SMALL + ["federation.final_head_steps=5"])
    taskset = load_tasks(config)
    model = build_model(config, taskset.spec)
    encoder = model.shared_state()
    context = node({"partition-id": 1})
    record = RecordDict({"encoder": ArrayRecord(torch_state_dict=encoder),
                         "config": ConfigRecord({"run-config": json.dumps(config.to_dict(), sort_keys=True),
                                                 "heads-dir": str(tmp_path), "partition-id": 1})})
    reply = client_app.evaluate(Message(content=record, dst_node_id=1, message_type="evaluate"), context)
    task = taskset.in_tasks[1]
    fed = config.federation
    expected = task_math.head_steps(model, encoder, initial_private_state(model, 1, config.seed), task.train_x,
                                    task.train_y, fed.head_lr, fed.head_weight_decay, 5)
    kept = head(context, 1)
    saved = load_file(str(next(tmp_path.glob("00001_*.safetensors"))))
    assert all(torch.allclose(kept[k], expected[k], atol=1e-6) and torch.allclose(saved[k], kept[k]) for k in kept)
    # the reported accuracy is the refreshed head's, on the held-out samples
    assert float(reply.content["metrics"]["accuracy"]) == task_math.accuracy(model, encoder, kept, task.holdout_x,
                                                                               task.holdout_y)
