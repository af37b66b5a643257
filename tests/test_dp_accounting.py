"""Privacy accounting: ε comes from Opacus, calibration hits the target from below."""

import math

import pytest
from opacus.accountants import RDPAccountant
from opacus.accountants.registry import _ACCOUNTANTS as OPACUS_ACCOUNTANTS

import strategies.accounting as accounting
from strategies.accounting import ACCOUNTANTS, calibrate_noise_multiplier, epsilon_spent, privacy_report

PRIVACY_KEYS = ["enabled", "epsilon", "delta", "noise_multiplier", "clipping_norm",
                "sampling_rate", "rounds", "accountant"]


def eps(z, q, steps, delta, accountant="rdp"):
    return epsilon_spent(noise_multiplier=z, sample_rate=q, steps=steps, delta=delta, accountant=accountant)


def calibrate(target, q, steps, delta, accountant="rdp"):
    return calibrate_noise_multiplier(target_epsilon=target, sample_rate=q, steps=steps, delta=delta,
                                      accountant=accountant)


def report(**kwargs):
    args = dict(enabled=True, noise_multiplier=1.0, clipping_norm=0.5, delta=1e-5, sample_rate=0.05, steps=100,
                accountant="rdp")
    return privacy_report(**{**args, **kwargs})


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
    assert eps(z, q, steps, delta) == pytest.approx(_opacus_rdp(z, q, steps, delta), rel=1e-9)


def test_field_notes_reference_value():
    assert eps(1.0, 0.05, 100, 1e-5) == pytest.approx(4.04, abs=0.01)


def test_epsilon_edge_cases_and_monotonicity():
    assert eps(0.0, 0.05, 100, 1e-5) == math.inf
    assert eps(math.inf, 0.05, 100, 1e-5) == 0.0  # infinite noise releases nothing
    assert eps(1.0, 0.05, 0, 1e-5) == 0.0
    base = eps(1.0, 0.05, 100, 1e-5)
    assert eps(2.0, 0.05, 100, 1e-5) < base  # more noise, less ε
    assert eps(1.0, 0.05, 200, 1e-5) > base  # more rounds, more ε
    assert eps(1.0, 0.10, 100, 1e-5) > base  # more sampling, more ε
    assert eps(1.0, 0.05, 100, 1e-3) < base  # looser δ, less ε


@pytest.mark.parametrize("target", [0.5, 1.0, 3.0, 8.0])
@pytest.mark.parametrize("q,steps", [(0.05, 100), (1.0, 20)])
def test_calibration_spends_at_most_and_close_to_the_target(target, q, steps):
    z = calibrate(target, q, steps, 1e-5)
    spent = eps(z, q, steps, 1e-5)
    assert spent <= target
    assert spent >= 0.98 * target
    assert eps(0.95 * z, q, steps, 1e-5) > target  # no much smaller z would do


def test_calibration_target_inf_means_no_noise():
    assert calibrate(math.inf, 0.05, 100, 1e-5) == 0.0


