"""Experiment configuration: defaults, TOML presets, ``--set`` overrides, validation.

A config is a plain nested dict. Every key that may appear is declared in ``SCHEMA``
with its default and type, so that a typo in a preset or in ``--set`` is caught before
anything trains (exit 2, one line naming the key) instead of being silently ignored.
"""
from __future__ import annotations

import copy
import math
import tomllib
from pathlib import Path
from typing import Any

DATASETS = ("synthetic", "femnist", "celeba", "shakespeare", "stackoverflow", "reddit")
SETTINGS = ("personalization", "multiple_problems")


class ConfigError(ValueError):
    """A bad configuration; the message names the key (or file) and what is wrong."""


_OPTIONAL = object()  # marks a key whose default is "unset" (omitted from config.toml)

# key -> (default, allowed python types). ``_OPTIONAL`` defaults are absent unless set.
SCHEMA: dict[str, tuple[Any, tuple[type, ...]]] = {
    "seed": (0, (int,)),
    # --- data ---------------------------------------------------------------------
    "data.name": ("synthetic", (str,)),
    "data.setting": ("personalization", (str,)),
    "data.num_in_tasks": (64, (int,)),
    "data.num_out_tasks": (64, (int,)),
    "data.train_samples_per_task": (16, (int,)),
    "data.holdout_samples_per_task": (8, (int,)),
    "data.path": ("", (str,)),
    # synthetic task distribution (paper Section 4 / Appendix A.8)
    "data.dim": (64, (int,)),
    "data.projection_dim": (16, (int,)),
    "data.task_std": (1.0, (float,)),
    "data.sample_std": (1.0, (float,)),
    # --- language datasets and encoders (fedtask/data/{shakespeare,stackoverflow,reddit}.py,
    #     fedtask/models_text.py, fedtask/lora.py) ------------------------------------------
    "data.min_lines_per_task": (50, (int,)),    # Shakespeare: a (play, role) is a task with this many lines
    "data.seq_len": (80, (int,)),               # characters in (next-character prediction, char encoders)
    "data.max_length": (64, (int,)),            # tokens per text for subword tokenizers
    "data.min_samples_per_task": (0, (int,)),   # Stack Overflow / Reddit: a user needs this many posts
    "data.max_samples_per_task": (0, (int,)),   # ... and at most this many (0 = no limit)
    "data.num_tags": (256, (int,)),             # Stack Overflow by user: the most frequent tags are the classes
    "data.user_column": ("user", (str,)),       # column names in data.path's files
    "data.text_column": ("text", (str,)),
    "data.tags_column": ("tags", (str,)),
    "model.tokenizer_path": ("", (str,)),       # default: model.pretrained_path (minilm: the package's)
    "model.random_init": (False, (bool,)),      # build model.pretrained_path's config.json with random weights
    "model.freeze_embeddings": (False, (bool,)),
    "model.lstm_hidden": (256, (int,)),         # char_lstm: LEAF's 2-layer LSTM width
    "model.lora_r": (8, (int,)),
    "model.lora_alpha": (16.0, (float,)),
    "model.lora_targets": ([], (list,)),        # module names; [] = the encoder's default
    # --- model --------------------------------------------------------------------
    "model.encoder": ("mlp", (str,)),
    "model.embedding_dim": (16, (int,)),
    "model.hidden_dim": (512, (int,)),
    "model.head": ("linear", (str,)),
    "model.pretrained_path": ("", (str,)),
    # --- vision datasets and encoders (fedtask/data/femnist.py, celeba.py, models_vision.py) ---
    "data.image_size": (0, (int,)),             # square side in pixels; 0 = the dataset's default (FEMNIST 28, CelebA 64)
    "data.augment": (False, (bool,)),           # shift (+ flip for faces) of each client's training batch, seeded
    "data.target_attribute": ("Smiling", (str,)),  # CelebA personalization: the binary attribute every task detects
    "data.min_positive_fraction": (0.0, (float,)),  # CelebA multiple_problems: least share of positives per task
    "model.norm": ("group", (str,)),            # ResNet normalisation: group | frozen_batch (models_vision.py says why)
    # --- federation ---------------------------------------------------------------
    "federation.rounds": (100, (int,)),
    "federation.tasks_per_round": (32, (int,)),
    "federation.warm_start_rounds": (10, (int,)),
    "federation.engine": ("flower", (str,)),
    "federation.num_cpus_per_client": (1.0, (float,)),
    "federation.num_gpus_per_client": (0.0, (float,)),
    "federation.device": ("auto", (str,)),
    "federation.ray_address": ("", (str,)),
    "federation.server_optimizer": ("adamw", (str,)),
    "federation.server_lr": (1e-3, (float,)),
    "federation.server_weight_decay": (1e-4, (float,)),
    "federation.server_momentum": (0.0, (float,)),
    "federation.grad_clip": (1.0, (float,)),
    "federation.normalize_task_gradients": (False, (bool,)),
    "federation.head_lr": (0.1, (float,)),
    "federation.head_weight_decay": (1e-3, (float,)),
    "federation.head_steps": (1, (int,)),
    "federation.final_head_steps": (0, (int,)),  # head-only steps on the final encoder before evaluation
    "federation.batch_size": (0, (int,)),
    "federation.samples_per_pass": (0, (int,)),  # vectorized engine: most samples per encoder pass; 0 = per device
    # --- task-level differential privacy ------------------------------------------
    "dp.enabled": (False, (bool,)),
    "dp.noise_multiplier": (1.0, (float,)),
    "dp.clipping_norm": (1.0, (float,)),
    "dp.delta": (1e-5, (float,)),
    "dp.target_epsilon": (_OPTIONAL, (float,)),
    "dp.accountant": ("rdp", (str,)),
    # --- attack -------------------------------------------------------------------
    "attack.trials": (128, (int,)),
    "attack.k_strong": (8, (int,)),
    "attack.k_weak": (4, (int,)),
    "attack.whiten": (False, (bool,)),
    "attack.cosine": (False, (bool,)),
    "attack.whiten_lambda": (1e-3, (float,)),
    "attack.bootstrap": (1000, (int,)),
    "attack.batch_size": (1024, (int,)),
}


