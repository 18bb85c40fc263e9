"""Evaluation dataset builders on tiny fixtures written in each dataset's official layout."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_api

from clippy_jax.data import eval_datasets
from clippy_jax.data.eval_datasets import (
    IGNORE_LABEL,
    ade20k,
    cityscapes,
    coco,
    imagenet,
    voc,
    waterbirds,
)

H, W = 24, 32
# COCO 2017 ids of the 80 thing categories (1..90 with gaps), in COCO_THING_NAMES order.
COCO_THING_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]


def _write_image(path: Path, mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (H, W, 3), np.uint8))
    rgb.convert(mode).save(path)


def _write_index_png(path: Path, label: np.ndarray, palette: list[int] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(label.astype(np.uint8), mode="L")
    if palette is not None:
        image = image.convert("P")
        image.putpalette(palette)
    image.save(path)


def _load(name: str, manual_dir: Path, tmp_path: Path, split: str | None = None) -> list[dict]:
    ds = eval_datasets.load(name, str(manual_dir), str(tmp_path / "tfds"), split=split)
    return list(ds.as_numpy_iterator())


def _check_segmentation(examples: list[dict], expected: dict[str, np.ndarray]) -> None:
    assert [ex["image_id"].decode() for ex in examples] == list(expected)
    for ex, label in zip(examples, expected.values(), strict=True):
        assert ex["image"].shape == (H, W, 3) and ex["image"].dtype == np.uint8
        assert ex["label"].dtype == np.uint8
        np.testing.assert_array_equal(ex["label"], label)


def _class_names(name: str, manual_dir: Path, tmp_path: Path) -> list[str]:
    builder = eval_datasets.builder(name, str(manual_dir), str(tmp_path / "tfds"))
    return builder.info.metadata["class_names"]


def _stripes(*values: int) -> np.ndarray:
    """An [H, W] map whose rows cycle through `values`."""
    return np.resize(np.array(values, np.int64), H)[:, None].repeat(W, axis=1)


def test_voc_reads_palette_indices(tmp_path):
    root = tmp_path / "manual/VOCdevkit/VOC2012"
    # A palette whose colours differ from the indices: reading RGB would give wrong labels.
    palette = [(3 * i + c * 7) % 256 for i in range(256) for c in range(3)]
    raw = {"2007_000032": _stripes(0, 15, 255), "2007_000039": _stripes(20, 1, 30)}
    for image_id, label in raw.items():
        _write_image(root / f"JPEGImages/{image_id}.jpg")
        _write_index_png(root / f"SegmentationClass/{image_id}.png", label, palette)
    _write_image(root / "JPEGImages/2007_000999.jpg")  # Not in val.txt.
    (root / "ImageSets/Segmentation").mkdir(parents=True)
    (root / "ImageSets/Segmentation/val.txt").write_text("2007_000032\n2007_000039\n")

    examples = _load("voc2012_seg", tmp_path / "manual", tmp_path)
    _check_segmentation(
        examples, {"2007_000032": _stripes(0, 15, 255), "2007_000039": _stripes(20, 1, 255)}
    )
    names = _class_names("voc2012_seg", tmp_path / "manual", tmp_path)
    assert names == list(voc.VOC_CLASS_NAMES) and len(names) == 21 and names[15] == "person"


def _rgb_ids(ids: np.ndarray) -> np.ndarray:
    return np.stack([ids % 256, ids // 256 % 256, ids // 256**2], axis=-1).astype(np.uint8)


def test_coco_panoptic133_maps_categories_contiguously(tmp_path):
    manual = tmp_path / "manual"
    # Unsorted on purpose: labels follow sorted category ids -> 1: 0, 2: 1, 184: 2, 200: 3.
    categories = [
        {"id": 184, "name": "tree-merged", "isthing": 0},
        {"id": 1, "name": "person", "isthing": 1},
        {"id": 200, "name": "wall-other-merged", "isthing": 0},
        {"id": 2, "name": "bicycle", "isthing": 1},
    ]
    # Segment 300000 needs all three channels; 42 is not listed in segments_info -> ignored.
    segment_maps = {139: _stripes(5, 300000, 0, 42), 285: _stripes(70000, 7)}
    segments = {
        139: [
            {"id": 5, "category_id": 1, "iscrowd": 0},
            {"id": 300000, "category_id": 184, "iscrowd": 0},
        ],
        285: [
            {"id": 70000, "category_id": 200, "iscrowd": 0},
            {"id": 7, "category_id": 2, "iscrowd": 1},
        ],
    }
    images, annotations = [], []
    for image_id, ids in segment_maps.items():
        stem = f"{image_id:012d}"
        _write_image(manual / f"val2017/{stem}.jpg")
        png = manual / f"annotations/panoptic_val2017/{stem}.png"
        png.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_rgb_ids(ids)).save(png)
        images.append({"id": image_id, "file_name": f"{stem}.jpg", "height": H, "width": W})
        annotations.append(
            {"image_id": image_id, "file_name": f"{stem}.png", "segments_info": segments[image_id]}
        )
    panoptic = {"images": images, "annotations": annotations, "categories": categories}
    (manual / "annotations/panoptic_val2017.json").write_text(json.dumps(panoptic))

    examples = _load("coco_panoptic133", manual, tmp_path)
    _check_segmentation(
        examples,
        {
            "000000000139": _stripes(0, 2, IGNORE_LABEL, IGNORE_LABEL),
            "000000000285": _stripes(3, 1),
        },
    )
    assert _class_names("coco_panoptic133", manual, tmp_path) == [
        "person", "bicycle", "tree-merged", "wall-other-merged"
    ]  # fmt: skip


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE: run lengths over the column-major mask, starting with zeros."""
    flat = mask.flatten(order="F")
    changes = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0]:
        counts = [0, *counts]
    return {"size": [H, W], "counts": counts}


