"""Per-task leakage: which tasks the statistics single out, so an audit can name the exposed users.

A task's exposure is its mean score over the trials, placed among the OUT tasks' mean scores
(the percentile of OUT tasks it exceeds): a task above nearly every never-trained task is one
the adversary would call IN with confidence. The game predicts IN for higher scores, so higher
is more exposed, whichever way a statistic's IN and OUT distributions happen to be ordered.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .game import task_mean_scores

TOP_TASKS = 5  # rows per statistic in the report


def per_task_leakage(raw_scores: dict, *, in_names: Sequence[str], out_names: Sequence[str],
                     sizes: dict[str, Sequence[int]]) -> list[dict]:
    """One compact row per task (IN first, then OUT): name, side, challenge-pool sizes per access
    and mean score per statistic and game. ``sizes[access]`` lists IN then OUT pool sizes."""
    in_names, out_names = list(in_names), list(out_names)
    names = in_names + out_names
    for access, counts in sizes.items():
        if len(counts) != len(names):
            raise ValueError(f"sizes[{access!r}] has {len(counts)} entries for {len(names)} tasks")
    means = task_mean_scores(raw_scores)
    rows = []
    for index, name in enumerate(names):
        side, position = ("IN", index) if index < len(in_names) else ("OUT", index - len(in_names))
        key = side.lower()
        score = {}
        for statistic, games in means.items():
            for game, sides in games.items():
                if len(sides[key]) != (len(in_names) if side == "IN" else len(out_names)):
                    raise ValueError(f"in_names / out_names: {len(in_names)} / {len(out_names)} tasks, but "
                                     f"the {statistic} {game} scores hold {len(sides['in'])} / {len(sides['out'])}")
                score.setdefault(statistic, {})[game] = float(sides[key][position])
        rows.append({"task": name, "side": side, "samples": {a: int(c[index]) for a, c in sizes.items()},
                     "mean_score": score})
    return rows


def out_percentile(values: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Percent of ``reference`` below each value (ties count half)."""
    reference = np.sort(np.asarray(reference, dtype=np.float64))
    values = np.asarray(values, dtype=np.float64)
    below = np.searchsorted(reference, values, side="left")
    at_or_below = np.searchsorted(reference, values, side="right")
    return 100.0 * (below + at_or_below) / (2.0 * len(reference))


def most_exposed(per_task: list[dict], *, statistic: str, game: str = "strong", top: int = TOP_TASKS) -> list[dict]:
    """The ``top`` IN tasks whose mean ``game`` score ranks highest among the OUT tasks' mean scores."""
    if top < 1:
        raise ValueError(f"top must be >= 1; got {top}")
    in_rows = [row for row in per_task if row["side"] == "IN"]
    out_scores = np.array([row["mean_score"][statistic][game] for row in per_task if row["side"] == "OUT"])
    if not in_rows or not out_scores.size:
        return []
    scores = np.array([row["mean_score"][statistic][game] for row in in_rows])
    percentiles = out_percentile(scores, out_scores)
    order = np.lexsort((-scores, -percentiles))[:top]
    return [{**in_rows[i], "out_percentile": float(percentiles[i])} for i in order]


def format_leakage(per_task: list[dict], top: int = TOP_TASKS) -> str:
    """The report's section: per statistic, the IN tasks that leak most under strong access."""
    from .report import markdown_table

    if not per_task:
        return ""
    statistics = list(per_task[0]["mean_score"])
    parts = ["## Tasks that leak most",
             "Each IN task's mean score over its trials, ranked by the percentile of OUT tasks' mean scores it "
             "exceeds (100 = above every never-trained task): the users an adversary would single out. "
             "`results.json[\"per_task\"]` lists every task."]
    for statistic in statistics:
        games = per_task[0]["mean_score"][statistic]
        out_weak = np.array([r["mean_score"][statistic]["weak"] for r in per_task if r["side"] == "OUT"]) \
            if "weak" in games else None
        rows = []
        for rank, row in enumerate(most_exposed(per_task, statistic=statistic, top=top), 1):
            weak = (f"{out_percentile([row['mean_score'][statistic]['weak']], out_weak)[0]:.0f}"
                    if out_weak is not None and out_weak.size else "n/a")
            rows.append([str(rank), row["task"], str(row["samples"].get("strong", "")),
                         str(row["samples"].get("weak", "")), f"{row['mean_score'][statistic]['strong']:.4g}",
                         f"{row['out_percentile']:.0f}", weak])
        table = markdown_table(["rank", "task", "training samples", "held-out samples", "mean score (strong)",
                                "OUT percentile (strong)", "OUT percentile (weak)"], rows)
        ranked = most_exposed(per_task, statistic=statistic, top=len(per_task))
        above = sum(row["out_percentile"] >= 95 for row in ranked)
        parts.append(f"**{statistic}**: {above} of {len(ranked)} IN tasks score above 95 % of the OUT tasks "
                     f"(about {0.05 * len(ranked):.1f} expected without a leak)\n\n{table}")
    return "\n\n".join(parts)
