"""`python -m clippy_jax.segment` on real photographs (matplotlib's and scikit-learn's sample photos)
written in several sizes, formats and modes, with the tiny demo run's checkpoint; loading a workdir
writes nothing into it."""

import json
import logging
import math
import os
import shutil
import subprocess
import sys

import matplotlib.cbook
import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_sample_images

from clippy_jax.evaluate.render import MIN_DISPLAY_SIDE
from clippy_jax.inference import Clippy, read_image
from tests.helpers import REPO, foreign_lines, user_env

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
                          text=True, timeout=300, check=False, env=user_env())


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
        overlay = Image.open(f"{stem}_overlay.png")  # enlarged to MIN_DISPLAY_SIDE, the legend beside the image
        scale = math.ceil(MIN_DISPLAY_SIDE / min(height, width))
        assert overlay.size[1] == scale * height and overlay.size[0] > scale * width and overlay.mode == "RGB"
        labels = Image.open(f"{stem}_labels.png")
        assert labels.mode == "P" and labels.size == (width, height)
        labels = np.asarray(labels)
        record = json.loads((out / f"{os.path.splitext(name)[0]}.json").read_text())
        assert record["labels"] == names and (record["height"], record["width"]) == (height, width)
        counts = np.bincount(labels.ravel(), minlength=len(names))
        assert len(counts) == len(names)
        np.testing.assert_allclose([record["shares"][n] for n in names], counts / labels.size, atol=1e-6)
    assert "hopper.jpg (512x600)" in result.stderr
    assert "unlike the 64x64 synthetic scenes this model was trained on" in result.stderr
    assert foreign_lines(result.stdout + result.stderr) == []  # before: 9 of 13 lines (TensorFlow's C++ logs)

    grouped = _segment(f"--checkpoint={workdir}", f"--image={tmp_path / 'hopper.jpg'}", "--group=3",
                       f"--output={tmp_path / 'groups'}")
    assert grouped.returncode == 0, grouped.stderr[-3000:]
    record = json.loads((tmp_path / "groups" / "hopper.json").read_text())
    assert record["labels"] == ["group 1", "group 2", "group 3"]
    assert sum(record["shares"].values()) == pytest.approx(1, abs=1e-5)
    width, height = Image.open(tmp_path / "groups" / "hopper_overlay.png").size
    assert height == 600 and width > 512


@pytest.mark.parametrize(("flags", "message"), [
    (("--prompts=cat",), "Pass at least one --image"),
    (("--image={photo}", "--prompts=cat", "--output={photo}"), "is a file; pass a folder"),
    (("--image={photo}",), '--prompts="cat,dog,grass"'),
    (("--image={photo}", "--prompts=cat", "--group=2"), "--group groups bottom-up without prompts"),
])
def test_segment_command_flag_errors(tmp_path, flags, message):
    photo = tmp_path / "photo.png"
    Image.new("RGB", (8, 8)).save(photo)
    result = _segment(f"--checkpoint={tmp_path}", f"--output={tmp_path / 'out'}",
                      *[f.format(photo=photo) for f in flags])
    assert result.returncode == 2 and message in result.stderr and len(result.stderr.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_segment_command_reports_each_bad_image_in_one_line_and_segments_the_others(tiny_run, tmp_path):
    Image.new("RGB", (64, 64), (200, 30, 30)).save(tmp_path / "good.png")
    (tmp_path / "text.jpg").write_text("not an image\n")
    Image.new("RGB", (64, 64)).save(tmp_path / "whole.jpg")
    (tmp_path / "truncated.jpg").write_bytes((tmp_path / "whole.jpg").read_bytes()[:300])
    (tmp_path / "folder.png").mkdir()
    bad = {"text.jpg": "is not an image", "truncated.jpg": "is truncated", "folder.png": "is a directory",
           "missing.png": "does not exist"}
    result = _segment(f"--checkpoint={tiny_run[0]}", f"--output={tmp_path / 'out'}", "--prompts=zebra,sand",
                      *[f"--image={tmp_path / name}" for name in ["good.png", *bad]])
    assert result.returncode == 2, result.stderr[-3000:]
    for name, reason in bad.items():
        assert len([line for line in result.stderr.splitlines() if f"{tmp_path / name} {reason}" in line]) == 1
    assert "Traceback" not in result.stderr and "4 of 5 images could not be segmented" in result.stderr
    assert sorted(os.listdir(tmp_path / "out")) == ["good.json", "good_labels.png", "good_overlay.png"]


def test_missing_checkpoints_files_and_mismatched_model_configs_are_named(tiny_run, tmp_path):
    with pytest.raises(FileNotFoundError, match=f"checkpoint {tmp_path / 'none'} does not exist.*make demo"):
        Clippy.load(str(tmp_path / "none"))
    with pytest.raises(ValueError, match=r"demo.py' does not match .*model\.text\.embed_dim=128 \(checkpoint: 32\)"):
        Clippy.load(tiny_run[0], model_config=os.path.join(REPO, "configs/demo.py"))
    with pytest.raises(IsADirectoryError, match=f"{tmp_path} is a directory"):
        read_image(str(tmp_path))


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
    with pytest.raises(FileNotFoundError, match=r"tokenizer .*/data/tokenizer.model does not exist"):
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
        overlay = Image.open(f"{stem}_overlay.png")  # as for the ViT: the legend beside the (enlarged) photo
        scale = math.ceil(MIN_DISPLAY_SIDE / min(height, width))
        assert overlay.size[1] == scale * height and overlay.size[0] > scale * width
        assert np.asarray(Image.open(f"{stem}_labels.png")).shape == (height, width)
