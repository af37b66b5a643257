"""How alike the trained task heads are (the paper's Appendix A.7.2, Figure 5).

Correlated heads (inner products not centred at 0) mean the tasks pull the shared
representation the same way, which the paper ties to the variance statistic's direction.
Each task's private part becomes one vector: a linear head's weight matrix, or for a LoRA
adapter its effective update B @ A x (lora_alpha / lora_r) over every adapted module (peft's
scaling), concatenated. Biases are left out.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from fedtask import rundir
from fedtask.config import ConfigError, load_config

HEAD_WEIGHT = "head.weight"


def head_vectors(heads: list[dict], *, lora_scaling: float) -> tuple[np.ndarray, str]:
    """(tasks, parameters) matrix of the heads' vectors, and what they are. Adapters win over the
    linear head when a task has both (the adapter is what it adds to the shared encoder)."""
    if len(heads) < 2:
        raise ValueError(f"heads must hold at least two tasks' parameters; got {len(heads)}")
    names = sorted(heads[0])
    for index, head in enumerate(heads):
        if sorted(head) != names:
            raise ValueError(f"heads[{index}] has other parameters than heads[0] ({sorted(head)[:3]} vs {names[:3]})")
    adapters = [name for name in names if "lora_A" in name]
    if adapters:
        parts = []
        for a_name in adapters:
            b_name = a_name.replace("lora_A", "lora_B")
            if b_name not in names:
                raise ValueError(f"heads: {a_name} has no matching {b_name}")
            a = np.stack([np.asarray(h[a_name], dtype=np.float64) for h in heads])  # (T, r, in)
            b = np.stack([np.asarray(h[b_name], dtype=np.float64) for h in heads])  # (T, out, r)
            parts.append((b @ a).reshape(len(heads), -1) * lora_scaling)
        return np.concatenate(parts, axis=1), "LoRA effective matrices B @ A x lora_alpha / lora_r"
    if HEAD_WEIGHT not in names:
        raise ValueError(f"heads: no {HEAD_WEIGHT} and no LoRA adapter among {names[:5]}")
    return np.stack([np.asarray(h[HEAD_WEIGHT], dtype=np.float64).reshape(-1) for h in heads]), HEAD_WEIGHT


def pairwise(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inner products and cosines of every pair i < j of rows (zero rows have cosine 0)."""
    vectors = np.asarray(vectors, dtype=np.float64)
    if vectors.ndim != 2 or len(vectors) < 2:
        raise ValueError(f"vectors must be (tasks >= 2, parameters); got shape {vectors.shape}")
    gram = vectors @ vectors.T
    i, j = np.triu_indices(len(vectors), k=1)
    norms = np.sqrt(np.maximum(np.diag(gram), 0.0))
    scale = norms[i] * norms[j]
    inner = gram[i, j]
    return inner, np.divide(inner, scale, out=np.zeros_like(inner), where=scale > 0)


def _summary(values: np.ndarray) -> dict:
    low, median, high = np.percentile(values, [5, 50, 95])
    return {"mean": float(values.mean()), "std": float(values.std()), "median": float(median),
            "p05": float(low), "p95": float(high), "fraction_positive": float((values > 0).mean())}


def similarity(vectors: np.ndarray) -> dict:
    """heads.json's numbers: mean and std (numpy's, ddof 0) over all pairs, and more of the distribution."""
    inner, cosine = pairwise(vectors)
    return {"inner_product": _summary(inner), "cosine": _summary(cosine), "num_heads": int(len(vectors)),
            "num_pairs": int(len(inner)), "mean_norm": float(np.linalg.norm(vectors, axis=1).mean())}


def load_heads(run_dir: Path) -> tuple[list[str], list[dict]]:
    """The heads a run saved (file stems and tensors as numpy), in partition order."""
    files = sorted((Path(run_dir) / rundir.HEADS).glob("*.safetensors"))
    states = [{k: v.float().numpy() for k, v in rundir.load_state(path).items()} for path in files]
    return [path.stem for path in files], states


def run_heads(run_dir: Path) -> dict:
    """Write heads.json and heads.png for a finished run's heads."""
    run_dir = Path(run_dir)
    if not (run_dir / rundir.CONFIG).is_file():
        raise ConfigError(f"{run_dir / rundir.CONFIG}: missing; --run must be a finished training run")
    config = load_config(run_dir / rundir.CONFIG)
    names, states = load_heads(run_dir)
    if len(states) < 2:
        raise ConfigError(f"{run_dir / rundir.HEADS}: {len(states)} saved heads; pairs need at least two")
    try:
        vectors, what = head_vectors(states, lora_scaling=config.model.lora_alpha / config.model.lora_r)
    except ValueError as err:
        raise ConfigError(f"{run_dir / rundir.HEADS}: {err}") from None
    result = {**similarity(vectors), "parameters": what, "head": config.model.head}
    if what != HEAD_WEIGHT and HEAD_WEIGHT in states[0]:  # a LoRA run's linear head, for comparison
        head_only, _ = head_vectors([{HEAD_WEIGHT: s[HEAD_WEIGHT]} for s in states], lora_scaling=1.0)
        result["linear_head"] = similarity(head_only)
    rundir.write_json(run_dir / rundir.HEADS_SUMMARY, result)
    plot_heads(vectors, result, run_dir / rundir.HEADS_PLOT)
    return result


def format_heads(result: dict) -> str:
    ip, cos = result["inner_product"], result["cosine"]
    return (f"{result['num_heads']} heads ({result['parameters']}), {result['num_pairs']} pairs: inner product "
            f"mean {ip['mean']:.4g} (std {ip['std']:.4g}, {100 * ip['fraction_positive']:.0f}% > 0); cosine mean "
            f"{cos['mean']:.3f} (std {cos['std']:.3f})")


def plot_heads(vectors: np.ndarray, result: dict, path: Path) -> None:
    """Histograms of the pairwise inner products and cosines (Figure 5)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    inner, cosine = pairwise(vectors)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), constrained_layout=True)
    for ax, values, key, label in ((axes[0], inner, "inner_product", "inner product"),
                                   (axes[1], cosine, "cosine", "cosine similarity")):
        ax.hist(values, bins=60, color="tab:purple", alpha=0.75)
        ax.axvline(0.0, color="0.5", lw=1, ls=":")
        ax.axvline(result[key]["mean"], color="tab:red", lw=1.5, label=f"mean {result[key]['mean']:.3g}")
        ax.set(xlabel=f"pairwise {label}", ylabel="pairs", title=f"Task heads: {label}")
        ax.legend(fontsize=8)
    fig.suptitle(f"{result['num_heads']} heads, {result['parameters']}")
    fig.savefig(path, dpi=120)
    plt.close(fig)
