"""Entry point: `python -m clippy_jax.main --config=configs/demo.py --workdir=DIR`.

Config overrides use ml_collections flags, e.g. `--config.train.steps=200`, and config string
arguments, e.g. `--config=configs/demo.py:pool=avg`. Installed, the same command is `clippy-train`.
A finished run, run again, reports where its results are and exits; `--reevaluate` evaluates it again.

Exit codes: 0 trained and evaluated; 1 failed (e.g. a non-finite loss); 2 bad settings, data or
workdir (one line naming the setting); 75 stopped by a termination signal, rerun to resume (a
relaunch loop restarts on 75 only). Failures print one line; `--traceback` adds the traceback.
"""

import contextlib
import os
import re
import sys

import jax
import tensorflow as tf
from absl import app, flags, logging
from ml_collections import config_flags

from clippy_jax import cli, config_checks, distributed, logs
from clippy_jax.data.pipeline import InputStalledError
from clippy_jax.data.sources import DataError
from clippy_jax.evaluate import loading
from clippy_jax.train.loop import TrainingStopped, train_and_evaluate

# ml_collections' hint for a misspelt config key.
_DID_YOU_MEAN = re.compile(r'Did you mean "([^"]+)" instead of "([^"]+)"')
EXIT_FAILED, EXIT_BAD_INPUT, EXIT_STOPPED = 1, 2, 75
# Errors in what the user gave (settings, data, workdir): exit EXIT_BAD_INPUT.
BAD_INPUT_ERRORS = (config_checks.ConfigError, DataError, InputStalledError, FileNotFoundError)

DEFAULT_CONFIG = "configs/demo.py"
_CONFIG = config_flags.DEFINE_config_file("config", cli.config_file(DEFAULT_CONFIG), "Training configuration file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "workdirs/demo", "Directory for checkpoints, logs and results.")
_REEVALUATE = flags.DEFINE_bool("reevaluate", False, "Evaluate a finished run again (otherwise it just exits).")
_TRACEBACK = cli.traceback_flag()


def _suggest_huge_pages() -> None:
    """XLA:CPU maps fresh buffers every step; on Linux, glibc can back them with huge pages (BENCHMARKS.md)."""
    if jax.default_backend() == "cpu" and sys.platform == "linux" and "hugetlb" not in os.environ.get(
            "GLIBC_TUNABLES", ""):
        logging.info("Training on the CPU: export GLIBC_TUNABLES=glibc.malloc.hugetlb=1 before starting Python for "
                     "about 25% faster steps (BENCHMARKS.md, 'CPU memory pages'; `make demo` does it).")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        print(f"{argv[0]}: unexpected arguments {argv[1:]}: every setting is a flag (--config=..., --workdir=..., "
              "--config.section.key=value)", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    tf.config.set_visible_devices([], "GPU")  # TensorFlow only feeds data; leave accelerators to JAX.
    logs.quiet_libraries()
    distributed.initialize()
    logs.start_backends()
    logging.info("JAX process %d of %d, %d local devices, %d in all.", jax.process_index(), jax.process_count(),
                 jax.local_device_count(), jax.device_count())
    _suggest_huge_pages()
    workdir = _WORKDIR.value
    if not workdir.startswith("gs://"):
        workdir = os.path.abspath(workdir)
    try:
        train_and_evaluate(_CONFIG.value, workdir, reevaluate=_REEVALUATE.value)
    except TrainingStopped as stop:
        _exit(EXIT_STOPPED, str(stop))
    except (Exception, KeyboardInterrupt) as error:  # noqa: BLE001 (one line, then exit)
        if _TRACEBACK.value:
            logging.exception("Traceback of the failure:")
        _exit(EXIT_BAD_INPUT if isinstance(error, BAD_INPUT_ERRORS) else EXIT_FAILED,
              f"{type(error).__name__}: {error}".strip() + ("" if _TRACEBACK.value else " (--traceback for details)"))


def _exit(code: int, message: str) -> None:
    """Logs `message` and exits at once: the in-flight checkpoint is already complete (`train_and_evaluate`),
    and interpreter shutdown would add tracebacks from background threads (orbax, tf.data)."""
    (logging.warning if code == EXIT_STOPPED else logging.error)("%s", message)
    logging.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing with a one-line error (exit 2) for a bad flag or config override."""
    try:
        argv = cli.resolve_config_flags(argv)
        return flags.FLAGS(argv)
    except Exception as error:  # noqa: BLE001 (config files and overrides raise any error)
        chain = [error]
        while chain[-1].__cause__ or chain[-1].__context__:
            chain.append(chain[-1].__cause__ or chain[-1].__context__)
        messages = [str(e.args[0] if isinstance(e, KeyError | AttributeError) and e.args else e) for e in chain]
        suggestion = next((m for m in map(_DID_YOU_MEAN.search, messages) if m), None)
        unknown = next((m.strip("'\"") for e, m in zip(chain, messages) if isinstance(e, KeyError | AttributeError)),
                       None)
        message = (messages[-1] if "Traceback" in messages[0] else messages[0]).replace("\n", " ")
        if suggestion:
            flag = next((arg.split("=")[0] for arg in argv if f".{suggestion.group(2)}" in arg), "a config override")
            message = f"{flag} names an unknown key {suggestion.group(2)!r}; did you mean {suggestion.group(1)!r}?"
        elif unknown and (override := _override_naming(argv, unknown)):
            with contextlib.suppress(Exception):  # the config file's own error stays the message
                message = _unknown_key_message(argv, override, unknown)
        print(f"{argv[0]}: error in the flags: {message}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)


def _override_naming(argv: list[str], key: str) -> str | None:
    """The `--config.a.b` override of `argv` whose path contains `key`, if any."""
    return next((arg.split("=")[0].lstrip("-") for arg in argv
                 if arg.startswith("--config.") and key in arg.split("=")[0].split(".")), None)


def _unknown_key_message(argv: list[str], override: str, key: str) -> str:
    """What an override that names an unknown key could mean: the section's keys, or where the key lives."""
    spec = next((arg.split("=", 1)[1] for arg in argv if arg.startswith("--config=")), cli.config_file(DEFAULT_CONFIG))
    root = loading.load_config_file(spec)
    parts = override.split(".")[1:]
    section, config = "config", root
    for part in parts[:parts.index(key)]:
        section, config = f"{section}.{part}", config[part]
    elsewhere = [f"config.{path}" for path in config_checks.flatten(root) if path.split(".")[-1] == key]
    hint = f"did you mean {' or '.join(elsewhere)}?" if elsewhere else \
        f"the keys of {section} are {', '.join(sorted(config.keys()))}"
    return f"--{override} names an unknown key {key!r} of {section}; {hint}" + ("" if elsewhere else ".")


def run() -> None:
    """The `clippy-train` console command."""
    jax.config.config_with_absl()
    cli.list_flags_in_help(__name__)
    app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
    run()
