"""The empirical DP audit (attacks/audit.py): closed-form Clopper-Pearson values, a false-alarm rate
within the confidence level (also when trials of a task are correlated), errors, and the wiring into
results.json and dp-sweep."""
import json
import math

import numpy as np
import pytest

import run
from attacks.audit import (clopper_pearson_lower, clopper_pearson_upper, empirical_epsilon_lower_bound,
                           epsilon_lower_bound)

DELTA = 1e-5
CONTRACT_FIELDS = {"value", "confidence", "attack", "threshold", "tpr_low", "fpr_high", "decisions"}


def separable(n_in, n_out, trials=4, seed=0):
    rng = np.random.default_rng(seed)
    return {"in": 2.0 + rng.random((n_in, trials)), "out": rng.random((n_out, trials))}


def test_clopper_pearson_closed_forms():
    # all successes: the lower bound solves p^n = alpha; none: the upper bound solves (1 - p)^n = alpha
    assert clopper_pearson_lower(successes=10, trials=10, alpha=0.025) == pytest.approx(0.025 ** (1 / 10))
    assert clopper_pearson_upper(successes=0, trials=10, alpha=0.025) == pytest.approx(1 - 0.025 ** (1 / 10))
    assert clopper_pearson_lower(successes=0, trials=10, alpha=0.025) == 0.0
    assert clopper_pearson_upper(successes=10, trials=10, alpha=0.025) == 1.0
    # one success in n: the lower bound is 1 - (1 - alpha)^(1/n)
    assert clopper_pearson_lower(successes=1, trials=7, alpha=0.05) == pytest.approx(1 - 0.95 ** (1 / 7))


@pytest.mark.parametrize("n_in, n_out", [(20, 20), (64, 64), (33, 17)])
def test_perfectly_separable_scores_give_the_closed_form_bound(n_in, n_out):
    bound = empirical_epsilon_lower_bound(scores={"planted": separable(n_in, n_out)}, delta=DELTA)
    m_in, m_out = n_in - n_in // 2, n_out - n_out // 2  # the evaluation half
    tpr_low, fpr_high = 0.025 ** (1 / m_in), 1 - 0.025 ** (1 / m_out)  # 95 % split over the two proportions
    assert CONTRACT_FIELDS <= set(bound)
    assert bound["decisions"] == m_in + m_out
    assert (bound["true_positives"], bound["false_positives"]) == (m_in, 0)
    assert bound["tpr_low"] == pytest.approx(tpr_low) and bound["fpr_high"] == pytest.approx(fpr_high)
    assert bound["value"] == pytest.approx(math.log((tpr_low - DELTA) / fpr_high), rel=1e-9)
    assert bound["confidence"] == 0.95 and bound["attack"] == "planted"
    assert 1.0 <= bound["threshold"] <= 2.0  # between the two groups


def test_the_strongest_attack_is_chosen():
    rng = np.random.default_rng(1)
    scores = {"noise": {"in": rng.normal(size=(40, 8)), "out": rng.normal(size=(40, 8))},
              "leak": separable(40, 40)}
    bound = empirical_epsilon_lower_bound(scores=scores, delta=DELTA)
    assert bound["attack"] == "leak" and bound["value"] > 1.5


def test_identical_in_and_out_distributions_certify_nothing():
    rng = np.random.default_rng(2)
    bound = empirical_epsilon_lower_bound(scores={"same": {"in": rng.normal(size=(64, 128)),
                                                           "out": rng.normal(size=(64, 128))}}, delta=DELTA)
    assert bound["value"] == 0.0


@pytest.mark.parametrize("task_effect", [0.0, 3.0])
def test_false_alarm_rate_stays_within_the_confidence_level(task_effect):
    """IN and OUT from one distribution: a positive bound is a false alarm; at 95 % confidence it must
    happen in at most ~5 % of audits, also when a task's trials are strongly correlated (a task effect
    3x the trial noise). Pooling the trials as if independent would fail this."""
    positives = 0
    audits = 100
    for seed in range(audits):
        rng = np.random.default_rng(seed)
        scores = {name: {side: task_effect * rng.normal(size=(32, 1)) + rng.normal(size=(32, 8))
                         for side in ("in", "out")} for name in ("a", "b")}
        positives += empirical_epsilon_lower_bound(scores=scores, delta=DELTA, seed=seed)["value"] > 0
    assert positives / audits <= 0.08  # measured: 0 of 300 (Clopper-Pearson is conservative)


