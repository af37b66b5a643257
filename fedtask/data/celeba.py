"""CelebA by identity (personalization) and by attribute (multiple learning problems).

Source: ``flwrlabs/celeba``, subset ``img_align+identity+attr`` (its "train" split, ~163k
rows), or a local export of it in ``data.path``. Columns used, as published: ``image``
(aligned 178x218 RGB faces), ``celeb_id`` (int64 identity: the natural id of a
personalization task) and the 40 boolean attribute columns (``ATTRIBUTES``; 0/1 or -1/1
integers, as in the original list_attr_celeba.txt, are read as well).

- personalization (paper Sections 6.3, A.5.1): a task is one identity; its label is the
  binary ``data.target_attribute`` (default "Smiling"). Identities with at least
  train + held-out images (22 + 8: "roughly 30") are eligible; 256 IN / 256 OUT.
- multiple_problems (Sections 6.4, A.5.2): a task is one attribute, binary detection over
  images drawn from the whole split (tasks share images); 20 IN / 20 OUT, 1024 training
  images each. The images are first split once into a training pool and a held-out pool
  (in the ratio of the train / held-out sizes), so that no task's held-out image was ever
  trained on by any task. ``data.min_positive_fraction`` guarantees rare attributes (Bald:
  about 2% of CelebA) enough positive examples; a task's challenge samples (what the
  adversary gets) are its positive examples only. An OUT attribute gets no head: it is
  never trained on.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from fedtask.data.base import TaskData, TaskSet
from fedtask.data.images import IMAGENET_MEAN, IMAGENET_STD, ShiftFlipAugment, check_decodable, images_to_tensor
from fedtask.data.sources import (LazyTaskList, choose_in_out, column_numpy, load_dataset_source,
                                  natural_id_task_builders, partition_sizes)

HUB_DATASET = "flwrlabs/celeba"
HUB_SUBSET = "img_align+identity+attr"
PARTITION_BY = "celeb_id"
IMAGE = "image"
DEFAULT_SIZE = 64
ATTRIBUTES = (
    "5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes", "Bald", "Bangs", "Big_Lips",
    "Big_Nose", "Black_Hair", "Blond_Hair", "Blurry", "Brown_Hair", "Bushy_Eyebrows", "Chubby", "Double_Chin",
    "Eyeglasses", "Goatee", "Gray_Hair", "Heavy_Makeup", "High_Cheekbones", "Male", "Mouth_Slightly_Open",
    "Mustache", "Narrow_Eyes", "No_Beard", "Oval_Face", "Pale_Skin", "Pointy_Nose", "Receding_Hairline",
    "Rosy_Cheeks", "Sideburns", "Smiling", "Straight_Hair", "Wavy_Hair", "Wearing_Earrings", "Wearing_Hat",
    "Wearing_Lipstick", "Wearing_Necklace", "Wearing_Necktie", "Young",
)


def load(config) -> TaskSet:
    data, seed = config.data, config.seed
    size = data.image_size or DEFAULT_SIZE
    if size < 8:
        raise ValueError(f"data.image_size: must be >= 8 (or 0 for the default {DEFAULT_SIZE}); got {size}")
    personalization = data.setting == "personalization"
    if personalization and data.target_attribute not in ATTRIBUTES:
        raise ValueError(f"data.target_attribute: {data.target_attribute!r} is not a CelebA attribute "
                         f"(one of {', '.join(ATTRIBUTES)})")
    if not 0.0 <= data.min_positive_fraction <= 1.0:
        raise ValueError(f"data.min_positive_fraction: must be in [0, 1]; got {data.min_positive_fraction}")
    required = (IMAGE, data.target_attribute) if personalization else (IMAGE,)
    dataset, partitioner, where = load_dataset_source(data.path, HUB_DATASET, PARTITION_BY, HUB_SUBSET,
                                                      required_columns=required, image_column=IMAGE)
    check_decodable(dataset, IMAGE, "RGB", where)

    def images(rows) -> torch.Tensor:
        return images_to_tensor(rows[IMAGE], "RGB", size, IMAGENET_MEAN, IMAGENET_STD)

    if personalization:
        in_builders, out_builders = _identity_tasks(dataset, partitioner, data, seed, where, images)
    else:
        in_builders, out_builders = _attribute_tasks(dataset, data, seed, where, images)
    extra = {"source": where}
    if data.augment:
        extra["augment"] = ShiftFlipAugment(pad=max(1, size // 16), flip=True)
    return TaskSet(in_tasks=LazyTaskList(in_builders), out_tasks=LazyTaskList(out_builders), num_classes=2,
                   input_kind="image", input_shape=(3, size, size), extra=extra)


def binary(values: np.ndarray) -> np.ndarray:
    """Attribute values as 0/1: booleans as published, or the original -1/1 (or 0/1) integers."""
    if values.dtype == bool:
        return values.astype(np.int64)
    if values.dtype.kind in "iuf":
        return (values > 0).astype(np.int64)
    raise ValueError(f"expected boolean attribute values, got {values.dtype}")


def _attribute(rows, name: str, where: str) -> np.ndarray:
    try:
        return binary(column_numpy(rows, name))
    except ValueError as err:
        raise ValueError(f"{where}: column {name!r}: {err}") from None


def _identity_tasks(dataset, partitioner, data: dict, seed: int, where: str, images):
    target = data.target_attribute
    _attribute(dataset.select(range(min(1, len(dataset)))), target, where)  # fail early on a bad column type

    def to_task(name: str, train, holdout) -> TaskData:
        return TaskData(name=f"celeb_{name}", train_x=images(train),
                        train_y=torch.as_tensor(_attribute(train, target, where)),
                        holdout_x=images(holdout), holdout_y=torch.as_tensor(_attribute(holdout, target, where)))

    sizes = partition_sizes(partitioner, dataset, PARTITION_BY)
    return natural_id_task_builders(partitioner, sizes, data, seed, f"identities in {where}", to_task)


def _attribute_tasks(dataset, data: dict, seed: int, where: str, images):
    present = [name for name in ATTRIBUTES if name in dataset.column_names]
    labels = {name: _attribute(dataset, name, where) for name in present}
    n_train, n_hold = data.train_samples_per_task, data.holdout_samples_per_task
    fraction = data.min_positive_fraction
    # one split of the images into a training pool and a held-out pool, shared by every task
    order = np.random.default_rng([seed, 0]).permutation(len(dataset))
    n_hold_pool = int(round(len(dataset) * n_hold / (n_train + n_hold)))
    pools = {"train": (np.sort(order[n_hold_pool:]), n_train), "holdout": (np.sort(order[:n_hold_pool]), n_hold)}

    def forced_positives(count: int) -> int:
        return max(1, math.ceil(fraction * count)) if count else 0

    def feasible(name: str) -> bool:
        for pool, count in pools.values():
            positives = int(labels[name][pool].sum())
            if len(pool) < count or positives < forced_positives(count):
                return False
        return True

    eligible = np.array([i for i, name in enumerate(present) if feasible(name)], dtype=np.int64)
    in_ids, out_ids = choose_in_out(
        eligible, data.num_in_tasks, data.num_out_tasks, seed,
        f"CelebA attributes in {where} have {n_train} training and {n_hold} held-out images with at least "
        f"{forced_positives(n_train)} / {forced_positives(n_hold)} positives (data.min_positive_fraction="
        f"{fraction})")

    def sample(name: str, split: str) -> np.ndarray:
        """``count`` rows of the split's pool, at least the forced number of them positive."""
        pool, count = pools[split]
        rng = np.random.default_rng([seed, 1 + ATTRIBUTES.index(name), 0 if split == "train" else 1])
        positives = pool[labels[name][pool] == 1]
        forced = rng.choice(positives, size=forced_positives(count), replace=False)
        rest = rng.choice(np.setdiff1d(pool, forced, assume_unique=True), size=count - len(forced), replace=False)
        return np.sort(np.concatenate([forced, rest]))

    def builder(name: str):
        def build() -> TaskData:
            train_rows, hold_rows = sample(name, "train"), sample(name, "holdout")
            train_y = torch.as_tensor(labels[name][train_rows])
            holdout_y = torch.as_tensor(labels[name][hold_rows])
            return TaskData(name=name, train_x=images(dataset.select(train_rows)), train_y=train_y,
                            holdout_x=images(dataset.select(hold_rows)), holdout_y=holdout_y,
                            train_challenge=torch.nonzero(train_y == 1).flatten(),
                            holdout_challenge=torch.nonzero(holdout_y == 1).flatten())

        return build

    return [builder(present[i]) for i in in_ids], [builder(present[i]) for i in out_ids]
