"""Run the attack's linear algebra on one BLAS thread.

The attack's linear algebra is batches of small matrices (per-task d x d factorisations,
k x k Gram blocks), which numpy hands to BLAS one matrix at a time: extra BLAS threads add
nothing, while oversubscribed ones (torch's OpenMP pool in the same process, a busy machine)
stall them badly.  Measured on the 2-core dev machine under load: 256 batched 256 x 256
Cholesky factorisations took 8.0 s with OpenBLAS's 2 threads and 0.18 s with 1.
"""

from __future__ import annotations

import functools
from contextlib import nullcontext


@functools.lru_cache(maxsize=1)
def _controller():
    try:
        from threadpoolctl import ThreadpoolController  # ships with scikit-learn
    except ImportError:
        return None
    return ThreadpoolController()


def single_threaded_blas():
    """Context manager limiting BLAS libraries to one thread (a no-op without threadpoolctl)."""
    controller = _controller()
    return nullcontext() if controller is None else controller.limit(limits=1, user_api="blas")


def on_one_blas_thread(function):
    """Decorator form of `single_threaded_blas`."""
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with single_threaded_blas():
            return function(*args, **kwargs)
    return wrapper
