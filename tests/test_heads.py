"""Task-head similarity (`run.py heads`): linear heads from a tiny vectorised run, LoRA adapters of the
tiny BERT fixture saved as clients save them; every number checked against a pair-by-pair computation."""
import itertools
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import run
from fedtask import pipeline, rundir
from fedtask.config import load_config, to_toml
from fedtask.heads import head_vectors, pairwise

TINY = ["data.num_in_tasks=8", "data.num_out_tasks=8", "federation.tasks_per_round=4", "federation.rounds=6",
        "federation.warm_start_rounds=2", "federation.engine=vectorized"]


def by_pairs(vectors):
    inner = [float(vectors[i] @ vectors[j]) for i, j in itertools.combinations(range(len(vectors)), 2)]
    cosine = [float(vectors[i] @ vectors[j] / (np.linalg.norm(vectors[i]) * np.linalg.norm(vectors[j])))
              for i, j in itertools.combinations(range(len(vectors)), 2)]
    return np.array(inner), np.array(cosine)


def check(summary, inner, cosine, heads):
    assert summary["num_heads"] == heads and summary["num_pairs"] == heads * (heads - 1) // 2
    for key, values in (("inner_product", inner), ("cosine", cosine)):
        assert summary[key]["mean"] == pytest.approx(values.mean(), rel=1e-9, abs=1e-12)
        assert summary[key]["std"] == pytest.approx(values.std(), rel=1e-9, abs=1e-12)


def test_linear_heads(tmp_path, capsys):
    config = load_config("configs/synthetic.toml", TINY)
    pipeline.run_training(config, tmp_path / "run", on_round=None)
    assert run.main(["heads", "--run", str(tmp_path / "run")]) == 0
    assert "8 heads (head.weight), 28 pairs" in capsys.readouterr().out
    summary = json.loads((tmp_path / "run" / rundir.HEADS_SUMMARY).read_text())
    weights = [load_file(str(p))["head.weight"].double().numpy().ravel()
               for p in sorted((tmp_path / "run" / rundir.HEADS).glob("*.safetensors"))]
    check(summary, *by_pairs(weights), heads=8)
    assert summary["parameters"] == "head.weight"
    assert (tmp_path / "run" / rundir.HEADS_PLOT).stat().st_size > 0


def test_lora_adapters_use_their_effective_matrices(tmp_path):
    from text_fixtures import posts, tiny_bert

    from fedtask.data import load_tasks
    from fedtask.models import build_model, initial_private_state

    data = posts(tmp_path / "so.parquet", users=8, posts_per_user=24)
    config = load_config(None, {
        "data": {"name": "stackoverflow", "path": str(data), "num_in_tasks": 4, "num_out_tasks": 4,
                 "train_samples_per_task": 8, "holdout_samples_per_task": 4, "max_length": 16, "num_tags": 8},
        "model": {"encoder": "bert", "pretrained_path": str(tiny_bert(tmp_path / "bert")), "random_init": True,
                  "embedding_dim": 8, "head": "lora", "lora_r": 2, "lora_alpha": 4.0},
        "federation": {"tasks_per_round": 4}, "attack": {"k_strong": 4, "k_weak": 4}})
    model = build_model(config, load_tasks(config).spec)
    scalings = {m.scaling["default"] for m in model.modules() if isinstance(getattr(m, "scaling", None), dict)}
    assert scalings == {2.0}  # peft's alpha / r, what heads.json must use
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / rundir.CONFIG).write_text(to_toml(config))
    gen = torch.Generator().manual_seed(0)
    saved = []
    for pid in range(4):
        state = initial_private_state(model, pid, config.seed)
        state = {k: torch.randn(v.shape, generator=gen) if "lora_B" in k else v for k, v in state.items()}
        rundir.save_head(run_dir / rundir.HEADS, pid, f"user{pid}", state)
        saved.append(state)
    assert run.main(["heads", "--run", str(run_dir)]) == 0
    summary = json.loads((run_dir / rundir.HEADS_SUMMARY).read_text())
    adapters = sorted(k for k in saved[0] if "lora_A" in k)
    assert adapters  # query and value of both layers
    effective = [np.concatenate([(2.0 * s[a.replace("lora_A", "lora_B")].double() @ s[a].double()).numpy().ravel()
                                 for a in adapters]) for s in saved]
    check(summary, *by_pairs(effective), heads=4)
    assert summary["parameters"].startswith("LoRA")
    heads = [s["head.weight"].double().numpy().ravel() for s in saved]
    check(summary["linear_head"], *by_pairs(heads), heads=4)


def test_pairwise_needs_two_heads_and_matching_parameters():
    with pytest.raises(ValueError, match="^heads"):
        head_vectors([{"head.weight": np.ones((2, 3))}], lora_scaling=1.0)
    with pytest.raises(ValueError, match="^heads"):
        head_vectors([{"head.weight": np.ones((2, 3))}, {"other": np.ones(3)}], lora_scaling=1.0)
    inner, cosine = pairwise(np.array([[1.0, 0.0], [0.0, 0.0], [2.0, 0.0]]))
    assert inner.tolist() == [0.0, 2.0, 0.0] and cosine.tolist() == [0.0, 1.0, 0.0]  # a zero head: cosine 0
