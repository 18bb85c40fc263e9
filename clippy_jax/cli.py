"""What the command-line entry points share: config files found from any folder, `--help` that lists the
command's flags when it runs as an installed console script (`clippy-train`, ...), and failures in one line
(exit 2 for bad input, 1 otherwise; `--traceback` adds the traceback).

Config files: `--config=PATH[:arguments]` reads PATH when it exists; otherwise a config name (`demo`,
`demo.py` or `configs/demo.py`) reads the package's copy of the checkout's `configs/` (shipped in the
wheel, `clippy_jax/configs` links to it), so that `clippy-train --config=demo` works from any folder.
"""

import os
import sys
from collections.abc import Callable

from absl import app, flags, logging

CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


class ConfigNotFoundError(ValueError):
    """A --config that names no file and no shipped config."""


def shipped_configs() -> list[str]:
    return sorted(n[:-3] for n in os.listdir(CONFIGS) if n.endswith(".py")) if os.path.isdir(CONFIGS) else []


def config_file(spec: str, flag: str = "--config") -> str:
    """`PATH[:arguments]` with PATH an existing file, or resolved to a shipped config (see the module docstring)."""
    path, colon, arguments = spec.partition(":")
    if os.path.isfile(path):
        return spec
    name = os.path.basename(path)
    name = name if name.endswith(".py") else f"{name}.py"
    shipped = os.path.join(CONFIGS, name)
    if os.path.normpath(path) in (name, name[:-3], os.path.join("configs", name)) and os.path.isfile(shipped):
        return shipped + colon + arguments
    what = "is a directory" if os.path.isdir(path) else f"does not exist (in {os.getcwd()})"
    raise ConfigNotFoundError(f"{flag}={spec}: {path} {what}; pass a config file or a shipped config: "
                              f"{', '.join(shipped_configs())} (e.g. {flag}=demo).")


def resolve_config_flags(argv: list[str], flag: str = "--config") -> list[str]:
    """`argv` with each `--config=SPEC` / `--config SPEC` resolved by `config_file`."""
    resolved = list(argv)
    for i, arg in enumerate(argv):
        if arg.startswith(f"{flag}="):
            resolved[i] = f"{flag}={config_file(arg.partition('=')[2], flag)}"
        elif arg == flag and i + 1 < len(argv):
            resolved[i + 1] = config_file(argv[i + 1], flag)
    return resolved


def list_flags_in_help(module_name: str) -> None:
    """Makes the flags of `module_name` (and `traceback_flag`) the key flags of the running program, which
    absl's `--help` lists (those of `sys.argv[0]`: the module's own path under `python -m`, not a console
    script's)."""
    module = sys.argv[0] if module_name == "__main__" else module_name
    shared = [flags.FLAGS["traceback"]] if "traceback" in flags.FLAGS else []
    for flag in [*flags.FLAGS.get_key_flags_for_module(module), *shared]:
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)


def traceback_flag() -> flags.FlagHolder[bool]:
    """The `--traceback` flag, defined by the first command module imported (several may share a process)."""
    if "traceback" in flags.FLAGS:
        return flags.FlagHolder(flags.FLAGS, flags.FLAGS["traceback"])
    return flags.DEFINE_bool("traceback", False, "Print the traceback of a failure, not only its one-line message.")


class BadInput(Exception):
    """A flag, setting or file the user gave cannot be used: reported in one line, exit `EXIT_BAD_INPUT`."""


EXIT_FAILED, EXIT_BAD_INPUT = 1, 2


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing (configs resolved by `resolve_config_flags`); a bad flag: one line, exit 2."""
    try:
        return flags.FLAGS(resolve_config_flags(argv))
    except (flags.Error, ConfigNotFoundError) as error:
        print(f"{os.path.basename(argv[0])}: error in the flags: {error}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)


def run(main: Callable[[list[str]], None], traceback: flags.FlagHolder[bool]) -> None:
    """`app.run(main)` with `parse_flags`, the flags listed by `--help`, and each failure in one line: `BadInput`
    exits 2, any other error 1; `traceback` (a --traceback flag) adds the traceback."""
    def one_line_errors(argv: list[str]) -> None:
        try:
            main(argv)
        except Exception as error:  # noqa: BLE001 (one line, then exit)
            if traceback.value:
                logging.exception("Traceback of the failure:")
            bad = isinstance(error, BadInput)
            message = str(error) if bad else f"{type(error).__name__}: {error}"
            hint = "" if bad or traceback.value else " (--traceback for details)"
            print(f"{os.path.basename(sys.argv[0])}: error: {message}{hint}", file=sys.stderr)
            sys.exit(EXIT_BAD_INPUT if bad else EXIT_FAILED)

    list_flags_in_help(main.__module__)
    app.run(one_line_errors, flags_parser=parse_flags)
