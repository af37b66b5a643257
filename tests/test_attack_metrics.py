"""ROC metrics with exactly known answers (CONTRACT §5 threshold rules), against scikit-learn, and the task bootstrap."""

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score, roc_curve

from attacks import auc_bootstrap_ci, roc_curve_points, roc_metrics
from attacks.metrics import _resample_counts, bootstrap_aucs, mann_whitney_auc, task_pair_u_matrix


def brute_force_auc(x, y):
    x, y = np.ravel(x)[:, None], np.ravel(y)[None, :]
    return float(np.mean((x > y) + 0.5 * (x == y)))


def test_auc_counts_ties_as_half():
    assert mann_whitney_auc([3, 4, 5], [1, 2, 3]) == pytest.approx(8.5 / 9)
    assert mann_whitney_auc([1, 1], [1, 1, 1]) == pytest.approx(0.5)
    assert mann_whitney_auc([0, 0], [1, 2]) == 0.0


def test_auc_equals_brute_force_on_discrete_scores():
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 6, size=(17, 5)), rng.integers(0, 5, size=(23, 5))
    assert roc_metrics(x, y)["auc"] == pytest.approx(brute_force_auc(x, y), abs=1e-12)


def test_tpr_at_fpr_uses_floor_alpha_n_plus_one_largest_out_score():
    out = np.arange(1000.0)  # k-th largest is 1000 - k
    scores_in = np.array([999.5, 998.5, 997.0, 898.0])
    tpr = roc_metrics(scores_in, out)["tpr_at_fpr"]
    assert tpr["0.001"] == 0.5   # t = 2nd largest = 998: 999.5, 998.5 above
    assert tpr["0.01"] == 0.75   # t = 11th largest = 989
    assert tpr["0.1"] == 0.75    # t = 101st largest = 899: 898 is below


def test_tpr_at_fpr_small_out_set_and_ties_at_threshold():
    out = np.array([5, 5, 5, 5, 1, 1, 1, 1, 1, 1.0])
    tpr = roc_metrics([5.0, 5.0, 6.0], out)["tpr_at_fpr"]
    # n_out = 10: alpha 0.001 and 0.01 -> the largest OUT score (5); alpha 0.1 -> 2nd largest (5).
    # Scores equal to the threshold are not "above" it.
    assert tpr == {"0.001": pytest.approx(1 / 3), "0.01": pytest.approx(1 / 3), "0.1": pytest.approx(1 / 3)}
    tpr = roc_metrics([4.0, 2.0], [9.0, 3.0, 1.0])["tpr_at_fpr"]
    assert tpr == {"0.001": 0.0, "0.01": 0.0, "0.1": 0.0}  # t = 9 everywhere when n_out < 10


def test_tpr_at_fpr_alpha_n_exact_integer():
    out = np.arange(100.0)  # alpha 0.01 * 100 = 1 exactly: t = 2nd largest = 98
    assert roc_metrics([98.5, 97.0], out)["tpr_at_fpr"]["0.01"] == 0.5


def test_percentile_thresholds_linear_interpolation():
    result = roc_metrics([1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 0.0])["percentile"]
    # pooled [0,0,0,0,1,2,3,4]: 50th -> 0.5, 75th -> 2.25, 90th -> 3.3
    assert result["50"] == {"tpr": 1.0, "fpr": 0.0, "balanced_accuracy": 1.0}
    assert result["75"] == {"tpr": 0.5, "fpr": 0.0, "balanced_accuracy": 0.75}
    assert result["90"] == {"tpr": 0.25, "fpr": 0.0, "balanced_accuracy": 0.625}


def test_percentile_counts_out_scores_above_threshold():
    result = roc_metrics([0.0, 10.0], [5.0, 6.0])["percentile"]["50"]  # t = 5.5
    assert (result["tpr"], result["fpr"], result["balanced_accuracy"]) == (0.5, 0.5, 0.5)


def test_metrics_reject_nan_and_empty():
    with pytest.raises(ValueError, match="^scores_in contains NaN"):
        roc_metrics([np.nan, 1.0], [0.0])
    with pytest.raises(ValueError, match="^scores_in is empty"):
        roc_metrics([], [0.0])
    with pytest.raises(ValueError, match="^scores_out must be a \\(tasks, trials\\) array"):
        task_pair_u_matrix(np.zeros((2, 3)), np.zeros(3))
    with pytest.raises(ValueError, match="^n_boot must be >= 1"):
        auc_bootstrap_ci(np.zeros((2, 3)), np.ones((2, 3)), 0)


@pytest.mark.parametrize("discrete", [False, True])
def test_task_pair_u_matrix_equals_naive_pair_counts(discrete):
    rng = np.random.default_rng(1)
    x, y = rng.normal(0.3, 1, size=(37, 6)), rng.normal(0, 1, size=(41, 9))
    if discrete:
        x, y = np.round(x), np.round(y)
    naive = ((x[:, None, :, None] > y[None, :, None, :]) + 0.5 * (x[:, None, :, None] == y[None, :, None, :])).sum((2, 3))
    np.testing.assert_array_equal(task_pair_u_matrix(x, y), naive)


