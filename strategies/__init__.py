"""Server-side aggregation of the shared encoder: FedSGD, task-level DP, accounting.

``strategies.accounting`` (and its ``ACCOUNTANTS``) is not imported here: it imports Opacus,
which costs seconds that the aggregation and sampling code does not need.
"""
from strategies.fedsgd import OPTIMIZERS, EncoderAggregator
from strategies.sampling import sample_fixed, sample_poisson

__all__ = ["OPTIMIZERS", "EncoderAggregator", "sample_fixed", "sample_poisson"]