def test_impossible_target_names_the_parameters():
    with pytest.raises(ValueError) as err:
        calibrate(0.01, 0.05, 100, 1e-5)
    message = str(err.value)
    assert message.startswith("target_epsilon=0.01 cannot be reached at delta=1e-05 with sample_rate 0.05 over "
                              "100 steps using the RDP accountant (")
    assert message.endswith("; raise target_epsilon or delta, take fewer steps, lower sample_rate, "
                            'or use accountant "prv"')
    assert "dp." not in message and "federation." not in message  # no config keys: the edge maps those
    with pytest.raises(ValueError, match=r"^target_epsilon=1e-06 .* PRV accountant .*or lower sample_rate$"):
        calibrate(1e-6, 0.01, 5, 1e-5, "prv")


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(sample_rate=0.0), r"sample_rate must be in \(0, 1\]; got 0\.0"),
        (dict(sample_rate=2), r"sample_rate must be in \(0, 1\]; got 2"),
        (dict(sample_rate=math.inf), r"sample_rate must be in \(0, 1\]; got inf"),
        (dict(sample_rate=math.nan), r"sample_rate must be in \(0, 1\]; got nan"),
        (dict(sample_rate="0.05"), r"sample_rate must be in \(0, 1\]; got '0\.05'"),
        (dict(delta=0.0), r"delta must be in \(0, 1\); got 0\.0"),
        (dict(delta=1.0), r"delta must be in \(0, 1\); got 1\.0"),
        (dict(delta=math.nan), r"delta must be in \(0, 1\); got nan"),
        (dict(delta=math.inf), r"delta must be in \(0, 1\); got inf"),
        (dict(steps=0), r"steps must be an integer >= 1; got 0"),
        (dict(steps=10.0), r"steps must be an integer >= 1; got 10\.0"),
        (dict(steps=True), r"steps must be an integer >= 1; got True"),
        (dict(target_epsilon=-1.0), r"target_epsilon must be > 0 \(inf = no noise\); got -1\.0"),
        (dict(target_epsilon=math.nan), r"target_epsilon must be > 0 \(inf = no noise\); got nan"),
        (dict(accountant="gdp"), r"accountant must be one of \('rdp', 'prv', 'pld'\); got 'gdp'"),
    ],
)
def test_calibration_validates_inputs_naming_its_parameters(kwargs, message):
    args = dict(target_epsilon=2.0, sample_rate=0.05, steps=100, delta=1e-5, accountant="rdp")
    args.update(kwargs)
    with pytest.raises(ValueError, match="^" + message + "$"):
        calibrate_noise_multiplier(**args)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(noise_multiplier=-1), r"noise_multiplier must be >= 0; got -1"),
        (dict(noise_multiplier=math.nan), r"noise_multiplier must be >= 0; got nan"),
        (dict(noise_multiplier=None), r"noise_multiplier must be >= 0; got None"),
        (dict(sample_rate=0.0), r"sample_rate must be in \(0, 1\]; got 0\.0"),
        (dict(sample_rate=math.inf), r"sample_rate must be in \(0, 1\]; got inf"),
        (dict(delta=math.inf), r"delta must be in \(0, 1\); got inf"),
        (dict(steps=-1), r"steps must be an integer >= 0; got -1"),
        (dict(accountant="gdp"), r"accountant must be one of \('rdp', 'prv', 'pld'\); got 'gdp'"),
    ],
)
def test_epsilon_validates_inputs_naming_its_parameters(kwargs, message):
    args = dict(noise_multiplier=1.0, sample_rate=0.05, steps=100, delta=1e-5, accountant="rdp")
    args.update(kwargs)
    with pytest.raises(ValueError, match="^" + message + "$"):
        epsilon_spent(**args)


def test_accounting_takes_keywords_only():
    with pytest.raises(TypeError):
        epsilon_spent(1.0, 0.05, 100, 1e-5)  # positional: the point of the test
    with pytest.raises(TypeError):
        calibrate_noise_multiplier(2.0, 0.05, 100, 1e-5)
    with pytest.raises(TypeError):
        privacy_report(True, 1.0, 1.0, 1e-5, 0.05, 100)


def test_accountants_come_from_opacus_registry():
    assert isinstance(ACCOUNTANTS, tuple) and ACCOUNTANTS == ("rdp", "prv", "pld")
    assert set(ACCOUNTANTS) <= set(OPACUS_ACCOUNTANTS)
    assert "gdp" in OPACUS_ACCOUNTANTS and "gdp" not in ACCOUNTANTS  # an approximation that may under-report


def test_removed_helpers_are_gone():
    assert not hasattr(accounting, "resolve_noise_multiplier") and not hasattr(accounting, "_get")
    assert set(accounting.__all__) == {"ACCOUNTANTS", "calibrate_noise_multiplier", "epsilon_spent",
                                       "privacy_report"}


def test_prv_is_finite_and_no_looser_than_rdp():
    for z, q, steps in [(1.0, 0.05, 100), (2.0, 1.0, 10)]:
        rdp = eps(z, q, steps, 1e-5, "rdp")
        prv = eps(z, q, steps, 1e-5, "prv")
        assert math.isfinite(prv)
        assert 0.7 * rdp <= prv <= 1.05 * rdp


