"""Human-readable report of a run: utility, privacy and the attack tables (paper Table 1 layout),
plus ROC curves (roc.png) and statistic histograms (hist.png, paper Figure 4).
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np

from .metrics import FPR_LEVELS, PERCENTILES, roc_curve_points
from .statistics import STATISTICS

GAME_LABELS = {"strong": "Strong", "weak": "Weak", "null_control": "Null control (untrained encoder)"}
_CONFIG_SUMMARY = {"data": ("name", "setting", "num_in_tasks", "num_out_tasks"), "model": ("encoder", "embedding_dim"),
                   "federation": ("rounds", "engine"), "attack": ("whiten", "cosine")}


def _title(statistic: str) -> str:
    """Registered title; a results file may name a statistic this version no longer registers."""
    registered = STATISTICS.get(statistic)
    return registered.title if registered is not None else statistic


def _percent(value) -> str:
    return "n/a" if value is None else f"{100.0 * value:.1f}%"


def _number(value, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool) or isinstance(value, str):
        return str(value)
    return f"{value:.{digits}g}"


def markdown_table(header, rows) -> str:
    """A GitHub Markdown table with padded columns, so it also reads well on a terminal."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    def line(cells):
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def _utility_table(utility: dict) -> str:
    columns = [("IN-task accuracy (held-out)", "in_task_accuracy"), ("IN-task accuracy (train)", "in_task_train_accuracy"),
               ("majority-label baseline", "majority_baseline_accuracy"), ("OUT-task accuracy", "out_task_accuracy")]
    shown = [(label, key) for label, key in columns if key in utility or key in ("in_task_accuracy", "out_task_accuracy")]
    return markdown_table([label for label, _ in shown], [[_percent(utility.get(key)) for _, key in shown]])


def _privacy_table(privacy: dict) -> str:
    if not privacy.get("enabled"):
        return "Task-level DP: off (epsilon = infinity)."
    fields = ("epsilon", "delta", "noise_multiplier", "clipping_norm", "sampling_rate", "rounds", "accountant")
    return markdown_table(["task-level DP", *fields], [["on", *(_number(privacy.get(f)) for f in fields)]])


MIN_OUT_BEYOND = 20  # OUT points above a threshold for its false-positive rate to mean something


def tpr_cell(metrics: dict, level: str) -> str:
    """TPR at a FPR with its Clopper-Pearson 95 % interval, or n/a when the threshold rests on fewer
    than ``MIN_OUT_BEYOND`` OUT points (the interval treats (task, trial) points as independent)."""
    trials, n_in, n_out = metrics.get("trials"), metrics.get("num_in_tasks"), metrics.get("num_out_tasks")
    tpr = metrics["tpr_at_fpr"][level]
    if not (trials and n_in and n_out):
        return _percent(tpr)
    beyond = int(Fraction(level) * n_out * trials)
    if beyond < MIN_OUT_BEYOND:
        return f"n/a ({beyond} OUT points beyond)"
    from .audit import clopper_pearson_lower, clopper_pearson_upper

    points = n_in * trials
    hits = round(tpr * points)
    low = float(clopper_pearson_lower(successes=hits, trials=points, alpha=0.025))
    high = float(clopper_pearson_upper(successes=hits, trials=points, alpha=0.025))
    return f"{_percent(tpr)} [{100 * low:.1f}, {100 * high:.1f}]"


def auc_cell(metrics: dict) -> str:
    """AUC [bootstrap interval]; an interval wholly below 0.5 is a reversed ordering (IN scores lower), a
    leak in the other direction, not its absence (the paper sees this for the variance statistic, A.7.2)."""
    low, high = metrics.get("auc_ci95") or (None, None)
    text = f"{metrics['auc']:.3f}" + (f" [{low:.3f}, {high:.3f}]" if low is not None else "")
    return text + (" (reversed: IN lower)" if high is not None and high < 0.5 else "")


