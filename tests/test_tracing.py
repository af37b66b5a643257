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
    table = format_tracing(result).splitlines()
    assert table[0].startswith("tracing analog: T=32 tasks, d=16, N=6 samples/task, k=3, 100 trials")
    assert table[2].startswith("| adversary | E[z_in]") and set(table[3]) == {"|", "-"}
    assert table[4].startswith("| strong ") and f"| {result['weak']['auc']:.3f} |" in table[5]


def test_same_seed_same_result():
    assert run_tracing(tasks=16, dim=8, trials=50, seed=5) == run_tracing(tasks=16, dim=8, trials=50, seed=5)


@pytest.mark.parametrize("params,message", [
    ({"k": 9}, "k must not exceed samples (9 > 8): "), ({"tasks": 0}, "tasks must be an integer >= 1; got 0"),
    ({"dim": -1}, "dim must be an integer >= 1"), ({"samples": 2.5}, "samples must be an integer >= 1"),
    ({"trials": 0}, "trials must be an integer >= 1"), ({"task_std": 0.0}, "task_std must be a finite number > 0"),
    ({"sample_std": -1.0}, "sample_std must be a finite number >= 0"), ({"seed": -2}, "seed must be an integer >= 0"),
    ({"k": True}, "k must be an integer >= 1; got True"), ({"task_std": float("inf")}, "task_std must be a finite"),
])
def test_invalid_parameters_name_the_parameter_first(params, message):
    # The CLI maps the message's first word to its flag; the library never names flags.
    with pytest.raises(ValueError) as error:
        run_tracing(**{"trials": 10, **params})
    assert str(error.value).startswith(message) and "--" not in str(error.value)


def test_parameters_are_keyword_only(tmp_path):
    with pytest.raises(TypeError):
        run_tracing(16, 8)
    with pytest.raises(TypeError):
        write_tracing(tmp_path, 16, 8)