def _box_polygon(x0: int, y0: int, x1: int, y1: int) -> list[list[float]]:
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def _annotation(annotation_id: int, **fields) -> dict:
    return {"id": annotation_id, "iscrowd": 0, "area": 1.0, "bbox": [0, 0, 1, 1], **fields}


def test_coco_object_paints_instances_and_ignores_crowds(tmp_path):
    manual = tmp_path / "manual"
    person, dog, toothbrush = 1, 18, 90  # -> labels 1, 17, 80.
    crowd = np.zeros((H, W), np.uint8)
    crowd[:, 20:] = 1
    rle = mask_api.encode(np.asfortranarray(np.ones((H, W), np.uint8)))
    compressed = {"size": [H, W], "counts": rle["counts"].decode()}
    annotations = [
        _annotation(1, image_id=1, category_id=person, segmentation=_box_polygon(0, 0, 24, 12)),
        _annotation(2, image_id=1, category_id=dog, segmentation=_box_polygon(8, 0, 16, 12)),
        _annotation(
            3, image_id=1, category_id=person, segmentation=_uncompressed_rle(crowd), iscrowd=1
        ),
        _annotation(4, image_id=2, category_id=toothbrush, segmentation=compressed),
    ]
    images = [{"id": i, "file_name": f"{i:012d}.jpg", "height": H, "width": W} for i in (1, 2, 3)]
    for image in images:
        _write_image(manual / "val2017" / image["file_name"])
    categories = [
        {"id": i, "name": n} for i, n in zip(COCO_THING_IDS, coco.COCO_THING_NAMES, strict=True)
    ]
    instances = {"images": images, "annotations": annotations, "categories": categories}
    (manual / "annotations").mkdir(parents=True)
    (manual / "annotations/instances_val2017.json").write_text(json.dumps(instances))

    examples = _load("coco_object", manual, tmp_path)
    assert [ex["image_id"].decode() for ex in examples] == [f"{i:012d}" for i in (1, 2, 3)]
    label = examples[0]["label"]
    assert label[4, 2] == 1  # Person only.
    assert label[4, 12] == 17  # Dog painted over the person.
    assert label[4, 22] == 1  # Person over the crowd region.
    assert label[20, 22] == IGNORE_LABEL  # Crowd only.
    assert label[20, 2] == 0  # Background.
    np.testing.assert_array_equal(examples[1]["label"], np.full((H, W), 80))
    np.testing.assert_array_equal(examples[2]["label"], np.zeros((H, W)))  # No annotations.
    names = _class_names("coco_object", manual, tmp_path)
    assert len(names) == 81 and names[0] == "background" and names[17] == "dog"


def test_ade20k_shifts_labels_and_ignores_zero(tmp_path):
    manual = tmp_path / "manual"
    raw = {"ADE_val_00000001": _stripes(0, 1, 150), "ADE_val_00000002": _stripes(13, 0)}
    for image_id, label in raw.items():
        _write_image(manual / f"ADEChallengeData2016/images/validation/{image_id}.jpg")
        _write_index_png(
            manual / f"ADEChallengeData2016/annotations/validation/{image_id}.png", label
        )

    examples = _load("ade20k_150", manual, tmp_path)
    _check_segmentation(
        examples,
        {"ADE_val_00000001": _stripes(255, 0, 149), "ADE_val_00000002": _stripes(12, 255)},
    )
    names = _class_names("ade20k_150", manual, tmp_path)
    assert names == list(ade20k.ADE20K_CLASS_NAMES) and len(names) == 150 and names[12] == "person"


def test_cityscapes27_maps_label_ids(tmp_path):
    manual = tmp_path / "manual"
    raw = {
        ("frankfurt", "frankfurt_000000_000294"): _stripes(0, 6, 7, 26),
        ("lindau", "lindau_000000_000019"): _stripes(33, 24, 3),
    }
    for (city, image_id), label in raw.items():
        _write_image(manual / f"leftImg8bit/val/{city}/{image_id}_leftImg8bit.png")
        _write_index_png(manual / f"gtFine/val/{city}/{image_id}_gtFine_labelIds.png", label)

    examples = _load("cityscapes27", manual, tmp_path)
    _check_segmentation(
        examples,
        {
            "frankfurt_000000_000294": _stripes(255, 255, 0, 19),
            "lindau_000000_000019": _stripes(26, 17, 255),
        },
    )
    names = _class_names("cityscapes27", manual, tmp_path)
    assert names == list(cityscapes.CITYSCAPES27_CLASS_NAMES) and len(names) == 27
    assert (names[0], names[19], names[26]) == ("road", "car", "bicycle")


