"""Checkpoints survive failures: the save in flight completes, a latest step whose bytes are bad falls
back to the one before, and nothing else (an interrupt during the restore, other settings, an old
layout) changes the workdir: a workdir written with other settings is named before compiling."""

import glob
import hashlib
import os
import shutil
import signal

import jax
import orbax.checkpoint as ocp
import pytest

from clippy_jax import checkpoints
from clippy_jax.data import pipeline
from clippy_jax.train.loop import PreemptionWatcher, TrainingStopped
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


def _tree_hash(directory: str) -> str:
    digest = hashlib.sha256()
    for root, dirs, files in sorted(os.walk(directory)):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(root, name)
            digest.update(os.path.relpath(path, directory).encode())
            with open(path, "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()


def _abstract_state(step_dir: str):
    """The saved TrainState's arrays as shapes on one device (as a run with the same settings builds them)."""
    tree = ocp.Checkpointer(ocp.CompositeCheckpointHandler(default=ocp.StandardCheckpointHandler())).metadata(
        step_dir).item_metadata["default"].tree
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)


class _SignalOnRestore:
    """An input iterator whose restore receives a SIGTERM (the iterator state is read after the arrays)."""

    def restore(self, directory: str) -> None:
        del directory
        signal.raise_signal(signal.SIGTERM)


@pytest.mark.parametrize("point", ["metadata", "arrays", "iterator"])
def test_a_signal_during_the_restore_stops_and_leaves_every_step_in_place(tiny_run, tmp_path, monkeypatch, point):
    workdir = _copy(tiny_run, tmp_path)
    before = _tree_hash(workdir)
    abstract = _abstract_state(os.path.join(workdir, "checkpoints", "10"))
    if point == "metadata":
        original = ocp.CheckpointManager.item_metadata

        def item_metadata(self, step):
            signal.raise_signal(signal.SIGTERM)
            return original(self, step)

        monkeypatch.setattr(ocp.CheckpointManager, "item_metadata", item_metadata)
    elif point == "arrays":  # the fifth array orbax reads
        from orbax.checkpoint._src.serialization import serialization

        original, calls = serialization.async_deserialize, []

        async def async_deserialize(*args, **kwargs):
            calls.append(1)
            if len(calls) == 5:
                signal.raise_signal(signal.SIGTERM)
            return await original(*args, **kwargs)

        monkeypatch.setattr(serialization, "async_deserialize", async_deserialize)
    watcher = PreemptionWatcher()
    checkpointer = checkpoints.Checkpointer(workdir, 4, 2, wait_seconds=60)
    try:
        with pytest.raises(TrainingStopped):
            checkpointer.restore(abstract, _SignalOnRestore() if point == "iterator" else None,
                                 lambda: watcher.requested)
    finally:
        watcher.close()
        checkpointer.close()
    assert _tree_hash(workdir) == before
    monkeypatch.undo()
    checkpointer = checkpoints.Checkpointer(workdir, 4, 2, wait_seconds=60)
    assert int(checkpointer.restore(abstract, None, lambda: False)["step"]) == 10
    checkpointer.close()


@pytest.mark.parametrize(("failures", "error", "outcome", "attempts"), [
    (2, TimeoutError("the mount did not answer"), "restored", 3),
    (3, ValueError("UNAVAILABLE: Error reading from gs://bucket/checkpoints/10"), checkpoints.CheckpointReadError, 3),
    (1, MemoryError("out of host memory"), MemoryError, 1),
])
def test_a_restore_that_fails_for_other_reasons_than_bad_bytes_changes_nothing(tiny_run, tmp_path, monkeypatch,
                                                                                 failures, error, outcome, attempts):
    workdir = _copy(tiny_run, tmp_path)
    before = _tree_hash(workdir)
    abstract = _abstract_state(os.path.join(workdir, "checkpoints", "10"))
    original, calls = ocp.CheckpointManager.restore, []

    def restore(self, step, *args, **kwargs):
        calls.append(step)
        if len(calls) <= failures:
            raise error
        return original(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "restore", restore)
    monkeypatch.setattr(checkpoints, "_RETRY_SECONDS", 0.01)
    checkpointer = checkpoints.Checkpointer(workdir, 4, 2, wait_seconds=60)
    try:
        if outcome == "restored":
            assert int(checkpointer.restore(abstract, None, lambda: False)["step"]) == 10
        else:
            with pytest.raises(outcome, match="after 3 attempts .*nothing in the workdir was changed" if
                               outcome is checkpoints.CheckpointReadError else "out of host memory"):
                checkpointer.restore(abstract, None, lambda: False)
    finally:
        checkpointer.close()
    assert calls == [10] * attempts and _tree_hash(workdir) == before


