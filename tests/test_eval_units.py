"""Evaluation building blocks: prompt files (against the paper's appendix), window geometry and
stitching, the Waterbirds decision rule."""

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clippy_jax.data.eval_datasets import ade20k, cityscapes, coco, voc
from clippy_jax.evaluate import geometry, waterbirds, zero_shot

APPENDIX = "/work/shared/reference/clippy-paper-appendix.txt"
LINE = re.compile(r"^(?:- )?\d+\. (?:\*\*)?([^:*]+?):(?:\*\*)? (.*)$")


@pytest.mark.parametrize(
    ("filename", "class_names"),
    [
        ("voc2012_seg.txt", voc.VOC_CLASS_NAMES),
        ("coco_object.txt", coco.COCO_OBJECT_CLASS_NAMES),
        ("ade20k_150.txt", ade20k.ADE20K_CLASS_NAMES),
        ("cityscapes27.txt", cityscapes.CITYSCAPES27_CLASS_NAMES),
        ("waterbirds.txt", waterbirds.CATEGORIES),
    ],
)
def test_prompt_files_cover_exactly_the_dataset_classes(filename, class_names):
    prompts = zero_shot.read_label_prompts(filename, class_names)
    assert len(prompts) == len(class_names) == len(zero_shot.read_lines(filename))
    assert all(prompts) and all(p for group in prompts for p in group)


def test_coco_panoptic_prompts_are_the_things_and_53_stuff_classes():
    lines = dict(line.split(": ", 1) for line in zero_shot.read_lines("coco_panoptic133.txt"))
    things = dict(line.split(": ", 1) for line in zero_shot.read_lines("coco_object.txt"))
    assert len(lines) == 133 and set(coco.COCO_THING_NAMES) <= set(lines)
    assert all(lines[name] == things[name] for name in coco.COCO_THING_NAMES)
    assert "wall-other-merged" in lines and "playingfield" in lines


def test_imagenet_names_and_templates():
    names = zero_shot.read_lines("imagenet_classes.txt")
    templates = zero_shot.read_lines("imagenet_templates.txt")
    assert len(names) == 1000 and (names[0], names[999]) == ("tench", "toilet paper")
    # OpenAI's curated list (open_clip 830197e) repeats these two names.
    assert names[836] == names[837] == "sunglasses" and names[657] == names[744] == "missile"
    assert len(templates) == len(set(templates)) == 80 and all(t.count("{}") == 1 for t in templates)


def _appendix_sections() -> dict[str, list[tuple[str, str]]]:
    text = open(APPENDIX).read()
    prompts = text[text.index("I. Prompts for Zero-shot Segmentation"):]
    bounds = {"voc": ("Pascal VOC 2012 [27]", "COCO 2017 [54]"), "coco": ("COCO 2017 [54]", "[ADE-20K"),
              "ade": ("[ADE-20K", "\nPascal VOC 2012\n")}
    sections = {}
    for name, (start, end) in bounds.items():
        part = prompts[prompts.index(start):]
        part = part[: part.index(end)]
        sections[name] = [m.groups() for m in map(LINE.match, map(str.strip, part.splitlines())) if m]
    robustness = re.sub(r"Magnolia\s+Warbler", "Magnolia Warbler", text[text.index("H. Details of robustness"):])
    sections["waterbirds"] = [(k, re.search(rf"- \*\*{k}:\*\* (.*)", robustness).group(1).strip())
                              for k in waterbirds.CATEGORIES]
    return sections


@pytest.mark.skipif(not os.path.exists(APPENDIX), reason="the paper appendix is not available")
def test_prompt_files_copy_the_appendix_verbatim():
    sections = _appendix_sections()
    for filename, section, extra in [("voc2012_seg.txt", "voc", 0), ("coco_object.txt", "coco", 1),
                                     ("ade20k_150.txt", "ade", 0), ("waterbirds.txt", "waterbirds", 0)]:
        ours = [line.split(": ", 1)[1] for line in zero_shot.read_lines(filename)][extra:]
        assert ours == [prompts for _, prompts in sections[section]], filename
    assert (len(sections["voc"]), len(sections["coco"]), len(sections["ade"])) == (21, 80, 150)
    # Appendix labels equal the dataset's names except for the first-word abbreviations of ADE-20K.
    keys = [line.split(": ", 1)[0] for line in zero_shot.read_lines("ade20k_150.txt")]
    assert sum(k != label for k, (label, _) in zip(keys, sections["ade"])) == 15
    assert all(k.startswith(label) for k, (label, _) in zip(keys, sections["ade"]))


