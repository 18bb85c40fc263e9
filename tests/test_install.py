"""The package installs from its sources and runs from any folder: a wheel built from a copy of the
sources, installed (without its dependencies, which the test environment lends) into a fresh virtual
environment, imports from /tmp, its `clippy-segment` command segments a JPEG and its `clippy-train` lists
its flags and finds the shipped configs by name.

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

from tests.conftest import TINY_RUN_FLAGS
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
    assert Image.open(elsewhere / "out" / "photo_overlay.png").size[1] == 450  # 90 rows enlarged 5 times

    train = str(venv / "bin" / "clippy-train")
    shown = subprocess.run([train, "--help"], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120,
                           check=False)
    assert all(flag in shown.stdout for flag in ("--config:", "--workdir:", "reevaluate:", "traceback:")), shown.stdout
    finished = subprocess.run([train, "--config=demo:size=tiny", f"--workdir={tiny_run[0]}", *TINY_RUN_FLAGS],
                              cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert finished.returncode == 0 and "This run already finished" in finished.stderr, finished.stderr[-3000:]
    missing = subprocess.run([train, "--config=configs/nope.py"], cwd=elsewhere, env=env, capture_output=True,
                             text=True, timeout=120, check=False)
    assert missing.returncode == 2 and len(missing.stderr.splitlines()) == 1, missing.stderr
    assert "configs/nope.py does not exist" in missing.stderr and "demo" in missing.stderr
