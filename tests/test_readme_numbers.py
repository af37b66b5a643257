"""The README's result tables are copies of files a command wrote (docs/): check that they agree."""
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
GAMES = {"Strong": "strong", "Weak": "weak", "Null control (untrained encoder)": "null_control"}


def table_after(heading: str) -> list[list[str]]:
    """The rows of the first Markdown table after ``heading``."""
    lines = README[README.index(heading):].splitlines()[1:]
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return [row for row in rows[1:] if not set(row[0]) <= set("-: ")]


def auc_text(metrics: dict) -> str:
    return f"{metrics['auc']:.3f} [{metrics['auc_ci95'][0]:.3f}, {metrics['auc_ci95'][1]:.3f}]"


def test_default_run_tables_match_docs_default():
    results = json.loads((ROOT / "docs" / "default" / "results.json").read_text())
    utility = table_after("A real run of `python run.py`")[0]
    expect = [results["utility"][k] for k in ("in_task_accuracy", "in_task_train_accuracy",
                                                 "majority_baseline_accuracy")]
    assert utility == [f"{100 * v:.1f} %" for v in expect]
    for heading, statistic in (("**Coordinate-wise variance attack**", "variance"),
                               ("**Pairwise inner-product attack**", "inner_product")):
        rows = table_after(heading)
        assert {row[0] for row in rows} == set(GAMES)
        for row in rows:
            assert row[1] == auc_text(results["attacks"][statistic][GAMES[row[0]]]), row


def test_study_table_matches_docs_figure6():
    study = json.loads((ROOT / "docs" / "figure6" / "study.json").read_text())
    rows = table_after("Coordinate-wise variance attack, mean [95 % interval] over seeds 0-3")
    assert len(rows) == len(study["cells"])

    def text(stat):
        return f"{stat['mean']:.3f} [{stat['ci95'][0]:.3f}, {stat['ci95'][1]:.3f}]"

    for row, cell in zip(rows, study["cells"]):
        games = cell["summary"]["attacks"]["variance"]
        assert row[0] == cell["axis"] and row[1] == ", ".join(str(v) for v in cell["settings"].values())
        assert row[2:] == [text(cell["summary"]["in_task_accuracy"]),
                           *(text(games[g]["auc"]) for g in ("strong", "weak", "null_control"))]
    assert study["cells"][0]["seeds"] == [0, 1, 2, 3]
    assert re.search(r"4 seeds \(0-3\)", README)


def test_inner_product_table_matches_docs_inner_product():
    study = json.loads((ROOT / "docs" / "inner_product" / "study.json").read_text())
    rows = table_after("pairwise inner-product attack:\n")
    assert [row[0] for row in rows] == [str(cell["settings"]["data.task_std"]) for cell in study["cells"]]
    for row, cell in zip(rows, study["cells"]):
        games = cell["summary"]["attacks"]["inner_product"]
        text = [f"{s['mean']:.3f} [{s['ci95'][0]:.3f}, {s['ci95'][1]:.3f}]" for s in
                (cell["summary"]["in_task_accuracy"], *(games[g]["auc"] for g in ("strong", "weak", "null_control")))]
        assert row[1:] == text
