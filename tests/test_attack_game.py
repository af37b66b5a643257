"""The security game against fake embedding oracles (CONTRACT §4-5)."""

import numpy as np
import pytest
import torch

from attacks import STATISTICS, challenge_scores, embed_pools, run_security_games, whiten_by_task
from attacks.game import draw_subsets
from attacks.grouping import pad_by_task

D = 12
METRIC_KEYS = {"auc", "auc_ci95", "tpr_at_fpr", "percentile", "k", "trials", "num_in_tasks", "num_out_tasks"}


def identity_oracle(batch):
    return batch.numpy()


class CountingOracle:
    """Identity oracle that records how many inputs it embedded."""

    def __init__(self):
        self.rows = 0

    def __call__(self, batch):
        self.rows += len(batch)
        return batch.double().numpy() * 2.0


def make_pools(rng, n_tasks, n, member):
    """Members: a task-specific offset plus wider noise (both statistics rise); others: N(0, I)."""
    pools = []
    for _ in range(n_tasks):
        rows = 1.5 * rng.normal(size=(n, D)) + 2.0 * rng.normal(size=D) if member else rng.normal(size=(n, D))
        pools.append(torch.tensor(rows, dtype=torch.float32))
    return pools


def cfg(**overrides):
    """Keyword arguments of run_security_games: a small game, quiet."""
    return {"trials": 16, "k_strong": 6, "k_weak": 4, "whiten": False, "cosine": False, "bootstrap": 200,
            "progress": lambda line: None, **overrides}


@pytest.mark.parametrize("whiten,cosine", [(False, False), (True, False), (True, True)])
def test_members_that_cluster_are_detected(whiten, cosine):
    rng = np.random.default_rng(0)
    in_train, in_holdout = make_pools(rng, 24, 12, True), make_pools(rng, 24, 6, True)
    out = make_pools(rng, 24, 12, False)
    results, raw = run_security_games(identity_oracle, identity_oracle, {"strong": (in_train, out), "weak": (in_holdout, out)},
                                      **cfg(whiten=whiten, cosine=cosine), seed=1)
    for statistic in ("variance", "inner_product"):
        assert results[statistic]["strong"]["auc"] > 0.9
        assert results[statistic]["weak"]["auc"] > 0.9
        assert raw[statistic]["strong"]["in"].shape == (24, 16)
        assert raw[statistic]["weak"]["out"].shape == (24, 16)


def test_oracle_blind_to_membership_gives_chance_auc():
    # Pools much larger than k keep the trials of one task nearly independent, so the AUC's
    # task-level noise is small (bootstrap CIs here are about +-0.03 wide).
    rng = np.random.default_rng(1)
    in_train, in_holdout = make_pools(rng, 128, 40, False), make_pools(rng, 128, 24, False)
    out = make_pools(rng, 128, 40, False)
    lines = []
    results, _ = run_security_games(identity_oracle, identity_oracle, {"strong": (in_train, out), "weak": (in_holdout, out)},
                                    **cfg(trials=16, whiten=True, progress=lines.append), seed=2)
    for statistic in ("variance", "inner_product"):
        for game in ("strong", "weak", "null_control"):
            metrics = results[statistic][game]
            assert set(metrics) == METRIC_KEYS
            assert abs(metrics["auc"] - 0.5) < 0.05, (statistic, game, metrics["auc"])
            low, high = metrics["auc_ci95"]
            assert low <= metrics["auc"] <= high and low < 0.5 < high
    assert len(lines) == 3 and all("AUC" in line and " s)" in line for line in lines)


