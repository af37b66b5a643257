"""A two-round federation of FEMNIST writers on ResNet-8 with augmentation, then the attack on its output.

The vectorised engine runs it (no Ray start: the Flower engine equals it, tests/test_flower_simulation.py)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from fedtask import pipeline
from fedtask.config import load_config
from vision_datasets import write_femnist

ROOT = Path(__file__).resolve().parents[1]


def test_femnist_resnet8_federation_then_attack(tmp_path):
    data = write_femnist(tmp_path / "femnist", [28] * 8 + [12] * 2)
    config = load_config(ROOT / "configs" / "femnist.toml", [
        f"data.path={data}", "data.num_in_tasks=4", "data.num_out_tasks=4", "data.train_samples_per_task=16",
        "data.holdout_samples_per_task=8", "federation.tasks_per_round=2", "federation.rounds=2",
        "federation.warm_start_rounds=1", "attack.k_strong=4", "attack.k_weak=4", "attack.trials=8",
        "attack.bootstrap=20", 'federation.engine="vectorized"'])
    assert config.model.encoder == "resnet8" and config.data.augment
    out = tmp_path / "run"
    results = pipeline.run_experiment(config, out)

    metrics = json.loads((out / "metrics.json").read_text())
    assert [row["phase"] for row in metrics["rounds"]] == ["warm_start", "train"]
    assert all(len(row["tasks"]) == 2 for row in metrics["rounds"])
    encoder = load_file(str(out / "encoder.safetensors"))
    initial = load_file(str(out / "encoder_init.safetensors"))
    assert "encoder.bottleneck.weight" in encoder and any(k.startswith("encoder.backbone.") for k in encoder)
    assert not any(k.startswith("head.") for k in encoder)  # heads never leave the clients
    assert any(not (encoder[k] == initial[k]).all() for k in encoder)  # the training round moved the encoder
    heads = sorted(p.name for p in (out / "heads").iterdir())
    assert len(heads) == 4 and heads[0].startswith("00000_f00")  # one head per IN writer, named by writer_id
    assert len(metrics["per_task_evaluation"]) == 4

    saved = json.loads((out / "results.json").read_text())
    for attack in ("variance", "inner_product"):
        for access in ("strong", "weak", "null_control"):
            row = saved["attacks"][attack][access]
            assert row["auc_ci95"][0] <= row["auc"] <= row["auc_ci95"][1]
            assert (row["num_in_tasks"], row["num_out_tasks"], row["trials"]) == (4, 4, 8)
    assert saved["attacks"]["variance"]["strong"]["k"] == 4
    assert results["config"]["data"]["name"] == "femnist"
