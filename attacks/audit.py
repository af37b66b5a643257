"""Empirical lower bound on task-level epsilon from the attacks' scores (a one-run DP audit).

An (eps, delta)-DP training algorithm bounds every test that decides "task IN" from the
released model: TPR <= e^eps * FPR + delta (Kairouz et al. 2015; used for auditing by
Jagielski et al. 2020 and Nasr et al. 2021). An attack's measured TPR and FPR at a threshold
therefore certify

    eps >= log((TPR_low - delta) / FPR_high),

with TPR_low a lower and FPR_high an upper Clopper-Pearson bound. This module computes that
bound honestly:

* **Confidence.** The two proportions share the error budget (Bonferroni): TPR_low is a
  one-sided lower bound at 1 - alpha/2 and FPR_high a one-sided upper bound at 1 - alpha/2,
  so both hold together with probability >= 1 - alpha = ``confidence`` (0.95).
* **Independence.** Trials of one task reuse its samples and share its draw from the task
  distribution: they are correlated, and pooling them would overstate the evidence. The unit
  is one decision per task: the score of one held-out trial (trial 0, a uniform random
  k-subset) of each evaluation task. Tasks are i.i.d. draws from the task distribution and
  IN/OUT does not depend on their content, so, as in one-run audits (Steinke, Nasr and
  Jagielski 2023), the per-task decisions are treated as independent Bernoulli trials.
* **Choice of threshold and attack.** Picking the best of many thresholds on the data it is
  evaluated on would be optimistic. The tasks are split at random (seeded) into a selection
  half and an evaluation half, IN and OUT separately. On the selection half (all trials
  pooled: only rates are estimated there) every (attack, threshold) gets the bound it would
  be *expected* to certify on the evaluation half; the best one is then evaluated, once, on
  the evaluation tasks, which played no part in choosing it. No multiplicity correction is
  needed because one test is evaluated.

The result is a *lower* bound on the epsilon the training actually has, at the attack's
strength; the accountant's epsilon is an *upper* bound. A bound above the accountant's
epsilon (beyond its 5 % error rate) means a bug in one of them. With n evaluation tasks on
each side the bound can never exceed log((0.025^(1/n) - delta) / (1 - 0.025^(1/n))), about
2.1 for 32 and 2.8 for 64: a one-run audit with few tasks can only certify small epsilons.
"""

from __future__ import annotations

import math

import numpy as np

DEFAULT_AUDIT_DELTA = 1e-5  # the delta used when the run has no DP (the bound is then at this delta)
DEFAULT_CONFIDENCE = 0.95
MAX_THRESHOLDS = 2048  # candidate thresholds per attack on the selection half
AUDITED_GAMES = ("strong", "weak")  # games against the released model (not the null control)
METHOD = ("one decision per task (trial 0 of each evaluation task); threshold and attack chosen on a "
          "disjoint random half of the tasks; Clopper-Pearson, alpha split equally between TPR and FPR")


