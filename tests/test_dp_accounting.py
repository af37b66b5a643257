"""Privacy accounting: ε comes from Opacus, calibration hits the target from below."""

import math

import pytest
from opacus.accountants import RDPAccountant

from strategies.accounting import (
    calibrate_noise_multiplier,
    epsilon_spent,
    privacy_report,
    resolve_noise_multiplier,
)

PRIVACY_KEYS = ["enabled", "epsilon", "delta", "noise_multiplier", "clipping_norm",
                "sampling_rate", "rounds", "accountant"]


def _opacus_rdp(z, q, steps, delta):
    acc = RDPAccountant()
    for _ in range(steps):  # the step-by-step path, independent of our history shortcut
        acc.step(noise_multiplier=z, sample_rate=q)
    return acc.get_epsilon(delta=delta)


@pytest.mark.parametrize(
    "z,q,steps,delta",
    [(1.0, 0.05, 100, 1e-5), (0.8, 0.25, 30, 1e-6), (3.0, 1.0, 10, 1e-5), (1.5, 0.01, 500, 1e-4)],
)
def test_epsilon_equals_opacus_rdp_accountant(z, q, steps, delta):
    assert epsilon_spent(z, q, steps, delta) == pytest.approx(_opacus_rdp(z, q, steps, delta), rel=1e-9)


def test_field_notes_reference_value():
    assert epsilon_spent(1.0, 0.05, 100, 1e-5) == pytest.approx(4.04, abs=0.01)


def test_epsilon_edge_cases_and_monotonicity():
    assert epsilon_spent(0.0, 0.05, 100, 1e-5) == math.inf
    assert epsilon_spent(1.0, 0.05, 0, 1e-5) == 0.0
    base = epsilon_spent(1.0, 0.05, 100, 1e-5)
    assert epsilon_spent(2.0, 0.05, 100, 1e-5) < base  # more noise, less ε
    assert epsilon_spent(1.0, 0.05, 200, 1e-5) > base  # more rounds, more ε
    assert epsilon_spent(1.0, 0.10, 100, 1e-5) > base  # more sampling, more ε
    assert epsilon_spent(1.0, 0.05, 100, 1e-3) < base  # looser δ, less ε


@pytest.mark.parametrize("target", [0.5, 1.0, 3.0, 8.0])
@pytest.mark.parametrize("q,steps", [(0.05, 100), (1.0, 20)])
def test_calibration_spends_at_most_and_close_to_the_target(target, q, steps):
    z = calibrate_noise_multiplier(target, q, steps, 1e-5)
    eps = epsilon_spent(z, q, steps, 1e-5)
    assert eps <= target
    assert eps >= 0.98 * target
    assert epsilon_spent(0.95 * z, q, steps, 1e-5) > target  # no much smaller z would do


def test_calibration_target_inf_means_no_noise():
    assert calibrate_noise_multiplier(math.inf, 0.05, 100, 1e-5) == 0.0


def test_impossible_target_names_the_key():
    with pytest.raises(ValueError, match=r"dp\.target_epsilon"):
        calibrate_noise_multiplier(0.01, 0.05, 100, 1e-5)


@pytest.mark.parametrize(
    "kwargs,key",
    [
        (dict(sample_rate=0.0), "federation.tasks_per_round"),
        (dict(sample_rate=1.5), "data.num_in_tasks"),
        (dict(delta=0.0), "dp.delta"),
        (dict(delta=1.0), "dp.delta"),
        (dict(steps=0), "federation.rounds"),
        (dict(target_epsilon=-1.0), "dp.target_epsilon"),
        (dict(accountant="gdp"), "dp.accountant"),
    ],
)
def test_calibration_validates_inputs(kwargs, key):
    args = dict(target_epsilon=2.0, sample_rate=0.05, steps=100, delta=1e-5, accountant="rdp")
    args.update(kwargs)
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        calibrate_noise_multiplier(**args)


def test_epsilon_validates_inputs():
    with pytest.raises(ValueError, match=r"dp\.noise_multiplier"):
        epsilon_spent(-1.0, 0.05, 100, 1e-5)
    with pytest.raises(ValueError, match=r"federation\.tasks_per_round"):
        epsilon_spent(1.0, 0.0, 100, 1e-5)


def test_prv_is_finite_and_no_looser_than_rdp():
    for z, q, steps in [(1.0, 0.05, 100), (2.0, 1.0, 10)]:
        rdp = epsilon_spent(z, q, steps, 1e-5, "rdp")
        prv = epsilon_spent(z, q, steps, 1e-5, "prv")
        assert math.isfinite(prv)
        assert 0.7 * rdp <= prv <= 1.05 * rdp


def test_prv_calibration():
    z = calibrate_noise_multiplier(2.0, 0.05, 50, 1e-5, accountant="prv")
    eps = epsilon_spent(z, 0.05, 50, 1e-5, "prv")
    assert 0.98 * 2.0 <= eps <= 2.0
    assert z <= calibrate_noise_multiplier(2.0, 0.05, 50, 1e-5)  # tighter -> less noise


def test_privacy_report_disabled():
    rep = privacy_report({"enabled": False, "noise_multiplier": 1.0}, 0.05, 100)
    assert list(rep) == PRIVACY_KEYS
    assert rep == {"enabled": False, **{k: None for k in PRIVACY_KEYS[1:]}}


def test_privacy_report_fixed_noise():
    cfg = {"enabled": True, "noise_multiplier": 1.0, "clipping_norm": 0.5, "delta": 1e-5,
           "accountant": "rdp"}
    rep = privacy_report(cfg, 0.05, 100)
    assert list(rep) == PRIVACY_KEYS
    assert rep["enabled"] is True and rep["rounds"] == 100 and rep["accountant"] == "rdp"
    assert rep["noise_multiplier"] == 1.0 and rep["clipping_norm"] == 0.5
    assert rep["sampling_rate"] == 0.05 and rep["delta"] == 1e-5
    assert rep["epsilon"] == pytest.approx(_opacus_rdp(1.0, 0.05, 100, 1e-5), rel=1e-9)


def test_privacy_report_with_target_epsilon_uses_the_calibrated_noise():
    cfg = {"enabled": True, "noise_multiplier": 1.0, "clipping_norm": 1.0, "delta": 1e-5,
           "target_epsilon": 3.0}
    z = resolve_noise_multiplier(cfg, 0.1, 40)
    rep = privacy_report(cfg, 0.1, 40)
    assert rep["noise_multiplier"] == z != 1.0
    assert 0.98 * 3.0 <= rep["epsilon"] <= 3.0
    # the z the strategy actually used wins, and warm-start-only runs spend nothing
    assert privacy_report(cfg, 0.1, 40, noise_multiplier=2.0)["epsilon"] == epsilon_spent(2.0, 0.1, 40, 1e-5)
    assert privacy_report(cfg, 0.1, 0)["epsilon"] == 0.0
    # target ε = inf: no noise, no finite guarantee
    inf_rep = privacy_report({**cfg, "target_epsilon": math.inf}, 0.1, 40)
    assert inf_rep["noise_multiplier"] == 0.0 and inf_rep["epsilon"] == math.inf
