"""Privacy accounting for task-level DP: thin, validated wrappers over Opacus.

The mechanism of ``strategies.dp`` is the Poisson-subsampled Gaussian mechanism, applied
once per round that touches the encoder (warm-start rounds release nothing about the
encoder, so they are not counted). That is exactly the mechanism Opacus's accountants
analyse, with (noise_multiplier z, sample_rate q, steps T) = (z, tasks_per_round /
num_in_tasks, rounds - warm_start_rounds). No accountant is written here by hand.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
from opacus.accountants import create_accountant
from opacus.accountants.utils import MAX_SIGMA, get_noise_multiplier

__all__ = [
    "ACCOUNTANTS",
    "calibrate_noise_multiplier",
    "epsilon_spent",
    "privacy_report",
    "resolve_noise_multiplier",
]

ACCOUNTANTS = ("rdp", "prv")
# Relative precision of the calibration's binary search: the calibrated z spends
# between (1 - _REL_TOL) * target and target.
_REL_TOL = 0.005


def _check_accountant(accountant: str) -> str:
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"dp.accountant must be one of {ACCOUNTANTS}; got {accountant!r}")
    return accountant


def _as_float(x: Any) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan  # fails every range check below, so the message names the key


def _check_rate(sample_rate: float) -> None:
    if not 0 < _as_float(sample_rate) <= 1:
        raise ValueError(
            "sampling rate q = federation.tasks_per_round / data.num_in_tasks must be in (0, 1]; "
            f"got {sample_rate}"
        )


def _check_delta(delta: float) -> None:
    if not 0 < _as_float(delta) < 1:
        raise ValueError(f"dp.delta must be in (0, 1); got {delta}")


def _check_steps(steps: int, minimum: int) -> None:
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < minimum:
        raise ValueError(
            "rounds that train the encoder (federation.rounds - federation.warm_start_rounds) "
            f"must be an integer >= {minimum}; got {steps}"
        )


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
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    delta: float,
    accountant: str = "rdp",
) -> float:
    """ε at ``delta`` after ``steps`` rounds of the Poisson-subsampled Gaussian mechanism.

    Computed by Opacus's ``RDPAccountant`` (default) or ``PRVAccountant`` (a tighter
    numerical upper bound). No noise (z == 0) gives no finite guarantee: ``math.inf``.
    Zero rounds release nothing about the encoder: 0.0.
    """
    _check_accountant(accountant)
    _check_rate(sample_rate)
    _check_delta(delta)
    _check_steps(steps, 0)
    if not _as_float(noise_multiplier) >= 0:
        raise ValueError(f"dp.noise_multiplier must be >= 0; got {noise_multiplier}")
    if steps == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    if math.isinf(noise_multiplier):
        return 0.0
    return _accountant_epsilon(noise_multiplier, sample_rate, steps, delta, accountant)


def calibrate_noise_multiplier(
    target_epsilon: float,
    sample_rate: float,
    steps: int,
    delta: float,
    accountant: str = "rdp",
) -> float:
    """Smallest noise multiplier (to 0.5% in ε) whose ε after ``steps`` rounds is <= target.

    Uses ``opacus.accountants.utils.get_noise_multiplier`` with a relative tolerance, so the
    returned z spends ε in [0.995 * target, target]. ``target_epsilon = inf`` means no
    privacy: 0.0. Raises ValueError naming dp.target_epsilon when the accountant cannot
    certify the target at any noise level Opacus searches (z up to 1e6), e.g. a tiny ε with
    many rounds under RDP, whose ε-conversion has a floor.
    """
    _check_accountant(accountant)
    _check_rate(sample_rate)
    _check_delta(delta)
    _check_steps(steps, 1)
    if not _as_float(target_epsilon) > 0:
        raise ValueError(f"dp.target_epsilon must be > 0 (inf = no noise); got {target_epsilon}")
    if math.isinf(float(target_epsilon)):
        return 0.0
    try:
        with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            # The search probes huge z, where RDP's best order is its largest: not our concern.
            warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
            # Opacus doubles z up to its MAX_SIGMA before giving up (~20 slow evaluations):
            # one evaluation at that ceiling tells at once whether the target is reachable.
            if _accountant_epsilon(MAX_SIGMA, sample_rate, steps, delta, accountant) > float(target_epsilon):
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
        raise ValueError(
            f"dp.target_epsilon={target_epsilon} cannot be reached at dp.delta={delta} with "
            f"sampling rate {sample_rate:g} over {steps} encoder rounds using the "
            f"{accountant.upper()} accountant ({exc}); raise dp.target_epsilon or dp.delta, "
            "train fewer rounds, sample fewer tasks per round"
            + (", or use dp.accountant = \"prv\"" if accountant == "rdp" else "")
        ) from exc
    return float(z)


def _get(cfg: Mapping[str, Any], key: str, default: Any = None) -> Any:
    value = cfg.get(key, default)
    return default if value is None else value


def resolve_noise_multiplier(dp_cfg: Mapping[str, Any], sample_rate: float, steps: int) -> float:
    """The z to train with: calibrated to ``dp.target_epsilon`` if set, else ``dp.noise_multiplier``.

    Call it once before training with the planned encoder rounds; calibration is
    deterministic, so ``privacy_report`` recomputes the same value. With a target but
    no encoder rounds (steps == 0) nothing is released and 0.0 is returned.
    """
    target = dp_cfg.get("target_epsilon")
    if target is not None and steps == 0:
        return 0.0  # nothing touches the encoder, so no noise is needed for any target
    if target is not None:
        return calibrate_noise_multiplier(
            float(target), sample_rate, steps, float(_get(dp_cfg, "delta", 1e-5)),
            _get(dp_cfg, "accountant", "rdp"),
        )
    z = float(_get(dp_cfg, "noise_multiplier", 1.0))
    if not z >= 0:
        raise ValueError(f"dp.noise_multiplier must be >= 0; got {z}")
    return z


def privacy_report(
    dp_cfg: Mapping[str, Any],
    sample_rate: float,
    steps: int,
    noise_multiplier: float | None = None,
) -> dict[str, Any]:
    """The CONTRACT §4 ``results.json["privacy"]`` block for a finished training run.

    ``dp_cfg`` is the resolved ``[dp]`` table; ``steps`` the rounds that updated the encoder
    (warm-start rounds excluded). ``noise_multiplier`` is the z actually used (default:
    ``resolve_noise_multiplier``). With DP disabled every field but ``enabled`` is None.
    ``epsilon`` is ``math.inf`` when z == 0 (target ε = inf): JSON writers must map it.
    """
    keys = ("epsilon", "delta", "noise_multiplier", "clipping_norm", "sampling_rate",
            "rounds", "accountant")
    if not dp_cfg.get("enabled", False):
        return {"enabled": False, **dict.fromkeys(keys)}
    accountant = _check_accountant(_get(dp_cfg, "accountant", "rdp"))
    delta = float(_get(dp_cfg, "delta", 1e-5))
    z = resolve_noise_multiplier(dp_cfg, sample_rate, steps) if noise_multiplier is None \
        else float(noise_multiplier)
    return {
        "enabled": True,
        "epsilon": epsilon_spent(z, sample_rate, steps, delta, accountant),
        "delta": delta,
        "noise_multiplier": z,
        "clipping_norm": float(_get(dp_cfg, "clipping_norm", 1.0)),
        "sampling_rate": float(sample_rate),
        "rounds": int(steps),
        "accountant": accountant,
    }
