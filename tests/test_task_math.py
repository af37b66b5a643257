"""The per-task math: plain functions, correct gradients, no Flower."""
import subprocess
import sys

import torch

from fedtask import task as task_math
from fedtask.config import load_config
from fedtask.data import load_tasks
from fedtask.models import build_model, initial_private_state


def setup():
    config = load_config(None, ["data.num_in_tasks=4", "data.num_out_tasks=2", "federation.tasks_per_round=2"])
    taskset = load_tasks(config)
    model = build_model(config, taskset)
    return config, taskset, model


def test_encoder_gradient_matches_plain_autograd():
    config, taskset, model = setup()
    task = taskset.in_tasks[1]
    private = initial_private_state(model, 1, config["seed"])
    shared = model.shared_state()
    grads, loss = task_math.encoder_gradient(model, shared, private, task.train_x, task.train_y,
                                             model.shared_parameter_names())
    reference = build_model(config, taskset)
    reference.load_state_dict({**shared, **private})
    ref_loss = torch.nn.functional.cross_entropy(reference(task.train_x), task.train_y)
    ref_loss.backward()
    assert torch.allclose(loss, ref_loss)
    for name, param in reference.named_parameters():
        if name.startswith("encoder."):
            assert torch.allclose(grads[name], param.grad, atol=1e-6), name
    assert not any(name.startswith("head.") for name in grads)  # the head's gradient never leaves


def test_head_steps_lower_the_task_loss_and_leave_the_encoder_alone():
    config, taskset, model = setup()
    task = taskset.in_tasks[0]
    shared = model.shared_state()
    private = initial_private_state(model, 0, config["seed"])
    before = task_math.task_loss(model, shared, private, task.train_x, task.train_y)
    new = task_math.head_steps(model, shared, private, task.train_x, task.train_y, lr=0.5, weight_decay=0.0, steps=20)
    after = task_math.task_loss(model, shared, new, task.train_x, task.train_y)
    assert after < before - 0.05
    assert all(torch.equal(shared[k], model.shared_state()[k]) for k in shared)


def test_private_state_is_seeded_per_task():
    config, _, model = setup()
    a, b = initial_private_state(model, 0, 0), initial_private_state(model, 1, 0)
    assert not torch.equal(a["head.weight"], b["head.weight"])
    assert torch.equal(a["head.weight"], initial_private_state(model, 0, 0)["head.weight"])


def test_minibatches_are_seeded_by_round_and_task():
    a = task_math.batch_indices(100, 10, 0, 3, 7)
    assert torch.equal(a, task_math.batch_indices(100, 10, 0, 3, 7))
    assert not torch.equal(a, task_math.batch_indices(100, 10, 0, 4, 7))
    assert len(set(a.tolist())) == 10
    assert task_math.batch_indices(100, 0, 0, 3, 7) is None


def test_per_task_math_does_not_import_flower():
    code = "import sys, fedtask.task, strategies.fedsgd; print(any(m.split('.')[0] == 'flwr' for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
