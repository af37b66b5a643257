"""FEMNIST and CelebA task datasets from local parquet exports shaped like the published ones."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fedtask.config import ConfigError, load_config
from fedtask.data import celeba, femnist
from fedtask.data.images import ShiftFlipAugment
from fedtask.data.sources import LazyTaskList
from fedtask.config import with_overrides
from fedtask.pipeline import check_task_sizes, load_taskset
from vision_datasets import CELEBA_ATTRIBUTES, celeba_row_and_identity, write_celeba, write_femnist, writer_marker

ROOT = Path(__file__).resolve().parents[1]
# 6 writers with 30 images, 4 with 10 (too few for 16 + 8)
FEMNIST_SIZES = [30, 10, 30, 30, 10, 30, 10, 30, 30, 10]


@pytest.fixture(scope="module")
def femnist_dir(tmp_path_factory) -> Path:
    return write_femnist(tmp_path_factory.mktemp("femnist"), FEMNIST_SIZES)


@pytest.fixture(scope="module")
def celeba_dir(tmp_path_factory) -> Path:
    # 10 identities with 12 images, 4 with 5 (too few for 8 + 4): 140 images
    return write_celeba(tmp_path_factory.mktemp("celeba"), [12, 5] * 4 + [12] * 6)


def femnist_config(path: Path, *extra: str) -> dict:
    return load_config(ROOT / "configs" / "femnist.toml", [
        f"data.path={path}", "data.num_in_tasks=3", "data.num_out_tasks=3", "federation.tasks_per_round=2",
        "data.train_samples_per_task=16", "data.holdout_samples_per_task=8", "attack.k_strong=4",
        "attack.k_weak=4", *extra])


def celeba_config(path: Path, *extra: str, setting: str = "personalization") -> dict:
    preset = "celeba_personalization.toml" if setting == "personalization" else "celeba_attributes.toml"
    sizes = (["data.train_samples_per_task=8", "data.holdout_samples_per_task=4"] if setting == "personalization"
             else ["data.train_samples_per_task=64", "data.holdout_samples_per_task=16"])
    return load_config(ROOT / "configs" / preset, [
        f"data.path={path}", "data.num_in_tasks=3", "data.num_out_tasks=3", "federation.tasks_per_round=2",
        *sizes, "attack.k_strong=2", "attack.k_weak=2", "data.image_size=16", *extra])


def pixel_values(x: torch.Tensor, row: int, col: int) -> np.ndarray:
    """FEMNIST tensors are (p / 255 - 0.5) / 0.5: back to the stored byte."""
    return np.rint((x[:, 0, row, col].double().numpy() * 0.5 + 0.5) * 255).astype(int)


def test_femnist_tasks_are_writers_with_enough_samples(femnist_dir):
    taskset = femnist.load(femnist_config(femnist_dir))
    assert isinstance(taskset.in_tasks, LazyTaskList) and taskset.in_tasks.num_built == 0
    assert (taskset.num_classes, taskset.input_kind, taskset.input_shape) == (62, "image", (1, 28, 28))
    big = {f"f{w:04d}_{w % 100:02d}": w for w, n in enumerate(FEMNIST_SIZES) if n >= 24}
    names = [t.name for t in taskset.in_tasks] + [t.name for t in taskset.out_tasks]
    assert sorted(names) == sorted(big)  # all 6 big writers, none of the small ones, no repeats
    for task in taskset.in_tasks + taskset.out_tasks:
        assert task.train_x.shape == (16, 1, 28, 28) and task.holdout_x.shape == (8, 1, 28, 28)
        assert task.train_x.dtype == torch.float32 and task.train_y.dtype == torch.int64
        images = torch.cat([task.train_x, task.holdout_x])
        assert set(pixel_values(images, 0, 0)) == {writer_marker(big[task.name])}  # one writer's images only
        rows = pixel_values(images, 0, 1)
        assert len(set(rows)) == len(rows)  # train and held-out samples are distinct images
        assert task.train_challenge is None and len(task.challenge_pool("weak")) == 8
        assert 0 <= int(task.train_y.min()) and int(task.train_y.max()) < 62


def test_femnist_tasks_are_built_lazily_and_deterministically(femnist_dir):
    a = femnist.load(femnist_config(femnist_dir))
    first = a.in_tasks[1]
    assert a.in_tasks.num_built == 1 and a.out_tasks.num_built == 0  # only what was asked for
    assert a.in_tasks[1] is first  # cached
    b = femnist.load(femnist_config(femnist_dir))
    assert [t.name for t in a.in_tasks] == [t.name for t in b.in_tasks]
    assert torch.equal(first.train_x, b.in_tasks[1].train_x) and torch.equal(first.train_y, b.in_tasks[1].train_y)
    c = femnist.load(femnist_config(femnist_dir, "seed=1"))
    draws_a = [(t.name, t.train_y.tolist()) for t in a.in_tasks + a.out_tasks]
    draws_c = [(t.name, t.train_y.tolist()) for t in c.in_tasks + c.out_tasks]
    assert draws_a != draws_c  # another seed: another IN/OUT choice or split


def test_arrow_and_save_to_disk_exports_give_the_same_tasks(femnist_dir, tmp_path):
    import datasets

    parquet = femnist.load(femnist_config(femnist_dir))
    table = datasets.load_dataset("parquet", data_files=str(next(femnist_dir.rglob("*.parquet"))), split="train")
    datasets.DatasetDict({"train": table, "test": table.select(range(5))}).save_to_disk(str(tmp_path / "disk"))
    arrow = tmp_path / "single" / "femnist.arrow"
    arrow.parent.mkdir()
    arrow.write_bytes(next((tmp_path / "disk" / "train").glob("*.arrow")).read_bytes())
    for path in (tmp_path / "disk", arrow):
        other = femnist.load(femnist_config(path))
        assert [t.name for t in other.in_tasks] == [t.name for t in parquet.in_tasks]
        assert torch.equal(other.out_tasks[0].holdout_x, parquet.out_tasks[0].holdout_x)


def test_femnist_too_few_writers_is_a_config_error(femnist_dir):
    config = femnist_config(femnist_dir, "data.num_in_tasks=4")  # 4 + 3 > 6 eligible writers
    with pytest.raises(ConfigError, match=r"data.num_in_tasks \+ data.num_out_tasks = 7, but only 6 writers"):
        load_taskset(config)
    with pytest.raises(ConfigError, match="data.setting"):
        load_taskset(femnist_config(femnist_dir, "data.setting=multiple_problems"))


def test_celeba_personalization_tasks_are_identities(celeba_dir):
    taskset = celeba.load(celeba_config(celeba_dir, "data.target_attribute=Eyeglasses"))
    assert (taskset.num_classes, taskset.input_shape) == (2, (3, 16, 16))
    assert "augment" in taskset.extra  # the preset turns augmentation on
    tasks = taskset.in_tasks + taskset.out_tasks
    assert len({t.name for t in tasks}) == 6
    for task in tasks:
        rows_train, ids_train = celeba_row_and_identity(task.train_x)
        rows_hold, ids_hold = celeba_row_and_identity(task.holdout_x)
        identity = int(task.name.removeprefix("celeb_")) - 1000
        assert set(ids_train) | set(ids_hold) == {identity}
        assert identity % 2 == 0 or identity >= 8  # the identities with 5 images are filtered out
        assert not set(rows_train) & set(rows_hold)
        assert task.train_x.shape[0] == 8 and task.holdout_x.shape[0] == 4
        assert set(task.train_y.tolist()) <= {0, 1}


def test_celeba_personalization_labels_are_the_target_attribute(celeba_dir):
    import datasets

    table = datasets.load_dataset("parquet", data_files=sorted(str(p) for p in celeba_dir.rglob("train-*.parquet")),
                                  split="train")
    eyeglasses = np.array(table["Eyeglasses"], dtype=int)
    smiling = np.array(table["Smiling"], dtype=int)
    for attribute, truth in (("Eyeglasses", eyeglasses), ("Smiling", smiling)):
        taskset = celeba.load(celeba_config(celeba_dir, f"data.target_attribute={attribute}"))
        for task in taskset.in_tasks:
            rows, _ = celeba_row_and_identity(task.train_x)
            assert task.train_y.tolist() == truth[rows].tolist()
    with pytest.raises(ConfigError, match="data.target_attribute"):
        load_taskset(celeba_config(celeba_dir, "data.target_attribute=Smilling"))


def test_celeba_multiple_problems_tasks_are_attributes(celeba_dir):
    config = celeba_config(celeba_dir, "data.min_positive_fraction=0.25", setting="multiple_problems")
    taskset = celeba.load(config)
    assert taskset.num_classes == 2
    in_names = [t.name for t in taskset.in_tasks]
    out_names = [t.name for t in taskset.out_tasks]
    assert set(in_names) <= set(CELEBA_ATTRIBUTES) and set(out_names) <= set(CELEBA_ATTRIBUTES)
    assert not set(in_names) & set(out_names) and len(set(in_names + out_names)) == 6
    train_rows, holdout_rows = set(), set()
    per_task_train = []
    for task in taskset.in_tasks + taskset.out_tasks:
        assert task.train_x.shape[0] == 64 and task.holdout_x.shape[0] == 16
        # the challenge samples are exactly the positive examples, at least a quarter of each split
        assert torch.equal(task.train_y[task.train_challenge], torch.ones(len(task.train_challenge), dtype=torch.int64))
        assert len(task.challenge_pool("strong")) == int(task.train_y.sum()) >= 16
        assert len(task.challenge_pool("weak")) == int(task.holdout_y.sum()) >= 4
        rows, _ = celeba_row_and_identity(task.train_x)
        per_task_train.append(set(rows))
        train_rows |= set(rows)
        holdout_rows |= set(celeba_row_and_identity(task.holdout_x)[0])
    assert not train_rows & holdout_rows  # no held-out image was trained on by any task
    assert any(a & b for i, a in enumerate(per_task_train) for b in per_task_train[i + 1:])  # tasks share images
    check_task_sizes(with_overrides(config, {"attack.k_strong": 16, "attack.k_weak": 4}), taskset)
    with pytest.raises(ConfigError, match="attack.k_strong"):
        check_task_sizes(with_overrides(config, {"attack.k_strong": 65}), taskset)


def test_celeba_attribute_too_rare_is_filtered(celeba_dir):
    # all-positive tasks: only the two or three most frequent attributes (~60%) could qualify, not 3 + 3
    config = celeba_config(celeba_dir, "data.min_positive_fraction=1.0", setting="multiple_problems")
    with pytest.raises(ConfigError, match="CelebA attributes"):
        load_taskset(config)


def test_augmentation_is_seeded_shift_and_flip():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    augment = ShiftFlipAugment(pad=2, flip=True)
    a, b = augment(x, 0, 5, 1), augment(x, 0, 5, 1)
    assert torch.equal(a, b) and a.shape == x.shape
    assert not all(torch.equal(augment(x, 0, r, 1), a) for r in range(6, 10))  # other rounds, other draws
    flip_only = ShiftFlipAugment(pad=0, flip=True)(x, 0, 3, 0)
    for i in range(2):
        assert torch.equal(flip_only[i], x[i]) or torch.equal(flip_only[i], x[i].flip(-1))
    shifted = ShiftFlipAugment(pad=1, flip=False)(x, 0, 3, 0)
    for i in range(2):  # the interior of a shifted image is a window of the original, moved by <= 1 px
        assert any(torch.equal(shifted[i, :, 1:-1, 1:-1], x[i, :, 1 + dy:7 + dy, 1 + dx:7 + dx])
                   for dy in (-1, 0, 1) for dx in (-1, 0, 1))


def test_client_batches_are_augmented_and_held_out_data_is_not(femnist_dir):
    from fedtask.client_app import ClientRuntime, _task_batch

    config = femnist_config(femnist_dir)
    taskset = femnist.load(config)
    runtime = ClientRuntime(config, taskset, model=None, device=torch.device("cpu"), trainable=[])
    x, y = _task_batch(runtime, 0, server_round=3)
    task = taskset.in_tasks[0]
    assert torch.equal(y, task.train_y) and not torch.equal(x, task.train_x)
    assert torch.equal(x, _task_batch(runtime, 0, server_round=3)[0])
    assert torch.equal(task.challenge_pool("strong"), task.train_x)  # the adversary's queries are clean
    plain = ClientRuntime(femnist_config(femnist_dir, "data.augment=false"), femnist.load(
        femnist_config(femnist_dir, "data.augment=false")), None, torch.device("cpu"), [])
    assert torch.equal(_task_batch(plain, 0, 3)[0], task.train_x)


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *args], cwd=ROOT, capture_output=True, text=True,
                          env=environment, timeout=300)


def test_missing_or_malformed_data_path_exits_2(tmp_path, capsys):
    from run import main

    small = ["--set", "data.num_in_tasks=3", "--set", "data.num_out_tasks=3", "--set", "federation.tasks_per_round=2"]
    missing = tmp_path / "nowhere"
    assert main(["train", "--config", str(ROOT / "configs" / "femnist.toml"), "--set", f"data.path={missing}", *small,
                 "--out", str(tmp_path / "a")]) == 2
    assert f"data.path: {missing}" in capsys.readouterr().err

    broken = tmp_path / "broken" / "train-00000-of-00001.parquet"
    broken.parent.mkdir()
    broken.write_bytes(b"this is not a parquet file")
    assert main(["train", "--config", str(ROOT / "configs" / "femnist.toml"), "--set", f"data.path={broken.parent}", *small,
                 "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(broken) in err[0] and "parquet" in err[0]

    import datasets

    wrong = tmp_path / "wrong.parquet"
    datasets.Dataset.from_dict({"image": [b"x"], "user": ["a"], "label": [1]}).to_parquet(str(wrong))
    assert main(["train", "--config", str(ROOT / "configs" / "femnist.toml"), "--set", f"data.path={wrong}", *small,
                 "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert str(wrong) in err and "'writer_id'" in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


def test_without_data_path_the_hub_is_tried_and_offline_exits_2(tmp_path):
    result = run_cli("train", "--config", "configs/celeba_personalization.toml", "--set", "data.num_in_tasks=3",
                     "--set", "data.num_out_tasks=3", "--set", "federation.tasks_per_round=2",
                     "--out", str(tmp_path / "run"), env={"HF_DATASETS_CACHE": str(tmp_path / "cache")})
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert "flwrlabs/celeba" in last and "data.path" in last and "Traceback" not in result.stderr