def register_keys(keys: dict[str, tuple[Any, tuple[type, ...]]]) -> None:
    """Let a data or model module declare its own keys (``data.seq_len`` ...)."""
    SCHEMA.update(keys)


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def _unflatten(flat: dict[str, Any]) -> dict:
    tree: dict = {}
    for dotted, value in flat.items():
        node = tree
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def _coerce(key: str, value: Any) -> Any:
    _, types = SCHEMA[key]
    if isinstance(value, bool) and bool not in types:
        raise ConfigError(f"{key}: expected {types[0].__name__}, got a boolean {value!r}")
    if float in types and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, types):
        raise ConfigError(
            f"{key}: expected {types[0].__name__}, got {type(value).__name__} {value!r}"
        )
    return value


def parse_set(assignment: str) -> tuple[str, Any]:
    """Parse one ``--set KEY=VALUE`` with the value read as TOML (bare words as strings)."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected KEY=VALUE")
    key, raw = assignment.split("=", 1)
    key, raw = key.strip(), raw.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare word such as --set data.name=femnist
    return key, value


def load_config(path: str | Path | None = None, overrides: list[str] | dict | None = None) -> dict:
    """Defaults, then the TOML preset at ``path``, then overrides; validated."""
    flat = {k: v for k, (v, _) in SCHEMA.items() if v is not _OPTIONAL}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            preset = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{path}: not valid TOML ({err})") from None
        flat.update(_check_keys(_flatten(preset), source=str(path)))
    if isinstance(overrides, dict):
        pairs = list(_flatten(overrides).items())
    else:
        pairs = [parse_set(item) for item in overrides or []]
    flat.update(_check_keys(dict(pairs), source="--set"))
    config = _unflatten(flat)
    validate(config)
    return config


def _check_keys(flat: dict[str, Any], source: str) -> dict[str, Any]:
    checked = {}
    for key, value in flat.items():
        if key not in SCHEMA:
            raise ConfigError(f"{key}: unknown configuration key (in {source})")
        checked[key] = _coerce(key, value)
    return checked


def get(config: dict, dotted: str, default: Any = None) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{key}: {message}")


def validate(config: dict) -> None:
    """Check values that are well-typed but impossible, before anything starts."""
    data, model, fed, dp, attack = (config[s] for s in ("data", "model", "federation", "dp", "attack"))
    _require(data["name"] in DATASETS, "data.name", f"must be one of {', '.join(DATASETS)}; got {data['name']!r}")
    _require(data["setting"] in SETTINGS, "data.setting", f"must be one of {', '.join(SETTINGS)}; got {data['setting']!r}")
    for key in ("num_in_tasks", "num_out_tasks", "train_samples_per_task", "dim", "projection_dim"):
        _require(data[key] >= 1, f"data.{key}", f"must be >= 1; got {data[key]}")
    _require(data["num_in_tasks"] >= 2, "data.num_in_tasks", "must be >= 2")
    _require(data["holdout_samples_per_task"] >= 0, "data.holdout_samples_per_task", "must be >= 0")
    for key in ("task_std", "sample_std"):
        _require(data[key] > 0, f"data.{key}", f"must be > 0; got {data[key]}")
    if data["path"]:
        _require(Path(data["path"]).exists(), "data.path", f"{data['path']}: no such file or directory")

    _require(model["embedding_dim"] >= 1, "model.embedding_dim", "must be >= 1")
    _require(model["hidden_dim"] >= 1, "model.hidden_dim", "must be >= 1")
    _require(model["head"] in ("linear", "lora"), "model.head", f"must be 'linear' or 'lora'; got {model['head']!r}")
    if model["pretrained_path"]:
        _require(Path(model["pretrained_path"]).exists(), "model.pretrained_path",
                 f"{model['pretrained_path']}: no such file or directory")

    _validate_language(data, model)

    _require(fed["rounds"] >= 1, "federation.rounds", f"must be >= 1; got {fed['rounds']}")
    _require(0 <= fed["warm_start_rounds"] < fed["rounds"], "federation.warm_start_rounds",
             f"must be in [0, federation.rounds); got {fed['warm_start_rounds']} with {fed['rounds']} rounds")
    _require(1 <= fed["tasks_per_round"] <= data["num_in_tasks"], "federation.tasks_per_round",
             f"must be in [1, data.num_in_tasks={data['num_in_tasks']}]; got {fed['tasks_per_round']} "
             "(a sampling rate above 1 is impossible)")
    _require(fed["engine"] in ("flower", "vectorized"), "federation.engine",
             f"must be 'flower' or 'vectorized'; got {fed['engine']!r}")
    _require(fed["num_cpus_per_client"] > 0, "federation.num_cpus_per_client", "must be > 0")
    _require(fed["num_gpus_per_client"] >= 0, "federation.num_gpus_per_client", "must be >= 0")
    _require(fed["device"] in ("auto", "cpu", "cuda"), "federation.device", "must be auto, cpu or cuda")
    _require(fed["server_optimizer"] in ("sgd", "adamw"), "federation.server_optimizer",
             f"must be 'sgd' or 'adamw'; got {fed['server_optimizer']!r}")
    for key in ("server_lr", "head_lr"):
        _require(fed[key] > 0, f"federation.{key}", f"must be > 0; got {fed[key]}")
    for key in ("server_weight_decay", "head_weight_decay", "grad_clip", "server_momentum"):
        _require(fed[key] >= 0, f"federation.{key}", f"must be >= 0; got {fed[key]}")
    _require(fed["head_steps"] >= 1, "federation.head_steps", "must be >= 1")
    _require(fed["final_head_steps"] >= 0, "federation.final_head_steps", "must be >= 0")
    _require(fed["batch_size"] >= 0, "federation.batch_size", "must be >= 0 (0 = the whole task)")
    _require(fed["samples_per_pass"] >= 0, "federation.samples_per_pass",
             "must be >= 0 (0 = chosen per device: 1024 on a CPU, 8192 on a GPU)")

    _require(dp["clipping_norm"] > 0, "dp.clipping_norm", f"must be > 0; got {dp['clipping_norm']}")
    _require(dp["noise_multiplier"] >= 0, "dp.noise_multiplier", f"must be >= 0; got {dp['noise_multiplier']}")
    _require(0 < dp["delta"] < 1, "dp.delta", f"must be in (0, 1); got {dp['delta']}")
    if "target_epsilon" in dp:
        eps = dp["target_epsilon"]
        _require(eps > 0 and not math.isnan(eps), "dp.target_epsilon", f"must be > 0 (inf = no noise); got {eps}")
    _require(dp["accountant"] in ("rdp", "prv"), "dp.accountant", f"must be 'rdp' or 'prv'; got {dp['accountant']!r}")

    _require(attack["trials"] >= 1, "attack.trials", "must be >= 1")
    _require(attack["bootstrap"] >= 0, "attack.bootstrap", "must be >= 0")
    _require(attack["whiten_lambda"] >= 0, "attack.whiten_lambda", "must be >= 0")
    _require(attack["batch_size"] >= 1, "attack.batch_size", "must be >= 1")
    _require(attack["k_strong"] >= 2, "attack.k_strong", "must be >= 2 (the statistics need two samples)")
    _require(attack["k_weak"] >= 2, "attack.k_weak", "must be >= 2 (the statistics need two samples)")
    if data["setting"] == "personalization":
        _require(attack["k_strong"] <= data["train_samples_per_task"], "attack.k_strong",
                 f"k={attack['k_strong']} is larger than data.train_samples_per_task={data['train_samples_per_task']}")
        _require(attack["k_weak"] <= data["holdout_samples_per_task"], "attack.k_weak",
                 f"k={attack['k_weak']} is larger than data.holdout_samples_per_task={data['holdout_samples_per_task']}")


def _validate_language(data: dict, model: dict) -> None:
    """Keys of the language datasets and encoders (see the SCHEMA block above)."""
    for key in ("min_lines_per_task", "seq_len", "max_length", "num_tags"):
        _require(data[key] >= 1, f"data.{key}", f"must be >= 1; got {data[key]}")
    for key in ("min_samples_per_task", "max_samples_per_task"):
        _require(data[key] >= 0, f"data.{key}", f"must be >= 0; got {data[key]}")
    _require(model["lstm_hidden"] >= 1, "model.lstm_hidden", "must be >= 1")
    _require(model["lora_r"] >= 1, "model.lora_r", f"must be >= 1; got {model['lora_r']}")
    _require(model["lora_alpha"] > 0, "model.lora_alpha", f"must be > 0; got {model['lora_alpha']}")
    _require(all(isinstance(t, str) and t for t in model["lora_targets"]), "model.lora_targets",
             "must be a list of module names")
    if model["tokenizer_path"]:
        _require(Path(model["tokenizer_path"]).exists(), "model.tokenizer_path",
                 f"{model['tokenizer_path']}: no such file or directory")
    _require((data["name"] == "reddit") == (model["encoder"] == "causal_lm"), "model.encoder",
             "next-token prediction: data.name = 'reddit' goes with model.encoder = 'causal_lm' and only with it")
    if model["encoder"] == "causal_lm":
        _require(model["head"] == "lora", "model.head",
                 "model.encoder = 'causal_lm' predicts tokens with its own LM head; the private part is a "
                 "LoRA adapter: set model.head = 'lora'")


def to_toml(config: dict) -> str:
    """Serialise a resolved config (two levels: top-level scalars and tables)."""

    def fmt(value: Any) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, float):
            if math.isinf(value):
                return "inf" if value > 0 else "-inf"
            return repr(value)
        if isinstance(value, str):
            return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
        return str(value)

    lines = [f"{k} = {fmt(v)}" for k, v in config.items() if not isinstance(v, dict)]
    for section, table in config.items():
        if isinstance(table, dict):
            lines += ["", f"[{section}]"] + [f"{k} = {fmt(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


def with_overrides(config: dict, overrides: dict[str, Any]) -> dict:
    """A validated copy of ``config`` with dotted-key overrides applied."""
    flat = _flatten(copy.deepcopy(config))
    flat.update(_check_keys(overrides, source="overrides"))
    new = _unflatten(flat)
    validate(new)
    return new
