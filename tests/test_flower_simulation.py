"""Real Flower simulations on Ray (two, small): the contract's outputs, and equality with the vectorised engine."""
import json

import pytest
import torch
from safetensors.torch import load_file

from fedtask.pipeline import run_training
from fedtask.config import load_config
from fedtask.data import load_tasks
from fedtask.models import build_model, initial_private_state

pytestmark = pytest.mark.simulation

TINY = ["data.num_in_tasks=6", "data.num_out_tasks=6", "federation.tasks_per_round=3", "federation.rounds=6",
        "federation.warm_start_rounds=2", "federation.head_steps=2", "attack.trials=8", "attack.bootstrap=20"]
REFRESH = ["federation.final_head_steps=3"]  # every head, even an unsampled one, is refreshed before evaluation
DP = ["dp.enabled=true", "dp.noise_multiplier=0.8", "dp.clipping_norm=0.5"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sim")
    out = {}
    for name, engine, extra in (("flower_a", "flower", []), ("vector", "vectorized", []),
                                ("vector_again", "vectorized", []), ("flower_dp", "flower", DP + REFRESH),
                                ("vector_dp", "vectorized", DP + REFRESH)):
        config = load_config("configs/synthetic.toml", TINY + extra + [f'federation.engine="{engine}"'])
        run_training(config, root / name, on_round=None)
        out[name] = root / name
    return out


def encoder(run):
    return load_file(str(run / "encoder.safetensors"))


def heads(run):
    return {p.name: load_file(str(p)) for p in sorted((run / "heads").glob("*.safetensors"))}


def max_diff(a, b):
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_same_seed_gives_identical_files(runs):
    # Flower equals the vectorised engine (below); the vectorised engine repeats itself byte for byte
    files = sorted(p.relative_to(runs["vector"]) for p in runs["vector"].rglob("*.safetensors"))
    assert len(files) == 8  # two encoders, six heads
    for name in files:
        assert (runs["vector"] / name).read_bytes() == (runs["vector_again"] / name).read_bytes(), name
    assert max_diff(encoder(runs["flower_a"]), load_file(str(runs["flower_a"] / "encoder_init.safetensors"))) > 1e-4


def test_outputs_follow_the_contract(runs):
    run = runs["flower_a"]
    for name in ("config.toml", "encoder.safetensors", "metrics.json", "results.json", "report.md"):
        assert (run / name).is_file(), name
    assert len(heads(run)) == 6  # every IN task's head, written by its client
    results = json.loads((run / "results.json").read_text())
    assert results["privacy"]["enabled"] is False
    rounds = json.loads((run / "metrics.json").read_text())["rounds"]
    assert [r["phase"] for r in rounds] == ["warm_start"] * 2 + ["train"] * 4
    assert all(len(r["tasks"]) == 3 and r["seconds"] > 0 for r in rounds)


def test_heads_persist_across_rounds(runs):
    # a head trained in several rounds is no longer the fresh one, and equals what the
    # vectorised engine (which keeps every head across rounds explicitly) ends with
    config = load_config("configs/synthetic.toml", TINY)
    model = build_model(config, load_tasks(config).spec)
    flower_heads = heads(runs["flower_a"])
    rounds = json.loads((runs["flower_a"] / "metrics.json").read_text())["rounds"]
    sampled = {t for r in rounds for t in r["tasks"]}
    for pid, (name, head) in enumerate(flower_heads.items()):
        fresh = initial_private_state(model, pid, config.seed)
        moved = not torch.equal(head["head.weight"], fresh["head.weight"])
        assert moved == (pid in sampled), name
    assert max_diff(flower_heads.popitem()[1], heads(runs["vector"]).popitem()[1]) < 1e-5


@pytest.mark.parametrize("flower, vector", [("flower_a", "vector"), ("flower_dp", "vector_dp")])
def test_vectorized_engine_equals_flower(runs, flower, vector):
    assert max_diff(encoder(runs[flower]), encoder(runs[vector])) <= 1e-5
    fh, vh = heads(runs[flower]), heads(runs[vector])
    assert fh.keys() == vh.keys()
    assert max(max_diff(fh[k], vh[k]) for k in fh) <= 1e-5
    fm = json.loads((runs[flower] / "metrics.json").read_text())["rounds"]
    vm = json.loads((runs[vector] / "metrics.json").read_text())["rounds"]
    assert [r["tasks"] for r in fm] == [r["tasks"] for r in vm]


def test_dp_run_reports_its_privacy_spend(runs):
    privacy = json.loads((runs["flower_dp"] / "results.json").read_text())["privacy"]
    assert privacy["enabled"] is True and privacy["rounds"] == 4 and privacy["accountant"] == "rdp"
    assert privacy["sampling_rate"] == 0.5 and privacy["noise_multiplier"] == 0.8
    assert 0 < privacy["epsilon"] < float("inf")
    # DP noise moved the encoder away from the noiseless run
    assert max_diff(encoder(runs["flower_dp"]), encoder(runs["flower_a"])) > 1e-4


def test_learning_happened(runs):
    # even 4 training rounds on 6 tasks beat the majority label on held-out samples (0.740 vs 0.729
    # with this seed; the DP run does not), the heads fit their own tasks, and each task has its own head
    utility = json.loads((runs["flower_a"] / "results.json").read_text())["utility"]
    assert utility["in_task_accuracy"] > utility["majority_baseline_accuracy"]
    assert utility["in_task_train_accuracy"] > utility["majority_baseline_accuracy"] + 0.1
    weights = [head["head.weight"] for head in heads(runs["flower_a"]).values()]
    assert all(not torch.equal(weights[0], other) for other in weights[1:])
