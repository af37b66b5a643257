"""FEMNIST by writer (paper Appendix A.6): one task per writer, 62-way character recognition.

Source: ``flwrlabs/femnist`` (one "train" split, ~814k rows) or a local export of it in
``data.path``. Columns used, as published: ``image`` (28x28 grayscale PNG), ``writer_id``
(string, e.g. "f0000_14": the natural id a task is made of), ``character`` (ClassLabel of 62
names: 0-9, A-Z, a-z). ``hsf_id`` is ignored. The paper's scale: 128 IN / 128 OUT writers with
128 training + 16 held-out images each (writers with fewer are filtered out).
"""
from __future__ import annotations

import torch

from fedtask.data.base import TaskData, TaskSet
from fedtask.data.images import ShiftFlipAugment, check_decodable, images_to_tensor
from fedtask.data.sources import (LazyTaskList, column_numpy, load_dataset_source, natural_id_task_builders,
                                  partition_sizes)

HUB_DATASET = "flwrlabs/femnist"
PARTITION_BY = "writer_id"
IMAGE, LABEL = "image", "character"
NUM_CLASSES = 62
NATIVE_SIZE = 28
MEAN, STD = (0.5,), (0.5,)  # trained from scratch: centre the [0, 1] pixels on zero


def load(config) -> TaskSet:
    data, seed = config.data, config.seed
    if data.setting != "personalization":
        raise ValueError("data.setting: femnist has one learning problem (62 characters); only "
                         "'personalization' (one task per writer) is supported")
    size = data.image_size or NATIVE_SIZE
    if size < 8:
        raise ValueError(f"data.image_size: must be >= 8 (or 0 for FEMNIST's native 28); got {size}")
    dataset, partitioner, where = load_dataset_source(data.path, HUB_DATASET, PARTITION_BY,
                                                      required_columns=(IMAGE, LABEL), image_column=IMAGE)
    check_decodable(dataset, IMAGE, "L", where)
    labels = column_numpy(dataset, LABEL)
    if labels.dtype.kind not in "iu" or (len(labels) and (labels.min() < 0 or labels.max() >= NUM_CLASSES)):
        raise ValueError(f"{where}: column {LABEL!r} must hold class ids 0..{NUM_CLASSES - 1} "
                         f"(got {labels.dtype} values {labels.min() if len(labels) else ''}..{labels.max() if len(labels) else ''})")

    def to_task(name: str, train, holdout) -> TaskData:
        return TaskData(name=name, train_x=_images(train, size), train_y=_labels(train),
                        holdout_x=_images(holdout, size), holdout_y=_labels(holdout))

    sizes = partition_sizes(partitioner, dataset, PARTITION_BY)
    in_builders, out_builders = natural_id_task_builders(partitioner, sizes, data, seed, f"writers in {where}", to_task)
    return TaskSet(
        in_tasks=LazyTaskList(in_builders),
        out_tasks=LazyTaskList(out_builders),
        num_classes=NUM_CLASSES,
        input_kind="image",
        input_shape=(1, size, size),
        extra={"source": where, "augment": ShiftFlipAugment(pad=max(1, size // 14), flip=False)}
        if data.augment else {"source": where},
    )


def _images(rows, size: int) -> torch.Tensor:
    return images_to_tensor(rows[IMAGE], "L", size, MEAN, STD)


def _labels(rows) -> torch.Tensor:
    return torch.as_tensor(column_numpy(rows, LABEL), dtype=torch.int64)

