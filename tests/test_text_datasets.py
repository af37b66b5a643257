"""Stack Overflow and Reddit from local files (fixtures made here), tokenised by a tiny tokenizer."""
import json

import pandas as pd
import pytest
import torch

from fedtask.config import ConfigError, load_config
from fedtask.data import reddit, stackoverflow
from fedtask.data.text import TextEncoding, parse_tags
from fedtask.pipeline import load_taskset

from text_fixtures import TAGS, posts


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    return posts(tmp_path_factory.mktemp("posts") / "posts.parquet")


def so_config(path, model_dir, **data):
    return load_config(None, {
        "data": {"name": "stackoverflow", "path": str(path), "num_in_tasks": 4, "num_out_tasks": 4,
                 "train_samples_per_task": 16, "holdout_samples_per_task": 8, "max_length": 16, **data},
        "model": {"encoder": "bert", "pretrained_path": str(model_dir), "random_init": True},
        "federation": {"tasks_per_round": 2}, "attack": {"k_strong": 4, "k_weak": 4}})


def test_tags_come_as_lists_or_strings():
    assert parse_tags("<python><pandas>") == ["python", "pandas"]
    assert parse_tags("python|SQL") == ["python", "sql"]
    assert parse_tags(["Git", " "]) == ["git"]
    assert parse_tags(None) == [] and parse_tags(float("nan")) == []


def test_stackoverflow_by_user(table, bert_dir):
    config = so_config(table, bert_dir, num_tags=5)
    taskset = stackoverflow.load(config)
    assert taskset.num_classes == 5 and taskset.extra["tags"][0] in TAGS
    frame = pd.read_parquet(table)
    users = [t.name.removeprefix("user-") for t in taskset.in_tasks + taskset.out_tasks]
    assert len(set(users)) == 8 and set(users) <= set(frame["user"])
    for task in taskset.in_tasks:
        assert task.train_x.shape == (16, 16) and task.holdout_x.shape[0] == 8
        assert task.train_x.dtype == torch.int64 and int(task.train_y.max()) < 5
        assert (task.train_x[:, 0] == 2).all()  # [CLS] first: the encoder's own tokenizer
    again = stackoverflow.load(config)
    assert all(torch.equal(a.train_x, b.train_x) for a, b in zip(taskset.in_tasks, again.in_tasks))


def test_stackoverflow_by_tag_keeps_out_tags_out_of_in_negatives(table, bert_dir):
    config = so_config(table, bert_dir, setting="multiple_problems", num_in_tasks=3, num_out_tasks=3)
    taskset = stackoverflow.load(config)
    assert taskset.num_classes == 2
    in_tags = {t.name.removeprefix("tag-") for t in taskset.in_tasks}
    out_tags = {t.name.removeprefix("tag-") for t in taskset.out_tasks}
    frame = stackoverflow.read_posts(config)
    frequent = [tag for tag, _ in stackoverflow.tag_frequencies(frame)[:6]]
    assert not in_tags & out_tags and in_tags | out_tags == set(frequent)
    encode = TextEncoding(config)
    tags_of = {}
    for ids, tags in zip(encode(frame["text"].tolist()), frame["tags"]):
        tags_of.setdefault(tuple(ids.tolist()), set()).update(tags)
    for task in taskset.in_tasks:
        n_pos = int(task.train_y.sum())
        assert n_pos == 16 and torch.equal(task.challenge_pool("strong"), task.train_x[:n_pos])
        assert torch.equal(task.challenge_pool("weak"), task.holdout_x[task.holdout_y == 1])
        tag = task.name.removeprefix("tag-")
        assert all(tag in tags_of[tuple(row.tolist())] for row in task.train_x[:n_pos])
        for row in task.train_x[n_pos:]:  # negatives: without the tag, and with no OUT tag
            assert not tags_of[tuple(row.tolist())] & (out_tags | {tag})


def test_reddit_targets_are_the_next_tokens(tmp_path, lm_dir):
    path = posts(tmp_path / "reddit.parquet", users=10, posts_per_user=24)
    frame = pd.read_parquet(path).rename(columns={"user": "author", "text": "body"})
    frame.to_parquet(path)
    config = load_config(None, {
        "data": {"name": "reddit", "path": str(path), "user_column": "author", "text_column": "body",
                 "num_in_tasks": 3, "num_out_tasks": 3, "train_samples_per_task": 100,
                 "holdout_samples_per_task": 4, "min_samples_per_task": 20, "max_samples_per_task": 28,
                 "max_length": 24},
        "model": {"encoder": "causal_lm", "pretrained_path": str(lm_dir), "random_init": True, "head": "lora"},
        "federation": {"tasks_per_round": 2}, "attack": {"k_strong": 4, "k_weak": 4}})
    taskset = reddit.load(config)
    counts = frame.groupby("author").size()
    for task in taskset.in_tasks + taskset.out_tasks:
        user = task.name.removeprefix("user-")
        assert len(task.train_x) == counts[user] - 4  # "up to" train_samples: all remaining posts
        x, y = task.train_x, task.train_y
        assert x.shape == y.shape and x.shape[1] == 24
        real = x[:, 1:] != 0
        assert torch.equal(y[:, :-1][real], x[:, 1:][real])
        assert (y[:, :-1][~real] == -100).all() and (y[:, -1] == -100).all()


def test_missing_column_and_path_errors_name_the_key(tmp_path, bert_dir):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"author": "a", "text": "x", "tags": "<a>"}]))
    with pytest.raises(ConfigError, match=r"data.path: .*bad.json: missing column\(s\) user='user'"):
        load_taskset(so_config(bad, bert_dir))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="data.path: .*no .parquet"):
        load_taskset(so_config(empty, bert_dir))
    with pytest.raises(ConfigError, match="data.path: .*no such file"):
        so_config(tmp_path / "nope.parquet", bert_dir)


def test_too_few_users_is_a_config_error(table, bert_dir):
    with pytest.raises(ConfigError, match="data.num_in_tasks: .* users"):
        load_taskset(so_config(table, bert_dir, min_samples_per_task=1000))


@pytest.mark.parametrize("preset", ["stackoverflow_personalization", "stackoverflow_topics", "reddit"])
def test_gpu_presets_run_their_code_path_on_fixtures(preset, table, bert_dir, lm_dir):
    """The paper-scale presets, shrunk and pointed at fixtures: data, model and one task round."""
    from fedtask import task as task_math
    from fedtask.models import build_model, initial_private_state

    config = load_config(f"configs/{preset}.toml", {
        "data": {"path": str(table), "num_in_tasks": 2, "num_out_tasks": 2, "train_samples_per_task": 8,
                 "holdout_samples_per_task": 4, "min_samples_per_task": 0, "max_samples_per_task": 0,
                 "max_length": 16},
        "model": {"pretrained_path": str(lm_dir if preset == "reddit" else bert_dir), "random_init": True},
        "federation": {"tasks_per_round": 2, "num_gpus_per_client": 0.0}, "attack": {"k_strong": 4, "k_weak": 4}})
    taskset = load_taskset(config)
    model = build_model(config, taskset.spec)
    task = taskset.in_tasks[0]
    private, grads, loss = task_math.local_round(
        model, model.shared_state(), initial_private_state(model, 0, 0), task.train_x, task.train_y,
        0.1, 1e-3, 1, False, model.shared_parameter_names())
    assert torch.isfinite(loss) and set(grads) == set(model.shared_parameter_names())
    assert (preset == "reddit") == all("lora_" in name for name in private)
