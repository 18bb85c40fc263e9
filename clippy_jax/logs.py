"""Console logging of the command-line entry points: the libraries' own progress reports stay out.

Orbax logs every step of every checkpoint save at INFO (two thirds of the demo's console before),
CLU and JAX's backend discovery add more; `quiet_libraries()` keeps their warnings and errors and
drops the rest. Set `CLIPPY_VERBOSE_LIBRARIES=1` to see everything.
"""

import importlib.util
import logging
import os

from absl import logging as absl_logging

QUIET_PACKAGES = ("orbax", "clu", "jax", "tensorflow")  # packages whose INFO and DEBUG records are dropped


class _LibraryFilter(logging.Filter):
    def __init__(self):
        super().__init__()
        specs = [importlib.util.find_spec(name) for name in QUIET_PACKAGES]
        self.roots = tuple(os.path.join(path, "") for spec in specs if spec for path in spec.submodule_search_locations)

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or not record.pathname.startswith(self.roots)


def quiet_libraries() -> None:
    """Drops the INFO and DEBUG records of `QUIET_PACKAGES` from absl's handler (all Python logging)."""
    if os.environ.get("CLIPPY_VERBOSE_LIBRARIES") == "1":
        return
    handler = absl_logging.get_absl_handler()
    if not any(isinstance(f, _LibraryFilter) for f in handler.filters):
        handler.addFilter(_LibraryFilter())