def test_pooled_trials_would_overstate_the_bound():
    """The same correlated, leak-free scores: with trials pooled as independent decisions, a naive
    bound is often positive; the per-task audit is not (the unit is what keeps it honest)."""
    naive_positive = 0
    for seed in range(100):
        rng = np.random.default_rng(seed)
        scores_in = 3.0 * rng.normal(size=(32, 1)) + rng.normal(size=(32, 16))
        scores_out = 3.0 * rng.normal(size=(32, 1)) + rng.normal(size=(32, 16))
        t = np.quantile(scores_out, 0.9)
        naive = epsilon_lower_bound(true_positives=int((scores_in > t).sum()), in_decisions=scores_in.size,
                                    false_positives=int((scores_out > t).sum()), out_decisions=scores_out.size,
                                    delta=DELTA)
        naive_positive += naive["value"] > 0
    assert naive_positive >= 10  # pooled trials: spurious "leaks" in ~20 % of audits (measured: 21 % of 200)


@pytest.mark.parametrize("kwargs, parameter", [
    ({"scores": {}}, "scores"),
    ({"scores": {"a": {"in": np.zeros((4, 2))}}}, "scores"),
    ({"scores": {"a": {"in": np.zeros(4), "out": np.zeros((4, 2))}}}, "scores"),
    ({"scores": {"a": separable(4, 4), "b": separable(5, 4)}}, "scores"),
    ({"scores": {"a": separable(4, 4)}, "delta": 1.5}, "delta"),
    ({"scores": {"a": separable(4, 4)}, "confidence": 1.0}, "confidence"),
    ({"scores": {"a": separable(4, 4)}, "seed": -1}, "seed"),
])
def test_bad_arguments_name_their_parameter(kwargs, parameter):
    with pytest.raises(ValueError) as err:
        empirical_epsilon_lower_bound(**{"delta": DELTA, **kwargs})
    assert str(err.value).startswith(parameter)


def test_too_few_tasks_give_zero_with_a_note():
    bound = empirical_epsilon_lower_bound(scores={"a": separable(1, 5)}, delta=DELTA)
    assert bound["value"] == 0.0 and bound["attack"] is None and "note" in bound


TINY = ["data.num_in_tasks=8", "data.num_out_tasks=8", "federation.tasks_per_round=4", "federation.rounds=8",
        "federation.warm_start_rounds=2", "attack.trials=16", "attack.bootstrap=20", 'federation.engine="vectorized"']


def _args(command, out, extra=()):
    args = [command, "--config", "configs/synthetic.toml", "--out", str(out)]
    for item in [*TINY, *extra]:
        args += ["--set", item]
    return args


def test_experiment_writes_the_bound_and_the_sweep_never_exceeds_the_accountant(tmp_path):
    out = tmp_path / "sweep"
    assert run.main(_args("dp-sweep", out) + ["--epsilons", "inf,4,1"]) == 0
    rows = json.loads((out / "dp_sweep.json").read_text())
    assert (out / "dp_audit.png").stat().st_size > 0
    assert "empirical ε" in (out / "dp_sweep.md").read_text()
    for row in rows:
        label = "inf" if row["target_epsilon"] == "inf" else format(row["target_epsilon"], "g")
        results = json.loads((out / f"eps_{label}" / "results.json").read_text())
        bound = results["privacy"]["empirical_epsilon_lower_bound"]
        assert CONTRACT_FIELDS <= set(bound) and bound["confidence"] == 0.95
        assert row["empirical_epsilon_lower_bound"] == bound["value"] >= 0.0
        assert bound["decisions"] == 8  # 4 IN + 4 OUT held-out tasks, one decision each
        assert bound["delta"] == (results["privacy"]["delta"] if results["privacy"]["enabled"] else 1e-5)
        if row["epsilon"] != "inf":
            assert bound["value"] <= row["epsilon"]  # a lower bound above the accountant's would be a bug
    report = (out / "eps_1" / "report.md").read_text()
    assert "Empirical lower bound on task-level ε" in report
