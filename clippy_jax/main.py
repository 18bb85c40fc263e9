"""Entry point: `python -m clippy_jax.main --config=configs/demo.py --workdir=DIR`.

Config overrides use ml_collections flags, e.g. `--config.train.steps=200`, and config string
arguments, e.g. `--config=configs/demo.py:pool=avg`. Installed, the same command is `clippy-train`.
A finished run, run again, reports where its results are and exits; `--reevaluate` evaluates it again.
"""

import os
import sys

import jax
import tensorflow as tf
from absl import app, flags, logging
from ml_collections import config_flags

from clippy_jax import distributed, logs
from clippy_jax.train.loop import train_and_evaluate

_CONFIG = config_flags.DEFINE_config_file("config", "configs/demo.py", "Training configuration file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "workdirs/demo", "Directory for checkpoints, logs and results.")
_REEVALUATE = flags.DEFINE_bool("reevaluate", False, "Evaluate a finished run again (otherwise it just exits).")


def _suggest_huge_pages() -> None:
    """XLA:CPU maps fresh buffers every step; on Linux, glibc can back them with huge pages (BENCHMARKS.md)."""
    if jax.default_backend() == "cpu" and sys.platform == "linux" and "hugetlb" not in os.environ.get(
            "GLIBC_TUNABLES", ""):
        logging.info("Training on the CPU: export GLIBC_TUNABLES=glibc.malloc.hugetlb=1 before starting Python for "
                     "about 25% faster steps (BENCHMARKS.md, 'CPU memory pages'; `make demo` does it).")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    tf.config.set_visible_devices([], "GPU")  # TensorFlow only feeds data; leave accelerators to JAX.
    logs.quiet_libraries()
    distributed.initialize()
    logging.info("JAX process %d of %d, %d local devices, %d in all.", jax.process_index(), jax.process_count(),
                 jax.local_device_count(), jax.device_count())
    _suggest_huge_pages()
    workdir = _WORKDIR.value
    if not workdir.startswith("gs://"):
        workdir = os.path.abspath(workdir)
    train_and_evaluate(_CONFIG.value, workdir, reevaluate=_REEVALUATE.value)


def run() -> None:
    """The `clippy-train` console command."""
    jax.config.config_with_absl()
    app.run(main)


if __name__ == "__main__":
    run()
