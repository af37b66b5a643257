"""The vectorised engine's encoder passes: splitting a round into passes changes nothing but memory."""
import pytest
import torch

from fedtask.config import load_config
from fedtask.data import load_tasks
from fedtask.vectorized import tasks_per_pass, train_vectorized
from fedtask.rundir import load_state

SMALL = ["data.num_in_tasks=8", "data.num_out_tasks=2", "federation.tasks_per_round=5", "federation.rounds=5",
         "federation.warm_start_rounds=1", "federation.head_steps=2", "federation.final_head_steps=2",
         'federation.engine="vectorized"']
DP = ["dp.enabled=true", "dp.noise_multiplier=0.8", "dp.clipping_norm=0.5"]


def run(tmp_path, extra):
    config = load_config("configs/synthetic.toml", SMALL + extra)
    outcome = train_vectorized(config, load_tasks(config), tmp_path)
    heads = [load_state(path) for path in sorted(outcome.heads_dir.glob("*.safetensors"))]
    return outcome, {name: torch.stack([h[name] for h in heads]) for name in heads[0]}


def test_tasks_per_pass_holds_whole_tasks():
    config = load_config("configs/synthetic.toml", ["federation.samples_per_pass=100"])
    cpu = torch.device("cpu")
    assert tasks_per_pass(config, 32, 256, cpu) == 3
    assert tasks_per_pass(config, 500, 256, cpu) == 1  # never less than one task
    assert tasks_per_pass(config, 32, 2, cpu) == 2
    auto = load_config("configs/synthetic.toml", [])
    assert tasks_per_pass(auto, 32, 256, cpu) == 32  # 1024 samples per pass on a CPU
    assert tasks_per_pass(auto, 32, 256, torch.device("cuda")) == 256  # 8192 on a GPU


@pytest.mark.parametrize("extra", [[], DP], ids=["fused-mean", "per-task-dp"])
def test_passes_of_two_tasks_equal_one_pass(tmp_path, extra):
    # 5 sampled tasks of 32 samples in passes of 64 samples: 2 + 2 + 1 tasks
    one, one_heads = run(tmp_path / "one", extra + ["federation.samples_per_pass=100000"])
    split, split_heads = run(tmp_path / "split", extra + ["federation.samples_per_pass=64"])
    for key in one.encoder:
        assert torch.allclose(one.encoder[key], split.encoder[key], atol=1e-6), key
    assert not torch.equal(one.encoder["encoder.hidden.weight"], one.initial_encoder["encoder.hidden.weight"])
    for key in one_heads:
        assert torch.allclose(one_heads[key], split_heads[key], atol=1e-6), key
    assert [r["loss"] for r in one.rounds] == pytest.approx([r["loss"] for r in split.rounds], abs=1e-6)
    assert [e["accuracy"] for e in one.evaluation] == [e["accuracy"] for e in split.evaluation]
