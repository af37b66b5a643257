"""Server-side FedSGD: averaging in partition order, clipping, optimizer, seeded sampling."""
import torch

from strategies.fedsgd import EncoderAggregator
from strategies.sampling import sample_fixed, sample_poisson, sample_round

FED = {"grad_clip": 0.0, "normalize_task_gradients": False, "tasks_per_round": 2, "server_optimizer": "sgd",
       "server_lr": 0.5, "server_weight_decay": 0.0, "server_momentum": 0.0}
DP_OFF = {"enabled": False, "clipping_norm": 1.0, "noise_multiplier": 0.0}


def make(**fed):
    state = {"w": torch.zeros(3), "b": torch.ones(2), "running": torch.tensor([7.0])}
    return EncoderAggregator(state, ["w", "b"], {**FED, **fed}, DP_OFF, num_tasks=4, seed=0)


def grads(*rows):
    return [{"w": torch.tensor(r[:3]), "b": torch.tensor(r[3:])} for r in rows]


def test_sgd_step_applies_the_mean_gradient():
    agg = make()
    agg.step(grads([1.0, 2.0, 3.0, 4.0, 5.0], [3.0, 2.0, 1.0, 0.0, -1.0]), server_round=1)
    state = agg.state()
    assert torch.allclose(state["w"], -0.5 * torch.tensor([2.0, 2.0, 2.0]))
    assert torch.allclose(state["b"], 1 - 0.5 * torch.tensor([2.0, 2.0]))
    assert torch.equal(state["running"], torch.tensor([7.0]))  # untrained tensors are released unchanged


def test_stacked_and_listed_gradients_agree():
    rows = grads([1.0, 2.0, 3.0, 4.0, 5.0], [3.0, 2.0, 1.0, 0.0, -1.0])
    a, b = make(), make()
    a.step(rows, 1)
    b.step({k: torch.stack([r[k] for r in rows]) for k in ("w", "b")}, 1)
    assert all(torch.equal(a.state()[k], b.state()[k]) for k in ("w", "b"))


def test_aggregate_is_clipped_to_grad_clip():
    agg = make(grad_clip=1.0, server_lr=1.0)
    metrics = agg.step(grads([30.0, 0.0, 40.0, 0.0, 0.0]), 1)
    assert abs(metrics["aggregate_norm"] - 50.0) < 1e-4
    assert abs(float(agg.state()["w"].norm()) - 1.0) < 1e-5


def test_normalized_task_gradients_weigh_tasks_equally():
    agg = make(normalize_task_gradients=True, server_lr=1.0)
    agg.step(grads([100.0, 0.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0, 0.0]), 1)
    assert torch.allclose(agg.state()["w"], torch.tensor([-0.5, -0.5, 0.0]))


def test_dp_step_clips_each_task_and_divides_by_expected_count():
    state = {"w": torch.zeros(2)}
    dp = {"enabled": True, "clipping_norm": 1.0, "noise_multiplier": 0.0}
    agg = EncoderAggregator(state, ["w"], {**FED, "server_lr": 1.0, "tasks_per_round": 4}, dp, num_tasks=8, seed=0)
    metrics = agg.step([{"w": torch.tensor([3.0, 4.0])}, {"w": torch.tensor([0.1, 0.0])}], 1)
    # clipped rows (0.6, 0.8) + (0.1, 0) summed, divided by the expected 4 tasks, not the 2 that came
    assert torch.allclose(agg.state()["w"], -torch.tensor([0.7, 0.8]) / 4)
    assert metrics["clipped_fraction"] == 0.5


def test_sampling_depends_on_seed_and_round_only():
    assert sample_fixed(64, 8, 0, 5) == sample_fixed(64, 8, 0, 5)
    assert sample_fixed(64, 8, 0, 5) != sample_fixed(64, 8, 0, 6)
    assert len(set(sample_fixed(64, 8, 0, 5))) == 8
    counts = [len(sample_poisson(100, 0.25, 0, r)) for r in range(200)]
    assert 22 < sum(counts) / len(counts) < 28
    assert sample_round(64, 8, 0, 3, warm_start=True, dp_enabled=True) == sample_fixed(64, 8, 0, 3)
    assert sample_round(64, 8, 0, 3, warm_start=False, dp_enabled=True) == sample_poisson(64, 8 / 64, 0, 3)
