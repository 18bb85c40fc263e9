"""Shared test utilities: running the entry point in a subprocess and reading TensorBoard events."""

import glob
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import tensorflow as tf

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# A log record in absl's format: Python's (`main.py:55]`) and the native libraries' (`port.cc:153]`).
_RECORD = re.compile(r"^[IWEF]\d{4} [\d:.]+ +\d+ ([\w.]+):\d+\] ")


def user_env() -> dict[str, str]:
    """The environment of a command as a user starts it: without the test session's TF_CPP_MIN_LOG_LEVEL."""
    return {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}


def foreign_lines(console: str) -> list[str]:
    """The lines of a command's console that are not the project's: log records of files outside clippy_jax
    (native C++ libraries, other packages) with their continuation lines, tracebacks, absl's pre-init notice."""
    project = {path.name for path in pathlib.Path(REPO, "clippy_jax").rglob("*.py")}
    foreign, ours = [], True
    for line in console.splitlines():
        record = _RECORD.match(line)
        if record:
            ours = record.group(1) in project
        if not ours or line.startswith("Traceback") or "absl::InitializeLog" in line:
            foreign.append(line)
    return foreign


def main_command(workdir: str, *flags: str, config: str = "configs/demo.py:size=tiny") -> list[str]:
    return [sys.executable, "-m", "clippy_jax.main", f"--config={config}", f"--workdir={workdir}", *flags]


def run_main(workdir: str, *flags: str, config: str = "configs/demo.py:size=tiny", timeout: int = 300,
             check: bool = True, env: dict[str, str] | None = None,
             replace_env: bool = False) -> subprocess.CompletedProcess:
    """Runs the entry point as a user starts it (`user_env`), with the variables of `env` added (`replace_env`:
    `env` alone)."""
    result = subprocess.run(main_command(workdir, *flags, config=config), cwd=REPO, capture_output=True, text=True,
                            check=False, timeout=timeout, env=env if replace_env else {**user_env(), **(env or {})})
    if check and result.returncode:
        raise AssertionError(f"main failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result


def kill_after_checkpoint(workdir: str, step: int, *flags: str, config: str = "configs/demo.py:size=tiny",
                          env: dict[str, str] | None = None) -> None:
    """Starts the entry point as `run_main` does and kills it (SIGKILL) once the checkpoint of `step` appears."""
    process = subprocess.Popen(main_command(workdir, *flags, config=config), cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, env={**user_env(), **(env or {})})
    deadline = time.time() + 300
    while not os.path.isdir(os.path.join(workdir, "checkpoints", str(step))) and process.poll() is None:
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not os.path.exists(os.path.join(workdir, "results.json")), "the run finished before it was killed"


def read_scalars(workdir: str, tag: str) -> dict[int, float]:
    """{step: value} of a scalar tag over all event files in `workdir` (later files win)."""
    values = {}
    for path in sorted(glob.glob(os.path.join(workdir, "events.out.tfevents.*")), key=os.path.getmtime):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                if value.tag == tag:
                    values[event.step] = float(tf.make_ndarray(value.tensor)) if value.HasField("tensor") \
                        else value.simple_value
    return values
