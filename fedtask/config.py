"""Experiment configuration: typed, frozen sections, checked once at the edge.

Each section is a frozen dataclass whose fields are the keys users may set, with their
defaults; the dotted keys (``federation.rounds``), their types and the TOML layout all
derive from these classes, so a key is declared once. ``load_config`` reads defaults,
then a TOML preset, then ``--set`` overrides, and validates everything before anything
trains: a typo or an impossible value is one :class:`ConfigError` naming the key.
Library code below the edge receives plain keyword values taken from these sections.
"""
from __future__ import annotations

import dataclasses
import math
import tomllib
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

SETTINGS = ("personalization", "multiple_problems")
HEADS = ("linear", "lora")
DEVICES = ("auto", "cpu", "cuda")
MAX_SEED = 2**63 - 1
CALIBRATIONS = ("none", "shadow")
SHADOW_MODES = ("online", "offline")


class ConfigError(ValueError):
    """A bad configuration; the message names the key (or file) and what is wrong."""


@dataclass(frozen=True)
class DataConfig:
    name: str = "synthetic"
    setting: str = "personalization"
    num_in_tasks: int = 64
    num_out_tasks: int = 64
    train_samples_per_task: int = 16
    holdout_samples_per_task: int = 8
    path: str = ""                      # local files (parquet / arrow / json) for real datasets
    # synthetic task distribution (paper Section 4 / Appendix A.8)
    dim: int = 64
    projection_dim: int = 16
    task_std: float = 1.0
    sample_std: float = 1.0
    # language datasets (fedtask/data/{shakespeare,stackoverflow,reddit}.py)
    min_lines_per_task: int = 50        # Shakespeare: a (play, role) is a task with this many lines
    seq_len: int = 80                   # characters in (next-character prediction, char encoders)
    max_length: int = 64                # tokens per text for subword tokenizers
    min_samples_per_task: int = 0       # Stack Overflow / Reddit: a user needs this many posts
    max_samples_per_task: int = 0       # ... and at most this many (0 = no limit)
    num_tags: int = 256                 # Stack Overflow by user: the most frequent tags are the classes
    user_column: str = "user"           # column names in data.path's files
    text_column: str = "text"
    tags_column: str = "tags"
    # vision datasets (fedtask/data/femnist.py, celeba.py)
    image_size: int = 0                 # square side in pixels; 0 = the dataset's default (FEMNIST 28, CelebA 64)
    augment: bool = False               # shift (+ flip for faces) of each client's training batch, seeded
    target_attribute: str = "Smiling"   # CelebA personalization: the binary attribute every task detects
    min_positive_fraction: float = 0.0  # CelebA multiple_problems: least share of positives per task


@dataclass(frozen=True)
class ModelConfig:
    encoder: str = "mlp"
    embedding_dim: int = 16
    hidden_dim: int = 512
    head: str = "linear"
    pretrained_path: str = ""
    tokenizer_path: str = ""            # default: model.pretrained_path (minilm: the package's)
    random_init: bool = False           # build model.pretrained_path's config.json with random weights
    freeze_embeddings: bool = False
    lstm_hidden: int = 256              # char_lstm: LEAF's 2-layer LSTM width
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ()  # module names; () = the encoder's default
    norm: str = "group"                 # ResNet normalisation: group | frozen_batch (models_vision.py says why)


@dataclass(frozen=True)
class FederationConfig:
    rounds: int = 100
    tasks_per_round: int = 32
    warm_start_rounds: int = 10
    engine: str = "flower"
    num_cpus_per_client: float = 1.0
    num_gpus_per_client: float = 0.0
    device: str = "auto"
    ray_address: str = ""
    server_optimizer: str = "adamw"
    server_lr: float = 1e-3
    server_weight_decay: float = 1e-4
    server_momentum: float = 0.0
    grad_clip: float = 1.0
    normalize_task_gradients: bool = False
    head_lr: float = 0.1
    head_weight_decay: float = 1e-3
    head_steps: int = 1
    final_head_steps: int = 0           # head-only steps on the final encoder before evaluation
    batch_size: int = 0
    samples_per_pass: int = 0           # vectorized engine: most samples per encoder pass; 0 = per device
    reply_timeout: float = 900.0        # flower engine: seconds to wait for a round's replies
    max_failed_fraction: float = 0.1    # flower engine: share of a round's tasks that may fail before the run stops
    snapshot_every: int = 0             # keep the encoder every N rounds under snapshots/ (0 = off)
    checkpoint_every: int = 0           # everything training needs to continue, every N rounds (0 = off)
    launcher: str = "flwr-run"          # flower engine: "flwr-run" (Flower's supported launcher) | "run_simulation"
    tensorboard: bool = False           # per-round loss, update norm and epsilon spent under <out>/tensorboard


