"""With q = 1 our DP aggregate matches Flower's own server-side fixed-clipping DP.

Flower's ``DifferentialPrivacyServerSideFixedClipping`` (wrapping ``FedAvg``) clips each
reply's update (reply minus what was sent) to C, averages, and adds N(0, (zC/n)^2). With
every task sampled (q = 1, expected_tasks = n) ``dp_aggregate`` is the same mechanism; we
drive the real strategy (configure_train + aggregate_train on reply Messages) on the same
fixed updates many times and compare the two output distributions coordinate by coordinate.
"""

import logging
import math

import numpy as np
import pytest
import torch
from scipy import stats

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg

from strategies.dp import clip_updates, dp_aggregate

SHAPES = {"w": (8, 8), "b": (8,)}
NODES = [101, 102, 103, 104, 105]
NORMS = [0.3, 0.9, 2.5, 7.0, 1.4]  # C = 1: three of five updates get clipped
C = 1.0


class _FakeGrid:
    """The one Grid method FedAvg.configure_train needs: which nodes are connected."""

    def get_node_ids(self):
        return list(NODES)


@pytest.fixture
def flower_env(flower_identity, caplog):
    """Quiet logs; numpy's RNG seeded for Flower's noise and restored afterwards."""
    caplog.set_level(logging.WARNING, logger="flwr")
    state = np.random.get_state()
    np.random.seed(2024)  # Flower draws its noise from numpy's global RNG
    yield
    np.random.set_state(state)


def flatten_tensors(tensors: dict) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors.values()])


def unflatten_like(vec: torch.Tensor, template: dict) -> dict:
    parts = torch.split(vec, [t.numel() for t in template.values()])
    return {name: part.reshape(t.shape) for (name, t), part in zip(template.items(), parts)}


def _fixed_problem():
    g = torch.Generator().manual_seed(0)
    current = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    p = sum(math.prod(s) for s in SHAPES.values())
    d = torch.randn(len(NODES), p, generator=g, dtype=torch.float64)
    d = d / torch.linalg.vector_norm(d, dim=1, keepdim=True)
    updates = (d * torch.tensor(NORMS, dtype=torch.float64).unsqueeze(1)).float()
    return current, updates


def _to_record(params: dict) -> ArrayRecord:
    return ArrayRecord({k: Array(v.numpy()) for k, v in params.items()})


def _flower_round(strategy, current, updates) -> torch.Tensor:
    """One real configure_train / aggregate_train round; returns the new params minus current."""
    msgs = list(strategy.configure_train(1, _to_record(current), ConfigRecord({}), _FakeGrid()))
    by_node = {m.metadata.dst_node_id: m for m in msgs}
    assert sorted(by_node) == NODES
    cur_vec = flatten_tensors(current)
    replies = []
    for i, node in enumerate(NODES):  # each client trained and returns current + its update
        trained = unflatten_like(cur_vec + updates[i], current)
        content = RecordDict(
            {"arrays": _to_record(trained), "metrics": MetricRecord({"num-examples": 1})}
        )
        replies.append(Message(content, reply_to=by_node[node]))
    arrays, _ = strategy.aggregate_train(1, replies)
    out = {k: torch.from_numpy(np.asarray(v)) for k, v in zip(arrays.keys(), arrays.to_numpy_ndarrays())}
    return flatten_tensors(out) - cur_vec


def _strategy(z: float):
    inner = FedAvg(fraction_train=1.0, min_train_nodes=len(NODES), min_available_nodes=len(NODES))
    return DifferentialPrivacyServerSideFixedClipping(inner, z, C, len(NODES))


def test_noiseless_flower_matches_our_clipped_mean_exactly(flower_env):
    current, updates = _fixed_problem()
    ours = dp_aggregate(updates, C, 0.0, len(NODES), torch.Generator().manual_seed(0))
    flower = _flower_round(_strategy(0.0), current, updates)
    torch.testing.assert_close(flower, ours.update, atol=2e-6, rtol=0)
    assert ours.clipped_fraction == pytest.approx(3 / 5)


def test_noised_flower_and_ours_have_the_same_distribution(flower_env):
    z, reps = 1.7, 1000
    n = len(NODES)
    current, updates = _fixed_problem()
    strategy = _strategy(z)
    flower = torch.stack([_flower_round(strategy, current, updates) for _ in range(reps)]).double()
    g = torch.Generator().manual_seed(1)
    ours = torch.stack([dp_aggregate(updates, C, z, n, g).update for _ in range(reps)]).double()

    sigma = z * C / n  # both claim this std; check each against the other and against it
    se_diff = sigma * math.sqrt(2 / reps)
    # Same centre per coordinate (the clipped mean): 72 coordinates, 4.5 standard errors.
    assert (flower.mean(0) - ours.mean(0)).abs().max().item() < 4.5 * se_diff
    clipped_mean = clip_updates(updates.double(), C).mean(0)
    assert (flower.mean(0) - clipped_mean).abs().max().item() < 4.5 * sigma / math.sqrt(reps)
    # Same spread: pooled std (72k draws each, se ~0.3%) within 2% of each other and of sigma.
    f_res, o_res = flower - flower.mean(0), ours - ours.mean(0)
    assert f_res.std().item() == pytest.approx(o_res.std().item(), rel=0.02)
    assert f_res.std().item() == pytest.approx(sigma, rel=0.02)
    # Per coordinate: the std ratio is F-distributed; a generous 15% band over 72 coordinates.
    ratio = flower.std(0) / ours.std(0)
    assert (ratio - 1).abs().max().item() < 0.15
    # Same shape: the pooled standardized residuals are indistinguishable (two-sample KS).
    ks = stats.ks_2samp(f_res.flatten().numpy(), o_res.flatten().numpy())
    assert ks.pvalue > 1e-3