@pytest.mark.parametrize("damage", ["truncated", "not UTF-8", "missing"])
def test_an_unreadable_recorded_config_is_named_with_its_file(tiny_run, tmp_path, damage):
    workdir = _copy(tiny_run, tmp_path)
    step_dir = os.path.join(workdir, "checkpoints", "10")
    path = os.path.join(step_dir, "config", "metadata")
    if damage == "missing":
        os.remove(path)
    else:
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2) if damage == "truncated" else f.write(b"\xff\xfe")
    reason = {"truncated": "not valid JSON", "not UTF-8": "not UTF-8 text", "missing": "FileNotFoundError"}[damage]
    with pytest.raises(checkpoints.UnreadableCheckpointError,
                       match=rf"Checkpoint {step_dir} is unreadable \(its recorded config {step_dir}/config: {reason}"):
        checkpoints.read_config(step_dir)


@pytest.mark.parametrize("damage", ["state_metadata", "iterator", "config"])
def test_an_unreadable_latest_step_falls_back_to_the_step_before(tiny_run, tmp_path, damage):
    workdir = _copy(tiny_run, tmp_path)
    step_dir = os.path.join(workdir, "checkpoints", "10")
    if damage == "state_metadata":
        os.remove(os.path.join(step_dir, "default", "_METADATA"))
    elif damage == "config":
        with open(os.path.join(step_dir, "config", "metadata"), "r+b") as f:
            f.truncate(100)
    else:
        path = os.path.join(workdir, "checkpoints", "data", "10", "process_0", pipeline.STATE_FILE)
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    result = run_main(workdir, "--config.train.steps=12", "--config.train.checkpoint_every=4",
                      "--config.train.log_every=1", NO_EVAL)
    assert f"Checkpoint {step_dir} is unreadable" in result.stderr
    assert "training resumes from step 8" in result.stderr and "Resuming training at step 8 of 12" in result.stderr
    assert os.path.isdir(step_dir + ".unreadable")
    assert sorted(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit()) == [8, 12]


def test_a_changed_width_on_resume_is_named_before_compiling(tiny_run, tmp_path):
    workdir = _copy(tiny_run, tmp_path)
    result = run_main(workdir, "--config.model.image.width=64", "--config.train.steps=12", check=False, timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "config.model.image.width=32 -> 64" in result.stderr and workdir in result.stderr
    assert "FLOPs per step" not in result.stderr and "Traceback" not in result.stderr


def test_an_old_layout_workdir_with_a_changed_width_is_named_and_left_unchanged(tiny_run, tmp_path):
    workdir = _copy(tiny_run, tmp_path)
    for config_dir in glob.glob(os.path.join(workdir, "checkpoints", "*", "config")):
        shutil.rmtree(config_dir)  # checkpoints written before configs were recorded
    before = _tree_hash(workdir)
    result = run_main(workdir, "--config.model.image.width=64", "--config.train.steps=12", NO_EVAL, check=False,
                      timeout=180)
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"The checkpoints in {workdir} were written with other model settings (likely " in result.stderr
    assert "config.model.image.width=64 (the checkpoint's 32)" in result.stderr
    assert "record no config" in result.stderr and "Nothing in the workdir was changed" in result.stderr
    assert "unreadable" not in result.stderr and "Traceback" not in result.stderr
    assert _tree_hash(workdir) == before


def test_fewer_steps_than_the_workdir_has_done_is_an_error(tiny_run, tmp_path):
    workdir = _copy(tiny_run, tmp_path)
    result = run_main(workdir, "--config.train.steps=5", check=False, timeout=120)
    assert result.returncode == 2
    assert f"config.train.steps=5 is below the step 10 that {workdir} has reached" in result.stderr
