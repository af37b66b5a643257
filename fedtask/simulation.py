"""The ``flower`` engine: one ClientApp per IN task on Flower's simulation runtime (Ray),
locally or on a Ray cluster (``federation.ray_address``)."""
from __future__ import annotations

import logging
import os
from concurrent.futures import Future
from pathlib import Path

import torch
from flwr.app import Context
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation

from fedtask.client_app import app as default_client_app
from fedtask.config import ConfigError
from fedtask.engines import RoundHook, TrainingOutcome
from fedtask.federation import run_federation


def backend_config(config) -> dict:
    """Ray resources per client; ``federation.ray_address`` joins an existing cluster."""
    fed = config.federation
    init_args: dict = {"include_dashboard": False, "logging_level": logging.ERROR, "log_to_driver": False}
    if fed.ray_address:
        init_args["address"] = fed.ray_address
    else:
        init_args["num_cpus"] = os.cpu_count() or 1
    return {"client_resources": {"num_cpus": fed.num_cpus_per_client, "num_gpus": fed.num_gpus_per_client},
            "init_args": init_args}


class FlowerSimulationEngine:
    def __init__(self, client_app: ClientApp = default_client_app):
        self.client_app = client_app  # tests inject failing clients here

    def check(self, config) -> None:
        """Resources this machine cannot give: refused here, or Ray waits for them for ever."""
        fed = config.federation
        if fed.ray_address:
            return  # a cluster's resources are known only once joined
        cpus = os.cpu_count() or 1
        if fed.num_cpus_per_client > cpus:
            raise ConfigError(f"federation.num_cpus_per_client: {fed.num_cpus_per_client:g} CPUs per client, "
                              f"but this machine has {cpus}")
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if fed.num_gpus_per_client > gpus:
            raise ConfigError(f"federation.num_gpus_per_client: {fed.num_gpus_per_client:g} GPUs per client, but "
                              f"this machine has {gpus}" + ("; set it to 0" if gpus == 0 else ""))

    def train(self, config, taskset, out_dir: Path, *, on_round: RoundHook | None = None) -> TrainingOutcome:
        """Run the FedSGD ServerApp against ``data.num_in_tasks`` simulated SuperNodes."""
        result: Future = Future()  # run_simulation swallows the ServerApp's exceptions: carry them out
        server = ServerApp()

        @server.main()
        def main(grid: Grid, context: Context) -> None:
            try:
                result.set_result(run_federation(grid, config, taskset.spec, out_dir, on_round=on_round))
            except BaseException as err:
                result.set_exception(err)

        logging.getLogger("flwr").setLevel(logging.ERROR)  # hides run_simulation's deprecation notice
        os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # and Ray's GPU-env tip
        run_simulation(server_app=server, client_app=self.client_app, num_supernodes=config.data.num_in_tasks,
                       backend_config=backend_config(config))
        if not result.done():
            raise RuntimeError("the Flower simulation ended without a result (see the log above)")
        return result.result()