def _attack_tables(statistic: str, games: dict) -> str:
    present = [g for g in GAME_LABELS if g in games]
    summary_rows = []
    for game in present:
        m = games[game]
        summary_rows.append([GAME_LABELS[game], auc_cell(m), *(tpr_cell(m, level) for level in FPR_LEVELS),
                             str(m.get("k", "")), str(m.get("trials", "")),
                             f"{m.get('num_in_tasks', '')} / {m.get('num_out_tasks', '')}"])
    summary = markdown_table(
        ["access", "AUC [95% CI]", *(f"TPR @ {float(level) * 100:g}% FPR [95% CI]" for level in FPR_LEVELS), "k",
         "trials",
         "IN / OUT tasks"], summary_rows)
    percentile_rows = []
    for game in present:
        cells = [GAME_LABELS[game]]
        for q in PERCENTILES:
            p = games[game]["percentile"][q]
            cells += [f"({_percent(p['tpr'])}, {_percent(p['fpr'])})", _percent(p["balanced_accuracy"])]
        percentile_rows.append(cells)
    header = ["access"] + [h for q in PERCENTILES for h in (f"{q}th pct (TPR, FPR)", "Acc.")]
    percentiles = markdown_table(header, percentile_rows)
    title = _title(statistic)
    ks = {game: games[game].get("k") for game in ("strong", "weak") if game in games}
    if len(set(ks.values())) > 1:
        summary += (f"\n\nStrong uses k = {ks['strong']}, weak k = {ks['weak']}: their AUCs are not directly "
                    "comparable (set attack.k_strong = attack.k_weak to compare them).")
    return (f"### {title}\n\n{summary}\n\n"
            f"Black-box percentile thresholds (IN when the statistic exceeds the percentile of all scores):\n\n"
            f"{percentiles}")


def format_tables(results: dict) -> str:
    """The report's tables (Markdown, also readable on a terminal) for a results.json dict."""
    parts = ["## Utility", _utility_table(results.get("utility") or {}),
             "## Privacy", _privacy_table(results.get("privacy") or {})]
    audit = (results.get("privacy") or {}).get("empirical_epsilon_lower_bound")
    if audit:  # attacks/audit.py
        from .audit import format_audit

        parts.append(format_audit(audit))
    attacks = results.get("attacks")
    parts.append("## Task-inference attacks")
    if not attacks:
        parts.append("No attacks were run (train only); run `python run.py attack --run DIR`.")
    else:
        parts += [_attack_tables(statistic, games) for statistic, games in attacks.items()]
    if results.get("calibrated"):  # attacks/calibration.py
        from .calibration import format_calibrated

        parts.append(format_calibrated(results["calibrated"]))
    return "\n\n".join(parts)


