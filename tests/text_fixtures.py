"""Fixtures for the language tests, made on the spot: a tiny WordPiece tokenizer, tiny randomly
initialised transformers saved as local folders (config.json only: model.random_init = true),
and Stack Overflow / Reddit style post tables. Nothing is downloaded."""
from __future__ import annotations

import string
from pathlib import Path

import numpy as np

WORDS = ("the a to of and in is it you that for on with as this be are not have but can list data file "
         "error code value function class python java pandas numpy loop string array sql query table "
         "server client model train test git branch merge commit").split()
TAGS = ("python", "java", "pandas", "numpy", "sql", "git", "javascript", "css")


def tiny_tokenizer(folder: Path):
    """A WordPiece tokenizer over letters, digits, punctuation and a few whole words."""
    from transformers import BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    pieces = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    pieces += list(string.ascii_lowercase + string.digits + string.punctuation)
    pieces += ["##" + c for c in string.ascii_lowercase + string.digits]
    vocab = {piece: i for i, piece in enumerate(dict.fromkeys(pieces))}
    try:  # transformers >= 5 takes the vocabulary itself
        tokenizer = BertTokenizerFast(vocab=vocab)
    except TypeError:  # transformers 4: a vocab.txt file
        (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
        tokenizer = BertTokenizerFast(vocab_file=str(folder / "vocab.txt"))
    tokenizer.save_pretrained(folder)
    return tokenizer


def tiny_bert(folder: Path) -> Path:
    """A 2-layer BERT of width 32 (config + tokenizer, no weights)."""
    from transformers import BertConfig

    tokenizer = tiny_tokenizer(folder)
    BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
               intermediate_size=64, max_position_embeddings=128, pad_token_id=0).save_pretrained(folder)
    return folder


def tiny_causal_lm(folder: Path) -> Path:
    """A 2-layer Gemma 3 text model of width 32, tied embeddings like the real one (no weights)."""
    from transformers import Gemma3TextConfig

    tokenizer = tiny_tokenizer(folder)
    Gemma3TextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=128,
                     sliding_window=16, pad_token_id=0, bos_token_id=2, eos_token_id=3,
                     tie_word_embeddings=True).save_pretrained(folder)
    return folder


def posts(path: Path, users: int = 12, posts_per_user: int = 30, seed: int = 0) -> Path:
    """A parquet file of posts: each user favours a few words and tags (so tasks differ)."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    rows = []
    for user in range(users):
        favourite = rng.choice(len(WORDS), 6, replace=False)
        tag_bias = rng.dirichlet(np.ones(len(TAGS)) * 0.5)
        for _ in range(posts_per_user - user % 3):  # uneven users
            words = [WORDS[i] for i in rng.choice(favourite, rng.integers(5, 15))]
            words += [WORDS[i] for i in rng.integers(0, len(WORDS), 4)]
            tags = list(dict.fromkeys(TAGS[i] for i in rng.choice(len(TAGS), rng.integers(1, 4), p=tag_bias)))
            rows.append({"user": f"u{user:03d}", "text": " ".join(words), "tags": tags})
    frame = pd.DataFrame(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(path)
    return path
