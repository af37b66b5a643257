"""The mean-estimation tracing analog against Theorems 4.1-4.3 (CONTRACT §6)."""

import json

import numpy as np
import pytest

from attacks import format_tracing, run_tracing, write_tracing
from attacks.tracing import tracing_theory

PAPER = dict(tasks=256, dim=256, samples=8, k=4, task_std=1.0, sample_std=1.0)
CONTRACT_KEYS = {"in_mean", "out_mean", "in_var", "out_var", "theory_in_mean", "theory_out_var", "auc"}


@pytest.fixture(scope="module")
def long_run():
    return run_tracing(**PAPER, trials=20480, seed=1)


@pytest.mark.parametrize("adversary", ["strong", "weak"])
def test_empirical_moments_match_closed_forms(long_run, adversary):
    r = long_run[adversary]
    trials = long_run["params"]["trials"]
    standard_error = np.sqrt(r["theory_out_var"] / trials)
    # IN points of one release share mu_hat, which inflates the error of their mean; 6 SE covers it.
    assert abs(r["in_mean"] - r["theory_in_mean"]) < 6 * standard_error
    assert abs(r["out_mean"]) < 5 * standard_error
    # sample variance of ~Gaussian z: relative SE ~ sqrt(2 / trials) ~ 1%, plus release-level spread
    assert r["out_var"] == pytest.approx(r["theory_out_var"], rel=0.06)
    assert r["in_var"] <= 3 * r["theory_out_var"]  # Theorem 4.3's bound


def test_strong_beats_weak_beats_chance_at_paper_parameters(long_run):
    assert long_run["strong"]["auc"] > long_run["weak"]["auc"] > 0.5
    default = run_tracing()  # the paper's parameters, 4000 trials
    assert default["strong"]["auc"] > default["weak"]["auc"] > 0.5


def test_theory_closed_forms():
    theory = tracing_theory(tasks=4, dim=2, samples=3, k=2, task_std=2.0, sample_std=3.0)
    assert theory["strong"]["theory_in_mean"] == pytest.approx(2 / 4 * (4 + 9 / 3))
    assert theory["weak"]["theory_in_mean"] == pytest.approx(2 / 4 * 4)
    assert theory["strong"]["theory_out_var"] == pytest.approx(2 / 4 * (16 + 81 / 6 + 5 / 6 * 36))


def test_sample_noise_only_helps_the_strong_adversary():
    # with no task spread, the weak adversary's IN statistic has the OUT distribution
    result = run_tracing(tasks=64, dim=64, samples=8, k=4, trials=4096, task_std=1e-6, sample_std=1.0, seed=3)
    assert result["strong"]["auc"] > 0.6
    assert abs(result["weak"]["auc"] - 0.5) < 0.04


def test_output_files_and_exact_contract_shape(tmp_path):
    result = write_tracing(tmp_path, tasks=32, dim=16, samples=6, k=3, trials=100, seed=0)
    stored = json.loads((tmp_path / "tracing.json").read_text())
    assert stored == result
    assert set(stored) == {"params", "strong", "weak"}
    assert stored["params"] == {"tasks": 32, "dim": 16, "samples": 6, "k": 3, "trials": 100, "task_std": 1.0, "sample_std": 1.0}
    assert set(stored["strong"]) == CONTRACT_KEYS and set(stored["weak"]) == CONTRACT_KEYS
    assert (tmp_path / "tracing.png").stat().st_size > 10_000
    table = format_tracing(result)
    assert "strong" in table and "weak" in table and "theory" in table


def test_same_seed_same_result():
    assert run_tracing(tasks=16, dim=8, trials=50, seed=5) == run_tracing(tasks=16, dim=8, trials=50, seed=5)


@pytest.mark.parametrize("params,flag", [
    ({"k": 9}, "--k"), ({"tasks": 0}, "--tasks"), ({"dim": -1}, "--dim"), ({"samples": 2.5}, "--samples"),
    ({"trials": 0}, "--trials"), ({"task_std": 0.0}, "--task-std"), ({"sample_std": -1.0}, "--sample-std"),
    ({"seed": -2}, "--seed"), ({"k": True}, "--k"),
])
def test_invalid_parameters_name_the_flag(params, flag):
    with pytest.raises(ValueError, match=flag):
        run_tracing(**{"trials": 10, **params})
