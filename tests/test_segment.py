"""`python -m clippy_jax.segment` on real photographs (matplotlib's and scikit-learn's sample photos)
written in several sizes, formats and modes, with the tiny demo run's checkpoint; loading a workdir
writes nothing into it."""

import json
import logging
import os
import shutil
import subprocess
import sys

import matplotlib.cbook
import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_sample_images

from clippy_jax.inference import Clippy
from tests.helpers import REPO

PROMPTS = "zebra,tiger,giraffe,grapes"


def _photos(directory) -> dict[str, tuple[int, int]]:
    """Writes the test photos; returns {file name: (height, width) as displayed}."""
    hopper = Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg"))  # 512 x 600 RGB JPEG
    china, flower = (Image.open(path) for path in sorted(load_sample_images().filenames))  # 640 x 427 each
    hopper.save(directory / "hopper.jpg")
    china.convert("L").resize((320, 214)).save(directory / "china_gray.png")
    rgba = flower.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(flower.size))
    rgba.save(directory / "flower_rgba.png")
    hopper.convert("CMYK").resize((256, 300)).save(directory / "hopper_cmyk.jpg")
    exif = china.getexif()
    exif[0x0112] = 6  # stored landscape, displayed rotated 90 degrees clockwise
    china.save(directory / "china_exif.jpg", exif=exif)
    flower.resize((200, 133)).save(directory / "flower.webp")
    return {"hopper.jpg": (600, 512), "china_gray.png": (214, 320), "flower_rgba.png": (427, 640),
            "hopper_cmyk.jpg": (300, 256), "china_exif.jpg": (640, 427), "flower.webp": (133, 200)}


def _segment(*flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "clippy_jax.segment", *flags], cwd=REPO, capture_output=True,
                          text=True, timeout=300, check=False)


def _snapshot(directory: str) -> dict[str, float]:
    return {os.path.join(root, name): os.path.getmtime(os.path.join(root, name))
            for root, _, names in os.walk(directory) for name in names}


def test_segment_command_on_photos_of_several_sizes_and_modes(tiny_run, tmp_path):
    workdir = tiny_run[0]
    photos = _photos(tmp_path)
    before = _snapshot(workdir)
    out = tmp_path / "out"
    result = _segment(f"--checkpoint={workdir}", *[f"--image={tmp_path / name}" for name in photos],
                      f"--prompts={PROMPTS}", "--background=sand,wood,bricks", f"--output={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert _snapshot(workdir) == before, "loading wrote into the training workdir"
    names = ["background", *PROMPTS.split(",")]
    for name, (height, width) in photos.items():
        stem = out / os.path.splitext(name)[0]
        overlay = Image.open(f"{stem}_overlay.png")
        assert overlay.size == (width, height) and overlay.mode == "RGB"
        labels = Image.open(f"{stem}_labels.png")
        assert labels.mode == "P" and labels.size == (width, height)
        labels = np.asarray(labels)
        record = json.loads((out / f"{os.path.splitext(name)[0]}.json").read_text())
        assert record["labels"] == names and (record["height"], record["width"]) == (height, width)
        counts = np.bincount(labels.ravel(), minlength=len(names))
        assert len(counts) == len(names)
        np.testing.assert_allclose([record["shares"][n] for n in names], counts / labels.size, atol=1e-6)
    assert "hopper.jpg (512x600)" in result.stderr

    grouped = _segment(f"--checkpoint={workdir}", f"--image={tmp_path / 'hopper.jpg'}", "--group=3",
                       f"--output={tmp_path / 'groups'}")
    assert grouped.returncode == 0, grouped.stderr[-3000:]
    record = json.loads((tmp_path / "groups" / "hopper.json").read_text())
    assert record["labels"] == ["group 1", "group 2", "group 3"]
    assert sum(record["shares"].values()) == pytest.approx(1, abs=1e-5)
    assert Image.open(tmp_path / "groups" / "hopper_overlay.png").size == (512, 600)


@pytest.mark.parametrize(("flags", "message"), [
    (("--prompts=cat",), "Pass at least one --image"),
    (("--image=/no/such.jpg", "--prompts=cat"), "--image: no such file"),
    (("--image={photo}",), '--prompts="cat,dog,grass"'),
    (("--image={photo}", "--prompts=cat", "--group=2"), "--group groups bottom-up without prompts"),
])
def test_segment_command_flag_errors(tmp_path, flags, message):
    photo = tmp_path / "photo.png"
    Image.new("RGB", (8, 8)).save(photo)
    result = _segment(f"--checkpoint={tmp_path}", f"--output={tmp_path / 'out'}",
                      *[f.format(photo=photo) for f in flags])
    assert result.returncode != 0 and message in result.stderr
    assert not (tmp_path / "out").exists()


def test_loading_a_copied_workdir_writes_nothing(tiny_run, tmp_path, caplog):
    """The copy has no demo data: the model loads from checkpoints/ (with their config) and tokenizer.model."""
    workdir = tiny_run[0]
    copy = tmp_path / "copy"
    shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns("data"))
    before = _snapshot(str(copy))
    with caplog.at_level(logging.WARNING):
        clippy = Clippy.load(str(copy))
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text  # orbax's metadata warning
    assert clippy.image_size == 64  # configs/demo.py's data.image_size, from the recorded config
    assert clippy.segment(np.zeros((48, 80, 3), np.uint8), ["zebra", "sand"]).labels.shape == (48, 80)
    assert _snapshot(str(copy)) == before

    only_checkpoints = tmp_path / "only_checkpoints"
    shutil.copytree(os.path.join(workdir, "checkpoints"), only_checkpoints / "checkpoints")
    with pytest.raises(FileNotFoundError, match="No tokenizer"):
        Clippy.load(str(only_checkpoints))
    assert sorted(os.listdir(only_checkpoints)) == ["checkpoints"]  # no data regenerated


def test_a_step_written_before_configs_were_recorded_loads_with_model_config(tiny_run, tmp_path):
    """Older workdirs (no `config/` item in the step) name `model_config`, then load with it."""
    old = tmp_path / "old"
    shutil.copytree(tiny_run[0], old, ignore=shutil.ignore_patterns("data"))
    for step in ("8", "10"):
        shutil.rmtree(old / "checkpoints" / step / "config")
    with pytest.raises(ValueError, match="before checkpoints recorded their config: set config.model_config"):
        Clippy.load(str(old))
    clippy = Clippy.load(str(old), model_config=os.path.join(REPO, "configs/demo.py:size=tiny"))
    assert clippy.segment(np.zeros((48, 80, 3), np.uint8), ["zebra", "sand"]).labels.shape == (48, 80)


def test_segment_command_on_a_cnn_workdir_writes_overlays_at_the_photos_resolution(tiny_cnn_run, tmp_path):
    """The EfficientNet tower's stride-32 feature maps, upsampled to each photo's size."""
    photos = {name: size for name, size in _photos(tmp_path).items() if name in ("hopper.jpg", "flower.webp")}
    out = tmp_path / "out"
    result = _segment(f"--checkpoint={tiny_cnn_run[0]}", *[f"--image={tmp_path / name}" for name in photos],
                      f"--prompts={PROMPTS}", f"--output={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    for name, (height, width) in photos.items():
        stem = out / os.path.splitext(name)[0]
        assert Image.open(f"{stem}_overlay.png").size == (width, height)
        assert np.asarray(Image.open(f"{stem}_labels.png")).shape == (height, width)
