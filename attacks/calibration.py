"""Calibrated (shadow-model) task inference: per-challenge features, LiRA-style likelihood
ratios and a TMI-style metaclassifier. Pure array functions; the shadow federations that
produce the arrays are trained by fedtask/shadow.py and reach this module only as embeddings
from the black-box oracle.

A *challenge* is one (task, trial): a k-subset of the task's pool drawn exactly as the
reference-free game draws it (same seed, same slots), so the target's statistic here equals
the security game's raw score, and every shadow model is queried with the very same subsets.
Calibrating per (task, trial) removes what a challenge set's own content contributes to its
score (how spread its k samples are), leaving the model's effect.

* :func:`lira_scores` (Carlini et al. 2022, here per task): online, Gaussians of the shadow
  scores of the same challenge under the shadows that trained on the task (IN) and those that
  did not (OUT): mean per (task, trial), one variance per side pooled over all challenges (LiRA's
  global variance, for few shadows); the score is the log likelihood ratio. Offline (no IN
  shadows): a one-sided test against the OUT Gaussian, the score being z = (x - mu_out) / sigma_out
  (monotone in the p-value).
* :func:`metaclassifier_scores` (TMI, Abascal et al. 2023): a scikit-learn logistic regression
  over the feature vector of a challenge (every statistic, per-coordinate variances of the k
  embeddings, the norm of their mean), each feature standardised against the OUT shadows of the
  same challenge, trained on shadow observations labelled IN / OUT.
"""

from __future__ import annotations

import numpy as np

from .blas import on_one_blas_thread
from .game import _check_k, draw_subsets
from .grouping import pad_by_task
from .statistics import STATISTICS, as_float_array
from .whitening import DEFAULT_WHITEN_LAMBDA, whiten_padded

MODES = ("online", "offline")
_CHUNK_ELEMENTS = 1 << 22
_VARIANCE_FLOOR = 1e-12


def feature_names(d: int) -> list[str]:
    """Names of :func:`challenge_features`' columns for d-dimensional embeddings."""
    return [*STATISTICS, *(f"coordinate_variance_{j}" for j in range(d)), "mean_norm"]


