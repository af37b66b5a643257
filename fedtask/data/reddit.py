"""Reddit posts by user for personalised next-token prediction (paper 6.3 and A.5, Gemma 3 270M).

No package ships Reddit: point ``data.path`` at one parquet / arrow / json / jsonl / csv file,
a folder of them or a ``save_to_disk`` folder (read by :func:`fedtask.data.sources.load_local`,
whose rules say which files of a folder are read), one row per post, with a user column (``data.user_column``, default
"user") and a text column (``data.text_column``, default "text"). For the Webis TL;DR
corpus (Völske et al., 2017) that is ``data.user_column = "author"`` and
``data.text_column = "content"``.

Task = user. Users with ``data.min_samples_per_task`` to ``data.max_samples_per_task``
posts (the paper: 64 to 512) are eligible; each user's posts are split (seeded) into
``holdout_samples_per_task`` held out (the weak adversary's pool) and up to
``train_samples_per_task`` for training. A post is tokenised with the causal LM's own
tokenizer to ``data.max_length`` tokens, right-padded; the target at position t is the
token at t + 1 (-100 on padding and at the last position), so x is (n, L) and y is (n, L).
"""
from __future__ import annotations

import numpy as np
import torch

from fedtask.data.base import TaskData, TaskSet
from fedtask.data.text import IGNORE_INDEX, encode_tokens, load_tokenizer, read_table, split_rows, user_tasks


def next_token_targets(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """y[:, t] = ids[:, t + 1] where that token is real text, else -100 (ignored)."""
    targets = torch.full_like(ids, IGNORE_INDEX)
    targets[:, :-1] = torch.where(mask[:, 1:].bool(), ids[:, 1:], torch.full_like(ids[:, 1:], IGNORE_INDEX))
    return targets


def load(config) -> TaskSet:
    data = config.data
    if data.setting != "personalization":
        raise ValueError("data.setting: Reddit tasks are users (personalization); there is no multiple_problems "
                         "split of Reddit")
    n_in, n_out = data.num_in_tasks, data.num_out_tasks
    n_train, n_hold = data.train_samples_per_task, data.holdout_samples_per_task
    table = read_table(data.path, {"user": data.user_column, "text": data.text_column})
    users = user_tasks(table, data.min_samples_per_task or n_train + n_hold, data.max_samples_per_task,
                       n_in + n_out, config.seed, f"{data.path}")
    tokenizer = load_tokenizer(config)
    rows_of = table.groupby("user").indices
    texts = table["text"].to_numpy()
    tasks = []
    for number, user in enumerate(users):
        rng = np.random.default_rng([config.seed, 8, number])
        parts = []
        for rows in split_rows(np.asarray(rows_of[user]), n_train, n_hold, rng):
            ids, mask = encode_tokens(texts[rows].tolist(), tokenizer, data.max_length)
            parts += [ids, next_token_targets(ids, mask)]
        tasks.append(TaskData(f"user-{user}", *parts))
    return TaskSet(tasks[:n_in], tasks[n_in:], num_classes=len(tokenizer), input_kind="tokens",
                   input_shape=(data.max_length,), vocab_size=len(tokenizer),
                   extra={"pad_token_id": int(tokenizer.pad_token_id), "encoding": "tokens", "dataset": "reddit"})
