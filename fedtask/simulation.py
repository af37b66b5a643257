"""Launch the federation on Flower's simulation engine (Ray), locally or on a cluster."""
from __future__ import annotations

import logging
import os
from pathlib import Path

from flwr.simulation import run_simulation

from fedtask.client_app import app as client_app
from fedtask.server_app import build_server_app


def backend_config(config: dict) -> dict:
    """Ray resources per client; ``federation.ray_address`` joins an existing cluster."""
    fed = config["federation"]
    init_args: dict = {"include_dashboard": False, "logging_level": logging.ERROR, "log_to_driver": False}
    if fed["ray_address"]:
        init_args["address"] = fed["ray_address"]
    else:
        init_args["num_cpus"] = os.cpu_count() or 1
    return {"client_resources": {"num_cpus": fed["num_cpus_per_client"], "num_gpus": fed["num_gpus_per_client"]},
            "init_args": init_args}


def simulate(config: dict, out_dir: Path, progress=None) -> dict:
    """Run one Flower ClientApp per IN task and the FedSGD ServerApp; return the outcome."""
    outcome: dict = {}
    logging.getLogger("flwr").setLevel(logging.ERROR)  # hides run_simulation's deprecation notice
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # and Ray's GPU-env tip
    server = build_server_app(config, Path(out_dir), outcome, progress)
    run_simulation(server_app=server, client_app=client_app, num_supernodes=config["data"]["num_in_tasks"],
                   backend_config=backend_config(config))
    if "error" in outcome:
        raise outcome["error"]
    if "encoder" not in outcome:
        raise RuntimeError("the Flower simulation ended without a result (see the log above)")
    return outcome
