"""Server-side aggregation of the shared encoder: FedSGD, task-level DP, accounting."""
from strategies.fedsgd import EncoderAggregator
from strategies.sampling import sample_fixed, sample_poisson

__all__ = ["EncoderAggregator", "sample_fixed", "sample_poisson"]
