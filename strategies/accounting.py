"""Privacy accounting for task-level DP: thin, validated wrappers over Opacus.

The mechanism of ``strategies.dp`` is the Poisson-subsampled Gaussian mechanism, applied
once per round that touches the encoder (warm-start rounds release nothing about the
encoder, so they are not counted). That is exactly the mechanism Opacus's accountants
analyse, with (noise_multiplier z, sample_rate q, steps T) = (z, tasks_per_round /
num_in_tasks, rounds - warm_start_rounds). No accountant is written here by hand.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Any

import numpy as np
from opacus.accountants import create_accountant
from opacus.accountants.registry import _ACCOUNTANTS as _OPACUS_ACCOUNTANTS
from opacus.accountants.utils import MAX_SIGMA, get_noise_multiplier

import strategies.pld  # noqa: F401  (registers Google's PLD accountant as Opacus's "pld")
from strategies._checks import finite, integer, is_real, shown

__all__ = [
    "ACCOUNTANTS",
    "calibrate_noise_multiplier",
    "epsilon_spent",
    "privacy_report",
]

# The accountants we offer: the mechanisms of Opacus's own ``create_accountant`` registry that
# bound the Poisson-subsampled Gaussian mechanism over many steps from a (z, q, steps) history:
# "rdp" (RDPAccountant), "prv" (PRVAccountant) and "pld" (Google dp-accounting's PLD accountant,
# registered by strategies.pld). Opacus's "gdp" (GaussianAccountant) is left
# out: its Gaussian-DP bound is a central-limit approximation, accurate only for a small sample
# rate over very many steps, and it can underestimate the ε spent (Opacus warns so whenever one
# is built); with tasks_per_round / num_in_tasks often far from small, it would under-report.
_SUBSAMPLED_GAUSSIAN = frozenset({"rdp", "prv", "pld"})
ACCOUNTANTS: tuple[str, ...] = tuple(name for name in _OPACUS_ACCOUNTANTS if name in _SUBSAMPLED_GAUSSIAN)
# Relative precision of the calibration's binary search: the calibrated z spends
# between (1 - _REL_TOL) * target and target.
_REL_TOL = 0.005
_FIRST_PROBE = 10.0  # get_noise_multiplier's first upper bracket (opacus.accountants.utils)


def _check_accountant(accountant: Any) -> str:
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {ACCOUNTANTS}; got {accountant!r}")
    return accountant


def _check_rate(sample_rate: Any) -> None:
    if not (is_real(sample_rate) and 0 < sample_rate <= 1):
        raise ValueError(f"sample_rate must be in (0, 1]; got {shown(sample_rate)}")


def _check_delta(delta: Any) -> None:
    if not (is_real(delta) and 0 < delta < 1):
        raise ValueError(f"delta must be in (0, 1); got {shown(delta)}")


def _accountant_epsilon(
    noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str
) -> float:
    acc = create_accountant(mechanism=accountant)
    acc.history = [(float(noise_multiplier), float(sample_rate), int(steps))]
    # PRV evaluates log(1 - q), which is -inf (harmless, but noisy) at q == 1.
    with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(acc.get_epsilon(delta=delta))


def epsilon_spent(
    *,
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    delta: float,
    accountant: str = "rdp",
) -> float:
    """ε at ``delta`` after ``steps`` rounds of the Poisson-subsampled Gaussian mechanism.

    Computed by Opacus's ``RDPAccountant`` (default) or ``PRVAccountant`` (a tighter
    numerical upper bound), or by "pld", Google dp-accounting's privacy-loss-distribution
    accountant (``strategies.pld``, the tightest of the three; also an upper bound). No noise
    (noise_multiplier == 0) gives no finite guarantee: ``math.inf``; infinite noise (``math.inf``)
    releases nothing: 0.0. Zero steps release nothing either: 0.0. A ValueError names the
    parameter it refuses.
    """
    _check_accountant(accountant)
    _check_rate(sample_rate)
    _check_delta(delta)
    integer("steps", steps, minimum=0)
    if not (is_real(noise_multiplier) and noise_multiplier >= 0):
        raise ValueError(f"noise_multiplier must be >= 0; got {shown(noise_multiplier)}")
    if steps == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    if math.isinf(noise_multiplier):
        return 0.0
    return _accountant_epsilon(noise_multiplier, sample_rate, steps, delta, accountant)


def calibrate_noise_multiplier(
    *,
    target_epsilon: float,
    sample_rate: float,
    steps: int,
    delta: float,
    accountant: str = "rdp",
) -> float:
    """Smallest noise multiplier (to 0.5% in ε) whose ε after ``steps`` rounds is <= target.

    Uses ``opacus.accountants.utils.get_noise_multiplier`` with a relative tolerance, so the
    returned z spends ε in [0.995 * target, target]. ``target_epsilon = inf`` means no
    privacy: 0.0. Raises ValueError naming target_epsilon when the accountant cannot
    certify the target at any noise level Opacus searches (z up to 1e6), e.g. a tiny ε with
    many steps under RDP, whose ε-conversion has a floor.
    """
    _check_accountant(accountant)
    _check_rate(sample_rate)
    _check_delta(delta)
    integer("steps", steps, minimum=1)
    if not (is_real(target_epsilon) and target_epsilon > 0):
        raise ValueError(f"target_epsilon must be > 0 (inf = no noise); got {shown(target_epsilon)}")
    if math.isinf(float(target_epsilon)):
        return 0.0
    return _calibrated(float(target_epsilon), float(sample_rate), int(steps), float(delta), accountant)


@functools.lru_cache(maxsize=64)
def _calibrated(target_epsilon: float, sample_rate: float, steps: int, delta: float, accountant: str) -> float:
    """The search itself, cached: a sweep checks every budget before training, then trains each."""
    try:
        with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            # The search probes huge z, where RDP's best order is its largest: not our concern.
            warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
            # Opacus doubles z from 10 up to its MAX_SIGMA before giving up (~20 evaluations, slower
            # the larger z): when z = 10 does not reach the target, one evaluation at the ceiling
            # tells at once whether any z does. (Reachable targets skip it: it costs seconds.)
            if (_accountant_epsilon(_FIRST_PROBE, sample_rate, steps, delta, accountant) > target_epsilon
                    and _accountant_epsilon(MAX_SIGMA, sample_rate, steps, delta, accountant) > target_epsilon):
                raise ValueError("The privacy budget is too low.")
            z = get_noise_multiplier(
                target_epsilon=float(target_epsilon),
                target_delta=float(delta),
                sample_rate=float(sample_rate),
                steps=int(steps),
                accountant=accountant,
                epsilon_tolerance=_REL_TOL * float(target_epsilon),
            )
    except ValueError as exc:  # Opacus: "The privacy budget is too low." (z > 1e6)
        remedies = ("raise target_epsilon or delta, take fewer steps, lower sample_rate, or use accountant \"prv\""
                    if accountant == "rdp" else "raise target_epsilon or delta, take fewer steps, or lower sample_rate")
        raise ValueError(
            f"target_epsilon={target_epsilon} cannot be reached at delta={delta} with sample_rate "
            f"{sample_rate:g} over {steps} steps using the {accountant.upper()} accountant ({exc}); {remedies}"
        ) from exc
    return float(z)


def privacy_report(
    *,
    enabled: bool,
    noise_multiplier: float,
    clipping_norm: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "rdp",
) -> dict[str, Any]:
    """The CONTRACT §4 ``results.json["privacy"]`` block for a finished training run.

    ``noise_multiplier`` is the z actually trained with (calibrated, if a target ε was set);
    ``steps`` the rounds that updated the encoder (warm-start rounds excluded). With
    ``enabled`` False every field but ``enabled`` is None (and nothing else is checked).
    ``epsilon`` is ``math.inf`` when z == 0 (target ε = inf): JSON writers must map it.
    """
    keys = ("epsilon", "delta", "noise_multiplier", "clipping_norm", "sampling_rate",
            "rounds", "accountant")
    if not isinstance(enabled, bool):
        raise ValueError(f"enabled must be True or False; got {shown(enabled)}")
    if not enabled:
        return {"enabled": False, **dict.fromkeys(keys)}
    _check_accountant(accountant)
    clipping_norm = finite("clipping_norm", clipping_norm, strict=True)
    epsilon = epsilon_spent(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps,
                            delta=delta, accountant=accountant)
    return {
        "enabled": True,
        "epsilon": epsilon,
        "delta": float(delta),
        "noise_multiplier": float(noise_multiplier),
        "clipping_norm": clipping_norm,
        "sampling_rate": float(sample_rate),
        "rounds": int(steps),
        "accountant": accountant,
    }