def test_prv_calibration():
    z = calibrate(2.0, 0.05, 50, 1e-5, accountant="prv")
    spent = eps(z, 0.05, 50, 1e-5, "prv")
    assert 0.98 * 2.0 <= spent <= 2.0
    assert z <= calibrate(2.0, 0.05, 50, 1e-5)  # tighter -> less noise


def test_privacy_report_disabled():
    rep = report(enabled=False)
    assert list(rep) == PRIVACY_KEYS
    assert rep == {"enabled": False, **{k: None for k in PRIVACY_KEYS[1:]}}
    # nothing else is looked at when DP is off
    assert report(enabled=False, noise_multiplier=None, clipping_norm=None, delta=None, sample_rate=None,
                  steps=None, accountant=None) == rep


def test_privacy_report_fixed_noise():
    rep = report(noise_multiplier=1.0, clipping_norm=0.5, delta=1e-5, sample_rate=0.05, steps=100, accountant="rdp")
    assert list(rep) == PRIVACY_KEYS
    assert rep["enabled"] is True and rep["rounds"] == 100 and rep["accountant"] == "rdp"
    assert rep["noise_multiplier"] == 1.0 and rep["clipping_norm"] == 0.5
    assert rep["sampling_rate"] == 0.05 and rep["delta"] == 1e-5
    assert rep["epsilon"] == pytest.approx(_opacus_rdp(1.0, 0.05, 100, 1e-5), rel=1e-9)
    assert all(type(rep[k]) is float for k in ("epsilon", "delta", "noise_multiplier", "clipping_norm",
                                               "sampling_rate"))
    assert type(report(clipping_norm=1, delta=1e-5, noise_multiplier=2)["clipping_norm"]) is float


def test_privacy_report_with_calibrated_noise():
    z = calibrate(3.0, 0.1, 40, 1e-5)
    rep = report(noise_multiplier=z, clipping_norm=1.0, sample_rate=0.1, steps=40)
    assert rep["noise_multiplier"] == z != 1.0
    assert 0.98 * 3.0 <= rep["epsilon"] <= 3.0
    assert report(noise_multiplier=2.0, sample_rate=0.1, steps=40)["epsilon"] == eps(2.0, 0.1, 40, 1e-5)
    # warm-start-only runs spend nothing
    assert report(noise_multiplier=2.0, sample_rate=0.1, steps=0)["epsilon"] == 0.0
    # target ε = inf: no noise, no finite guarantee
    inf_rep = report(noise_multiplier=calibrate(math.inf, 0.1, 40, 1e-5), sample_rate=0.1, steps=40)
    assert inf_rep["noise_multiplier"] == 0.0 and inf_rep["epsilon"] == math.inf
    prv = report(noise_multiplier=1.3, sample_rate=0.2, steps=30, delta=1e-6, accountant="prv")
    assert prv["accountant"] == "prv" and prv["epsilon"] == eps(1.3, 0.2, 30, 1e-6, "prv")


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(enabled=1), r"enabled must be True or False; got 1"),
        (dict(clipping_norm=0.0), r"clipping_norm must be a finite number > 0; got 0\.0"),
        (dict(clipping_norm=math.inf), r"clipping_norm must be a finite number > 0; got inf"),
        (dict(clipping_norm=math.nan), r"clipping_norm must be a finite number > 0; got nan"),
        (dict(noise_multiplier=-0.5), r"noise_multiplier must be >= 0; got -0\.5"),
        (dict(delta=math.inf), r"delta must be in \(0, 1\); got inf"),
        (dict(sample_rate=1.5), r"sample_rate must be in \(0, 1\]; got 1\.5"),
        (dict(steps=2.5), r"steps must be an integer >= 0; got 2\.5"),
        (dict(accountant="gdp"), r"accountant must be one of \('rdp', 'prv', 'pld'\); got 'gdp'"),
    ],
)
def test_privacy_report_validates_inputs_naming_its_parameters(kwargs, message):
    with pytest.raises(ValueError, match="^" + message + "$"):
        report(**kwargs)
