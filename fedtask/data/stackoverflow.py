"""Stack Overflow posts from local files (``data.path``), by user or by topic (paper 6.3, 6.4, A.5).

No package ships Stack Overflow: point ``data.path`` at one parquet / arrow / json / jsonl /
csv file, a folder of them or a ``save_to_disk`` folder (read by
:func:`fedtask.data.sources.load_local`, whose rules say which files of a folder are read),
one row per post, with the columns

    user   (``data.user_column``, default "user"): who wrote the post (any id)
    text   (``data.text_column``, default "text"): the post (e.g. title + body)
    tags   (``data.tags_column``, default "tags"): a list of strings, or a string such as
           "<python><pandas>" (the Stack Exchange dump) or "python|pandas"

Settings:

- personalization (task = user): users with at least ``data.min_samples_per_task`` posts
  (default: train + holdout) and at most ``data.max_samples_per_task``; each user's posts
  are split (seeded) into ``holdout_samples_per_task`` held out and up to
  ``train_samples_per_task`` for training. The label is the post's topic: its first tag
  among the ``data.num_tags`` most frequent tags of the whole file (posts with none of
  them are dropped). The paper's model detects several topics per post; a task head here
  predicts one topic per post (cross-entropy), the same representation learning problem
  with a single-label head.
- multiple_problems (task = tag): the ``num_in_tasks + num_out_tasks`` most frequent tags,
  split into IN and OUT at random (seeded); a task is "does this post carry tag T", with
  ``train_samples_per_task`` positives and as many negatives (posts without T). Every post
  is held out with a seeded coin, so held-out posts are never trained on; IN tasks draw
  negatives only from posts that carry no OUT tag. Posts carry several tags, so (as in the
  paper) an IN task's positives may carry an OUT tag too.
"""
from __future__ import annotations

import numpy as np
import torch

from fedtask.data.base import TaskData, TaskSet
from fedtask.data.text import TextEncoding, parse_tags, read_table, split_rows, user_tasks


def read_posts(config):
    data = config.data
    table = read_table(data.path, {"user": data.user_column, "text": data.text_column,
                                      "tags": data.tags_column})
    return table.assign(tags=[parse_tags(value) for value in table["tags"]])


def tag_frequencies(table) -> list[tuple[str, int]]:
    counts: dict[str, int] = {}
    for tags in table["tags"]:
        for tag in dict.fromkeys(tags):
            counts[tag] = counts.get(tag, 0) + 1
    return sorted(counts.items(), key=lambda item: (-item[1], item[0]))


def by_user(config, table, encoding: TextEncoding) -> TaskSet:
    data = config.data
    n_in, n_out = data.num_in_tasks, data.num_out_tasks
    n_train, n_hold = data.train_samples_per_task, data.holdout_samples_per_task
    vocabulary = [tag for tag, _ in tag_frequencies(table)[: data.num_tags]]
    index = {tag: i for i, tag in enumerate(vocabulary)}
    labels = np.array([next((index[t] for t in tags if t in index), -1) for tags in table["tags"]])
    table = table.assign(label=labels)[labels >= 0].reset_index(drop=True)
    users = user_tasks(table, data.min_samples_per_task or n_train + n_hold, data.max_samples_per_task,
                       n_in + n_out, config.seed, f"{data.path}")
    rows_of = table.groupby("user").indices
    tasks = []
    for number, user in enumerate(users):
        rng = np.random.default_rng([config.seed, 7, number])
        train, held = split_rows(np.asarray(rows_of[user]), n_train, n_hold, rng)
        tasks.append(TaskData(f"user-{user}", *_encoded(table, train, encoding), *_encoded(table, held, encoding)))
    return TaskSet(tasks[:n_in], tasks[n_in:], num_classes=len(vocabulary), input_kind="tokens",
                   input_shape=(encoding.length,), vocab_size=encoding.vocab_size,
                   extra={**encoding.extra(), "dataset": "stackoverflow", "tags": vocabulary})


def _encoded(table, rows: np.ndarray, encoding: TextEncoding) -> tuple[torch.Tensor, torch.Tensor]:
    texts = table["text"].to_numpy()[rows].tolist()
    return encoding(texts), torch.as_tensor(table["label"].to_numpy()[rows], dtype=torch.int64)


def by_tag(config, table, encoding: TextEncoding) -> TaskSet:
    data = config.data
    n_in, n_out = data.num_in_tasks, data.num_out_tasks
    n_train, n_hold = data.train_samples_per_task, data.holdout_samples_per_task
    frequent = tag_frequencies(table)
    if len(frequent) < n_in + n_out:
        raise ValueError(f"data.num_in_tasks: {data.path} has {len(frequent)} tags; data.num_in_tasks + "
                         f"data.num_out_tasks = {n_in + n_out}")
    chosen = [tag for tag, _ in frequent[: n_in + n_out]]
    order = np.random.default_rng([config.seed, 7]).permutation(len(chosen))
    in_tags, out_tags = [chosen[i] for i in order[:n_in]], [chosen[i] for i in order[n_in:]]
    tag_sets = [set(tags) for tags in table["tags"]]
    held = np.random.default_rng([config.seed, 7, 1]).random(len(table)) < n_hold / (n_train + n_hold)
    texts = table["text"].to_numpy()

    def side(tags: list[str], other_side: set[str], offset: int) -> list[TaskData]:
        clean = np.array([not (s & other_side) for s in tag_sets])  # posts with no tag of the other side
        tasks = []
        for number, tag in enumerate(tags):
            rng = np.random.default_rng([config.seed, 7, 2, offset + number])
            has = np.array([tag in s for s in tag_sets])
            parts = []
            for holdout, count in ((False, n_train), (True, n_hold)):
                positives = np.flatnonzero(has & (held == holdout))
                negatives = np.flatnonzero(~has & clean & (held == holdout))
                positives = np.sort(rng.choice(positives, min(count, len(positives)), replace=False))
                negatives = np.sort(rng.choice(negatives, min(len(positives), len(negatives)), replace=False))
                rows = np.concatenate([positives, negatives])
                x = encoding(texts[rows].tolist())
                y = torch.cat([torch.ones(len(positives), dtype=torch.int64),
                               torch.zeros(len(negatives), dtype=torch.int64)])
                parts.append((x, y, torch.arange(len(positives))))
            (tx, ty, tc), (hx, hy, hc) = parts
            tasks.append(TaskData(f"tag-{tag}", tx, ty, hx, hy, train_challenge=tc, holdout_challenge=hc))
        return tasks

    return TaskSet(side(in_tags, set(out_tags), 0), side(out_tags, set(in_tags), n_in), num_classes=2,
                   input_kind="tokens", input_shape=(encoding.length,), vocab_size=encoding.vocab_size,
                   extra={**encoding.extra(), "dataset": "stackoverflow"})


def load(config) -> TaskSet:
    table = read_posts(config)
    encoding = TextEncoding(config)
    if config.data.setting == "personalization":
        return by_user(config, table, encoding)
    return by_tag(config, table, encoding)
