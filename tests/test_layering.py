"""The package's layering: evaluation and inference stand on their own, without the training code, and
inference without TensorFlow."""

import ast
import pathlib
import subprocess
import sys

from PIL import Image

from clippy_jax.data import synthetic
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


_WITHOUT_TENSORFLOW = """
import importlib.machinery, sys

class NoTensorFlow(importlib.machinery.PathFinder):  # TensorFlow as if not installed: find_spec finds nothing
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.split(".")[0] in ("tensorflow", "tensorflow_datasets", "tensorflow_text"):
            return None
        return super().find_spec(name, path, target)

sys.meta_path[sys.meta_path.index(importlib.machinery.PathFinder)] = NoTensorFlow
"""


def test_inference_segment_and_metrics_run_without_tensorflow(tiny_run, tmp_path):
    """The inference API, the segment command and the metrics on a checkpoint, in a process that cannot
    import TensorFlow. (`sys.modules['tensorflow'] = None` would not do: einops then takes TensorFlow for
    loaded and fails importing it.)"""
    Image.fromarray(synthetic.make_example(seed=2024, index=3).image).save(tmp_path / "scene.png")
    code = _WITHOUT_TENSORFLOW + f"""
import numpy as np
from clippy_jax.evaluate import metrics
from clippy_jax.inference import Clippy, read_image
clippy = Clippy.load({tiny_run[0]!r})
image = read_image({str(tmp_path / "scene.png")!r})
labels = clippy.segment(image, ["zebra", "sand"], render=True).labels
assert clippy.group(image, num_groups=3).groups.shape == labels.shape == (64, 64)
miou, _ = metrics.iou_from_confusion(np.array([[2, 1], [0, 1]]))
assert abs(miou - (2 / 3 + 1 / 2) / 2) < 1e-6, miou
sys.argv = ["clippy-segment", "--checkpoint={tiny_run[0]}", "--image={tmp_path / 'scene.png'}", "--prompts=zebra,sand",
            "--output={tmp_path / 'out'}"]
from clippy_jax import segment
try:
    segment.run()
except SystemExit as exit:
    assert not exit.code, exit.code
print(sorted(m for m in sys.modules if m.startswith("tensorflow")))
"""
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                            check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"
    assert (tmp_path / "out" / "scene_overlay.png").exists()
