"""The evaluation command line on the tiny demo checkpoint: the demo's own mIoU, and every paper
evaluation on tiny fixtures in each dataset's official layout (tables, JSON, TensorBoard images)."""

import csv
import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from clippy_jax.data.eval_datasets import coco, imagenet
from tests.helpers import REPO
from tests.test_eval_datasets import (
    COCO_THING_IDS,
    _annotation,
    _box_polygon,
    _rgb_ids,
    _stripes,
    _write_image,
    _write_index_png,
)

PAPER_TASKS = ("voc", "coco_object", "coco133", "ade20k", "cityscapes27", "voc_grouping",
               "cityscapes27_unsupervised", "imagenet", "imagenet_v2", "waterbirds")


def write_fixtures(root: Path) -> None:
    """Two or three images per dataset, all under one manual directory (the layouts do not collide)."""
    voc_root = root / "VOCdevkit/VOC2012"
    for image_id, label in {"2007_000032": _stripes(0, 15, 255), "2007_000039": _stripes(20, 1, 0),
                            "2007_000042": _stripes(0, 8)}.items():
        _write_image(voc_root / f"JPEGImages/{image_id}.jpg")
        _write_index_png(voc_root / f"SegmentationClass/{image_id}.png", label)
    (voc_root / "ImageSets/Segmentation").mkdir(parents=True)
    (voc_root / "ImageSets/Segmentation/val.txt").write_text("2007_000032\n2007_000039\n2007_000042\n")

    # COCO: the same two images for panoptic (4 of the 133 categories) and COCO-Object (80 things).
    images, panoptic_annotations = [], []
    segments = {139: ([{"id": 5, "category_id": 1, "iscrowd": 0}, {"id": 300000, "category_id": 184, "iscrowd": 0}],
                      _stripes(5, 300000, 0)),
                285: ([{"id": 70000, "category_id": 199, "iscrowd": 0}, {"id": 7, "category_id": 2, "iscrowd": 0}],
                      _stripes(70000, 7))}
    for image_id, (info, ids) in segments.items():
        stem = f"{image_id:012d}"
        _write_image(root / f"val2017/{stem}.jpg")
        png = root / f"annotations/panoptic_val2017/{stem}.png"
        png.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_rgb_ids(ids)).save(png)
        images.append({"id": image_id, "file_name": f"{stem}.jpg", "height": 24, "width": 32})
        panoptic_annotations.append({"image_id": image_id, "file_name": f"{stem}.png", "segments_info": info})
    categories = [{"id": i, "name": name} for i, name in
                  [(1, "person"), (2, "bicycle"), (184, "tree-merged"), (199, "wall-other-merged")]]
    (root / "annotations/panoptic_val2017.json").write_text(
        json.dumps({"images": images, "annotations": panoptic_annotations, "categories": categories}))
    instances = {
        "images": images,
        "annotations": [_annotation(1, image_id=139, category_id=1, segmentation=_box_polygon(0, 0, 16, 12)),
                        _annotation(2, image_id=285, category_id=18, segmentation=_box_polygon(8, 4, 30, 20))],
        "categories": [{"id": i, "name": n} for i, n in zip(COCO_THING_IDS, coco.COCO_THING_NAMES)],
    }
    (root / "annotations/instances_val2017.json").write_text(json.dumps(instances))

    for image_id, label in {"ADE_val_00000001": _stripes(0, 1, 150), "ADE_val_00000002": _stripes(13, 3)}.items():
        _write_image(root / f"ADEChallengeData2016/images/validation/{image_id}.jpg")
        _write_index_png(root / f"ADEChallengeData2016/annotations/validation/{image_id}.png", label)
    for city, image_id, label in [("frankfurt", "frankfurt_000000_000294", _stripes(7, 8, 23, 26)),
                                  ("lindau", "lindau_000000_000019", _stripes(33, 24, 7, 0))]:
        _write_image(root / f"leftImg8bit/val/{city}/{image_id}_leftImg8bit.png")
        _write_index_png(root / f"gtFine/val/{city}/{image_id}_gtFine_labelIds.png", label)

    for index in (0, 1, 999):
        _write_image(root / f"val/{imagenet.IMAGENET_SYNSETS[index]}/ILSVRC2012_val_{index:08d}.JPEG")
        _write_image(root / f"imagenetv2-matched-frequency-format-val/{index}/a{index}.jpeg")

    birds = root / "waterbird_complete95_forest2water2"
    birds.mkdir(parents=True)
    with (birds / "metadata.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["img_id", "img_filename", "y", "split", "place", "place_filename"])
        for i, (y, split, place) in enumerate([(1, 2, 1), (1, 2, 0), (0, 2, 0), (0, 2, 1), (0, 0, 0), (1, 1, 1)]):
            _write_image(birds / f"bird_{i}.jpg")
            writer.writerow([i, f"bird_{i}.jpg", y, split, place, "x.jpg"])


def _tags(workdir: str) -> dict[str, str]:
    """{tag: plugin name} of every summary in the workdir's event files."""
    tags = {}
    for path in glob.glob(os.path.join(workdir, "events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                tags[value.tag] = value.metadata.plugin_data.plugin_name
    return tags


@pytest.fixture(scope="module")
def evaluated(tiny_run, tmp_path_factory):
    """One evaluation run of the synthetic and all paper tasks on the tiny demo run's last checkpoint."""
    train_dir = tiny_run[0]
    manual = tmp_path_factory.mktemp("manual")
    write_fixtures(manual)
    eval_dir = str(tmp_path_factory.mktemp("eval"))
    templates = manual / "templates.txt"  # two of CLIP's 80 ImageNet templates keep the text encoding short
    templates.write_text("a photo of a {}.\nitap of a {}.\n")
    command = [
        sys.executable, "-m", "clippy_jax.evaluate",
        "--config=configs/eval.py:synthetic_segmentation,paper,res=32,window=32,stride=16",
        f"--config.init_from={train_dir}", "--config.model_config=configs/demo.py:size=tiny",
        f"--config.eval.manual_dir={manual}", f"--config.eval.tfds_dir={tmp_path_factory.mktemp('tfds')}",
        "--config.eval.batch_size=8", "--config.eval.num_overlays=2", f"--workdir={eval_dir}",
        f"--config.eval.tasks.imagenet.templates={templates}", f"--config.eval.tasks.imagenet_v2.templates={templates}",
    ]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=400, check=False)
    assert result.returncode == 0, result.stderr[-5000:]
    with open(os.path.join(eval_dir, "results.json")) as f:
        results = json.load(f)
    return train_dir, eval_dir, results, result


def test_cli_reproduces_the_demo_miou(evaluated):
    train_dir, _, results, _ = evaluated
    with open(os.path.join(train_dir, "results.json")) as f:
        trained = json.load(f)
    assert results["step"] == trained["step"] == 10
    trained = trained["evaluations"]["synthetic_segmentation"]
    ours = results["evaluations"]["synthetic_segmentation"]
    assert ours["miou"] == trained["miou"]
    assert ours["per_class_iou"] == trained["per_class_iou"]
    assert ours["classification_accuracy"] == trained["classification_accuracy"]


def test_cli_runs_every_paper_evaluation_on_fixtures(evaluated):
    _, eval_dir, results, run = evaluated
    evaluations = results["evaluations"]
    assert set(PAPER_TASKS) <= set(evaluations)
    for name in ("voc", "coco_object", "coco133", "ade20k", "cityscapes27", "cityscapes27_unsupervised"):
        assert 0.0 <= evaluations[name]["miou"] <= 1.0 and 0.0 <= evaluations[name]["pixel_accuracy"] <= 1.0
    assert len(evaluations["voc"]["per_class_iou"]) == 21
    assert list(evaluations["coco133"]["per_class_iou"]) == ["person", "bicycle", "tree-merged", "wall-other-merged"]
    assert evaluations["voc"]["geometry"].startswith("Geometry(") and "window=32" in evaluations["voc"]["geometry"]
    unsupervised = evaluations["cityscapes27_unsupervised"]
    assert sorted(unsupervised["cluster_of_class"]) == list(range(27)) and unsupervised["num_samples"] > 27
    assert 0.0 <= evaluations["voc_grouping"]["jaccard"] <= 1.0 and evaluations["voc_grouping"]["num_segments"] == 7
    for name in ("imagenet", "imagenet_v2"):
        assert evaluations[name]["num_images"] == 3 and evaluations[name]["top1"] <= evaluations[name]["top5"]
        assert evaluations[name]["num_templates"] == 2
    birds = evaluations["waterbirds"]
    assert birds["num_images"] == 4
    assert all(birds["accuracy"][place][bird] in (0.0, 1.0) for place in ("land", "water")
               for bird in ("landbird", "waterbird"))

    markdown = open(os.path.join(eval_dir, "results.md")).read()
    assert "## voc\n" in markdown and "| class | IoU |" in markdown and "| aeroplane |" in markdown
    assert "## waterbirds\n" in markdown and "| land background |" in markdown and "top5 accuracy" in markdown
    tags = _tags(eval_dir)
    for name in ("voc", "ade20k", "cityscapes27_unsupervised", "voc_grouping", "waterbirds",
                 "synthetic_segmentation"):
        assert tags.get(f"{name}/overlays") == "images", name
    assert tags.get("voc/per_class_iou") == "text" and tags.get("waterbirds/accuracy") == "text"
    assert f"{'imagenet/top1'}" in tags and "voc/miou" in tags
    assert "ade20k_150" in run.stderr  # the progress bar's description
    assert np.isfinite(evaluations["waterbirds"]["mean_accuracy"])
