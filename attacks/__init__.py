"""The task-inference adversary: black-box oracle, security game, statistics, whitening,
metrics, reports, and the mean-estimation tracing analog.

The adversary only ever calls an embedding oracle (inputs -> (n, d) embeddings); nothing here
imports the training code or touches weights.  `STATISTICS` (name -> `Statistic`) lists the
attacks every result, report and sweep column is keyed by.
"""

from .game import challenge_scores, embed_pools, run_security_games
from .metrics import auc_bootstrap_ci, roc_curve_points, roc_metrics
from .report import format_tables, load_raw_scores, markdown_table, save_raw_scores, write_report
from .statistics import STATISTICS, Statistic, inner_product_statistic, register_statistic, variance_statistic
from .tracing import format_tracing, run_tracing, write_tracing
from .whitening import whiten_by_task

__all__ = [
    "STATISTICS",
    "Statistic",
    "auc_bootstrap_ci",
    "challenge_scores",
    "embed_pools",
    "format_tables",
    "format_tracing",
    "inner_product_statistic",
    "load_raw_scores",
    "markdown_table",
    "register_statistic",
    "roc_curve_points",
    "roc_metrics",
    "run_security_games",
    "run_tracing",
    "save_raw_scores",
    "variance_statistic",
    "whiten_by_task",
    "write_report",
    "write_tracing",
]
