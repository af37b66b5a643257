"""The engine interface: registry, per-round hook, one training path, no import circles."""
import ast
import json
from pathlib import Path

import pytest
import torch
from flwr.app import Context, RecordDict
from safetensors.torch import load_file

from fedtask import engines, server_app
from fedtask.config import load_config
from fedtask.engines import ENGINES, TrainingOutcome, get_engine
from fedtask.pipeline import run_training

ROOT = Path(__file__).resolve().parents[1]
TINY = ["data.num_in_tasks=6", "data.num_out_tasks=2", "federation.tasks_per_round=3", "federation.rounds=4",
        "federation.warm_start_rounds=1", 'federation.engine="vectorized"']


def test_every_registered_engine_implements_the_protocol():
    assert set(ENGINES) == {"flower", "vectorized"}
    for name in ENGINES:
        assert callable(get_engine(name).train)
    with pytest.raises(ValueError, match="^engine must be one of"):
        get_engine("spark")


def test_the_round_hook_sees_every_round_and_the_released_encoder(tmp_path):
    seen = []
    results = run_training(load_config("configs/synthetic.toml", TINY), tmp_path / "run",
                           on_round=lambda r, state, row: seen.append((r, {k: v.clone() for k, v in state.items()},
                                                                       row)))
    assert [r for r, _, _ in seen] == [1, 2, 3, 4] and [row["round"] for _, _, row in seen] == [1, 2, 3, 4]
    final = load_file(str(tmp_path / "run" / "encoder.safetensors"))
    last = seen[-1][1]
    assert last.keys() == final.keys() and all(torch.equal(last[k], final[k]) for k in final)
    # the warm-start round leaves the encoder as it was; training rounds move it
    initial = load_file(str(tmp_path / "run" / "encoder_init.safetensors"))
    assert all(torch.equal(seen[0][1][k], initial[k]) for k in initial)
    assert not torch.equal(seen[1][1]["encoder.hidden.weight"], seen[0][1]["encoder.hidden.weight"])
    assert results["utility"]["majority_baseline_accuracy"] is not None


def test_a_failing_engine_leaves_nothing_behind(tmp_path):
    class Broken:
        def check(self, config):
            pass

        def train(self, config, taskset, out_dir, *, on_round=None) -> TrainingOutcome:
            (out_dir / "heads").mkdir()
            raise RuntimeError("client crashed")

    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="client crashed"):
        run_training(load_config("configs/synthetic.toml", TINY), out, engine=Broken())
    assert not out.exists() and not out.with_name("run.incomplete").exists()


def test_flwr_run_serverapp_refuses_bad_input_with_one_line(tmp_path, capsys):
    out = tmp_path / "flwr-run"
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                      run_config={"config": "configs/synthetic.toml", "overrides": "federation.rounds=0",
                                  "out": str(out)})
    with pytest.raises(SystemExit) as exit_info:
        server_app.main(None, context)  # refused before the grid is touched
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: federation.rounds: must be >= 1; got 0"]
    assert not out.exists()


def _project_imports(path: Path) -> set[str]:
    """Project modules a file imports at module level (imports inside functions are deferred)."""
    tree = ast.parse(path.read_text())
    names = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level:
            package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-node.level])
            names.add(f"{package}.{node.module}" if node.module else package)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_no_import_circles():
    modules = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
               for package in ("fedtask", "strategies", "attacks") for p in (ROOT / package).rglob("*.py")}
    graph = {name: {m for m in _project_imports(path) if m in modules and m != name} for name, path in modules.items()}
    state: dict[str, int] = {}

    def visit(name, trail):
        if state.get(name) == 1:
            raise AssertionError("import circle: " + " -> ".join(trail[trail.index(name):] + [name]))
        if state.get(name) == 2:
            return
        state[name] = 1
        for child in sorted(graph[name]):
            visit(child, trail + [name])
        state[name] = 2

    for name in sorted(graph):
        visit(name, [])
    # and the attack side never imports the training code
    for name in graph:
        if name.startswith(("attacks", "strategies")):
            assert not any(m.startswith("fedtask") for m in graph[name]), name


def test_engines_module_is_light():
    # config validation imports the registry: it must not pull in Flower or Ray
    source = Path(engines.__file__).read_text()
    assert "import flwr" not in source and "from flwr" not in source
    assert json.loads(json.dumps(ENGINES))  # plain names, imported only when chosen
