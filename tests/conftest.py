import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402


@pytest.fixture
def tiny_overrides():
    """A federation small enough for a unit test: 8 IN / 8 OUT tasks, 6 rounds."""
    return [
        "data.num_in_tasks=8", "data.num_out_tasks=8", "federation.tasks_per_round=4",
        "federation.rounds=6", "federation.warm_start_rounds=2", "attack.trials=16", "attack.bootstrap=50",
    ]


@pytest.fixture(scope="session")
def bert_dir(tmp_path_factory):
    """A tiny randomly initialised BERT saved as a local transformers folder (built once per run)."""
    from text_fixtures import tiny_bert

    return tiny_bert(tmp_path_factory.mktemp("tinybert"))


@pytest.fixture(scope="session")
def lm_dir(tmp_path_factory):
    """A tiny randomly initialised causal LM saved as a local transformers folder."""
    from text_fixtures import tiny_causal_lm

    return tiny_causal_lm(tmp_path_factory.mktemp("tinylm"))


@pytest.fixture
def flower_identity():
    """Outside a running SuperNode, Flower needs its task identity set to build Messages:
    set it through Flower's public setters, and restore it afterwards."""
    from flwr.supercore.task_identity import TaskIdentity

    before = {}
    for name in ("run_id", "node_id", "task_id"):
        try:
            before[name] = getattr(TaskIdentity, name)
        except RuntimeError:  # unset outside a Flower run
            before[name] = None
        setattr(TaskIdentity, name, 1)
    yield
    for name, value in before.items():
        setattr(TaskIdentity, name, value)
