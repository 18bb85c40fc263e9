"""Smoke tests of the benchmark commands under benchmarks/ (tiny models, a step or two)."""

import importlib.util
import math
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", os.path.join(REPO, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_step_benchmark_runs():
    train_step = _load("train_step")
    rows, table = train_step.benchmark(("jax",), size="tiny", batch_size=8, steps=1, warmup=1, text_length=16,
                                       peak_trials=1)
    assert [row["framework"] for row in rows] == ["jax"]
    row = rows[0]
    for key in ("examples_per_s", "step_s", "mfu", "flops", "peak_flops", "peak_rss_bytes"):
        assert math.isfinite(row[key]) and row[key] > 0, (key, row[key])
    assert table.splitlines()[2].startswith("| jax | ")
