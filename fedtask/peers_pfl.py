"""pfl-research's side of ``python run.py bench --peers``: a standalone script, run by file path.

It imports only torch, numpy and pfl (``pip install "pfl[pytorch]==0.6.0"``), never fedtask, so
it runs under any interpreter that has pfl, such as a separate virtual environment (pfl pins
``dp-accounting<0.6`` and ``attrs<24``, which this project's environment need not share):

    PYTHON fedtask/peers_pfl.py JOB OUT.json

``JOB.safetensors`` and ``JOB.json`` (written by ``fedtask.bench_peers.write_job``; no pickle) hold the users' data (``x``: users x
samples x features, ``y``: users x samples), the model's initial ``state`` and the ``settings``
to time. The workload is pfl's own FedSGD, the way its documentation sets it up:
``FederatedAveraging`` on a ``SimulatedBackend``, a ``FederatedDataset`` of one user per task,
one local SGD step on the whole batch with learning rate 1 (so a user's statistics are minus its
gradient), ``WeightByUser`` (an unweighted mean over the cohort), and the server's AdamW applied
to that mean by ``PyTorchModel.apply_model_update``. With DP: pfl's central Gaussian mechanism,
``CentrallyAppliedPrivacyMechanism(GaussianMechanism(clipping_bound=C, relative_noise_stddev=z))``:
each user's update clipped to C, N(0, (zC)^2) noise on the sum, then the mean. Metrics are not
sent to the platform, and only round 0 evaluates (pfl evaluates whenever iteration %
evaluation_frequency == 0); the timing is the median round after the first.
"""
from __future__ import annotations

import json
import statistics
import sys
import time
import warnings


def _network(state: dict):
    """The model fedtask trains (MLP encoder + linear head), with pfl's loss/metrics methods."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    from pfl.metrics import Weighted

    class MLPEncoder(nn.Module):
        def __init__(self, input_dim: int, hidden_dim: int, embedding_dim: int):
            super().__init__()
            self.hidden = nn.Linear(input_dim, hidden_dim)
            self.projection = nn.Linear(hidden_dim, embedding_dim)

        def forward(self, x):
            return self.projection(torch.relu(self.hidden(x)))

    class TaskNet(nn.Module):
        def __init__(self):
            super().__init__()
            hidden, features = state["encoder.hidden.weight"].shape
            embedding = state["encoder.projection.weight"].shape[0]
            self.encoder = MLPEncoder(features, hidden, embedding)
            self.head = nn.Linear(embedding, state["head.weight"].shape[0])

        def forward(self, x):
            return self.head(self.encoder(x))

        def loss(self, x, y):
            return F.cross_entropy(self(x), y)

        @torch.no_grad()
        def metrics(self, x, y, eval=False):
            return {"loss": Weighted(float(F.cross_entropy(self(x), y, reduction="sum")), len(y))}

    net = TaskNet()
    net.load_state_dict(state)
    return net


def time_pfl(job: dict, setting: dict) -> dict:
    """Train ``setting['rounds']`` central iterations with pfl; seconds of each round."""
    import numpy as np
    import torch

    from pfl.aggregate.simulate import SimulatedBackend
    from pfl.aggregate.weighting import WeightByUser
    from pfl.algorithm import FederatedAveraging, NNAlgorithmParams
    from pfl.callback.base import TrainingProcessCallback
    from pfl.data.dataset import Dataset
    from pfl.data.federated_dataset import FederatedDataset
    from pfl.data.sampling import get_user_sampler
    from pfl.hyperparam import NNEvalHyperParams, NNTrainHyperParams
    from pfl.metrics import Metrics
    from pfl.model.pytorch import PyTorchModel
    from pfl.privacy import CentrallyAppliedPrivacyMechanism, GaussianMechanism

    torch.manual_seed(job["seed"])
    np.random.seed(job["seed"])
    x, y = job["x"], job["y"]
    users = list(range(len(x)))
    data = {user: Dataset(raw_data=[x[user], y[user]], user_id=str(user)) for user in users}
    federated = FederatedDataset(lambda user: data[user], get_user_sampler("minimize_reuse", users))

    net = _network(job["state"])
    model = PyTorchModel(model=net, local_optimizer_create=torch.optim.SGD,
                         central_optimizer=torch.optim.AdamW(net.parameters(), lr=job["server_lr"],
                                                             weight_decay=job["server_weight_decay"]))
    postprocessors = [WeightByUser()]
    if setting["dp"]:
        postprocessors.append(CentrallyAppliedPrivacyMechanism(
            GaussianMechanism(clipping_bound=job["clipping_norm"], relative_noise_stddev=job["noise_multiplier"])))
    backend = SimulatedBackend(training_data=federated, val_data=federated, postprocessors=postprocessors)

    class RoundClock(TrainingProcessCallback):
        def __init__(self):
            self.stamps: list[float] = []

        def on_train_begin(self, *, model):
            self.stamps = [time.perf_counter()]
            return Metrics()

        def after_central_iteration(self, aggregate_metrics, model, *, central_iteration):
            self.stamps.append(time.perf_counter())
            return False, Metrics()

    clock = RoundClock()
    rounds = setting["rounds"]
    FederatedAveraging().run(
        algorithm_params=NNAlgorithmParams(central_num_iterations=rounds, evaluation_frequency=rounds + 1,
                                           train_cohort_size=setting["tasks_per_round"], val_cohort_size=None),
        backend=backend, model=model,
        model_train_params=NNTrainHyperParams(local_num_epochs=1, local_learning_rate=1.0, local_batch_size=None),
        model_eval_params=NNEvalHyperParams(local_batch_size=None),
        callbacks=[clock], send_metrics_to_platform=False)
    seconds = [b - a for a, b in zip(clock.stamps, clock.stamps[1:])]
    steady = statistics.median(seconds[1:]) if len(seconds) > 1 else seconds[0]
    final_loss = float(net.loss(x.flatten(0, 1), y.flatten()).detach())
    return {**setting, "seconds": steady, "round_seconds": seconds, "final_loss": final_loss}


def read_job(path: str) -> dict:
    """What ``fedtask.bench_peers.write_job`` wrote: tensors from safetensors, the rest from JSON."""
    from safetensors.torch import load_file

    tensors = load_file(path + ".safetensors")
    job = json.loads(open(path + ".json").read())
    job.update(x=tensors["x"], y=tensors["y"],
               state={k[len("state."):]: v for k, v in tensors.items() if k.startswith("state.")})
    return job


def main(argv: list[str]) -> int:
    import torch

    import pfl

    from pfl.internal.ops.pytorch_ops import get_default_device

    job_path, out_path = argv
    job = read_job(job_path)
    if job.get("threads"):
        torch.set_num_threads(int(job["threads"]))  # as many as fedtask's side uses
    # pfl copy-constructs the noised tensors (torch.tensor(tensor)); torch warns each round
    warnings.filterwarnings("ignore", message="To copy construct from a tensor")
    rows = [time_pfl(job, setting) for setting in job["settings"]]
    report = {"pfl_version": getattr(pfl, "__version__", None) or _version("pfl"), "torch_version": torch.__version__,
              "torch_threads": torch.get_num_threads(), "device": str(get_default_device()),
              "python": sys.executable, "rows": rows}
    with open(out_path, "w") as f:
        json.dump(report, f)
    return 0


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