def test_u_matrix_bootstrap_equals_explicit_resample():
    rng = np.random.default_rng(2)
    x, y = rng.normal(0.5, 1, size=(12, 8)), np.round(rng.normal(0, 1, size=(15, 8)), 1)
    u = task_pair_u_matrix(x, y)
    assert u.sum() / (x.size * y.size) == pytest.approx(mann_whitney_auc(x, y))
    fast = bootstrap_aucs(u, 8, 8, n_boot=5, rng=np.random.default_rng(7))
    replay = np.random.default_rng(7)
    counts_in, counts_out = _resample_counts(12, 5, replay), _resample_counts(15, 5, replay)
    for b in range(5):
        resampled_in = np.repeat(x, counts_in[b], axis=0)
        resampled_out = np.repeat(y, counts_out[b], axis=0)
        assert fast[b] == pytest.approx(brute_force_auc(resampled_in, resampled_out), abs=1e-12)


def test_resample_counts_are_draws_with_replacement():
    counts = _resample_counts(9, 2000, np.random.default_rng(3))
    assert counts.shape == (2000, 9) and np.all(counts.sum(axis=1) == 9)
    assert counts.mean() == pytest.approx(1.0) and counts.var() == pytest.approx(8 / 9, rel=0.1)


def test_bootstrap_ci_contains_point_auc_and_is_reproducible():
    rng = np.random.default_rng(4)
    x, y = rng.normal(0.4, 1, size=(64, 16)), rng.normal(0, 1, size=(64, 16))
    low, high = auc_bootstrap_ci(x, y, 500, np.random.default_rng(0))
    assert low < roc_metrics(x, y)["auc"] < high
    assert 0.0 < high - low < 0.2
    assert auc_bootstrap_ci(x, y, 500, np.random.default_rng(0)) == [low, high]


def test_roc_curve_points_area_equals_auc():
    rng = np.random.default_rng(5)
    x, y = np.round(rng.normal(0.5, 1, 300), 1), np.round(rng.normal(0, 1, 400), 1)
    fpr, tpr = roc_curve_points(x, y)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    area = np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2)
    assert area == pytest.approx(mann_whitney_auc(x, y), abs=1e-12)


def random_scores(rng, discrete):
    """IN and OUT scores of random sizes and shapes; discrete ones tie within and across the two sets."""
    n_in, n_out = rng.integers(1, 80, size=2)
    if discrete:
        return rng.integers(0, 7, size=n_in).astype(float), rng.integers(0, 5, size=n_out).astype(float)
    return rng.normal(0.4, 1.0, size=n_in), rng.normal(0.0, 1.0, size=n_out)


def sklearn_inputs(x, y):
    x, y = np.ravel(x), np.ravel(y)
    return np.concatenate((np.ones(x.size), np.zeros(y.size))), np.concatenate((x, y))


@pytest.mark.parametrize("discrete", [False, True])
@pytest.mark.parametrize("seed", range(5))
def test_auc_matches_sklearn_roc_auc_score(seed, discrete):
    rng = np.random.default_rng(100 + seed)
    for _ in range(20):
        x, y = random_scores(rng, discrete)
        expected = roc_auc_score(*sklearn_inputs(x, y))
        assert mann_whitney_auc(x, y) == pytest.approx(expected, abs=1e-12)
        assert roc_metrics(x, y)["auc"] == pytest.approx(expected, abs=1e-12)


def test_auc_matches_sklearn_on_task_by_trial_arrays():
    rng = np.random.default_rng(6)
    x, y = np.round(rng.normal(0.3, 1, size=(13, 7)), 1), np.round(rng.normal(0, 1, size=(17, 7)), 1)
    assert roc_metrics(x, y)["auc"] == pytest.approx(roc_auc_score(*sklearn_inputs(x, y)), abs=1e-12)


@pytest.mark.parametrize("discrete", [False, True])
@pytest.mark.parametrize("seed", range(5))
def test_roc_curve_points_equal_sklearn_roc_curve(seed, discrete):
    # Both start at (0, 0) and, with drop_intermediate=False, keep one point per distinct score;
    # the rates are exact integer ratios, so they agree to the last bit.
    rng = np.random.default_rng(200 + seed)
    for _ in range(20):
        x, y = random_scores(rng, discrete)
        fpr, tpr = roc_curve_points(x, y)
        expected_fpr, expected_tpr, _ = roc_curve(*sklearn_inputs(x, y), drop_intermediate=False)
        np.testing.assert_array_equal(fpr, expected_fpr)
        np.testing.assert_array_equal(tpr, expected_tpr)


def test_sklearn_default_curve_is_a_subset_with_the_same_area():
    rng = np.random.default_rng(7)
    x, y = np.round(rng.normal(0.5, 1, 300), 1), np.round(rng.normal(0, 1, 400), 1)
    fpr, tpr = roc_curve_points(x, y)
    kept_fpr, kept_tpr, _ = roc_curve(*sklearn_inputs(x, y))  # drops collinear points
    assert kept_fpr.size < fpr.size
    assert set(zip(kept_fpr, kept_tpr)) <= set(zip(fpr, tpr))
    area = np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2)
    kept_area = np.sum(np.diff(kept_fpr) * (kept_tpr[1:] + kept_tpr[:-1]) / 2)
    assert area == pytest.approx(kept_area, abs=1e-12)


def test_planted_shift_gives_the_gaussian_auc():
    # IN ~ N(1, 1), OUT ~ N(0, 1): AUC = Phi(1 / sqrt(2)) = 0.7602...; 20000 x 20000 points pin it to ~0.003.
    rng = np.random.default_rng(8)
    x, y = rng.normal(1.0, 1.0, 20_000), rng.normal(0.0, 1.0, 20_000)
    assert roc_metrics(x, y)["auc"] == pytest.approx(0.760250, abs=0.01)