@dataclass(frozen=True)
class DPConfig:
    enabled: bool = False
    noise_multiplier: float = 1.0
    clipping_norm: float = 1.0
    delta: float = 1e-5
    target_epsilon: float | None = None  # unset: train with dp.noise_multiplier
    accountant: str = "rdp"


@dataclass(frozen=True)
class AttackConfig:
    trials: int = 128
    k_strong: int = 8
    k_weak: int = 4
    whiten: bool = False
    cosine: bool = False
    whiten_lambda: float = 1e-3
    bootstrap: int = 1000
    batch_size: int = 1024
    calibration: str = "none"           # none (reference-free, the paper's) | shadow (fedtask/shadow.py)
    shadow_models: int = 16             # shadow federations the calibrated adversary trains (even, >= 4)
    shadow_mode: str = "online"         # online: each challenge task IN for half the shadows | offline: none


@dataclass(frozen=True)
class Config:
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    dp: DPConfig = field(default_factory=DPConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)

    def to_dict(self) -> dict:
        """The resolved configuration as nested plain values (unset optional keys left out)."""
        return _unflatten(_flat_values(self, plain=True))

    @property
    def sample_rate(self) -> float:
        """q = tasks_per_round / num_in_tasks: each task's chance of taking part in a round."""
        return self.federation.tasks_per_round / self.data.num_in_tasks

    @property
    def encoder_rounds(self) -> int:
        """Rounds that touch the encoder (warm-start rounds do not, so DP does not count them)."""
        return self.federation.rounds - self.federation.warm_start_rounds


SECTIONS = {f.name: f.default_factory for f in fields(Config) if f.default_factory is not dataclasses.MISSING}


def _key_types() -> dict[str, Any]:
    types = {"seed": int}
    for name, section in SECTIONS.items():
        hints = typing.get_type_hints(section)
        types.update({f"{name}.{f.name}": hints[f.name] for f in fields(section)})
    return types


KEY_TYPES: dict[str, Any] = _key_types()  # every dotted key -> its annotated type


def _flat_values(config: Config, plain: bool = False) -> dict[str, Any]:
    """Dotted key -> value, unset optional keys left out; ``plain`` turns tuples into lists (TOML, JSON)."""
    flat: dict[str, Any] = {"seed": config.seed}
    for name in SECTIONS:
        section = getattr(config, name)
        for f in fields(section):
            value = getattr(section, f.name)
            if value is not None:
                flat[f"{name}.{f.name}"] = list(value) if plain and isinstance(value, tuple) else value
    return flat


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


def _type_name(kind: Any) -> str:
    if typing.get_origin(kind) is tuple:
        return "list"
    kinds = [k for k in typing.get_args(kind) if k is not type(None)] or [kind]  # float | None -> float
    return kinds[0].__name__


def _coerce(key: str, value: Any) -> Any:
    """``value`` as the key's declared type; integers widen to floats, lists become tuples."""
    kind = KEY_TYPES[key]
    expected = _type_name(kind)
    if expected == "list":
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{key}: expected a list of strings, got {type(value).__name__} {value!r}")
        return tuple(value)
    if isinstance(value, bool) and expected != "bool":
        raise ConfigError(f"{key}: expected {expected}, got a boolean {value!r}")
    if expected == "float" and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if type(value).__name__ != expected:
        raise ConfigError(f"{key}: expected {expected}, got {type(value).__name__} {value!r}")
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


