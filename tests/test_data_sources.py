"""The one local-file reader (fedtask.data.sources.load_local) and read_table on top of it."""
import json

import pandas as pd
import pytest

from fedtask.config import ConfigError, load_config
from fedtask.data.sources import load_local, local_files
from fedtask.data.text import read_table
from fedtask.pipeline import load_taskset

COLUMNS = {"user": "user", "text": "text", "tags": "tags"}
ROWS = [{"user": "001", "text": "first post", "tags": ["python", "pandas"]},
        {"user": "002", "text": "second post", "tags": ["git"]},
        {"user": "001", "text": "third post", "tags": []}]


def write_lines(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_a_folder_mixing_kinds_reads_only_the_preferred_kind(tmp_path):
    """The rule: one kind per folder, parquet before arrow before json / jsonl before csv;
    the other kinds' files are ignored, not concatenated."""
    pd.DataFrame(ROWS[:2]).to_parquet(tmp_path / "b.parquet")
    pd.DataFrame(ROWS[2:]).assign(tags="<css>").to_csv(tmp_path / "a.csv", index=False)
    assert local_files(tmp_path) == ("parquet", [tmp_path / "b.parquet"])
    table = read_table(str(tmp_path), COLUMNS)
    assert table["text"].tolist() == ["first post", "second post"]
    (tmp_path / "b.parquet").unlink()  # csv alone is read, through datasets' csv builder
    assert read_table(str(tmp_path), COLUMNS)["text"].tolist() == ["third post"]


def test_files_are_read_in_sorted_path_order_skipping_hidden_ones(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / ".cache").mkdir()
    write_lines(tmp_path / "b" / "0.jsonl", ROWS[:1])
    write_lines(tmp_path / "a.jsonl", ROWS[1:2])
    write_lines(tmp_path / "c.json", ROWS[2:])
    write_lines(tmp_path / ".cache" / "stale.jsonl", ROWS)
    assert read_table(str(tmp_path), COLUMNS)["text"].tolist() == ["second post", "first post", "third post"]


def test_json_arrays_and_json_lines_both_read(tmp_path):
    array = tmp_path / "array.json"
    array.write_text(json.dumps(ROWS, indent=2))
    lines = write_lines(tmp_path / "lines.jsonl", ROWS)
    lines_in_json = write_lines(tmp_path / "lines.json", ROWS)  # JSON lines under a .json name
    tables = [read_table(str(path), COLUMNS) for path in (array, lines, lines_in_json)]
    for table in tables:
        assert table["user"].tolist() == ["001", "002", "001"]  # ids kept as written, not parsed as numbers
        assert table["text"].tolist() == [row["text"] for row in ROWS]
        assert [list(tags) for tags in table["tags"]] == [row["tags"] for row in ROWS]


def test_mixed_types_and_empty_rows_are_handled_like_pandas(tmp_path):
    """datasets keeps a column of mixed JSON types as JSON text: read_table decodes it, so ids
    that are sometimes numbers become strings, and a NaN user is dropped like a missing one."""
    path = tmp_path / "posts.jsonl"
    path.write_text('{"user": 7, "text": "a", "tags": "<x>"}\n{"user": "u", "text": "b", "tags": ["y"]}\n'
                    '{"user": NaN, "text": "c", "tags": []}\n{"user": "u", "text": "  ", "tags": []}\n'
                    '{"user": "u", "text": null, "tags": []}\n')
    table = read_table(str(path), COLUMNS)
    assert table["user"].tolist() == ["7", "u"] and table["text"].tolist() == ["a", "b"]


@pytest.mark.parametrize("kind", ["parquet", "jsonl", "csv"])
def test_a_corrupt_file_is_a_one_line_error_naming_it(tmp_path, kind):
    good, bad = tmp_path / f"a.{kind}", tmp_path / f"b.{kind}"
    frame = pd.DataFrame(ROWS).assign(tags="<x>")
    if kind == "parquet":
        frame.to_parquet(good)
        bad.write_bytes(b"this is not a parquet file")
    elif kind == "jsonl":
        write_lines(good, ROWS)
        bad.write_text('{"user": "a", "text": ')
    else:
        frame.to_csv(good, index=False)
        bad.write_text('user,text,tags\n"a,b,c\n')
    with pytest.raises(ValueError) as caught:
        load_local(tmp_path)
    message = str(caught.value)
    assert len(message.splitlines()) == 1 and message.startswith(f"{bad}: ")
    with pytest.raises(ValueError, match=r"^data\.path: .*b\.") as caught:
        read_table(str(tmp_path), COLUMNS)
    assert str(bad) in str(caught.value) and len(str(caught.value).splitlines()) == 1


def test_a_json_array_after_whitespace_gets_a_hint(tmp_path):
    path = tmp_path / "posts.json"
    path.write_text("\n" + json.dumps(ROWS))
    with pytest.raises(ValueError, match=r"posts\.json: .*JSON array must start at the file's first byte"):
        read_table(str(path), COLUMNS)


def test_read_table_errors_become_config_errors(tmp_path, bert_dir):
    bad = tmp_path / "posts.jsonl"
    bad.write_text('{"user": "a", "text": ')
    config = load_config(None, {
        "data": {"name": "stackoverflow", "path": str(bad), "num_in_tasks": 2, "num_out_tasks": 2},
        "model": {"encoder": "bert", "pretrained_path": str(bert_dir), "random_init": True},
        "federation": {"tasks_per_round": 2}, "attack": {"k_strong": 4, "k_weak": 4}})
    with pytest.raises(ConfigError) as caught:
        load_taskset(config)
    message = str(caught.value)
    assert message.startswith(f"data.path: {bad}: cannot be read as json") and len(message.splitlines()) == 1


def test_save_to_disk_folders_read_too(tmp_path):
    import datasets

    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "saved"))
    assert read_table(str(tmp_path / "saved"), COLUMNS)["text"].tolist() == [row["text"] for row in ROWS]
