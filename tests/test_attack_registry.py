"""The statistics registry: one `register_statistic` call reaches the game, the results and the report."""

import numpy as np
import pytest
import torch

from attacks import STATISTICS, challenge_scores, format_tables, register_statistic, run_security_games, write_report
from attacks.game import draw_subsets
from attacks.grouping import pad_by_task

TITLE = "Mean squared-norm attack"


def mean_squared_norm(E, *, cosine=False):
    E = np.asarray(E, dtype=np.float64)
    return np.einsum("...kd,...kd->...", E, E) / (E.shape[-2] * E.shape[-1])


@pytest.fixture
def toy_statistic():
    """A third, non-centred statistic (not shift invariant), registered for one test only."""
    statistic = register_statistic(
        "mean_sq_norm", TITLE, centred=False, on_embeddings=mean_squared_norm,
        from_gram=lambda G, *, d, cosine=False: np.trace(G, axis1=-2, axis2=-1) / (G.shape[-1] * d),
    )
    yield statistic
    STATISTICS.pop("mean_sq_norm", None)


@pytest.fixture
def restrict_registry():
    """Call with names to leave only those statistics registered; the full registry comes back afterwards."""
    saved = dict(STATISTICS)

    def restrict(*names):
        STATISTICS.clear()
        STATISTICS.update({name: saved[name] for name in names})

    yield restrict
    STATISTICS.clear()
    STATISTICS.update(saved)


def uneven_embeddings(seed=0):
    rng = np.random.default_rng(seed)
    task_index = rng.permutation(np.repeat(np.arange(6), [7, 9, 8, 7, 10, 8]))
    return rng.normal(2.0, 1.0, size=(task_index.size, 5)), task_index


def member_pools(rng, n_tasks, n, member, d=8):
    """Members get a task offset and wider noise (larger norms); others are N(0, I)."""
    scale, offset = (1.5, 2.0) if member else (1.0, 0.0)
    return [torch.tensor(scale * rng.normal(size=(n, d)) + offset * rng.normal(size=d), dtype=torch.float32)
            for _ in range(n_tasks)]


def test_built_in_registry():
    assert list(STATISTICS) == ["variance", "inner_product"]
    assert STATISTICS["variance"].title == "Coordinate-wise variance attack" and STATISTICS["variance"].centred
    assert STATISTICS["inner_product"].title == "Pairwise inner-product attack"
    assert not STATISTICS["inner_product"].centred


def test_challenge_scores_pick_up_a_new_statistic_and_leave_the_others_unchanged(toy_statistic):
    emb, task_index = uneven_embeddings()
    scores = challenge_scores(emb, task_index, 3, 4, 9, np.random.default_rng(1))
    assert list(scores) == ["variance", "inner_product", "mean_sq_norm"]
    padded, counts = pad_by_task(emb, task_index)
    subsets = padded[np.arange(6)[:, None], draw_subsets(counts, 4, 9, np.random.default_rng(1))]
    expected = mean_squared_norm(subsets).T
    np.testing.assert_allclose(scores["mean_sq_norm"]["in"], expected[:3], rtol=1e-12)
    np.testing.assert_allclose(scores["mean_sq_norm"]["out"], expected[3:], rtol=1e-12)
    del STATISTICS["mean_sq_norm"]
    without = challenge_scores(emb, task_index, 3, 4, 9, np.random.default_rng(1))
    for name in without:  # same subsets, same float operations
        np.testing.assert_array_equal(scores[name]["in"], without[name]["in"])
        np.testing.assert_array_equal(scores[name]["out"], without[name]["out"])


@pytest.mark.parametrize("whiten", [False, True])
@pytest.mark.parametrize("only", [("variance",), ("inner_product",)])
def test_only_the_grams_some_statistic_needs_are_built(restrict_registry, only, whiten):
    emb, task_index = uneven_embeddings(seed=2)
    full = challenge_scores(emb, task_index, 2, 3, 7, np.random.default_rng(3), whiten=whiten, cosine=True)
    restrict_registry(*only)
    alone = challenge_scores(emb, task_index, 2, 3, 7, np.random.default_rng(3), whiten=whiten, cosine=True)
    assert list(alone) == list(only)
    np.testing.assert_array_equal(alone[only[0]]["in"], full[only[0]]["in"])
    np.testing.assert_array_equal(alone[only[0]]["out"], full[only[0]]["out"])


def test_games_tables_and_report_pick_up_a_new_statistic(toy_statistic, tmp_path):
    rng = np.random.default_rng(4)
    out = member_pools(rng, 16, 10, False)
    pools = {"strong": (member_pools(rng, 16, 10, True), out), "weak": (member_pools(rng, 16, 6, True), out)}
    lines = []
    results, raw = run_security_games(lambda batch: batch.numpy(), lambda batch: batch.numpy(), pools, trials=8,
                                      k_strong=5, k_weak=3, seed=0, bootstrap=50, progress=lines.append)
    assert list(results) == list(raw) == ["variance", "inner_product", "mean_sq_norm"]
    assert set(results["mean_sq_norm"]) == {"strong", "weak", "null_control"}
    assert results["mean_sq_norm"]["strong"]["auc"] > 0.9  # members' norms are larger by construction
    assert results["mean_sq_norm"]["weak"]["k"] == 3 and raw["mean_sq_norm"]["weak"]["in"].shape == (16, 8)
    assert all("mean_sq_norm AUC" in line for line in lines)
    tables = format_tables({"attacks": results})
    assert f"### {TITLE}" in tables and tables.count("### ") == 3
    report = write_report({"attacks": results}, raw, tmp_path).read_text()
    assert f"### {TITLE}" in report and (tmp_path / "roc.png").is_file() and (tmp_path / "hist.png").is_file()


def test_register_rejects_duplicate_and_unstorable_names():
    with pytest.raises(ValueError, match="^name 'variance' is already"):
        register_statistic("variance", "again", from_gram=None, on_embeddings=None, centred=True)
    with pytest.raises(ValueError, match="^name must be"):
        register_statistic("a/b", "slash", from_gram=None, on_embeddings=None, centred=True)
    assert list(STATISTICS) == ["variance", "inner_product"]
