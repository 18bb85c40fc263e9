"""Checkpoints survive failures: the save in flight completes, an unreadable latest step falls back
to the one before, and a workdir written with other settings is named before compiling."""

import glob
import os
import shutil

import pytest

from clippy_jax.data import pipeline
from tests.helpers import run_main

NO_EVAL = "--config.eval.evaluators=()"


def _copy(tiny_run, tmp_path) -> str:
    workdir = str(tmp_path / "work")
    shutil.copytree(tiny_run[0], workdir, symlinks=True)
    return workdir


def test_a_nonfinite_stop_completes_the_finite_checkpoint_in_flight(tmp_path):
    # The loss diverges at step 6 with this rate; step 5's save is still running in the background then.
    result = run_main(str(tmp_path), "--config.optim.learning_rate=10", "--config.train.checkpoint_every=5",
                      "--config.train.keep_checkpoints=100", "--config.train.steps=60", NO_EVAL, check=False)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "NonFiniteLossError: Non-finite loss or gradients at step 6" in result.stderr
    checkpoints = tmp_path / "checkpoints"
    assert glob.glob(str(checkpoints / "*tmp*")) == []
    assert sorted(int(name) for name in os.listdir(checkpoints) if name.isdigit()) == [1, 5]
    assert os.path.exists(checkpoints / "5" / "commit_success.txt")
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("damage", ["state_metadata", "iterator"])
def test_an_unreadable_latest_step_falls_back_to_the_step_before(tiny_run, tmp_path, damage):
    workdir = _copy(tiny_run, tmp_path)
    step_dir = os.path.join(workdir, "checkpoints", "10")
    if damage == "state_metadata":
        os.remove(os.path.join(step_dir, "default", "_METADATA"))
    else:
        path = os.path.join(workdir, "checkpoints", "data", "10", "process_0", pipeline.STATE_FILE)
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    result = run_main(workdir, "--config.train.steps=12", "--config.train.checkpoint_every=4",
                      "--config.train.log_every=1", NO_EVAL)
    assert f"Checkpoint step 10 at {step_dir} is unreadable" in result.stderr
    assert "training resumes from step 8" in result.stderr and "Resuming training at step 8 of 12" in result.stderr
    assert os.path.isdir(step_dir + ".unreadable")
    assert sorted(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit()) == [8, 12]


def test_a_changed_width_on_resume_is_named_before_compiling(tiny_run, tmp_path):
    workdir = _copy(tiny_run, tmp_path)
    result = run_main(workdir, "--config.model.image.width=64", "--config.train.steps=12", check=False, timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "config.model.image.width=32 -> 64" in result.stderr and workdir in result.stderr
    assert "FLOPs per step" not in result.stderr and "Traceback" not in result.stderr


def test_fewer_steps_than_the_workdir_has_done_is_an_error(tiny_run, tmp_path):
    workdir = _copy(tiny_run, tmp_path)
    result = run_main(workdir, "--config.train.steps=5", check=False, timeout=120)
    assert result.returncode == 2
    assert f"config.train.steps=5 is below the step 10 that {workdir} has reached" in result.stderr
