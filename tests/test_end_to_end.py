"""The entry point end to end on the tiny demo config: artifacts, resume after kill -9, bad input."""

import json
import os
import re
import time

import numpy as np
import pytest

from tests.conftest import TINY_RUN_FLAGS
from tests.helpers import foreign_lines, kill_after_checkpoint, read_scalars, run_main, user_env


def test_tiny_run_leaves_checkpoint_events_and_results(tiny_run):
    workdir, result = tiny_run
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["10", "8", "data"]
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(workdir))
    with open(os.path.join(workdir, "results.json")) as f:
        results = json.load(f)
    miou = results["evaluations"]["synthetic_segmentation"]["miou"]
    assert 0.0 <= miou <= 1.0
    assert "mIoU" in open(os.path.join(workdir, "results.md")).read()
    losses = read_scalars(workdir, "train/loss")
    assert sorted(losses) == list(range(1, 11)) and all(np.isfinite(list(losses.values())))
    assert read_scalars(workdir, "synthetic_segmentation/miou")[10] == pytest.approx(miou)



def test_console_shows_progress_lines_and_where_the_results_are_without_library_chatter(tiny_run):
    workdir, result = tiny_run
    lines = result.stderr.splitlines()
    progress = [line for line in lines
                if re.search(r"step \d+/10 \(\d+%\) \| loss \d+\.\d+ \| [\d.]+ examples/s \| ETA \d+:\d\d:\d\d$", line)]
    assert len(progress) == 10  # log_every=1
    orbax_sources = ("checkpoint_manager.py", "async_checkpointer.py", "atomicity.py", "event_tracking.py",
                     "logging_writer.py", "local.py", "functional_saver.py", "_schedule.py")
    assert not [line for line in lines if any(f" {source}:" in line for source in orbax_sources)]
    assert "Hyperparameters (also in TensorBoard's HPARAMS tab" in result.stderr
    assert max(len(line) for line in lines) < 400  # before: a 2,183-character hyperparameter line
    assert lines[-1].endswith(f"Results: {workdir}/results.md | TensorBoard: tensorboard --logdir {workdir} | "
                              f"checkpoint: {workdir}/checkpoints/10")
    with open(os.path.join(workdir, "checkpoints", "10", "config", "metadata")) as f:  # orbax's JsonSave item
        assert json.load(f)["train"]["steps"] == 10
    assert os.path.exists(os.path.join(workdir, "tokenizer.model"))
    assert foreign_lines(result.stdout + result.stderr) == []  # before: 69 of 101 lines (C++ logs of TensorFlow)


def test_accelerator_plugins_without_their_device_leave_one_line_on_a_cpu_machine(tmp_path):
    """As a user starts the command after `make test` (the `.[aot]` CUDA plugin and libtpu installed, JAX's platform
    not set): their start-up tracebacks and native errors are held back for one line; verbose shows them (the
    control). The run stops at the config checks, which come after the backends start."""
    env = {k: v for k, v in user_env().items() if k != "JAX_PLATFORMS"}
    consoles = {}
    for verbose in ("0", "1"):
        result = run_main(str(tmp_path / verbose), "--config.train.steps=0", check=False,
                          env={**env, "CLIPPY_VERBOSE_LIBRARIES": verbose}, replace_env=True)
        assert result.returncode == 2 and "config.train.steps=0 must be >= 1" in result.stderr, result.stderr[-2000:]
        consoles[verbose] = result.stdout + result.stderr
    assert foreign_lines(consoles["1"]), consoles["1"][-2000:]
    assert foreign_lines(consoles["0"]) == [] and "Traceback" not in consoles["0"], consoles["0"][-2000:]
    assert "No GPU or TPU found: JAX runs on the CPU" in consoles["0"]


def test_foreign_lines_are_the_libraries_records_and_their_continuations():
    console = """WARNING: All log messages before absl::InitializeLog() is called are written to STDERR
I0000 00:00:1796436994.514743    5653 port.cc:153] oneDNN custom operations are on.
I1205 02:16:57.598167 140479819553664 loop.py:278] step 2/10 (20%) | loss 5.9905
W0000 00:00:1796437016.597761    5653 type_inference.cc:340] Type inference failed. This indicates an invalid graph
  type_id: TFT_PRODUCT
I1205 02:16:57.598167 140479819553664 loop.py:197] Hyperparameters:
  data: crop=random
E1205 02:16:57.598167 140479819553664 xla_bridge.py:508] Jax plugin configuration error
Traceback (most recent call last):"""
    assert foreign_lines(console) == [line for i, line in enumerate(console.splitlines()) if i not in (2, 5, 6)]


def test_a_finished_run_run_again_exits_without_compiling_or_evaluating(tiny_run):
    workdir, _ = tiny_run
    files = {name: os.path.getmtime(os.path.join(workdir, name)) for name in os.listdir(workdir)}
    start = time.time()
    result = run_main(workdir, *TINY_RUN_FLAGS)
    seconds = time.time() - start
    assert "This run already finished: 10 of 10 steps" in result.stderr and "Results: " in result.stderr
    assert "XLA:" not in result.stderr and "mIoU" not in result.stderr  # no compilation, no evaluation
    assert {name: os.path.getmtime(os.path.join(workdir, name)) for name in os.listdir(workdir)} == files
    print(f"rerun of a finished run: {seconds:.1f} s")


def test_resume_after_kill_follows_the_uninterrupted_run(tiny_run, tmp_path):
    reference = read_scalars(tiny_run[0], "train/loss")
    workdir = str(tmp_path)
    # The first run shares the demo data of the reference run so that only training differs.
    os.symlink(os.path.join(tiny_run[0], "data"), os.path.join(workdir, "data"))
    kill_after_checkpoint(workdir, 4, *TINY_RUN_FLAGS)

    result = run_main(workdir, *TINY_RUN_FLAGS)
    assert "Resuming training at step 4" in result.stderr or "Resuming training at step 8" in result.stderr
    resumed = read_scalars(workdir, "train/loss")
    assert sorted(resumed) == list(range(1, 11))
    np.testing.assert_array_equal([resumed[s] for s in range(5, 11)], [reference[s] for s in range(5, 11)])


@pytest.mark.parametrize(
    ("flags", "config", "message"),
    [
        ((), "configs/demo.py:size=tiny,pool=median", "model.image_pool='median'"),
        (("--config.train.batch_size=12",), "configs/demo.py:size=tiny", "config.train.batch_size=12"),
        (("--config.train.no_such_key=1",), "configs/demo.py:size=tiny", "no_such_key"),
        (("--config.mesh.model=3",), "configs/demo.py:size=tiny", "config.mesh"),
    ],
)
def test_bad_settings_fail_before_compilation_naming_the_setting(tmp_path, flags, config, message):
    result = run_main(str(tmp_path), *flags, config=config, check=False, timeout=120)
    assert result.returncode != 0
    assert message in result.stderr
    assert not os.path.exists(os.path.join(tmp_path, "data")), "failed only after generating data"
