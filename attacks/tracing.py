"""The mean-estimation tracing analog of task inference (paper Section 4, Appendix B; CONTRACT §6).

T task means mu_i ~ N(0, task_std^2 I_d); task i holds N samples ~ N(mu_i, sample_std^2 I_d);
the release is the multitask mean mu_hat of all T*N samples.  The adversary averages its k
challenge samples into mu_B and scores z = <mu_hat - mu_bar, mu_B - mu_bar> (mu_bar = 0).
Strong IN challenges are k of the task's own N samples, weak IN challenges k fresh samples of
the task, OUT challenges k samples of a fresh task.  Every release is simulated in full.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from .metrics import mann_whitney_auc
from .report import markdown_table

ADVERSARIES = ("strong", "weak")
_RELEASE_BATCH_ELEMENTS = 1 << 23  # samples x dims simulated at once


def validate_tracing_params(*, tasks, dim, samples, k, trials, task_std, sample_std, seed) -> dict:
    """Return the parameters as a dict, or raise ValueError whose message starts with the parameter's name."""
    params = dict(tasks=tasks, dim=dim, samples=samples, k=k, trials=trials, seed=seed)
    for name, value in params.items():
        minimum = 0 if name == "seed" else 1
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
            raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}")
    if k > samples:
        raise ValueError(f"k must not exceed samples ({k} > {samples}): the strong adversary draws k of a task's samples")
    for name, value, minimum in (("task_std", task_std, "> 0"), ("sample_std", sample_std, ">= 0")):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not ok or value < 0 or (value == 0 and minimum == "> 0"):
            raise ValueError(f"{name} must be a finite number {minimum}; got {value!r}")
    return {**{n: int(v) for n, v in params.items()}, "task_std": float(task_std), "sample_std": float(sample_std)}


def tracing_theory(tasks, dim, samples, k, task_std, sample_std) -> dict:
    """Theorems 4.1-4.3: E[z_in] per adversary and Var(z_out) (E[z_out] = 0)."""
    var_task, var_sample = task_std**2, sample_std**2
    scale = dim / tasks
    out_var = scale * (var_task**2 + var_sample**2 / (k * samples) + (k + samples) / (k * samples) * var_task * var_sample)
    return {
        "strong": {"theory_in_mean": scale * (var_task + var_sample / samples), "theory_out_var": out_var},
        "weak": {"theory_in_mean": scale * var_task, "theory_out_var": out_var},
    }