def _configuration_line(config: dict) -> str:
    sections = {name: config.get(name) if isinstance(config.get(name), dict) else {} for name in _CONFIG_SUMMARY}
    items = [(f"{name}.{key}", sections[name].get(key)) for name, keys in _CONFIG_SUMMARY.items() for key in keys]
    return ", ".join(f"`{key}` = {value}" for key, value in items if value is not None)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_roc(results: dict, raw_scores: dict, path) -> None:
    """ROC curves on log-log axes: one panel per attack, strong and weak solid, null control dashed."""
    plt = _pyplot()
    statistics = list(raw_scores)
    fig, axes = plt.subplots(1, len(statistics), figsize=(5.5 * len(statistics), 5), squeeze=False, constrained_layout=True)
    styles = {"strong": dict(color="tab:red", ls="-"), "weak": dict(color="tab:blue", ls="-"),
              "null_control": dict(color="0.4", ls="--")}
    for ax, statistic in zip(axes[0], statistics):
        smallest_fpr = 1.0
        for game, scores in raw_scores[statistic].items():
            fpr, tpr = roc_curve_points(scores["in"], scores["out"])
            keep = fpr > 0
            smallest_fpr = min(smallest_fpr, 1.0 / np.size(scores["out"]))
            auc = ((results.get("attacks") or {}).get(statistic) or {}).get(game, {}).get("auc")
            label = GAME_LABELS.get(game, game) + (f" (AUC {auc:.3f})" if auc is not None else "")
            ax.plot(fpr[keep], tpr[keep], lw=1.8, label=label,  # other curves: calibrated attacks
                    **styles.get(game, dict(color="tab:green", ls="-.")))
        grid = np.logspace(np.log10(smallest_fpr), 0, 100)
        ax.plot(grid, grid, color="0.7", lw=1, ls=":", label="chance")
        ax.set(xscale="log", yscale="log", xlim=(smallest_fpr, 1), ylim=(smallest_fpr, 1.05),
               xlabel="false positive rate", ylabel="true positive rate", title=_title(statistic))
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    fig.suptitle("Task-inference ROC")
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_histograms(raw_scores: dict, path) -> None:
    """IN vs OUT histograms of each statistic, strong and weak access (paper Figure 4)."""
    plt = _pyplot()
    statistics = list(raw_scores)
    games = [g for g in ("strong", "weak") if all(g in raw_scores[s] for s in statistics)]
    fig, axes = plt.subplots(len(statistics), len(games), figsize=(5.5 * len(games), 3.6 * len(statistics)),
                             squeeze=False, constrained_layout=True)
    for row, statistic in enumerate(statistics):
        for col, game in enumerate(games):
            ax = axes[row, col]
            scores_in = np.ravel(raw_scores[statistic][game]["in"])
            scores_out = np.ravel(raw_scores[statistic][game]["out"])
            low, high = np.percentile(np.concatenate((scores_in, scores_out)), [0.5, 99.5])
            bins = np.linspace(low, high if high > low else low + 1.0, 60)
            ax.hist(scores_out, bins=bins, density=True, alpha=0.55, color="tab:blue", label="OUT")
            ax.hist(scores_in, bins=bins, density=True, alpha=0.55, color="tab:red", label="IN")
            ax.set(title=f"{_title(statistic)}, {game}", xlabel=f"{statistic} statistic",
                   ylabel="density")
            ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(results: dict, raw_scores: dict | None, out_dir) -> Path:
    """Write report.md (and, given raw scores, roc.png and hist.png) into `out_dir`; return report.md's path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sections = ["# fedtask run report"]
    config_line = _configuration_line(results.get("config") or {})
    if config_line:
        sections.append(config_line)
    sections.append(format_tables(results))
    if results.get("attacks") and results.get("per_task"):
        from .leakage import format_leakage

        sections.append(format_leakage(results["per_task"]))
    if results.get("attacks") and raw_scores:
        plot_roc(results, raw_scores, out_dir / "roc.png")
        plot_histograms(raw_scores, out_dir / "hist.png")
        sections.append("## Figures\n\n![ROC curves, log-log axes](roc.png)\n\n"
                        "![IN vs OUT distributions of the statistics](hist.png)")
    path = out_dir / "report.md"
    path.write_text("\n\n".join(sections) + "\n")
    return path


def save_raw_scores(raw_scores: dict, path) -> None:
    """Store raw_scores[statistic][game]["in"|"out"] arrays in one .npz (keys "stat/game/side")."""
    arrays = {f"{s}/{g}/{side}": np.asarray(a) for s, games in raw_scores.items()
              for g, sides in games.items() for side, a in sides.items()}
    np.savez_compressed(path, **arrays)


def load_raw_scores(path) -> dict:
    """Inverse of `save_raw_scores`."""
    raw: dict = {}
    with np.load(path) as stored:
        for key in stored.files:
            statistic, game, side = key.split("/")
            raw.setdefault(statistic, {}).setdefault(game, {})[side] = stored[key]
    return raw
