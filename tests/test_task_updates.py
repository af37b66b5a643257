"""Each task's own encoder gradient from one encoder forward: the same numbers as ``local_round``.

``task.linear_head_round`` (one forward, the head in closed form, one pull-back) against
``task.local_round`` (three forwards, autograd), one task at a time and ``vmap``-ed over tasks, for
the encoders the vectorized engine accepts; the engine's per-task matrix (the MLP's written-out
passes and the generic ``vmap`` path) and its mean gradient against the same reference; and the
aggregator taking that matrix as it is, its DP release equal to ``dp_aggregate``'s.
"""
import functools

import pytest
import torch
from torch.func import vmap

from fedtask import task as task_math
from fedtask import vectorized
from fedtask.config import load_config
from fedtask.data.base import TaskSpec
from fedtask.models import build_model, initial_private_state
from strategies.dp import dp_aggregate
from strategies.fedsgd import EncoderAggregator
from strategies.sampling import noise_generator

LR, WD = 0.3, 1e-3


def mlp_case(tasks=5, samples=6):
    config = load_config(None, ["model.hidden_dim=32", "model.embedding_dim=4"])
    model = build_model(config, TaskSpec(3, "vector", (10,)))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(tasks, samples, 10, generator=gen)
    y = torch.randint(0, 3, (tasks, samples), generator=gen)
    y[1, :2] = task_math.IGNORE_INDEX  # an unlabelled position counts in no loss
    return model, x, y


def vision_case(encoder, norm, channels=1, size=28, tasks=3, samples=4):
    config = load_config(None, ["data.name=femnist", f"model.encoder={encoder}", f"model.norm={norm}",
                                "model.embedding_dim=8"])
    model = build_model(config, TaskSpec(5, "image", (channels, size, size)))
    gen = torch.Generator().manual_seed(2)
    return model, torch.randn(tasks, samples, channels, size, size, generator=gen), \
        torch.randint(0, 5, (tasks, samples), generator=gen)


def bert_case(bert_dir, tasks=3, samples=4, length=10):
    config = load_config(None, {"data": {"name": "stackoverflow"},
                                "model": {"encoder": "bert", "pretrained_path": str(bert_dir), "random_init": True,
                                          "embedding_dim": 8}})
    model = build_model(config, TaskSpec(3, "tokens", (length,), 60, pad_token_id=0))
    gen = torch.Generator().manual_seed(3)
    x = torch.randint(5, 60, (tasks, samples, length), generator=gen)
    x[:, :2, length - 3:] = 0  # padded rows
    return model, x, torch.randint(0, 3, (tasks, samples), generator=gen)


def heads_for(model, tasks):
    heads = [initial_private_state(model, pid, 0) for pid in range(tasks)]
    return {name: torch.stack([h[name] for h in heads]) for name in heads[0]}


def reference(model, shared, private, x, y, steps, warm):
    """``local_round`` per task under ``vmap``, as the engine ran it before."""
    one = functools.partial(task_math.local_round, model, shared, lr=LR, weight_decay=WD, steps=steps,
                            warm_start=warm, trainable=model.shared_parameter_names())

    def batched(p, xb, yb):
        new_p, grads, loss = one(p, xb, yb)
        return new_p, ({} if grads is None else grads), loss

    return vmap(batched)(private, x, y)


def assert_close(got, want, atol=1e-6, rtol=1e-4):
    assert got.keys() == want.keys()
    for name in want:
        assert torch.allclose(got[name], want[name], atol=atol, rtol=rtol), \
            (name, float((got[name] - want[name]).abs().max()))


