"""report.md / roc.png / hist.png from a results.json dict, with and without attacks."""

import numpy as np

from attacks import format_tables, markdown_table, write_report
from attacks.report import load_raw_scores, save_raw_scores

RESULTS = {
    "config": {"data": {"name": "synthetic", "setting": "personalization"}, "federation": {"rounds": 5}},
    "utility": {"in_task_accuracy": 0.8125, "out_task_accuracy": None},
    "privacy": {"enabled": True, "epsilon": 7.98, "delta": 1e-5, "noise_multiplier": 1.1, "clipping_norm": 1.0,
                "sampling_rate": 0.25, "rounds": 40, "accountant": "rdp"},
}


def metrics(auc):
    percentile = {q: {"tpr": 0.6, "fpr": 0.4, "balanced_accuracy": 0.6} for q in ("50", "75", "90")}
    return {"auc": auc, "auc_ci95": [auc - 0.02, auc + 0.02], "tpr_at_fpr": {"0.001": 0.002, "0.01": 0.03, "0.1": 0.25},
            "percentile": percentile, "k": 8, "trials": 16, "num_in_tasks": 10, "num_out_tasks": 10}


def raw_scores():
    rng = np.random.default_rng(0)
    game = lambda shift: {"in": rng.normal(shift, 1, (10, 16)), "out": rng.normal(0, 1, (10, 16))}
    return {s: {"strong": game(1.0), "weak": game(0.4), "null_control": game(0.0)} for s in ("variance", "inner_product")}


def test_tables_without_attacks_say_so():
    text = format_tables(RESULTS)
    assert "81.2%" in text and "n/a" in text and "7.98" in text
    assert "No attacks were run" in text


def test_tables_follow_table_1_layout():
    results = {**RESULTS, "attacks": {s: {g: metrics(a) for g, a in (("strong", 0.9), ("weak", 0.6), ("null_control", 0.5))}
                                      for s in ("variance", "inner_product")}}
    text = format_tables(results)
    assert text.count("0.900 [0.880, 0.920]") == 2
    assert "TPR @ 0.1% FPR" in text and "TPR @ 1% FPR" in text and "TPR @ 10% FPR" in text
    assert "(60.0%, 40.0%)" in text and "90th pct (TPR, FPR)" in text
    assert "Null control" in text


def test_report_with_attacks_writes_linked_figures(tmp_path):
    results = {**RESULTS, "attacks": {s: {g: metrics(0.7) for g in ("strong", "weak", "null_control")}
                                      for s in ("variance", "inner_product")}}
    path = write_report(results, raw_scores(), tmp_path)
    report = path.read_text()
    assert "](roc.png)" in report and "](hist.png)" in report and "synthetic" in report
    assert (tmp_path / "roc.png").stat().st_size > 10_000 and (tmp_path / "hist.png").stat().st_size > 10_000


def test_train_only_report_has_no_figures(tmp_path):
    write_report(RESULTS, None, tmp_path)
    assert (tmp_path / "report.md").exists() and not (tmp_path / "roc.png").exists()


def test_raw_scores_round_trip(tmp_path):
    raw = raw_scores()
    save_raw_scores(raw, tmp_path / "scores.npz")
    loaded = load_raw_scores(tmp_path / "scores.npz")
    np.testing.assert_array_equal(loaded["inner_product"]["weak"]["out"], raw["inner_product"]["weak"]["out"])
    assert set(loaded) == set(raw) and set(loaded["variance"]) == set(raw["variance"])


def test_markdown_table_pads_columns():
    assert markdown_table(["a", "long header"], [["wide cell", 1], ["x", 2.5]]).splitlines() == [
        "| a         | long header |",
        "|-----------|-------------|",
        "| wide cell | 1           |",
        "| x         | 2.5         |",
    ]
    assert markdown_table(["only"], []) == "| only |\n|------|"


def test_configuration_line_lists_the_summary_keys_present(tmp_path):
    config = {"data": {"name": "synthetic", "num_in_tasks": 8}, "model": "not a section", "attack": {"cosine": False}}
    report = write_report({**RESULTS, "config": config}, None, tmp_path).read_text()
    assert report.splitlines()[2] == "`data.name` = synthetic, `data.num_in_tasks` = 8, `attack.cosine` = False"


def test_tpr_at_fpr_is_shown_only_with_enough_out_points_and_with_its_interval():
    from scipy.stats import binomtest

    from attacks.report import tpr_cell

    metrics = {"tpr_at_fpr": {"0.001": 0.016, "0.01": 0.0712890625}, "trials": 128, "num_in_tasks": 64,
               "num_out_tasks": 64}
    assert tpr_cell(metrics, "0.001") == "n/a (8 OUT points beyond)"  # 0.1 % of 8192 OUT points
    hits = round(0.0712890625 * 8192)
    interval = binomtest(hits, 8192).proportion_ci(method="exact")  # Clopper-Pearson
    assert tpr_cell(metrics, "0.01") == f"7.1% [{100 * interval.low:.1f}, {100 * interval.high:.1f}]"


def test_an_auc_interval_wholly_below_half_is_flagged_as_reversed():
    from attacks.report import auc_cell

    assert auc_cell({"auc": 0.31, "auc_ci95": [0.22, 0.41]}).endswith("(reversed: IN lower)")
    assert "reversed" not in auc_cell({"auc": 0.47, "auc_ci95": [0.40, 0.54]})
