"""The ClientApp in-process (no Ray): head persists in context.state, only the encoder gradient leaves."""
import json

import pytest
import torch
from safetensors.torch import load_file
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from fedtask import client_app
from fedtask import task as task_math
from fedtask.config import load_config
from fedtask.data import load_tasks
from fedtask.models import build_model, initial_private_state


pytestmark = pytest.mark.usefixtures("flower_identity")


def make_message(config, encoder, server_round, warm_start=False):
    record = RecordDict({"encoder": ArrayRecord(torch_state_dict=encoder),
                         "config": ConfigRecord({"run-config": json.dumps(config.to_dict(), sort_keys=True),
                                                 "server-round": server_round, "warm-start": warm_start})})
    return Message(content=record, dst_node_id=1, message_type="train")


def test_head_persists_across_rounds_and_only_encoder_gradients_are_returned():
    config = load_config(None, ["data.num_in_tasks=4", "data.num_out_tasks=2", "federation.tasks_per_round=2",
                                "federation.head_steps=3"])
    taskset = load_tasks(config)
    model = build_model(config, taskset.spec)
    encoder = model.shared_state()
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 2}, state=RecordDict(), run_config={})

    reply1 = client_app.train(make_message(config, encoder, 1), context)
    head1 = context.state[client_app.HEAD_KEY].to_torch_state_dict()
    reply2 = client_app.train(make_message(config, encoder, 2), context)
    assert int(reply2.content["metrics"]["partition-id"]) == 2 and "encoder-grad" in reply2.content
    head2 = context.state[client_app.HEAD_KEY].to_torch_state_dict()

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


def test_warm_start_rounds_return_no_encoder_update():
    config = load_config(None, ["data.num_in_tasks=4", "data.num_out_tasks=2", "federation.tasks_per_round=2"])
    taskset = load_tasks(config)
    encoder = build_model(config, taskset.spec).shared_state()
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    reply = client_app.train(make_message(config, encoder, 1, warm_start=True), context)
    assert "encoder-grad" not in reply.content
    assert client_app.HEAD_KEY in context.state


def test_evaluation_refreshes_a_stale_head_on_the_final_encoder(tmp_path):
    config = load_config(None, ["data.num_in_tasks=4", "data.num_out_tasks=2", "federation.tasks_per_round=2",
                                "federation.final_head_steps=5"])
    taskset = load_tasks(config)
    model = build_model(config, taskset.spec)
    encoder = model.shared_state()
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 1}, state=RecordDict(), run_config={})
    record = RecordDict({"encoder": ArrayRecord(torch_state_dict=encoder),
                         "config": ConfigRecord({"run-config": json.dumps(config.to_dict(), sort_keys=True),
                                                 "heads-dir": str(tmp_path)})})
    reply = client_app.evaluate(Message(content=record, dst_node_id=1, message_type="evaluate"), context)
    task = taskset.in_tasks[1]
    fed = config.federation
    expected = task_math.head_steps(model, encoder, initial_private_state(model, 1, config.seed), task.train_x,
                                    task.train_y, fed.head_lr, fed.head_weight_decay, 5)
    kept = context.state[client_app.HEAD_KEY].to_torch_state_dict()
    saved = load_file(str(next(tmp_path.glob("00001_*.safetensors"))))
    assert all(torch.allclose(kept[k], expected[k], atol=1e-6) and torch.allclose(saved[k], kept[k]) for k in kept)
    # the reported accuracy is the refreshed head's, on the held-out samples
    assert float(reply.content["metrics"]["accuracy"]) == task_math.accuracy(model, encoder, kept, task.holdout_x,
                                                                               task.holdout_y)