def check_linear_head_round(model, x, y, steps=2, atol=1e-6, vmapped=True):
    model.eval()
    shared, private = model.shared_state(), heads_for(model, len(x))
    trainable = model.shared_parameter_names()
    for warm in (False, True) if vmapped else ():
        want_heads, want_grads, want_loss = reference(model, shared, private, x, y, steps, warm)
        batched = vmap(lambda p, xb, yb: (lambda out: (out[0], out[1] or {}, out[2]))(
            task_math.linear_head_round(model, shared, p, xb, yb, LR, WD, steps, warm, trainable)))
        got_heads, got_grads, got_loss = batched(private, x, y)
        assert_close(got_heads, want_heads, atol)
        assert_close(got_grads, want_grads, atol)
        assert torch.allclose(got_loss, want_loss, atol=atol)
        if not warm:
            assert set(got_grads) == set(trainable)
    # one task, no vmap: the Flower client's shapes
    one = {name: value[0] for name, value in private.items()}
    new, grads, loss = task_math.linear_head_round(model, shared, one, x[0], y[0], LR, WD, steps, False, trainable)
    ref_new, ref_grads, ref_loss = task_math.local_round(model, shared, one, x[0], y[0], LR, WD, steps, False,
                                                         trainable)
    assert_close(new, ref_new, atol)
    assert_close(grads, ref_grads, atol)
    assert torch.allclose(loss, ref_loss, atol=atol)


@pytest.mark.parametrize("steps", [0, 1, 3])
def test_linear_head_round_equals_local_round_mlp(steps):
    check_linear_head_round(*mlp_case(), steps=steps)


@pytest.mark.parametrize("encoder,norm,channels,size", [("resnet8", "group", 1, 28),
                                                        ("resnet18", "frozen_batch", 3, 32)])
def test_linear_head_round_equals_local_round_cnn(encoder, norm, channels, size):
    check_linear_head_round(*vision_case(encoder, norm, channels, size), atol=1e-5)


def test_linear_head_round_equals_local_round_transformer(bert_dir):
    # one task at a time only: transformers' attention mask is data-dependent control flow, which
    # vmap refuses (for local_round as well), so the vectorized engine runs no per-task BERT round
    check_linear_head_round(*bert_case(bert_dir), atol=1e-5, vmapped=False)


def test_linear_head_round_refuses_adapters(bert_dir):
    config = load_config(None, {"data": {"name": "stackoverflow"},
                                "model": {"encoder": "bert", "pretrained_path": str(bert_dir), "random_init": True,
                                          "embedding_dim": 8, "head": "lora", "lora_r": 4, "lora_alpha": 8.0}})
    model = build_model(config, TaskSpec(3, "tokens", (10,), 60, pad_token_id=0))
    with pytest.raises(ValueError, match="linear head"):
        task_math.linear_head_round(model, model.shared_state(), model.private_state(), torch.zeros(2, 10).long(),
                                    torch.zeros(2).long(), LR, WD, 1, False)


class Fed:
    head_lr, head_weight_decay, head_steps = LR, WD, 2


def flat(grads, names):
    return torch.cat([grads[name].flatten(1) for name in names], dim=1)


@pytest.mark.parametrize("written_out", [True, False], ids=["mlp-by-hand", "vmap"])
@pytest.mark.parametrize("chunk", [1, 2, 5])
def test_engine_task_updates_equal_local_round(monkeypatch, written_out, chunk):
    model, x, y = mlp_case()
    if not written_out:
        monkeypatch.setattr(vectorized, "_mlp_weights", lambda *args: None)
    shared, private, trainable = model.shared_state(), heads_for(model, len(x)), model.shared_parameter_names()
    want_heads, want_grads, want_loss = reference(model, shared, private, x, y, Fed.head_steps, False)
    heads, updates, losses = vectorized._task_updates_round(model, shared, private, x, y, Fed, trainable, chunk,
                                                            False)
    assert updates.shape == (len(x), sum(v.numel() for v in shared.values()))
    assert torch.allclose(updates, flat(want_grads, trainable), atol=1e-6, rtol=1e-4)
    assert_close(heads, want_heads)
    assert torch.allclose(losses, want_loss, atol=1e-6)
    # warm start: the heads move, no encoder gradient
    heads, updates, losses = vectorized._task_updates_round(model, shared, private, x, y, Fed, trainable, chunk, True)
    assert updates is None
    assert_close(heads, want_heads)


