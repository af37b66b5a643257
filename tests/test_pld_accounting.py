"""dp.accountant = "pld": Google dp-accounting's PLD accountant behind Opacus's accountant registry."""
import math

import pytest
from opacus.accountants import create_accountant
from opacus.accountants.registry import _ACCOUNTANTS as OPACUS_ACCOUNTANTS
from opacus.accountants.utils import get_noise_multiplier

from fedtask.config import load_config
from strategies.accounting import ACCOUNTANTS, calibrate_noise_multiplier, epsilon_spent, privacy_report
from strategies.pld import PLDAccountant


def eps(z, q, steps, delta, accountant):
    return epsilon_spent(noise_multiplier=z, sample_rate=q, steps=steps, delta=delta, accountant=accountant)


def test_pld_is_registered_with_opacus():
    assert "pld" in ACCOUNTANTS and OPACUS_ACCOUNTANTS["pld"] is PLDAccountant
    acc = create_accountant("pld")
    assert isinstance(acc, PLDAccountant) and acc.mechanism() == "pld" and len(acc) == 0
    assert acc.get_epsilon(1e-5) == 0.0  # nothing released yet
    acc.step(noise_multiplier=1.0, sample_rate=0.05)
    acc.step(noise_multiplier=1.0, sample_rate=0.05)
    acc.step(noise_multiplier=2.0, sample_rate=0.05)
    assert acc.history == [(1.0, 0.05, 2), (2.0, 0.05, 1)] and len(acc) == 2
    assert acc.state_dict()["mechanism"] == "pld"


# (z, q, T, delta): a small-rate, the default preset's (q = 32/64 over 190 encoder rounds), full participation
SETTINGS = [(1.0, 0.05, 100, 1e-5), (2.61, 0.5, 190, 1e-5), (8.09, 0.5, 190, 1e-5), (1.0, 1.0, 10, 1e-6)]


@pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha")  # RDP at large z: looser, as asserted
@pytest.mark.parametrize("z,q,steps,delta", SETTINGS)
def test_pld_agrees_with_prv_and_is_no_looser_than_rdp(z, q, steps, delta):
    pld, prv, rdp = (eps(z, q, steps, delta, name) for name in ("pld", "prv", "rdp"))
    assert math.isfinite(pld) and pld > 0
    assert abs(pld - prv) / prv < 0.05  # two numerical upper bounds of one mechanism's epsilon
    assert pld <= prv * 1.001  # PRV's eps_error slack makes it the looser of the two
    assert pld <= rdp


def test_pld_history_equals_one_composed_entry():
    acc = PLDAccountant()
    acc.history = [(1.0, 0.05, 60), (1.0, 0.05, 40)]
    assert acc.get_epsilon(1e-5) == pytest.approx(eps(1.0, 0.05, 100, 1e-5, "pld"), rel=1e-3)


def test_pld_no_noise_no_steps_infinite_noise():
    assert eps(0.0, 0.05, 100, 1e-5, "pld") == math.inf
    assert eps(1.0, 0.05, 0, 1e-5, "pld") == 0.0
    assert eps(math.inf, 0.05, 100, 1e-5, "pld") == 0.0
    acc = PLDAccountant()
    acc.history = [(0.0, 0.05, 10)]  # the accountant itself, bypassing epsilon_spent's shortcut
    assert acc.get_epsilon(1e-5) == math.inf


@pytest.mark.parametrize("target", [8.0, 2.0])
def test_pld_calibration_spends_at_most_the_target(target):
    z = calibrate_noise_multiplier(target_epsilon=target, sample_rate=0.05, steps=100, delta=1e-5, accountant="pld")
    spent = eps(z, 0.05, 100, 1e-5, "pld")
    assert 0.99 * target <= spent <= target
    # the tightest accountant needs the least noise for the same budget
    assert z <= calibrate_noise_multiplier(target_epsilon=target, sample_rate=0.05, steps=100, delta=1e-5,
                                           accountant="rdp")


def test_opacus_calibration_works_through_the_registry():
    z = get_noise_multiplier(target_epsilon=4.0, target_delta=1e-5, sample_rate=0.1, steps=50, accountant="pld",
                             epsilon_tolerance=0.02)
    assert eps(z, 0.1, 50, 1e-5, "pld") <= 4.0


def test_pld_privacy_report_and_config():
    rep = privacy_report(enabled=True, noise_multiplier=1.0, clipping_norm=1.0, delta=1e-5, sample_rate=0.05,
                         steps=100, accountant="pld")
    assert rep["accountant"] == "pld" and rep["epsilon"] == eps(1.0, 0.05, 100, 1e-5, "pld")
    config = load_config("configs/synthetic.toml", ["dp.enabled=true", 'dp.accountant="pld"'])
    assert config.dp.accountant == "pld"