def test_metrics_fields_and_null_control_uses_null_oracle():
    rng = np.random.default_rng(2)
    in_train, in_holdout, out = make_pools(rng, 10, 8, True), make_pools(rng, 10, 5, True), make_pools(rng, 12, 8, False)
    blind = lambda batch: np.random.default_rng(len(batch)).normal(size=(len(batch), D))  # ignores its inputs
    results, _ = run_security_games(identity_oracle, blind, {"strong": (in_train, out), "weak": (in_holdout, out)},
                                    **cfg(k_strong=5, k_weak=3), seed=3)
    strong, weak = results["variance"]["strong"], results["variance"]["weak"]
    assert (strong["k"], strong["trials"], strong["num_in_tasks"], strong["num_out_tasks"]) == (5, 16, 10, 12)
    assert weak["k"] == 3
    assert set(strong["tpr_at_fpr"]) == {"0.001", "0.01", "0.1"}
    assert set(strong["percentile"]) == {"50", "75", "90"}
    assert results["inner_product"]["strong"]["auc"] > 0.9
    assert results["inner_product"]["null_control"]["auc"] < 0.8


def test_same_seed_same_results():
    rng = np.random.default_rng(3)
    pools = {"strong": (make_pools(rng, 6, 8, True), make_pools(rng, 6, 8, False))}
    pools["weak"] = (make_pools(rng, 6, 5, True), pools["strong"][1])
    run = lambda seed: run_security_games(identity_oracle, identity_oracle, pools, **cfg(whiten=True), seed=seed)[0]
    assert run(7) == run(7)
    assert run(7) != run(8)


def small_pools(seed=4):
    rng = np.random.default_rng(seed)
    return {"strong": (make_pools(rng, 4, 8, True), make_pools(rng, 4, 8, False)),
            "weak": (make_pools(rng, 4, 5, True), make_pools(rng, 4, 8, False))}


@pytest.mark.parametrize("key,value,message", [
    ("k_strong", 9, r"k_strong = 9 exceeds the smallest IN pool \(8 samples\)"),
    ("k_weak", 6, r"k_weak = 6 exceeds the smallest IN pool \(5 samples\)"),
    ("k_strong", 1, r"k_strong must be an integer >= 2 .*; got 1"),
    ("k_weak", 2.0, r"k_weak must be an integer >= 2 .*; got 2.0"),
])
def test_bad_k_is_rejected_by_its_parameter_name(key, value, message):
    with pytest.raises(ValueError, match="^" + message):
        run_security_games(identity_oracle, identity_oracle, small_pools(), **cfg(**{key: value}), seed=0)


def test_challenge_scores_names_k_and_side():
    emb, task_index = np.random.default_rng(5).normal(size=(20, 3)), np.repeat(np.arange(4), [6, 6, 3, 5])
    with pytest.raises(ValueError, match=r"^k_weak = 4 exceeds the smallest OUT pool \(3 samples\)"):
        challenge_scores(emb, task_index, 2, 4, 5, np.random.default_rng(0), k_name="k_weak")
    with pytest.raises(ValueError, match=r"^k must be an integer >= 2"):
        challenge_scores(emb, task_index, 2, 1, 5, np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"^n_in_tasks "):
        challenge_scores(emb, task_index, 4, 2, 5, np.random.default_rng(0))


@pytest.mark.parametrize("bad,message", [
    ({"trials": 0}, "trials must be an integer >= 1; got 0"),
    ({"trials": 2.5}, "trials must be an integer >= 1; got 2.5"),
    ({"trials": True}, "trials must be an integer >= 1; got True"),
    ({"bootstrap": 0}, "bootstrap must be an integer >= 1; got 0"),
    ({"batch_size": 0}, "batch_size must be an integer >= 1; got 0"),
    ({"whiten": "yes"}, "whiten must be True or False; got 'yes'"),
    ({"cosine": 1}, "cosine must be True or False; got 1"),
    ({"whiten_lambda": -1.0}, "whiten_lambda must be a finite number >= 0; got -1.0"),
    ({"whiten_lambda": float("nan")}, "whiten_lambda must be a finite number >= 0; got nan"),
])
def test_invalid_parameters_are_rejected_before_any_oracle_call(bad, message):
    oracle = CountingOracle()
    with pytest.raises(ValueError) as error:
        run_security_games(oracle, oracle, small_pools(), **cfg(**bad), seed=0)
    assert str(error.value) == message
    assert oracle.rows == 0