def test_engine_task_updates_reuse_one_matrix_per_model():
    model, x, y = mlp_case()
    shared, private, trainable = model.shared_state(), heads_for(model, len(x)), model.shared_parameter_names()
    _, first, _ = vectorized._task_updates_round(model, shared, private, x, y, Fed, trainable, 2, False)
    first = first.clone()
    three = {name: value[:3] for name, value in private.items()}
    _, fewer, _ = vectorized._task_updates_round(model, shared, three, x[:3], y[:3], Fed, trainable, 2, False)
    _, again, _ = vectorized._task_updates_round(model, shared, private, x, y, Fed, trainable, 2, False)
    assert fewer.data_ptr() == again.data_ptr() and len(fewer) == 3
    assert torch.equal(again, first)


@pytest.mark.parametrize("chunk", [1, 2, 5])
def test_mlp_mean_gradient_equals_autograd(monkeypatch, chunk):
    model, x, y = mlp_case()
    shared, private, trainable = model.shared_state(), heads_for(model, len(x)), model.shared_parameter_names()
    got = vectorized._mean_gradient_round(model, shared, private, x, y, Fed, trainable, chunk)
    monkeypatch.setattr(vectorized, "_mlp_weights", lambda *args: None)
    want = vectorized._mean_gradient_round(model, shared, private, x, y, Fed, trainable, chunk)
    assert_close(got[0], want[0])
    assert_close(got[1], want[1])
    assert torch.allclose(got[2], want[2])
    # and the mean of local_round's per-task gradients, as Flower clients send them
    _, per_task, _ = reference(model, shared, private, x, y, Fed.head_steps, False)
    assert_close(got[1], {name: value.mean(0) for name, value in per_task.items()})


def aggregator(**dp):
    state = {"w": torch.zeros(3, 4), "b": torch.zeros(4)}
    return EncoderAggregator(state, ["w", "b"], seed=3, optimizer="sgd", lr=0.1, **dp)


@pytest.mark.parametrize("dp", [{}, {"dp_enabled": True, "clipping_norm": 1.0, "noise_multiplier": 0.7,
                                      "expected_tasks": 5.0}])
def test_step_takes_the_flat_matrix_as_it_is(dp):
    rows = torch.randn(7, 16, generator=torch.Generator().manual_seed(0))
    rows[2] *= 0.01  # one task within the clipping bound
    rows[4] = 0.0  # and one with no update at all (C / 0 = inf: scaled by 1)
    grads = {"w": rows[:, :12].reshape(7, 3, 4), "b": rows[:, 12:]}
    a, b = aggregator(**dp), aggregator(**dp)
    stats_a, stats_b = a.step(grads, 4), b.step(rows, 4)
    assert stats_a == pytest.approx(stats_b)
    for name in a.params:
        assert torch.allclose(a.params[name], b.params[name], atol=1e-7)
    if dp:  # clipped and summed in one product, then noised = dp_aggregate on every row
        want = dp_aggregate(rows, 1.0, 0.7, 5.0, noise_generator(3, 4))
        assert stats_b["clipped_fraction"] == pytest.approx(want.clipped_fraction)
        assert torch.allclose(-torch.cat([b.params["w"].flatten(), b.params["b"]]) / 0.1, want.update, atol=1e-6)
        with pytest.raises(ValueError, match=r"non-finite row\(s\) \[5\]"):  # named among all rows
            aggregator(**dp).step(torch.cat([rows[:5], torch.full((1, 16), float("nan")), rows[6:]]), 5)
    with pytest.raises(ValueError, match=r"\(tasks, 16\)"):
        aggregator(**dp).step(rows[:, :15], 1)
