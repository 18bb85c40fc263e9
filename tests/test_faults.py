"""Faults during training: NaN/Inf losses, termination signals, and kill -9 of a CNN run (BatchNorm statistics)."""

import os
import signal
import subprocess
import time

import jax
import numpy as np

from clippy_jax import checkpoints
from tests.conftest import CNN_CONFIG, CNN_RUN_FLAGS
from tests.helpers import REPO, kill_after_checkpoint, main_command, read_scalars, run_main

EXPLODE = ("--config.optim.learning_rate=1e38", "--config.optim.warmup_steps=0", "--config.train.steps=6",
           "--config.train.checkpoint_every=1", "--config.train.keep_checkpoints=10")


def test_nonfinite_loss_stops_naming_the_step_and_keeps_finite_checkpoints(tmp_path):
    result = run_main(str(tmp_path), *EXPLODE, check=False)
    assert result.returncode != 0
    assert "Non-finite loss or gradients at step 1" in result.stderr
    steps = [name for name in os.listdir(tmp_path / "checkpoints") if name.isdigit()]
    assert steps == [], f"a checkpoint of non-finite parameters was written: {steps}"


def test_nonfinite_updates_are_skipped_when_configured(tmp_path):
    run_main(str(tmp_path), *EXPLODE, "--config.train.on_nonfinite=skip", "--config.train.log_every=1")
    losses = read_scalars(str(tmp_path), "train/loss")
    skipped = read_scalars(str(tmp_path), "train/nonfinite")
    assert sorted(losses) == list(range(1, 7))
    assert all(skipped[step] == 1.0 for step in range(1, 7))  # every update overflows and is left out
    assert np.all(np.isfinite(list(losses.values())))  # so the parameters stay finite


def test_sigterm_saves_and_exits_75_then_resumes(tmp_path):
    workdir = str(tmp_path)
    flags = ("--config.train.steps=100000", "--config.train.checkpoint_every=100000", "--config.train.log_every=1")
    process = subprocess.Popen(main_command(workdir, *flags), cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not read_scalars(workdir, "train/loss"):
        assert process.poll() is None and time.time() < deadline, "training did not start"
        time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 75, stderr[-3000:]  # EXIT_STOPPED: rerun to resume
    assert "Stopped at step" in stderr
    stopped = max(int(name) for name in os.listdir(tmp_path / "checkpoints") if name.isdigit())
    assert f"Stopped at step {stopped} " in stderr
    result = run_main(workdir, f"--config.train.steps={stopped + 2}", "--config.train.log_every=1")
    assert f"Resuming training at step {stopped} " in result.stderr
    assert os.path.exists(tmp_path / "results.json")


def test_cnn_run_resumed_after_kill_9_is_bit_identical_with_its_batchnorm_statistics(tiny_cnn_run, cnn_env,
                                                                                      tmp_path):
    """kill -9 of the EfficientNet tower's run after a checkpoint, then a rerun: losses, parameters and BatchNorm
    running statistics equal those of the uninterrupted run bit for bit."""
    reference = tiny_cnn_run[0]
    workdir = str(tmp_path)
    os.symlink(os.path.join(reference, "data"), os.path.join(workdir, "data"))
    kill_after_checkpoint(workdir, 2, *CNN_RUN_FLAGS, config=CNN_CONFIG, env=cnn_env)

    result = run_main(workdir, *CNN_RUN_FLAGS, config=CNN_CONFIG, env=cnn_env)
    resumed_at = int(result.stderr.split("Resuming training at step ")[1].split()[0])
    assert 2 <= resumed_at < 10
    losses, expected = read_scalars(workdir, "train/loss"), read_scalars(reference, "train/loss")
    np.testing.assert_array_equal([losses[s] for s in range(resumed_at + 1, 11)],
                                  [expected[s] for s in range(resumed_at + 1, 11)])
    final = checkpoints.restore_variables(checkpoints.step_dir(workdir, 10))
    uninterrupted = checkpoints.restore_variables(checkpoints.step_dir(reference, 10))
    statistics = final["batch_stats"]["image_tower"]["bn2"]["var"]
    assert statistics.shape == (320,) and not np.allclose(statistics, 1.0)  # head BatchNorm, trained
    jax.tree.map(np.testing.assert_array_equal, final, uninterrupted)
