"""Console logging: the libraries' own progress reports and native start-up lines stay out.

Python logging: orbax logs every step of every checkpoint save at INFO (two thirds of the demo's
console before), CLU and JAX's backend discovery add more; `quiet_libraries()` keeps their warnings
and errors and drops the rest.

Native (C++) logging of TensorFlow, which reads as errors on a normal run: its start-up lines written
before absl::InitializeLog (oneDNN and CUDA stubs, printed whatever the log level), its CUDA probing on
a machine without a GPU (`failed call to cuInit`) and oneDNN's int64 fallback note. `quiet_native_libraries()`,
called on `import clippy_jax` before TensorFlow can load, sets TF_CPP_MIN_LOG_LEVEL=3 (unless set) and
sends the native stderr of TensorFlow's import to /dev/null (Python errors still raise).

JAX's accelerator plugins (the CUDA plugin and libtpu, installed by `.[aot]`) print tracebacks and errors when
they start on a machine without their device: `start_backends()` holds them back there (see its doc).

Set `CLIPPY_VERBOSE_LIBRARIES=1` to see everything.
"""

import contextlib
import importlib.abc
import importlib.util
import logging
import os
import sys
import tempfile
from collections.abc import Iterator
from typing import BinaryIO

from absl import logging as absl_logging

QUIET_PACKAGES = ("orbax", "clu", "jax", "tensorflow")  # packages whose INFO and DEBUG records are dropped
QUIET_IMPORTS = ("tensorflow",)  # packages whose native libraries print to stderr while they load


def verbose() -> bool:
    return os.environ.get("CLIPPY_VERBOSE_LIBRARIES") == "1"


class _LibraryFilter(logging.Filter):
    def __init__(self):
        super().__init__()
        specs = [importlib.util.find_spec(name) for name in QUIET_PACKAGES]
        self.roots = tuple(os.path.join(path, "") for spec in specs if spec for path in spec.submodule_search_locations)

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or not record.pathname.startswith(self.roots)


def quiet_libraries() -> None:
    """Drops the INFO and DEBUG records of `QUIET_PACKAGES` from absl's handler (all Python logging)."""
    if verbose():
        return
    handler = absl_logging.get_absl_handler()
    if not any(isinstance(f, _LibraryFilter) for f in handler.filters):
        handler.addFilter(_LibraryFilter())


@contextlib.contextmanager
def native_stderr_to(file: BinaryIO) -> Iterator[None]:
    """Sends what is written to file descriptor 2 (native code, and Python's `sys.stderr`) to `file` meanwhile."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        os.dup2(file.fileno(), 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


@contextlib.contextmanager
def native_stderr_silenced() -> Iterator[None]:
    """Sends what native code writes to file descriptor 2 to /dev/null meanwhile."""
    with open(os.devnull, "wb") as devnull, native_stderr_to(devnull):
        yield


def start_backends() -> None:
    """Starts JAX's backends. Installed accelerator plugins that find no device (the CUDA plugin and libtpu of
    `.[aot]` on a CPU machine) print tracebacks and native errors while they start: these are held back and
    replaced by one line when JAX ends up on the CPU, and printed as they were when an accelerator started."""
    import jax

    if verbose():
        jax.devices()
        return
    with tempfile.TemporaryFile() as captured:
        with native_stderr_to(captured):
            jax.devices()
        captured.seek(0)
        messages = captured.read().decode(errors="replace")
    if not messages.strip():
        return
    if jax.default_backend() != "cpu":
        sys.stderr.write(messages)
    else:
        absl_logging.info("No GPU or TPU found: JAX runs on the CPU (the accelerator plugins' start-up messages "
                          "were held back; CLIPPY_VERBOSE_LIBRARIES=1 shows them).")


class _SilentLoader(importlib.abc.Loader):
    """Runs a module's loader with the native stderr silenced."""

    def __init__(self, loader: importlib.abc.Loader):
        self.loader = loader

    def __getattr__(self, name: str):  # the wrapped loader's other methods (resources, source, ...)
        return getattr(self.loader, name)

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        with native_stderr_silenced():
            self.loader.exec_module(module)


class _SilentImports(importlib.abc.MetaPathFinder):
    """Finds `QUIET_IMPORTS` (top-level packages) with a `_SilentLoader`, the first time each is imported."""

    def find_spec(self, name, path, target=None):
        if path is not None or name not in QUIET_IMPORTS or name in sys.modules:
            return None
        for finder in sys.meta_path:
            if finder is not self and hasattr(finder, "find_spec"):
                spec = finder.find_spec(name, path, target)
                if spec is not None and spec.loader is not None:
                    spec.loader = _SilentLoader(spec.loader)
                    return spec
        return None


def quiet_native_libraries() -> None:
    """TensorFlow's native logging off (see the module docstring); call before TensorFlow is imported."""
    if verbose():
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if not any(isinstance(finder, _SilentImports) for finder in sys.meta_path):
        sys.meta_path.insert(0, _SilentImports())
