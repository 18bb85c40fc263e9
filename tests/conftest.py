"""Test session set-up: 8 forced host CPU devices (before JAX is imported) and quiet TensorFlow."""

import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# torch._dynamo loads triton when timm / transformers models are imported, and triton segfaults in a
# process that has already imported TensorFlow; the CPU reference models never need it.
sys.modules.setdefault("triton", None)


import pytest  # noqa: E402

TINY_RUN_FLAGS = ("--config.train.steps=10", "--config.train.checkpoint_every=4", "--config.train.log_every=1",
                  "--config.eval.every_steps=4")
# The CNN tower's tiny run: checkpoints every 2 steps, no evaluation (its train step takes most of the time).
CNN_CONFIG = "configs/demo.py:tower=efficientnet,size=tiny"
CNN_RUN_FLAGS = ("--config.train.steps=10", "--config.train.checkpoint_every=2", "--config.train.log_every=1",
                 "--config.eval.evaluators=()")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """(workdir, completed process) of one tiny demo run: 10 steps, checkpoints at 8 and 10, evaluations at
    4, 8 and 10, results."""
    from tests.helpers import run_main

    workdir = str(tmp_path_factory.mktemp("tiny"))
    return workdir, run_main(workdir, *TINY_RUN_FLAGS)


@pytest.fixture(scope="session")
def cnn_env(tmp_path_factory) -> dict[str, str]:
    """The environment of the CNN runs: one persistent XLA compilation cache, so that the runs after the first
    load its train step (a minute of XLA:CPU compilation) instead of compiling it again."""
    return dict(JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("xla_cache")),
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")


@pytest.fixture(scope="session")
def tiny_cnn_run(tiny_run, cnn_env, tmp_path_factory):
    """(workdir, completed process) of one tiny run of the EfficientNet tower (`CNN_CONFIG`, `CNN_RUN_FLAGS`) on
    the demo data of `tiny_run` (the same synthetic settings)."""
    from tests.helpers import run_main

    workdir = tmp_path_factory.mktemp("tiny_cnn")
    os.symlink(os.path.join(tiny_run[0], "data"), workdir / "data")
    return str(workdir), run_main(str(workdir), *CNN_RUN_FLAGS, config=CNN_CONFIG, env=cnn_env)


_EXIT_STATUS = {}


def pytest_sessionfinish(session, exitstatus):
    _EXIT_STATUS["value"] = int(exitstatus)


def pytest_unconfigure(config):
    """Ends the process with pytest's exit status once everything is reported, skipping the interpreter's
    teardown: with TensorFlow's and XLA's native threads still alive it occasionally aborted ("terminate
    called without an active exception") after all tests had passed, turning a green run red."""
    if "value" in _EXIT_STATUS:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_EXIT_STATUS["value"])
