"""The bench's report: ratios computed from the timings, and in-process timings that run."""
from fedtask.bench import bench_config, format_bench, time_reference_loop, time_vectorized


def test_in_process_timings_run_on_a_small_federation():
    config = bench_config(8, 4, 3)
    assert time_vectorized(config) > 0
    assert time_reference_loop(config, 3) > 0


def test_bench_table_shows_ratios():
    row = {"tasks_per_round": 256, "vectorized_s": 0.02, "flower_s": 3.0, "minimal_flower_s": 3.5,
           "pure_compute_s": 0.4, "reference_loop_s": 0.08, "flower_overhead_per_client_ms": 11.0,
           "minimal_flower_overhead_per_client_ms": 12.9, "speedup_vs_flower": 150.0, "speedup_vs_reference_loop": 4.0}
    attack = {"scores_s": 0.1, "metrics_s": 0.05, "bootstrap_s": 0.1, "total_s": 0.25, "total_without_bootstrap_s": 0.15,
              "task_trials_per_s": 400000.0}
    text = format_bench({"machine": {"cpus": 2, "cuda": None}, "num_tasks": 256, "repeats": 3,
                         "vectorized_device": "cpu", "engines": [row], "attack": attack})
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("|")]
    engine_row = next(r for r in rows if r[0] == "256")
    assert engine_row[:3] == ["256", "0.0200", "3.000"] and engine_row[-2:] == ["150.0x", "4.0x"]
    assert any("400,000" in r for r in rows)