def _check_probability(name: str, value, *, open_low: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number; got {value!r}")
    low_ok = value > 0 if open_low else value >= 0
    if not (low_ok and value < 1):
        raise ValueError(f"{name} must lie in {'(' if open_low else '['}0, 1); got {value!r}")
    return float(value)


def _check_count(name: str, value, maximum: int | None = None) -> np.ndarray:
    array = np.asarray(value)
    if array.dtype.kind not in "iu" and not (array.dtype.kind == "f" and np.all(array == np.round(array))):
        raise ValueError(f"{name} must be whole numbers; got {value!r}")
    array = array.astype(np.int64)
    if np.any(array < 0) or (maximum is not None and np.any(array > maximum)):
        raise ValueError(f"{name} must lie in [0, {maximum}]; got {value!r}")
    return array


def clopper_pearson_lower(*, successes, trials: int, alpha: float) -> np.ndarray:
    """One-sided (1 - alpha) lower Clopper-Pearson bound on a proportion (vectorised over successes)."""
    from scipy.stats import beta

    trials = int(_check_count("trials", trials))
    if trials < 1:
        raise ValueError(f"trials must be >= 1; got {trials}")
    successes = _check_count("successes", successes, trials)
    alpha = _check_probability("alpha", alpha)
    safe = np.maximum(successes, 1)
    return np.where(successes == 0, 0.0, beta.ppf(alpha, safe, trials - safe + 1))


def clopper_pearson_upper(*, successes, trials: int, alpha: float) -> np.ndarray:
    """One-sided (1 - alpha) upper Clopper-Pearson bound on a proportion (vectorised over successes)."""
    from scipy.stats import beta

    trials = int(_check_count("trials", trials))
    if trials < 1:
        raise ValueError(f"trials must be >= 1; got {trials}")
    successes = _check_count("successes", successes, trials)
    alpha = _check_probability("alpha", alpha)
    safe = np.minimum(successes, trials - 1)
    return np.where(successes == trials, 1.0, beta.ppf(1.0 - alpha, safe + 1, trials - safe))


def epsilon_bound_table(*, in_decisions: int, out_decisions: int, delta: float,
                        confidence: float = DEFAULT_CONFIDENCE):
    """(eps, tpr_low, fpr_high) for every count: eps[s, f] = max(0, log((TPR_low(s) - delta) / FPR_high(f)))
    with s true positives among ``in_decisions`` and f false positives among ``out_decisions``."""
    delta = _check_probability("delta", delta, open_low=False)
    confidence = _check_probability("confidence", confidence)
    alpha = (1.0 - confidence) / 2.0  # Bonferroni: half of the error to each proportion
    tpr_low = clopper_pearson_lower(successes=np.arange(in_decisions + 1), trials=in_decisions, alpha=alpha)
    fpr_high = clopper_pearson_upper(successes=np.arange(out_decisions + 1), trials=out_decisions, alpha=alpha)
    margin = tpr_low[:, None] - delta
    with np.errstate(divide="ignore", invalid="ignore"):
        eps = np.where(margin > 0, np.log(np.maximum(margin, 1e-300) / fpr_high[None, :]), 0.0)
    return np.maximum(eps, 0.0), tpr_low, fpr_high


def epsilon_lower_bound(*, true_positives: int, in_decisions: int, false_positives: int, out_decisions: int,
                        delta: float, confidence: float = DEFAULT_CONFIDENCE) -> dict:
    """The bound certified by one test: {"value", "tpr_low", "fpr_high"} (value >= 0)."""
    for name, value in (("in_decisions", in_decisions), ("out_decisions", out_decisions)):
        if int(_check_count(name, value)) < 1:
            raise ValueError(f"{name} must be >= 1; got {value!r}")
    tp = int(_check_count("true_positives", true_positives, int(in_decisions)))
    fp = int(_check_count("false_positives", false_positives, int(out_decisions)))
    eps, tpr_low, fpr_high = epsilon_bound_table(in_decisions=int(in_decisions), out_decisions=int(out_decisions),
                                                 delta=delta, confidence=confidence)
    return {"value": float(eps[tp, fp]), "tpr_low": float(tpr_low[tp]), "fpr_high": float(fpr_high[fp])}


def audit_candidates(raw_scores: dict, games=AUDITED_GAMES) -> dict:
    """{statistic: {game: {"in", "out"}}} (the security games' raw scores) -> {"statistic/game": {"in", "out"}}."""
    return {f"{name}/{game}": sides[game] for name, sides in raw_scores.items() for game in games if game in sides}


def _score_arrays(name: str, sides) -> tuple[np.ndarray, np.ndarray]:
    if not isinstance(sides, dict) or set(sides) != {"in", "out"}:
        raise ValueError(f"scores[{name!r}] must be a dict with 'in' and 'out' arrays")
    arrays = []
    for side in ("in", "out"):
        array = np.asarray(sides[side], dtype=np.float64)
        if array.ndim != 2 or min(array.shape) < 1:
            raise ValueError(f"scores[{name!r}][{side!r}] must be a (tasks, trials) array; got shape {array.shape}")
        if not np.all(np.isfinite(array)):
            raise ValueError(f"scores[{name!r}][{side!r}] holds NaN or infinite scores")
        arrays.append(array)
    return arrays[0], arrays[1]


def _binomial_pmf(rates: np.ndarray, n: int) -> np.ndarray:
    """(candidates, n + 1): P(Binomial(n, rate) = j) for each candidate's rate."""
    from scipy.stats import binom

    return binom.pmf(np.arange(n + 1)[None, :], n, np.clip(rates, 0.0, 1.0)[:, None])


def _candidate_thresholds(sel_in: np.ndarray, sel_out: np.ndarray):
    """Thresholds between consecutive distinct selection scores, and each one's (TPR, FPR) there."""
    values = np.unique(np.concatenate((sel_in, sel_out)))
    thresholds = np.concatenate(((values[:-1] + values[1:]) / 2.0, values[-1:]))  # score > t: t between values
    if thresholds.size > MAX_THRESHOLDS:  # evenly spaced in rank, the highest kept (low FPR lives there)
        thresholds = thresholds[np.linspace(0, thresholds.size - 1, MAX_THRESHOLDS).round().astype(np.int64)]
    tpr = 1.0 - np.searchsorted(np.sort(sel_in), thresholds, side="right") / sel_in.size
    fpr = 1.0 - np.searchsorted(np.sort(sel_out), thresholds, side="right") / sel_out.size
    return thresholds, tpr, fpr


def empirical_epsilon_lower_bound(*, scores: dict, delta: float, confidence: float = DEFAULT_CONFIDENCE,
                                  seed: int = 0) -> dict:
    """The strongest certified bound over ``scores`` = {attack name: {"in": (n_in, trials), "out": (n_out,
    trials)}}, all over the same tasks (rows), IN predicted when score > threshold.

    Returns CONTRACT §8's {"value", "confidence", "attack", "threshold", "tpr_low", "fpr_high", "decisions"}
    plus the counts behind it and the method (see the module docstring). ``value`` is 0 when nothing
    is certified, and "attack" None when there are too few tasks to hold out half of them.
    """
    delta = _check_probability("delta", delta, open_low=False)
    confidence = _check_probability("confidence", confidence)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0; got {seed!r}")
    if not isinstance(scores, dict) or not scores:
        raise ValueError("scores must be a non-empty dict of attack name -> {'in', 'out'} score arrays")
    arrays = {name: _score_arrays(name, sides) for name, sides in scores.items()}
    shapes = {(a.shape[0], b.shape[0]) for a, b in arrays.values()}
    if len(shapes) != 1:
        raise ValueError(f"scores must all cover the same IN and OUT tasks; got task counts {sorted(shapes)}")
    n_in, n_out = shapes.pop()
    result = {"value": 0.0, "confidence": confidence, "attack": None, "threshold": None, "tpr_low": 0.0,
              "fpr_high": 1.0, "decisions": 0, "decisions_in": 0, "decisions_out": 0, "true_positives": 0,
              "false_positives": 0, "delta": delta, "method": METHOD}
    if n_in < 2 or n_out < 2:
        return {**result, "note": "fewer than 2 IN or 2 OUT tasks: no held-out tasks to evaluate on"}
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xA0D17]))
    order_in, order_out = rng.permutation(n_in), rng.permutation(n_out)
    sel_in_tasks, eval_in_tasks = order_in[: n_in // 2], order_in[n_in // 2:]
    sel_out_tasks, eval_out_tasks = order_out[: n_out // 2], order_out[n_out // 2:]
    m_in, m_out = eval_in_tasks.size, eval_out_tasks.size
    table, tpr_low, fpr_high = epsilon_bound_table(in_decisions=m_in, out_decisions=m_out, delta=delta,
                                                   confidence=confidence)

    best = None  # (expected bound, tpr - fpr, name, threshold)
    for name, (scores_in, scores_out) in arrays.items():
        thresholds, tpr, fpr = _candidate_thresholds(scores_in[sel_in_tasks].ravel(),
                                                     scores_out[sel_out_tasks].ravel())
        # the bound each threshold is expected to certify on m_in + m_out fresh decisions
        expected = np.einsum("cs,sf,cf->c", _binomial_pmf(tpr, m_in), table, _binomial_pmf(fpr, m_out))
        key = np.lexsort((tpr - fpr, expected))[-1]  # highest expected bound, then Youden's J
        candidate = (float(expected[key]), float(tpr[key] - fpr[key]), name, float(thresholds[key]))
        if best is None or candidate[:2] > best[:2]:
            best = candidate
    expected, _, name, threshold = best
    scores_in, scores_out = arrays[name]
    tp = int(np.sum(scores_in[eval_in_tasks, 0] > threshold))
    fp = int(np.sum(scores_out[eval_out_tasks, 0] > threshold))
    return {**result, "value": float(table[tp, fp]), "attack": name, "threshold": threshold,
            "tpr_low": float(tpr_low[tp]), "fpr_high": float(fpr_high[fp]), "decisions": m_in + m_out,
            "decisions_in": m_in, "decisions_out": m_out, "true_positives": tp, "false_positives": fp,
            "expected_value": expected, "max_certifiable": float(table[m_in, 0])}


def format_audit(bound: dict | None) -> str:
    """One paragraph for report.md: the certified bound and what it rests on."""
    if not bound:
        return ""
    if bound.get("attack") is None:
        return f"Empirical lower bound on ε: not computed ({bound.get('note', 'no attack')})."
    return (f"Empirical lower bound on task-level ε ({bound['confidence']:.0%} confidence, δ = {bound['delta']:g}): "
            f"**{bound['value']:.3f}**, from `{bound['attack']}` at threshold {bound['threshold']:.4g}: "
            f"{bound['true_positives']}/{bound['decisions_in']} IN and {bound['false_positives']}/"
            f"{bound['decisions_out']} OUT held-out tasks flagged (TPR ≥ {bound['tpr_low']:.3f}, "
            f"FPR ≤ {bound['fpr_high']:.3f}); one decision per task, threshold chosen on the other tasks; "
            f"a perfect attack could certify at most {bound.get('max_certifiable', math.nan):.2f} "
            "with these tasks.")
