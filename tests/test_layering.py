"""The package's layering: evaluation and inference stand on their own, without the training code."""

import ast
import pathlib
import subprocess
import sys

from tests.helpers import REPO

EVALUATE = pathlib.Path(REPO) / "clippy_jax" / "evaluate"


def _imported_modules(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module, *(f"{node.module}.{alias.name}" for alias in node.names)}
    return names


def test_no_evaluation_module_imports_the_training_package():
    offenders = {path.name: sorted(m for m in _imported_modules(path) if m.startswith("clippy_jax.train"))
                 for path in EVALUATE.rglob("*.py")}
    assert not {name: modules for name, modules in offenders.items() if modules}


def test_evaluation_and_inference_load_without_the_training_package():
    """Not even through another module: importing them leaves `clippy_jax.train` unloaded."""
    code = ("import sys\n"
            "import clippy_jax.evaluate.__main__, clippy_jax.evaluate.runner\n"
            "import clippy_jax.inference, clippy_jax.segment\n"
            "print(sorted(m for m in sys.modules if m.startswith('clippy_jax.train')))\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True,
                            timeout=300)
    assert result.stdout.strip().splitlines()[-1] == "[]"
