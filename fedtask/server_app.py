"""The ServerApp for ``flwr run .``: the same training path as ``python run.py``.

The run config (``[tool.flwr.app.config]`` in pyproject.toml, or ``--run-config``) names
the preset (``config``), ``;``-separated ``--set``-style ``overrides``, the output
directory (``out``) and whether to ``attack`` the trained encoder afterwards. Training goes
through :func:`fedtask.pipeline.run_training` with the Grid Flower hands this app, so the
checks, the atomic run directory, the baseline and the outputs are those of ``run.py train``.
"""
from __future__ import annotations

import sys

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedtask.config import ConfigError, load_config, with_overrides
from fedtask.engines import TrainingFailed
from fedtask.federation import GridEngine
from fedtask.pipeline import run_attack, run_training
from fedtask.rundir import default_out_dir

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_config = context.run_config
    overrides = [item.strip() for item in str(run_config.get("overrides", "")).split(";") if item.strip()]
    try:
        config = load_config(str(run_config.get("config", "configs/synthetic.toml")), overrides)
        config = with_overrides(config, {"federation.engine": "flower"})  # what flwr run trains with
        out_dir = str(run_config.get("out", "")) or default_out_dir("flwr-run")
        run_training(config, out_dir, engine=GridEngine(grid))
        if run_config.get("attack", False):
            run_attack(out_dir)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    except TrainingFailed as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
