"""bench --peers / --accountants: the tables they write, and the one-line refusal without pfl (no pfl needed)."""
import json
import sys

import pytest

import run
from fedtask.bench import format_bench
from fedtask.bench_peers import DIFFERENCES, compare_accountants, format_accountants, format_peers, format_sections


def table_rows(text):
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("|")]


PEERS = {"pfl_version": "0.6.0", "num_tasks": 256, "samples_per_task": 32, "model": "MLP 64-512-8 + linear 8-2",
         "server": "AdamW lr 0.003, weight decay 0.0001", "rounds": 21, "repeats": 3, "torch_threads": 2,
         "fedtask_device": "cpu", "pfl_device": "cpu", "noise_multiplier": 1.0, "clipping_norm": 1.0,
         "differences": DIFFERENCES,
         "rows": [{"tasks_per_round": 32, "dp": False, "pfl_s": 0.04, "fedtask_s": 0.004, "speedup": 10.0},
                  {"tasks_per_round": 256, "dp": False, "pfl_s": 0.39, "fedtask_s": 0.013, "speedup": 30.0},
                  {"tasks_per_round": 256, "dp": True, "pfl_s": 0.45, "fedtask_s": 0.09, "speedup": 5.0}]}

ACCOUNTANT_ROWS = [{"target_epsilon": 8.0, "calibrated_by": "rdp", "sample_rate": 0.5, "noise_multiplier": 4.492,
                    "steps": 190, "delta": 1e-5, "epsilon": {"rdp": 7.991, "prv": 7.42, "pld": 7.41},
                    "seconds": {"rdp": 0.1, "prv": 0.7, "pld": 0.05}, "tightest": "pld"},
                   {"target_epsilon": None, "calibrated_by": None, "sample_rate": 0.05, "noise_multiplier": 1.0,
                    "steps": 100, "delta": 1e-5, "epsilon": {"rdp": 4.038, "prv": 3.512, "pld": 3.502},
                    "seconds": {"rdp": 0.1, "prv": 0.2, "pld": 0.1}, "tightest": "pld"}]


def test_peers_table_rows():
    text = format_peers(PEERS)
    rows = table_rows(text)
    assert rows[0] == ["tasks/round", "DP", "pfl 0.6.0 (s/round)", "fedtask vectorized (s/round)", "fedtask vs pfl"]
    assert rows[2] == ["32", "off", "0.0400", "0.0040", "10.0x"]
    assert rows[3] == ["256", "off", "0.3900", "0.0130", "30.0x"]
    assert rows[4] == ["256", "z=1, C=1", "0.4500", "0.0900", "5.0x"]
    assert "What differs: fedtask keeps each task's 2-way head private" in text


def test_accountant_table_rows():
    rows = table_rows(format_accountants(ACCOUNTANT_ROWS))
    assert rows[0][-4:] == ["RDP ε", "PRV ε", "PLD ε", "tightest"]
    assert rows[2] == ["8", "0.5", "4.492", "190", "1e-05", "7.991", "7.42", "7.41", "PLD"]
    assert rows[3][0] == "—" and rows[3][-1] == "PLD"


def test_full_bench_and_sections_show_the_accountants():
    report = {"machine": {"cpus": 2, "cuda": None, "platform": "Linux"}, "peers": PEERS, "accountants": ACCOUNTANT_ROWS}
    text = format_sections(report)
    assert text.index("Side by side with pfl-research") < text.index("Privacy accounting of the same")
    row = {"tasks_per_round": 32, "vectorized_s": 0.02, "flower_s": 3.0, "minimal_flower_s": 3.5,
           "pure_compute_s": 0.4, "reference_loop_s": 0.08, "flower_overhead_per_client_ms": 11.0,
           "minimal_flower_overhead_per_client_ms": 12.9, "speedup_vs_flower": 150.0, "speedup_vs_reference_loop": 4.0}
    attack = {"scores_s": 0.1, "metrics_s": 0.05, "bootstrap_s": 0.1, "total_s": 0.25,
              "total_without_bootstrap_s": 0.15, "task_trials_per_s": 400000.0}
    full = format_bench({"machine": {"cpus": 2, "cuda": None}, "num_tasks": 256, "repeats": 3, "engines": [row],
                         "attack": attack, "accountants": ACCOUNTANT_ROWS})
    assert ["8", "0.5", "4.492", "190", "1e-05", "7.991", "7.42", "7.41", "PLD"] in table_rows(full)


def test_compare_accountants_names_the_tightest():
    (row,) = compare_accountants([{"target_epsilon": None, "calibrated_by": None, "sample_rate": 0.05,
                                   "noise_multiplier": 1.0, "steps": 100, "delta": 1e-5}])
    assert set(row["epsilon"]) == {"rdp", "prv", "pld"} and row["tightest"] == "pld"
    assert row["epsilon"]["pld"] <= row["epsilon"]["prv"] <= row["epsilon"]["rdp"]
    json.dumps(row)  # goes into bench.json as is


def test_peers_without_pfl_exits_2_with_one_line(tmp_path, monkeypatch, capsys):
    shadow = tmp_path / "shadow" / "pfl"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError(\"No module named 'pfl'\")\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "shadow"))  # the probe's interpreter finds no working pfl
    monkeypatch.delenv("FEDTASK_PEERS_PYTHON", raising=False)
    out = tmp_path / "bench"
    assert run.main(["bench", "--peers", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --peers: pfl-research is not importable by " + sys.executable)
    assert 'pip install "pfl[pytorch]==0.6.0"' in err[0] and "--peers-python" in err[0]
    assert not out.exists()


def test_peers_python_that_does_not_exist_exits_2(tmp_path, capsys):
    missing = tmp_path / "no-such-python"
    assert run.main(["bench", "--peers", "--peers-python", str(missing), "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --peers: cannot run {missing}")


@pytest.mark.parametrize("flag", ["--peers", "--accountants"])
def test_bench_flags_parse(flag):
    args = run._parser().parse_args(["bench", flag])
    assert getattr(args, flag.strip("-")) is True and args.peers_python is None


def test_readme_tables_are_the_committed_bench_files():
    """README's pfl and accountant tables are copies of docs/bench_peers_cpu.md (written by bench --peers)."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    readme = table_rows((root / "README.md").read_text())
    doc = (root / "docs" / "bench_peers_cpu.md").read_text()
    report = json.loads((root / "docs" / "bench_peers_cpu.json").read_text())
    assert doc == format_sections(report)
    for row in table_rows(doc):
        if not set(row[0]) <= set("-"):
            assert row in readme, row