@on_one_blas_thread
def challenge_features(emb, task_index, *, k: int, trials: int, rng: np.random.Generator, whiten: bool = False,
                       cosine: bool = False, whiten_lambda: float = DEFAULT_WHITEN_LAMBDA,
                       k_name: str = "k") -> np.ndarray:
    """Features (tasks, trials, F) of ``trials`` random k-subsets of every task's embeddings.

    Columns as :func:`feature_names`: each registered statistic (as the game computes it), the
    unbiased variance of each embedding coordinate over the k samples, and the norm of their mean.
    ``rng`` fresh from the game's subset seed draws the game's very subsets; ``whiten`` applies the
    game's leave-one-task-out whitening (the symmetric W of CONTRACT §5).
    """
    emb = as_float_array(emb)
    padded, counts = pad_by_task(emb, task_index)
    if counts.size < 2:
        raise ValueError(f"task_index must name at least 2 tasks; got {counts.size}")
    _check_k(k, counts, counts.size, k_name)
    if whiten:
        padded = whiten_padded(padded, counts, whiten_lambda, symmetric=True)
    slots = draw_subsets(counts, k, trials, rng)  # the game's first draw from rng: the same subsets
    tasks, d = counts.size, padded.shape[-1]
    per_chunk = max(1, _CHUNK_ELEMENTS // (tasks * k * d))
    parts = []
    for first in range(0, trials, per_chunk):
        rows = padded[np.arange(tasks)[:, None], slots[first: first + per_chunk]]  # (chunk, T, k, d)
        columns = [s.on_embeddings(rows, cosine=cosine) for s in STATISTICS.values()]
        coordinate_variances = rows.var(axis=-2, ddof=1)
        mean_norm = np.linalg.norm(rows.mean(axis=-2), axis=-1)
        parts.append(np.concatenate([np.stack(columns, -1), coordinate_variances, mean_norm[..., None]], -1))
    return np.swapaxes(np.concatenate(parts), 0, 1)


def _shadow_arrays(target, shadows, shadow_in):
    target = np.asarray(target, dtype=np.float64)
    shadows = np.asarray(shadows, dtype=np.float64)
    shadow_in = np.asarray(shadow_in)
    if target.ndim != 2:
        raise ValueError(f"target must be a (tasks, trials) array; got shape {target.shape}")
    if shadows.ndim != 3 or shadows.shape[1:] != target.shape:
        raise ValueError(f"shadows must be a (shadow models, tasks, trials) array matching target {target.shape}; "
                         f"got shape {shadows.shape}")
    if shadow_in.shape != shadows.shape[:2] or shadow_in.dtype != bool:
        raise ValueError(f"shadow_in must be a boolean (shadow models, tasks) array of shape {shadows.shape[:2]}; "
                         f"got {shadow_in.dtype} {shadow_in.shape}")
    for name, array in (("target", target), ("shadows", shadows)):
        if not np.all(np.isfinite(array)):
            raise ValueError(f"{name} holds NaN or infinite scores")
    return target, shadows, shadow_in


def _gaussian_fit(shadows: np.ndarray, mask: np.ndarray, side: str):
    """Mean per (task, trial) of the masked shadows, and one variance around those means pooled over
    every task and trial (LiRA's "global variance", steadier than per-challenge ones with few shadows)."""
    count = mask.sum(axis=0)  # (T,)
    if np.any(count < 2):
        raise ValueError(f"shadow_in must give every task at least 2 {side} shadow models; "
                         f"task {int(np.argmin(count))} has {int(count.min())}")
    weights = mask[:, :, None].astype(np.float64)
    mean = (weights * shadows).sum(axis=0) / count[:, None]
    residual = (weights * (shadows - mean) ** 2).sum()
    variance = residual / (float((count - 1).sum()) * shadows.shape[2])
    scale = float(np.mean(shadows ** 2))
    return mean, max(variance, _VARIANCE_FLOOR * scale, np.finfo(np.float64).tiny)


def lira_scores(*, target, shadows, shadow_in, mode: str) -> np.ndarray:
    """LiRA-style calibrated scores (tasks, trials), higher = more IN-like.

    target (T, R): a statistic on the target model; shadows (S, T, R): the same statistic, same
    challenges, on each shadow model; shadow_in (S, T): whether shadow s trained on task t.
    ``mode`` "online": log N(x; IN fit) - log N(x; OUT fit); "offline": (x - mu_out) / sigma_out
    from the OUT shadows only (one-sided: the statistics grow with membership).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
    target, shadows, shadow_in = _shadow_arrays(target, shadows, shadow_in)
    mean_out, var_out = _gaussian_fit(shadows, ~shadow_in, "OUT")
    if mode == "offline":
        return (target - mean_out) / np.sqrt(var_out)
    mean_in, var_in = _gaussian_fit(shadows, shadow_in, "IN")
    log_in = -0.5 * np.log(var_in) - (target - mean_in) ** 2 / (2.0 * var_in)
    log_out = -0.5 * np.log(var_out) - (target - mean_out) ** 2 / (2.0 * var_out)
    return log_in - log_out


def _standardise(features: np.ndarray, reference: np.ndarray, reference_in: np.ndarray,
                 leave_one_out: bool) -> np.ndarray:
    """Each feature minus the mean of the OUT shadows of the same challenge, over a per-task scale.

    features (S or 1, T, R, F); reference (S, T, R, F), reference_in (S, T). With ``leave_one_out``
    ``features`` are the reference shadows themselves, and shadow s's own observation is left out
    of the OUT mean it is compared with (else a shadow would be measured against itself).
    """
    out = (~reference_in)[:, :, None, None].astype(np.float64)
    out_sum = (out * reference).sum(axis=0)  # (T, R, F)
    out_count = out.sum(axis=0)  # (T, 1, 1)
    if leave_one_out:
        counts = out_count[None] - out
        if np.any(counts < 1):
            raise ValueError("shadow_in must leave every task at least 2 OUT shadow models")
        mean = (out_sum[None] - out * reference) / counts
    else:
        if np.any(out_count < 1):
            raise ValueError("shadow_in must leave every task at least 1 OUT shadow model")
        mean = (out_sum / out_count)[None]
    scale = reference.std(axis=(0, 2))  # (T, F): how much the feature moves for this task
    scale = np.maximum(scale, _VARIANCE_FLOOR * max(float(scale.mean()), np.finfo(np.float64).tiny))
    return (features - mean) / scale[None, :, None, :]


def metaclassifier_scores(*, train_features, train_in, reference_features, reference_in, targets: list,
                          seed: int = 0, max_rows: int = 200_000) -> list[np.ndarray]:
    """TMI-style metaclassifier scores, one (T, R) array per entry of ``targets``.

    train_features (S, U, R, F) with train_in (S, U): shadow observations of U training tasks and
    whether each shadow trained on each task (the labels). reference_features (S', T, R, F) with
    reference_in (S', T): the shadows' observations of the T challenge tasks, whose OUT ones
    standardise each target (T, R, F) array. A logistic regression (scikit-learn) learns IN vs OUT
    from at most ``max_rows`` training observations (a seeded subsample); the score is its decision
    function.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    train_features = np.asarray(train_features, dtype=np.float64)
    reference_features = np.asarray(reference_features, dtype=np.float64)
    train_in, reference_in = np.asarray(train_in, dtype=bool), np.asarray(reference_in, dtype=bool)
    if train_features.ndim != 4 or train_in.shape != train_features.shape[:2]:
        raise ValueError(f"train_features must be (shadows, tasks, trials, features) with train_in (shadows, tasks); "
                         f"got {train_features.shape} and {train_in.shape}")
    if reference_features.ndim != 4 or reference_in.shape != reference_features.shape[:2]:
        raise ValueError(f"reference_features must be (shadows, tasks, trials, features) with reference_in "
                         f"(shadows, tasks); got {reference_features.shape} and {reference_in.shape}")
    if not train_in.any() or train_in.all():
        raise ValueError("train_in must hold both IN and OUT observations")
    width = train_features.shape[-1]
    for i, target in enumerate(targets):
        if np.shape(target) != reference_features.shape[1:]:
            raise ValueError(f"targets[{i}] must have shape {reference_features.shape[1:]}; got {np.shape(target)}")
    x = _standardise(train_features, train_features, train_in, leave_one_out=True)
    y = np.broadcast_to(train_in[:, :, None], x.shape[:3])
    x, y = x.reshape(-1, width), y.reshape(-1)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x7E7A]))
    if len(y) > max_rows:
        keep = rng.choice(len(y), size=max_rows, replace=False)
        x, y = x[keep], y[keep]
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    model.fit(x, y)
    scores = []
    for target in targets:
        z = _standardise(np.asarray(target, dtype=np.float64)[None], reference_features, reference_in,
                         leave_one_out=False)[0]
        scores.append(model.decision_function(z.reshape(-1, width)).reshape(z.shape[:2]))
    return scores