def read_toml(path: str | Path) -> dict:
    """A TOML file's content, or a ConfigError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML ({err})") from None


def load_config(path: str | Path | None = None, overrides: list[str] | dict | None = None) -> Config:
    """Defaults, then the TOML preset at ``path``, then overrides; validated."""
    flat: dict[str, Any] = {}
    if path is not None:
        flat.update(_check_keys(_flatten(read_toml(path)), source=str(path)))
    if isinstance(overrides, dict):
        pairs = _flatten(overrides)
    else:
        pairs = dict(parse_set(item) for item in overrides or [])
    flat.update(_check_keys(pairs, source="--set"))
    return _build(flat)


def from_dict(tree: dict, *, check: bool = True) -> Config:
    """A Config from nested plain values (``Config.to_dict``'s output). ``check=False`` for one
    that was validated at the edge already (a client receiving the server's resolved config)."""
    return _build(_check_keys(_flatten(tree), source="config"), check=check)


def with_overrides(config: Config, overrides: dict[str, Any]) -> Config:
    """A validated copy of ``config`` with dotted-key overrides applied."""
    flat = _flat_values(config)
    flat.update(_check_keys(overrides, source="overrides"))
    return _build(flat)


def _check_keys(flat: dict[str, Any], source: str) -> dict[str, Any]:
    checked = {}
    for key, value in flat.items():
        if key not in KEY_TYPES:
            raise ConfigError(f"{key}: unknown configuration key (in {source})")
        checked[key] = _coerce(key, value)
    return checked


def _build(flat: dict[str, Any], check: bool = True) -> Config:
    tree = _unflatten(flat)
    sections = {name: make(**tree.get(name, {})) for name, make in SECTIONS.items()}
    config = Config(seed=tree.get("seed", 0), **sections)
    if check:
        validate(config)
    return config


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{key}: {message}")


def _check_finite(config: Config) -> None:
    """Every float key must be a finite number, except a target epsilon of inf (= no noise)."""
    for key, value in _flat_values(config).items():
        if isinstance(value, float) and not math.isfinite(value):
            allowed = key == "dp.target_epsilon" and value == math.inf
            _require(allowed, key, f"must be a finite number; got {value}")


def validate(config: Config) -> None:
    """Check values that are well-typed but impossible, before anything starts."""
    from fedtask.data import DATASETS
    from fedtask.engines import ENGINES
    from strategies.accounting import ACCOUNTANTS
    from strategies.fedsgd import OPTIMIZERS

    data, model, fed, dp, attack = config.data, config.model, config.federation, config.dp, config.attack
    _check_finite(config)
    _require(0 <= config.seed <= MAX_SEED, "seed", f"must be in [0, 2**63 - 1]; got {config.seed}")
    _require(data.name in DATASETS, "data.name", f"must be one of {', '.join(DATASETS)}; got {data.name!r}")
    _require(data.setting in SETTINGS, "data.setting", f"must be one of {', '.join(SETTINGS)}; got {data.setting!r}")
    for key in ("num_in_tasks", "num_out_tasks", "train_samples_per_task", "dim", "projection_dim"):
        _require(getattr(data, key) >= 1, f"data.{key}", f"must be >= 1; got {getattr(data, key)}")
    _require(data.num_in_tasks >= 2, "data.num_in_tasks", "must be >= 2")
    _require(data.holdout_samples_per_task >= 0, "data.holdout_samples_per_task", "must be >= 0")
    for key in ("task_std", "sample_std"):
        _require(getattr(data, key) > 0, f"data.{key}", f"must be > 0; got {getattr(data, key)}")
    if data.path:
        _require(Path(data.path).exists(), "data.path", f"{data.path}: no such file or directory")

    _require(model.embedding_dim >= 1, "model.embedding_dim", "must be >= 1")
    _require(model.hidden_dim >= 1, "model.hidden_dim", "must be >= 1")
    _require(model.head in HEADS, "model.head", f"must be 'linear' or 'lora'; got {model.head!r}")
    if model.pretrained_path:
        _require(Path(model.pretrained_path).exists(), "model.pretrained_path",
                 f"{model.pretrained_path}: no such file or directory")

    _validate_language(data, model)

    _require(fed.rounds >= 1, "federation.rounds", f"must be >= 1; got {fed.rounds}")
    _require(0 <= fed.warm_start_rounds < fed.rounds, "federation.warm_start_rounds",
             f"must be in [0, federation.rounds); got {fed.warm_start_rounds} with {fed.rounds} rounds")
    _require(1 <= fed.tasks_per_round <= data.num_in_tasks, "federation.tasks_per_round",
             f"must be in [1, data.num_in_tasks={data.num_in_tasks}]; got {fed.tasks_per_round} "
             "(a sampling rate above 1 is impossible)")
    _require(fed.engine in ENGINES, "federation.engine",
             f"must be one of {', '.join(repr(e) for e in ENGINES)}; got {fed.engine!r}")
    _require(fed.num_cpus_per_client > 0, "federation.num_cpus_per_client", "must be > 0")
    _require(fed.num_gpus_per_client >= 0, "federation.num_gpus_per_client", "must be >= 0")
    _require(fed.device in DEVICES, "federation.device", "must be auto, cpu or cuda")
    _require(fed.server_optimizer in OPTIMIZERS, "federation.server_optimizer",
             f"must be 'sgd' or 'adamw'; got {fed.server_optimizer!r}")
    for key in ("server_lr", "head_lr"):
        _require(getattr(fed, key) > 0, f"federation.{key}", f"must be > 0; got {getattr(fed, key)}")
    for key in ("server_weight_decay", "head_weight_decay", "grad_clip", "server_momentum"):
        _require(getattr(fed, key) >= 0, f"federation.{key}", f"must be >= 0; got {getattr(fed, key)}")
    _require(fed.head_steps >= 1, "federation.head_steps", "must be >= 1")
    _require(fed.final_head_steps >= 0, "federation.final_head_steps", "must be >= 0")
    _require(fed.batch_size >= 0, "federation.batch_size", "must be >= 0 (0 = the whole task)")
    _require(fed.reply_timeout > 0, "federation.reply_timeout", f"must be > 0 seconds; got {fed.reply_timeout}")
    _require(0 <= fed.max_failed_fraction <= 1, "federation.max_failed_fraction",
             f"must be in [0, 1]; got {fed.max_failed_fraction}")
    _require(fed.snapshot_every >= 0, "federation.snapshot_every",
             f"must be >= 0 (0 = no snapshots); got {fed.snapshot_every}")
    _require(fed.checkpoint_every >= 0, "federation.checkpoint_every",
             f"must be >= 0 (0 = no checkpoints); got {fed.checkpoint_every}")
    _require(fed.launcher in ("flwr-run", "run_simulation"), "federation.launcher",
             f"must be 'flwr-run' or 'run_simulation'; got {fed.launcher!r}")
    _require(fed.samples_per_pass >= 0, "federation.samples_per_pass",
             "must be >= 0 (0 = chosen per device: 1024 on a CPU, 8192 on a GPU)")

    _require(dp.clipping_norm > 0, "dp.clipping_norm", f"must be > 0; got {dp.clipping_norm}")
    _require(dp.noise_multiplier >= 0, "dp.noise_multiplier", f"must be >= 0; got {dp.noise_multiplier}")
    _require(0 < dp.delta < 1, "dp.delta", f"must be in (0, 1); got {dp.delta}")
    if dp.target_epsilon is not None:
        _require(dp.target_epsilon > 0, "dp.target_epsilon", f"must be > 0 (inf = no noise); got {dp.target_epsilon}")
    _require(dp.accountant in ACCOUNTANTS, "dp.accountant",
             f"must be one of {', '.join(repr(a) for a in ACCOUNTANTS)}; got {dp.accountant!r}")

    _require(attack.trials >= 1, "attack.trials", "must be >= 1")
    _require(attack.bootstrap >= 1, "attack.bootstrap", "must be >= 1")
    _require(attack.whiten_lambda >= 0, "attack.whiten_lambda", "must be >= 0")
    _require(attack.batch_size >= 1, "attack.batch_size", "must be >= 1")
    for key in ("k_strong", "k_weak"):
        _require(getattr(attack, key) >= 2, f"attack.{key}", "must be >= 2 (the statistics need two samples)")
    if data.setting == "personalization":
        _require(attack.k_strong <= data.train_samples_per_task, "attack.k_strong",
                 f"k={attack.k_strong} is larger than data.train_samples_per_task={data.train_samples_per_task}")
        _require(attack.k_weak <= data.holdout_samples_per_task, "attack.k_weak",
                 f"k={attack.k_weak} is larger than data.holdout_samples_per_task={data.holdout_samples_per_task}")
    _validate_calibration(config)


def _validate_calibration(config: Config) -> None:
    """attack.calibration and the shadow federations it asks for (fedtask/shadow.py)."""
    attack, data = config.attack, config.data
    _require(attack.calibration in CALIBRATIONS, "attack.calibration",
             f"must be one of {', '.join(repr(c) for c in CALIBRATIONS)}; got {attack.calibration!r}")
    _require(attack.shadow_mode in SHADOW_MODES, "attack.shadow_mode",
             f"must be one of {', '.join(repr(m) for m in SHADOW_MODES)}; got {attack.shadow_mode!r}")
    _require(attack.shadow_models >= 4 and attack.shadow_models % 2 == 0, "attack.shadow_models",
             f"must be an even number >= 4 (IN and OUT shadows for every task); got {attack.shadow_models}")
    if attack.calibration != "shadow":
        return
    _require(data.name == "synthetic", "attack.calibration",
             f"'shadow' needs tasks the adversary owns, disjoint from the target's IN and OUT tasks; data.name = "
             f"{data.name!r} has no reserved split of users here (only 'synthetic' can draw fresh tasks)")
    _require(config.model.head == "linear", "attack.calibration",
             "'shadow' trains the shadow federations with the vectorized engine, which needs model.head = 'linear'")
    if attack.shadow_mode == "online":
        _require(data.num_out_tasks <= data.num_in_tasks, "attack.shadow_mode",
                 f"'online' puts half of the {data.num_in_tasks + data.num_out_tasks} challenge tasks in each shadow "
                 f"federation of data.num_in_tasks={data.num_in_tasks}: needs data.num_out_tasks <= "
                 "data.num_in_tasks; use 'offline'")


def _validate_language(data: DataConfig, model: ModelConfig) -> None:
    """Keys of the language datasets and encoders."""
    for key in ("min_lines_per_task", "seq_len", "max_length", "num_tags"):
        _require(getattr(data, key) >= 1, f"data.{key}", f"must be >= 1; got {getattr(data, key)}")
    for key in ("min_samples_per_task", "max_samples_per_task"):
        _require(getattr(data, key) >= 0, f"data.{key}", f"must be >= 0; got {getattr(data, key)}")
    _require(model.lstm_hidden >= 1, "model.lstm_hidden", "must be >= 1")
    _require(model.lora_r >= 1, "model.lora_r", f"must be >= 1; got {model.lora_r}")
    _require(model.lora_alpha > 0, "model.lora_alpha", f"must be > 0; got {model.lora_alpha}")
    _require(all(model.lora_targets), "model.lora_targets", "must be a list of module names")
    if model.tokenizer_path:
        _require(Path(model.tokenizer_path).exists(), "model.tokenizer_path",
                 f"{model.tokenizer_path}: no such file or directory")
    _require((data.name == "reddit") == (model.encoder == "causal_lm"), "model.encoder",
             "next-token prediction: data.name = 'reddit' goes with model.encoder = 'causal_lm' and only with it")
    if model.encoder == "causal_lm":
        _require(model.head == "lora", "model.head",
                 "model.encoder = 'causal_lm' predicts tokens with its own LM head; the private part is a "
                 "LoRA adapter: set model.head = 'lora'")


def to_toml(config: Config) -> str:
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
        if isinstance(value, list):
            return "[" + ", ".join(fmt(v) for v in value) + "]"
        return str(value)

    tree = config.to_dict()
    lines = [f"{k} = {fmt(v)}" for k, v in tree.items() if not isinstance(v, dict)]
    for section, table in tree.items():
        if isinstance(table, dict):
            lines += ["", f"[{section}]"] + [f"{k} = {fmt(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


def parameter_error(err: ValueError, keys: dict[str, str]) -> ConfigError:
    """A library's ValueError, whose message starts with its parameter's name, as a ConfigError
    naming the configuration key that fed that parameter (``keys``: parameter -> key)."""
    message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    first = message.replace("=", " ").replace(":", " ").split(" ", 1)[0]
    key = keys.get(first)
    return ConfigError(f"{key}: {message}" if key else message)
