"""A training workdir describes itself: its checkpoints carry their config and the workdir its tokenizer,
so evaluation and inference need nothing but the workdir; the run's one evaluator compiles once."""

import json
import os
import subprocess
import sys

import numpy as np

from clippy_jax.inference import Clippy
from tests.helpers import REPO, read_scalars, run_main


def test_the_evaluation_cli_reproduces_the_training_results_from_the_workdir_alone(tiny_run, tmp_path):
    workdir, _ = tiny_run
    out = tmp_path / "eval"
    subprocess.run([sys.executable, "-m", "clippy_jax.evaluate", "--config=configs/eval.py:synthetic_segmentation",
                    f"--config.init_from={workdir}", f"--workdir={out}"], cwd=REPO, check=True, capture_output=True,
                   timeout=300)
    with open(os.path.join(workdir, "results.json")) as f:
        trained = json.load(f)
    with open(out / "results.json") as f:
        evaluated = json.load(f)
    assert evaluated["step"] == trained["step"] == 10
    assert evaluated["evaluations"]["synthetic_segmentation"]["miou"] == \
        trained["evaluations"]["synthetic_segmentation"]["miou"]  # bit-identical

    labels = Clippy.load(workdir).segment(np.zeros((40, 56, 3), np.uint8), ["zebra", "grapes", "sand"]).labels
    assert labels.shape == (40, 56) and set(np.unique(labels)) <= {0, 1, 2}


def test_the_second_periodic_evaluation_compiles_nothing(tiny_run):
    """One evaluator for the whole run: evaluations at steps 4 and 8 (periodic) and 10 (final)."""
    workdir, result = tiny_run
    compilations = read_scalars(workdir, "eval/compilations")
    assert sorted(compilations) == [4, 8, 10]
    assert compilations[4] > 0 and compilations[8] == 0 and compilations[10] == 0
    assert "Evaluated step 8 in" in result.stderr and "(0 XLA compilations)" in result.stderr


def test_a_training_config_with_model_presets_trains(tiny_run, tmp_path):
    """`model.image.variant` (ViT preset) and `model.text.size` (T5 preset) in a training config; keys given
    next to a preset override it (here the depth, to keep the test small). The tiny run's demo data is reused."""
    config = tmp_path / "preset.py"
    config.write_text(
        "import importlib.util\n"
        f"spec = importlib.util.spec_from_file_location('demo', {os.path.join(REPO, 'configs/demo.py')!r})\n"
        "demo = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(demo)\n\n\n"
        "def get_config():\n"
        "    config = demo.get_config('size=tiny')\n"
        "    config.model.image = dict(variant='Ti/8', depth=1, posemb_grid=(8, 8), use_cls_token=True)\n"
        "    config.model.text = dict(size='tiny', variant='t5_1_0', depth=1, vocab_size=0)\n"
        "    return config\n"
    )
    workdir = tmp_path / "run"
    run_main(str(workdir), "--config.train.steps=2", "--config.eval.evaluators=()",
             f"--config.data.synthetic.directory={os.path.join(tiny_run[0], 'data')}", config=str(config))
    with open(workdir / "checkpoints" / "2" / "config" / "metadata") as f:
        recorded = json.load(f)
    assert recorded["model"]["image"]["variant"] == "Ti/8"
    assert Clippy.load(str(workdir)).patch_size == 8  # the preset's patch size, read back from the checkpoint
