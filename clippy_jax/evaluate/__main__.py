"""Evaluates a checkpoint from the command line:

    python -m clippy_jax.evaluate --config=configs/eval.py:voc --config.init_from=DIR --workdir=OUT

`config.init_from` is a training workdir / checkpoint step (which records its config; steps written
before that need `--config.model_config=<training config>`) or a converted checkpoint (`python -m
clippy_jax.convert`); see clippy_jax/evaluate/README.md. Results
land in OUT: `results.json`, `results.md` and TensorBoard events (scalars, tables, overlays).
"""

import os

# XLA runs LAPACK (the eigensolver of PCA grouping) inside its own CPU thread pool; OpenBLAS's extra
# threads only contend with it (30 s instead of 0.2 s for 8 512x512 eigh on 2 busy cores). Set before
# numpy / scipy load OpenBLAS.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from clippy_jax import cli, distributed, logs, sharding  # noqa: E402
from clippy_jax.evaluate import loading, runner  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", cli.config_file("configs/eval.py"),
                                          "Evaluation configuration file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for the results and TensorBoard events.", required=True)
_TRACEBACK = cli.traceback_flag()


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise cli.BadInput(f"unexpected arguments {argv[1:]}: every setting is a flag (--config.init_from=...).")
    tf.config.set_visible_devices([], "GPU")  # TensorFlow only reads data; leave accelerators to JAX.
    logs.quiet_libraries()
    distributed.initialize()
    logs.start_backends()
    config = _CONFIG.value
    workdir = _WORKDIR.value if _WORKDIR.value.startswith("gs://") else os.path.abspath(_WORKDIR.value)
    try:
        loaded = loading.load(config)
    except (OSError, ValueError) as error:  # a checkpoint, config or tokenizer that is missing or does not fit
        raise cli.BadInput(str(error)) from error
    logging.info("Evaluating %s (step %d) on %s.", config.init_from, loaded.step, ", ".join(config.eval.evaluators))
    mesh = sharding.make_mesh(config.mesh)
    writer = runner.create_writer(workdir)
    evaluator = runner.Evaluator(config, loaded.model, loaded.tokenizer, loaded.data_config, mesh, writer, workdir)
    evaluator(jax.device_put(loaded.params, sharding.replicated(mesh)), loaded.step)
    writer.close()
    logging.info("Results: %s; TensorBoard: tensorboard --logdir %s", os.path.join(workdir, "results.md"), workdir)


def run() -> None:
    """The `clippy-evaluate` console command."""
    jax.config.config_with_absl()
    cli.run(main, _TRACEBACK)


if __name__ == "__main__":
    run()
