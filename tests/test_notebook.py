"""The Colab inference notebook runs top to bottom from notebooks/ (Jupyter's default folder) against
the tiny demo checkpoint, with the image size from the checkpoint's recorded config, and draws its figures."""

import importlib.metadata
import os

import nbformat
from nbclient import NotebookClient

from tests.helpers import REPO

NOTEBOOK = os.path.join(REPO, "notebooks", "clippy_inference.ipynb")


def test_notebook_executes_from_its_folder_and_produces_figures(tiny_run, monkeypatch):
    monkeypatch.setenv("CLIPPY_CHECKPOINT", tiny_run[0])
    for name in ("CLIPPY_MODEL_CONFIG", "CLIPPY_IMAGE_SIZE", "CLIPPY_ROOT"):
        monkeypatch.delenv(name, raising=False)
    try:
        importlib.metadata.distribution("clippy_jax")
    except importlib.metadata.PackageNotFoundError:  # a development environment without `pip install -e .`
        monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(notebook, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}}).execute()
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    errors = [out for cell in code_cells for out in cell.outputs if out.output_type == "error"]
    assert not errors, errors
    figures = [out for cell in code_cells for out in cell.outputs if "image/png" in out.get("data", {})]
    assert len(figures) == 4  # the image, the segmentation, the groups, the labels
    printed = "".join(out.get("text", "") for cell in code_cells for out in cell.outputs)
    assert "labels found:" in printed and f"repository: {REPO}" in printed
    assert "shorter side at 64 pixels" in printed  # configs/demo.py's data.image_size, from the recorded config