def test_parameters_are_keyword_only():
    with pytest.raises(TypeError):
        run_security_games(identity_oracle, identity_oracle, small_pools(), 16, 6, 4, 0)


def test_subsets_are_k_distinct_samples_of_one_task():
    counts = np.array([5, 9, 4, 7])
    slots = draw_subsets(counts, 4, 300, np.random.default_rng(6))
    assert slots.shape == (300, 4, 4)
    assert np.all(slots < counts[None, :, None]) and np.all(slots >= 0)
    ordered = np.sort(slots, axis=-1)
    assert np.all(np.diff(ordered, axis=-1) > 0)
    # uniform: each sample of task 1 is chosen with probability k / n = 4/9
    frequency = np.bincount(slots[:, 1].ravel(), minlength=9) / 300
    np.testing.assert_allclose(frequency, 4 / 9, atol=0.1)


@pytest.mark.parametrize("whiten,cosine", [(False, False), (False, True), (True, False), (True, True)])
def test_scores_are_the_statistics_of_the_drawn_subsets(whiten, cosine):
    rng = np.random.default_rng(7)
    task_index = rng.permutation(np.repeat(np.arange(5), [6, 8, 7, 6, 9]))
    emb = rng.normal(3.0, 1.0, size=(task_index.size, 4)) @ rng.normal(size=(4, 4))
    scores = challenge_scores(emb, task_index, 2, 5, 11, np.random.default_rng(8), whiten=whiten, cosine=cosine,
                              whiten_lambda=0.01)
    reference = whiten_by_task(emb, task_index, 0.01) if whiten else emb  # the symmetric W of CONTRACT §5
    padded, counts = pad_by_task(reference, task_index)
    slots = draw_subsets(counts, 5, 11, np.random.default_rng(8))
    subsets = padded[np.arange(5)[:, None], slots]  # (trials, tasks, k, d)
    assert list(scores) == list(STATISTICS) == ["variance", "inner_product"]
    for name, statistic in STATISTICS.items():
        expected = statistic.on_embeddings(subsets, cosine=cosine)
        np.testing.assert_allclose(scores[name]["in"], expected.T[:2], rtol=1e-9)
        np.testing.assert_allclose(scores[name]["out"], expected.T[2:], rtol=1e-9)


def test_embed_pools_queries_each_sample_once_in_batches():
    pools = [torch.arange(n * 2, dtype=torch.float32).reshape(n, 2) + 100 * t for t, n in enumerate([3, 7, 1, 5])]
    oracle = CountingOracle()
    emb, task_index = embed_pools(oracle, pools, batch_size=4)
    assert oracle.rows == 16 and emb.shape == (16, 2)
    np.testing.assert_array_equal(task_index, np.repeat(np.arange(4), [3, 7, 1, 5]))
    np.testing.assert_array_equal(emb, torch.cat(pools).double().numpy() * 2.0)


def test_shared_out_pools_are_embedded_once_per_oracle():
    rng = np.random.default_rng(9)
    out = make_pools(rng, 5, 8, False)
    pools = {"strong": (make_pools(rng, 5, 8, True), out), "weak": (make_pools(rng, 5, 6, True), out)}
    oracle, null = CountingOracle(), CountingOracle()
    run_security_games(oracle, null, pools, **cfg(trials=4, batch_size=3), seed=0)
    assert oracle.rows == 5 * 8 + 5 * 6 + 5 * 8
    assert null.rows == 5 * 8 + 5 * 8


def test_oracle_output_is_checked():
    with pytest.raises(ValueError, match="expected \\(n, d\\)"):
        embed_pools(lambda batch: np.zeros(len(batch)), [torch.zeros(3, 2)])
    with pytest.raises(ValueError, match="NaN"):
        embed_pools(lambda batch: np.full((len(batch), 2), np.nan), [torch.zeros(3, 2)])