@pytest.mark.parametrize("layout", ["folders", "flat"])
def test_imagenet_val_layouts(tmp_path, layout):
    manual = tmp_path / "manual"
    first, last = imagenet.IMAGENET_SYNSETS[0], imagenet.IMAGENET_SYNSETS[-1]
    samples = {"ILSVRC2012_val_00000001": (last, "RGB"), "ILSVRC2012_val_00000002": (first, "CMYK")}
    if layout == "folders":
        for image_id, (synset, mode) in samples.items():
            _write_image(manual / f"val/{synset}/{image_id}.JPEG", mode)
    else:
        manual.mkdir()
        with (manual / "LOC_val_solution.csv").open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["ImageId", "PredictionString"])
            for image_id, (synset, mode) in samples.items():
                _write_image(manual / f"ILSVRC2012_img_val/{image_id}.JPEG", mode)
                writer.writerow([image_id, f"{synset} 1 2 3 4 {synset} 5 6 7 8"])

    examples = _load("imagenet2012_val", manual, tmp_path)
    assert sorted((ex["image_id"].decode(), ex["label"]) for ex in examples) == [
        ("ILSVRC2012_val_00000001", 999),
        ("ILSVRC2012_val_00000002", 0),
    ]
    assert all(ex["image"].shape == (H, W, 3) for ex in examples)  # CMYK converted to RGB.
    assert first == "n01440764" and len(imagenet.IMAGENET_SYNSETS) == 1000


def test_imagenet_v2_folders_are_class_indices(tmp_path):
    folder = tmp_path / "manual/imagenetv2-matched-frequency-format-val"
    for label in (0, 7, 999):
        _write_image(folder / f"{label}/a{label}.jpeg")

    examples = _load("imagenet_v2_matched_frequency", tmp_path / "manual", tmp_path)
    assert [(ex["image_id"].decode(), ex["label"]) for ex in examples] == [
        ("0/a0", 0),
        ("7/a7", 7),
        ("999/a999", 999),
    ]
    builder = eval_datasets.BUILDERS["imagenet_v2_matched_frequency"](
        data_dir=str(tmp_path / "tfds")
    )
    assert builder.info.features["label"].int2str(999) == imagenet.IMAGENET_SYNSETS[999]


def test_waterbirds_splits_and_place(tmp_path):
    root = tmp_path / "manual/waterbird_complete95_forest2water2"
    rows = [
        # img_id, img_filename, y, split, place
        (1, "001.Black_footed_Albatross/a.jpg", 1, 0, 1),
        (2, "001.Black_footed_Albatross/b.jpg", 1, 2, 0),
        (3, "002.Laysan_Albatross/c.jpg", 1, 1, 1),
        (4, "094.White_breasted_Nuthatch/d.jpg", 0, 2, 1),
    ]
    root.mkdir(parents=True)
    with (root / "metadata.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["img_id", "img_filename", "y", "split", "place", "place_filename"])
        for img_id, filename, y, split, place in rows:
            _write_image(root / filename, "L" if img_id == 4 else "RGB")
            writer.writerow([img_id, filename, y, split, place, "/b/bamboo_forest/x.jpg"])

    test = _load("waterbirds", tmp_path / "manual", tmp_path)
    assert [(ex["image_id"].decode(), ex["label"], ex["place"]) for ex in test] == [
        ("001.Black_footed_Albatross/b.jpg", 1, 0),
        ("094.White_breasted_Nuthatch/d.jpg", 0, 1),
    ]
    assert all(ex["image"].shape == (H, W, 3) for ex in test)  # Grayscale decoded to RGB.
    assert len(_load("waterbirds", tmp_path / "manual", tmp_path, split="train")) == 1
    assert len(_load("waterbirds", tmp_path / "manual", tmp_path, split="validation")) == 1
    assert waterbirds.WATERBIRDS_CLASS_NAMES == ("landbird", "waterbird")


def test_missing_layout_names_the_missing_path(tmp_path):
    manual = tmp_path / "manual"
    (manual / "VOCdevkit/VOC2012/JPEGImages").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"VOCdevkit/VOC2012/SegmentationClass") as error:
        eval_datasets.load("voc2012_seg", str(manual), str(tmp_path / "tfds"))
    assert "ImageSets/Segmentation/val.txt" in str(error.value)
    assert "JPEGImages," not in str(error.value)  # Present paths are not reported missing.
    with pytest.raises(FileNotFoundError, match=r"ILSVRC2012_img_val"):
        eval_datasets.load("imagenet2012_val", str(manual), str(tmp_path / "tfds"))


def test_unknown_dataset_name(tmp_path):
    with pytest.raises(KeyError, match="voc2012_seg"):
        eval_datasets.load("pascal", str(tmp_path), str(tmp_path))
