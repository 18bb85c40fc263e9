"""The Colab inference notebook runs top to bottom against a tiny demo checkpoint and draws its figures."""

import os

import nbformat
from nbclient import NotebookClient

from tests.helpers import REPO

NOTEBOOK = os.path.join(REPO, "notebooks", "clippy_inference.ipynb")


def test_notebook_executes_and_produces_figures(tiny_run, monkeypatch):
    monkeypatch.setenv("CLIPPY_CHECKPOINT", tiny_run[0])
    monkeypatch.setenv("CLIPPY_MODEL_CONFIG", "configs/demo.py:size=tiny")
    monkeypatch.setenv("CLIPPY_IMAGE_SIZE", "64")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": REPO}}).execute()
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    errors = [out for cell in code_cells for out in cell.outputs if out.output_type == "error"]
    assert not errors, errors
    figures = [out for cell in code_cells for out in cell.outputs if "image/png" in out.get("data", {})]
    assert len(figures) == 4  # the image, the segmentation, the groups, the labels
    printed = "".join(out.get("text", "") for cell in code_cells for out in cell.outputs)
    assert "labels found:" in printed