def format_calibrated(calibrated: dict | None) -> str:
    """report.md's calibrated section: the same columns as the reference-free tables."""
    if not calibrated:
        return ""
    from .metrics import FPR_LEVELS
    from .report import GAME_LABELS, _title, auc_cell, markdown_table, tpr_cell  # the reference-free cells

    rows = []
    scorers = [(f"LiRA on {_title(name).lower().replace(' attack', '')}", games)
               for name, games in calibrated.get("lira", {}).items()]
    scorers.append(("Metaclassifier (all features)", calibrated.get("metaclassifier", {})))
    for label, games in scorers:
        for game in GAME_LABELS:
            if game not in games:
                continue
            m = games[game]
            rows.append([label, GAME_LABELS[game], auc_cell(m), *(tpr_cell(m, level) for level in FPR_LEVELS),
                         str(m["k"]), str(m["trials"]), f"{m['num_in_tasks']} / {m['num_out_tasks']}"])
    table = markdown_table(["scorer", "access", "AUC [95% CI]",
                            *(f"TPR @ {float(level) * 100:g}% FPR [95% CI]" for level in FPR_LEVELS), "k", "trials",
                            "IN / OUT tasks"], rows)
    cost = calibrated.get("cost", {})
    return (f"### Shadow-calibrated attacks ({calibrated['shadow_models']} shadow federations, "
            f"{calibrated['mode']})\n\n{table}\n\nShadow training: {cost.get('seconds_per_shadow', 0):.2f} s per "
            f"federation, {cost.get('total_seconds', 0):.1f} s for the whole calibrated attack. The null control "
            "scores the untrained encoder with the same shadow fits.")


def with_calibrated_curves(raw_scores: dict, calibrated: dict | None, calibrated_scores: dict) -> dict:
    """The security games' raw scores plus each statistic's strong-access LiRA scores, for roc.png:
    the calibrated curve beside the reference-free ones (the key doubles as the curve's label)."""
    if not calibrated:
        return raw_scores
    merged = {name: dict(games) for name, games in raw_scores.items()}
    for name in merged:
        sides = calibrated_scores.get(f"lira/{name}/strong")
        if sides is not None:
            auc = calibrated["lira"][name]["strong"]["auc"]
            merged[name][f"Shadow-calibrated LiRA, strong (AUC {auc:.3f})"] = sides
    return merged
