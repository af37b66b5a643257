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
    model = build_model(config, taskset.spec)
    return config, taskset, model


def test_encoder_gradient_matches_plain_autograd():
    config, taskset, model = setup()
    task = taskset.in_tasks[1]
    private = initial_private_state(model, 1, config.seed)
    shared = model.shared_state()
    grads, loss = task_math.encoder_gradient(model, shared, private, task.train_x, task.train_y,
                                             model.shared_parameter_names())
    reference = build_model(config, taskset.spec)
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
    private = initial_private_state(model, 0, config.seed)
    before = task_math.task_loss(model, shared, private, task.train_x, task.train_y)
    new = task_math.head_steps(model, shared, private, task.train_x, task.train_y, lr=0.5, weight_decay=0.0, steps=20)
    after = task_math.task_loss(model, shared, new, task.train_x, task.train_y)
    assert after < before - 0.05
    assert all(torch.equal(shared[k], model.shared_state()[k]) for k in shared)


def test_closed_form_head_gradient_matches_autograd():
    gen = torch.Generator().manual_seed(0)
    for shape in [(32,), (4, 7)]:  # one label per sample, and per-position labels with ignored ones
        embeddings = torch.randn(*shape, 8, dtype=torch.float64, generator=gen)
        labels = torch.randint(0, 5, shape, generator=gen)
        labels.view(-1)[:3] = task_math.IGNORE_INDEX
        head = {"head.weight": torch.randn(5, 8, dtype=torch.float64, generator=gen),
                "head.bias": torch.randn(5, dtype=torch.float64, generator=gen)}
        grads, loss, grad_embeddings = task_math.head_gradient(head, embeddings, labels)
        ref_grads, ref_loss = torch.func.grad_and_value(lambda h: task_math.head_loss(h, embeddings, labels))(head)
        ref_embeddings = torch.func.grad(lambda e: task_math.head_loss(head, e, labels))(embeddings)
        assert torch.allclose(loss, ref_loss, atol=1e-12)
        assert all(torch.allclose(grads[k], ref_grads[k], atol=1e-12) for k in head)
        assert torch.allclose(grad_embeddings, ref_embeddings, atol=1e-12)


def test_head_math_on_many_tasks_at_once_equals_one_task_at_a_time():
    gen = torch.Generator().manual_seed(1)
    embeddings, labels = torch.randn(6, 4, 7, 8, generator=gen), torch.randint(0, 5, (6, 4, 7), generator=gen)
    labels[2, 1] = task_math.IGNORE_INDEX
    heads = {"head.weight": torch.randn(6, 5, 8, generator=gen), "head.bias": torch.randn(6, 5, generator=gen)}
    together = task_math.head_steps_on_embeddings(heads, embeddings, labels, lr=0.3, weight_decay=0.01, steps=3)
    for t in range(6):
        alone = task_math.head_steps_on_embeddings({k: v[t] for k, v in heads.items()}, embeddings[t], labels[t],
                                                   lr=0.3, weight_decay=0.01, steps=3)
        assert all(torch.allclose(together[k][t], alone[k], atol=1e-6) for k in heads)
    _, losses, _ = task_math.head_gradient(heads, embeddings, labels)
    assert losses.shape == (6,)


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
