"""Smoke tests of the benchmark commands under benchmarks/ (tiny models, a step or two)."""

import importlib.util
import math
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", os.path.join(REPO, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(("preset", "frameworks", "remat"), [
    ("tiny_drop", "jax,torch,torch_compile", "none"),  # kept patches + indices, as the paper trains
    ("tiny", "jax,torch", "dots"),  # whole images
])
def test_train_step_benchmark_runs(preset, frameworks, remat):
    train_step = _load("train_step")
    args = train_step.parse_args([f"--preset={preset}", "--steps=1", "--warmup=1", "--peak_trials=1",
                                  f"--remat={remat}", "--device=cpu"])
    rows = train_step.benchmark(args, tuple(frameworks.split(",")))
    assert [row["framework"] for row in rows] == frameworks.split(",")
    for row in rows:
        for key in ("examples_per_s", "step_s", "mfu", "flops", "peak_flops", "peak_memory_bytes", "compile_s"):
            assert math.isfinite(row[key]) and row[key] > 0, (row["framework"], key, row[key])
        assert math.isfinite(row["loss"])
    table = train_step.format_table(rows).splitlines()
    assert [line.split(" | ")[2] for line in table[2:2 + len(rows)]] == frameworks.split(",")


def test_paper_preset_feeds_157_kept_patches_of_the_448_grid():
    train_step = _load("train_step")
    batch = train_step.make_batch(train_step.PRESETS["paper"], batch_size=3)
    assert batch["patches"].shape == (3, 157, 16 * 16 * 3) and batch["tokens"].shape == (3, 64)
    indices = batch["patch_indices"]
    assert indices.min() >= 0 and indices.max() < 28 * 28
    assert all(len(set(row)) == 157 for row in indices.tolist())