def test_window_origins_cover_the_length_with_the_last_window_flush():
    assert geometry.window_origins(100, 100, 50) == [0]
    assert geometry.window_origins(80, 100, 50) == [0]
    assert geometry.window_origins(250, 100, 60) == [0, 60, 120, 150]
    for length, window, stride in [(224, 64, 48), (333, 224, 149), (500, 448, 298)]:
        origins = geometry.window_origins(length, window, stride)
        covered = np.zeros(length, bool)
        for o in origins:
            covered[o:o + window] = True
        assert covered.all() and origins[-1] == length - window
        assert all(0 < b - a <= stride for a, b in zip(origins, origins[1:]))


def test_sliding_windows_of_an_image():
    image = np.random.default_rng(0).integers(0, 256, (30, 50, 3), np.uint8)
    geo = geometry.Geometry(window=16, stride=10, short_side=20)
    crops, boxes, resized = geo.windows(image)
    assert resized == (20, 33) and crops.shape == (len(boxes), 16, 16, 3)
    assert boxes == [(0, 0), (0, 10), (0, 17), (4, 0), (4, 10), (4, 17)]
    full = geometry.resize_image(image, resized)
    np.testing.assert_array_equal(crops[2], full[0:16, 17:33])
    resize_crops, resize_boxes, _ = geometry.Geometry(input_size=(24, 40)).windows(image)
    assert resize_crops.shape == (1, 24, 40, 3) and resize_boxes == [(0, 0)]


def test_stitching_averages_overlapping_windows():
    # Two 4x4 windows on a 4x6 image, overlapping in columns 2..3; constant scores 1 and 3.
    scores = np.stack([np.full((2, 2, 1), 1.0), np.full((2, 2, 1), 3.0)]).astype(np.float32)
    stitched = np.asarray(geometry.to_label_resolution(scores, [(0, 0), (0, 2)], (4, 6), (4, 4), (4, 6)))[..., 0]
    np.testing.assert_allclose(stitched, np.tile([1, 1, 2, 2, 3, 3], (4, 1)), atol=1e-6)


def test_resize_mode_upsamples_the_grid_straight_to_label_resolution():
    scores = jax.random.normal(jax.random.key(0), (1, 4, 4, 3))
    out = geometry.to_label_resolution(np.asarray(scores), [(0, 0)], (32, 32), (32, 32), (37, 50))
    np.testing.assert_array_equal(out, jax.image.resize(scores[0], (37, 50, 3), "bilinear"))


def test_shorter_side_shape():
    assert geometry.shorter_side_shape((375, 500), 448) == (448, 597)
    assert geometry.shorter_side_shape((375, 500), 448, multiple=16) == (448, 592)
    assert geometry.shorter_side_shape((1024, 2048), 224) == (224, 448)


def test_waterbirds_decision_rule():
    # Columns: background, waterbird, landbird. Dataset labels: 0 landbird, 1 waterbird.
    similarity = jnp.asarray([
        [[0.9, 0.1, 0.0], [0.1, 0.5, 0.2], [0.0, 0.3, 0.6]],  # landbird's location is closer: landbird
        [[0.9, 0.1, 0.0], [0.1, 0.7, 0.2], [0.0, 0.3, 0.6]],  # waterbird's location is closer: waterbird
        [[0.9, 0.8, 0.0], [0.9, 0.2, 0.3], [0.9, 0.3, 0.6]],  # background everywhere: best bird anywhere
        [[0.1, 0.2, 0.0], [0.9, 0.1, 0.8], [0.9, 0.1, 0.5]],  # landbird only wins at no location
    ])
    np.testing.assert_array_equal(waterbirds.spatial_prediction(similarity), [0, 1, 1, 1])
