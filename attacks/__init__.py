"""The task-inference adversary: black-box oracle, security game, statistics, whitening,
metrics, reports, and the mean-estimation tracing analog.

The adversary only ever calls an embedding oracle (inputs -> (n, d) embeddings); nothing here
imports the training code or touches weights.
"""

from .game import (
    challenge_scores,
    draw_subsets,
    embed_pools,
    run_security_games,
    validate_attack_config,
)
from .metrics import auc_bootstrap_ci, roc_curve_points, roc_metrics
from .report import format_tables, load_raw_scores, save_raw_scores, write_report
from .statistics import inner_product_statistic, variance_statistic
from .tracing import format_tracing, run_tracing, write_tracing
from .whitening import whiten_by_task

__all__ = [
    "auc_bootstrap_ci",
    "challenge_scores",
    "draw_subsets",
    "embed_pools",
    "format_tables",
    "format_tracing",
    "inner_product_statistic",
    "load_raw_scores",
    "roc_curve_points",
    "roc_metrics",
    "run_security_games",
    "run_tracing",
    "save_raw_scores",
    "validate_attack_config",
    "variance_statistic",
    "whiten_by_task",
    "write_report",
    "write_tracing",
]