def _challenge_means(samples_of_tasks: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Mean of a uniform k-subset (without replacement) of each task's samples (..., N, d)."""
    keys = rng.random(samples_of_tasks.shape[:-1])
    chosen = np.argpartition(keys, k - 1, axis=-1)[..., :k]
    return np.take_along_axis(samples_of_tasks, chosen[..., None], axis=-2).mean(axis=-2)


def _fresh_sample_means(task_means: np.ndarray, k: int, sample_std: float, rng) -> np.ndarray:
    """Mean of k fresh samples N(mu, sample_std^2 I) for each task mean (..., d)."""
    noise = rng.standard_normal(task_means.shape[:-1] + (k, task_means.shape[-1]))
    return task_means + sample_std * noise.mean(axis=-2)


def _simulate_releases(releases: int, p: dict, rng: np.random.Generator) -> dict:
    """z for every IN task and as many fresh OUT tasks, per adversary: arrays (releases * T,)."""
    tasks, dim, samples, k = p["tasks"], p["dim"], p["samples"], p["k"]
    task_means = rng.normal(0.0, p["task_std"], (releases, tasks, dim))
    data = task_means[:, :, None, :] + p["sample_std"] * rng.standard_normal((releases, tasks, samples, dim))
    released = data.mean(axis=(1, 2))  # (releases, d): mu_hat - mu_bar with mu_bar = 0
    challenge = {
        ("strong", "in"): _challenge_means(data, k, rng),
        ("weak", "in"): _fresh_sample_means(task_means, k, p["sample_std"], rng),
    }
    for adversary in ADVERSARIES:
        fresh_tasks = rng.normal(0.0, p["task_std"], (releases, tasks, dim))
        challenge[(adversary, "out")] = _fresh_sample_means(fresh_tasks, k, p["sample_std"], rng)
    return {key: np.einsum("rd,rtd->rt", released, mu_b).ravel() for key, mu_b in challenge.items()}


def simulate_tracing(params: dict) -> dict:
    """Raw statistics {(adversary, "in"|"out"): z (trials,)} over ceil(trials/T) releases.

    Releases are shared by the two adversaries (their IN points differ only in the challenge
    samples), each adversary gets its own fresh OUT tasks; simulated in memory-bounded batches.
    """
    rng = np.random.default_rng(params["seed"])
    releases = math.ceil(params["trials"] / params["tasks"])
    per_release = params["tasks"] * params["samples"] * params["dim"]
    per_batch = max(1, _RELEASE_BATCH_ELEMENTS // per_release)
    batches = [_simulate_releases(min(per_batch, releases - first), params, rng) for first in range(0, releases, per_batch)]
    return {key: np.concatenate([b[key] for b in batches])[: params["trials"]] for key in batches[0]}


def summarise_tracing(params: dict, z: dict) -> dict:
    """The CONTRACT §6 dictionary from raw statistics."""
    theory = tracing_theory(params["tasks"], params["dim"], params["samples"], params["k"], params["task_std"], params["sample_std"])
    result = {"params": {n: params[n] for n in ("tasks", "dim", "samples", "k", "trials", "task_std", "sample_std")}}
    for adversary in ADVERSARIES:
        z_in, z_out = z[(adversary, "in")], z[(adversary, "out")]
        result[adversary] = {
            "in_mean": float(z_in.mean()),
            "out_mean": float(z_out.mean()),
            "in_var": float(z_in.var(ddof=1)),
            "out_var": float(z_out.var(ddof=1)),
            **{name: float(value) for name, value in theory[adversary].items()},
            "auc": mann_whitney_auc(z_in, z_out),
        }
    return result


def run_tracing(*, tasks=256, dim=256, samples=8, k=4, trials=4000, task_std=1.0, sample_std=1.0, seed=0) -> dict:
    """Simulate the tracing game for both adversaries; return the CONTRACT §6 dictionary."""
    params = validate_tracing_params(tasks=tasks, dim=dim, samples=samples, k=k, trials=trials, task_std=task_std,
                                     sample_std=sample_std, seed=seed)
    return summarise_tracing(params, simulate_tracing(params))


def plot_tracing(result: dict, z: dict, path) -> None:
    """IN vs OUT histograms of z, one panel per adversary, theory means as dashed lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True, constrained_layout=True)
    for ax, adversary in zip(axes, ADVERSARIES):
        z_in, z_out = z[(adversary, "in")], z[(adversary, "out")]
        bins = np.linspace(*np.percentile(np.concatenate((z_in, z_out)), [0.2, 99.8]), 60)
        ax.hist(z_out, bins=bins, density=True, alpha=0.55, color="tab:blue", label="OUT")
        ax.hist(z_in, bins=bins, density=True, alpha=0.55, color="tab:red", label="IN")
        ax.axvline(0.0, color="tab:blue", ls="--", lw=1.5, label="theory E[z_out] = 0")
        theory_in = result[adversary]["theory_in_mean"]
        ax.axvline(theory_in, color="tab:red", ls="--", lw=1.5, label=f"theory E[z_in] = {theory_in:.3g}")
        ax.set_title(f"{adversary} adversary (AUC {result[adversary]['auc']:.3f})")
        ax.set_xlabel(r"$z = \langle \hat\mu - \bar\mu,\ \mu_B - \bar\mu \rangle$")
        ax.legend(fontsize=8)
    axes[0].set_ylabel("density")
    p = result["params"]
    fig.suptitle(f"Mean-estimation tracing: T={p['tasks']}, d={p['dim']}, N={p['samples']}, k={p['k']}, "
                 f"{p['trials']} trials")
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_tracing(out_dir, *, tasks=256, dim=256, samples=8, k=4, trials=4000, task_std=1.0, sample_std=1.0,
                  seed=0) -> dict:
    """Run the analog and write tracing.json and tracing.png into `out_dir`; return the dict."""
    params = validate_tracing_params(tasks=tasks, dim=dim, samples=samples, k=k, trials=trials, task_std=task_std,
                                     sample_std=sample_std, seed=seed)
    z = simulate_tracing(params)
    result = summarise_tracing(params, z)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tracing.json").write_text(json.dumps(result, indent=2) + "\n")
    plot_tracing(result, z, out_dir / "tracing.png")
    return result


def format_tracing(result: dict) -> str:
    """Markdown table: empirical statistics beside the closed forms of Theorems 4.1-4.3."""
    p = result["params"]
    header = (f"tracing analog: T={p['tasks']} tasks, d={p['dim']}, N={p['samples']} samples/task, k={p['k']}, "
              f"{p['trials']} trials, task_std={p['task_std']:g}, sample_std={p['sample_std']:g}")
    columns = ["adversary", "E[z_in]", "theory", "E[z_out]", "theory", "Var(z_out)", "theory", "Var(z_in)", "AUC"]
    rows = []
    for adversary in ADVERSARIES:
        r = result[adversary]
        rows.append([adversary, f"{r['in_mean']:.4f}", f"{r['theory_in_mean']:.4f}", f"{r['out_mean']:.4f}", "0",
                     f"{r['out_var']:.4f}", f"{r['theory_out_var']:.4f}", f"{r['in_var']:.4f}", f"{r['auc']:.3f}"])
    return f"{header}\n\n{markdown_table(columns, rows)}"
