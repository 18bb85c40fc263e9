"""The package installs from its sources and runs from any folder: a wheel built from a copy of the
sources, installed (without its dependencies, which the test environment lends) into a fresh virtual
environment, imports from /tmp and its `clippy-segment` command segments a JPEG.

A full `pip install .` into an empty environment downloads ~3 GB of dependencies; it was run by hand
(clippy_jax/README: "Installing")."""

import os
import shutil
import site
import subprocess
import sys
import sysconfig

import numpy as np
from PIL import Image

from tests.helpers import REPO


def test_wheel_installs_and_runs_outside_the_repository(tiny_run, tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "requirements.txt", "requirements-test.txt",
                 "requirements-convert.txt"):
        shutil.copy(os.path.join(REPO, name), source)
    shutil.copytree(os.path.join(REPO, "clippy_jax"), source / "clippy_jax",
                    ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--quiet"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(source)],
                   check=True, cwd=tmp_path, timeout=120)
    wheel, = (tmp_path / "dist").glob("clippy_jax-*.whl")

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    python = str(venv / "bin" / "python")
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    # The dependencies come from this environment's site-packages (read only, without its .pth files).
    lent = [p for p in [*site.getsitepackages(), sysconfig.get_paths()["purelib"]] if os.path.isdir(p)]
    with open(os.path.join(purelib, "_test_dependencies.pth"), "w") as f:
        f.write("\n".join(dict.fromkeys(lent)) + "\n")
    subprocess.run([*pip, "--python", python, "install", "--no-deps", "--no-index", str(wheel)], check=True,
                   timeout=120)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    found = subprocess.run([python, "-c", "import clippy_jax.inference, clippy_jax; print(clippy_jax.__file__)"],
                           cwd=elsewhere, env=env, check=True, capture_output=True, text=True, timeout=120)
    assert found.stdout.strip().startswith(purelib), found.stdout

    photo = elsewhere / "photo.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (90, 120, 3), np.uint8)).save(photo)
    result = subprocess.run([str(venv / "bin" / "clippy-segment"), f"--checkpoint={tiny_run[0]}", "--image=photo.jpg",
                             "--prompts=zebra,sand", "--output=out"], cwd=elsewhere, env=env, capture_output=True,
                            text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert Image.open(elsewhere / "out" / "photo_overlay.png").size == (120, 90)
