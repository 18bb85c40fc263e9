"""The protocol switches of configs/eval.py (background labels, prompt templates, mIoU over present or
all classes, Jaccard with or without the background segment, group count) on a random-init tiny model
and VOC fixtures with absent classes, against a brute-force reference computed here: the texts written
out here and encoded in one batch, label embeddings averaged in numpy, argmax and the stuff-to-background
mapping per pixel, IoU and Jaccard by counting pixels per class, segment and group."""

import importlib.util
import os

import numpy as np
import pytest
from PIL import Image

from clippy_jax import sharding
from clippy_jax.data.eval_datasets.voc import VOC_CLASS_NAMES
from clippy_jax.evaluate import engine, geometry, grouping, loading, segmentation, zero_shot
from clippy_jax.evaluate.metrics import IGNORE_LABEL
from tests.helpers import REPO
from tests.test_inference import _save_tiny

_spec = importlib.util.spec_from_file_location("eval_config", os.path.join(REPO, "configs/eval.py"))
eval_config = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(eval_config)

H, W, SIDE = 24, 32, 32
NUM_CLASSES = 21
# Three VOC images whose labels cover 6 of the 21 classes (the others are absent from the subset).
LABELS = {
    "2007_000032": [(0, 0, 12, 32, 0), (12, 0, 24, 20, 15), (12, 20, 24, 32, 3), (10, 0, 12, 32, IGNORE_LABEL)],
    "2007_000039": [(0, 0, 24, 16, 0), (0, 16, 24, 32, 20)],
    "2007_000042": [(0, 0, 24, 32, 0), (4, 4, 20, 14, 8), (4, 18, 20, 30, 1)],
}


def _label_map(boxes) -> np.ndarray:
    label = np.zeros((H, W), np.uint8)
    for top, left, bottom, right, value in boxes:
        label[top:bottom, left:right] = value
    return label


@pytest.fixture(scope="module")
def context(tmp_path_factory):
    converted = str(tmp_path_factory.mktemp("converted"))
    _save_tiny(converted)
    manual = tmp_path_factory.mktemp("manual")
    root = manual / "VOCdevkit/VOC2012"
    for directory in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / directory).mkdir(parents=True)
    for seed, (image_id, boxes) in enumerate(LABELS.items()):
        pixels = np.random.default_rng(seed).integers(0, 256, (H, W, 3), np.uint8)
        Image.fromarray(pixels).save(root / f"JPEGImages/{image_id}.jpg", quality=100)
        Image.fromarray(_label_map(boxes), mode="L").save(root / f"SegmentationClass/{image_id}.png")
    (root / "ImageSets/Segmentation/val.txt").write_text("\n".join(LABELS) + "\n")
    config = eval_config.get_config("voc")
    config.init_from = converted
    config.data.mean, config.data.std = (0.5,) * 3, (0.25,) * 3
    config.eval.update(manual_dir=str(manual), tfds_dir=str(tmp_path_factory.mktemp("tfds")), batch_size=8,
                       progress=False)
    loaded = loading.load(config)
    ctx = engine.EvalContext(config, loaded.model, loaded.tokenizer, loaded.data_config,
                             sharding.make_mesh(config.mesh))
    ctx.use_params(loaded.params)
    examples = list(engine.dataset_examples(ctx, eval_config.get_config("voc").eval.tasks.voc).iterator)
    for example, boxes in zip(examples, LABELS.values()):  # the images as decoded by the dataset builder
        np.testing.assert_array_equal(example["label"], _label_map(boxes))
    return ctx, [e["image"] for e in examples], [e["label"] for e in examples]


def _task(arg: str, name: str = "voc"):
    return eval_config.get_config(f"{name},res={SIDE},{arg}".rstrip(",")).eval.tasks[name]


def _dense(ctx, image: np.ndarray) -> np.ndarray:
    """Unit per-location embeddings [h, w, E] of the image resized to SIDE x SIDE."""
    pixels = geometry.normalize(geometry.resize_image(image, (SIDE, SIDE)), ctx.data_config.mean, ctx.data_config.std)
    return np.asarray(zero_shot.encode_image(ctx.model, ctx.params, pixels[None])[1][0], np.float64)


def _text_embeddings(ctx, texts: list[str]) -> dict[str, np.ndarray]:
    """{text: unit embedding} in one batch."""
    unique = sorted(set(texts))
    emb = ctx.model.apply({"params": ctx.params}, ctx.tokenizer.encode(unique), method=ctx.model.encode_text)
    return dict(zip(unique, np.asarray(emb, np.float64)))


def _brute_force_miou(ctx, images, labels, label_texts: list[list[str]], label_class: list[int], over: str):
    """mIoU from per-pixel argmax over labels (each the normalised mean of its texts' embeddings)."""
    text_emb = _text_embeddings(ctx, [t for texts in label_texts for t in texts])
    emb = np.stack([np.mean([text_emb[t] for t in texts], axis=0) for texts in label_texts])
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    intersection, union = np.zeros(NUM_CLASSES), np.zeros(NUM_CLASSES)
    for image, label in zip(images, labels):
        scores = np.asarray(geometry.upsample(_dense(ctx, image) @ emb.T, label.shape))  # [H, W, L]
        predicted = np.vectorize(lambda i: label_class[i])(scores.argmax(-1))
        valid = label != IGNORE_LABEL
        for c in range(NUM_CLASSES):
            intersection[c] += np.sum((label == c) & (predicted == c) & valid)
            union[c] += np.sum(((label == c) | (predicted == c)) & valid)
    present = union > 0
    iou = [intersection[c] / union[c] if present[c] else 0.0 for c in range(NUM_CLASSES)]
    if over == "present":
        return float(np.mean([iou[c] for c in range(NUM_CLASSES) if present[c]])), present
    return float(np.mean(iou)), present


VOC_PROMPTS = zero_shot.read_label_prompts("voc2012_seg.txt", VOC_CLASS_NAMES)
REPLICATION_NAMES = ["background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
                     "cow", "table", "dog", "horse", "motorbike", "person", "potted plant", "sheep", "sofa", "train",
                     "television monitor"]
STUFF = ["bag", "bed", "bench", "book", "building", "cabinet", "ceiling", "cloth", "computer", "cup", "door", "fence",
         "floor", "flower", "food", "grass", "ground", "keyboard", "light", "mountain", "mouse", "curtain", "platform",
         "sign", "plate", "road", "rock", "shelves", "sidewalk", "sky", "snow", "bedclothes", "track", "tree", "truck",
         "wall", "water", "window", "wood"]


def _photo(name: str) -> str:
    return f"a photo of {'an' if name[0] in 'aeiou' else 'a'} {name}"


def _check(ctx, images, labels, task, label_texts, label_class, over):
    result = segmentation.segmentation(ctx, task).summary
    expected, present = _brute_force_miou(ctx, images, labels, label_texts, label_class, over)
    assert result["num_labels"] == len(label_texts)
    assert abs(result["miou"] - expected) <= 1e-6, (result["miou"], expected)
    return result, present


def test_paper_protocol_is_the_default(context):
    ctx, images, labels = context
    result, _ = _check(ctx, images, labels, _task(""), VOC_PROMPTS, list(range(NUM_CLASSES)), "present")
    assert result["templates"] == ["{}"]


def test_background_as_separate_labels_mapped_to_background(context):
    ctx, images, labels = context
    texts = VOC_PROMPTS + [[name] for name in STUFF]
    _check(ctx, images, labels, _task("background=labels"), texts, list(range(NUM_CLASSES)) + [0] * 39, "present")


@pytest.mark.parametrize("templates", ["photo", "file"])
def test_prompt_templates(context, tmp_path, templates):
    ctx, images, labels = context
    if templates == "photo":
        fill = [_photo]
    else:
        path = tmp_path / "templates.txt"
        path.write_text("a photo of the {}.\nitap of a {}.\n")
        templates, fill = str(path), [lambda n: f"a photo of the {n}.", lambda n: f"itap of a {n}."]
    texts = [[f(p) for p in prompts for f in fill] for prompts in VOC_PROMPTS]
    _check(ctx, images, labels, _task(f"templates={templates}"), texts, list(range(NUM_CLASSES)), "present")


def test_miou_over_all_classes_counts_absent_ones_as_zero(context, tmp_path):
    """Classes 4..20 but 8 and 15 share the prompt of background, which wins their ties: they are
    never predicted, and 12 of them are absent from the subset's labels too."""
    ctx, images, labels = context
    prompts = [[name] if i in (0, 1, 2, 3, 8, 15) else ["background"] for i, name in enumerate(VOC_CLASS_NAMES)]
    path = tmp_path / "prompts.txt"
    path.write_text("".join(f"{name}: {p[0]}\n" for name, p in zip(VOC_CLASS_NAMES, prompts)))
    numbers = {}
    for over in ("present", "all"):
        task = _task(f"miou={over}")
        task.prompts = str(path)
        result, present = _check(ctx, images, labels, task, prompts, list(range(NUM_CLASSES)), over)
        numbers[over] = result["miou"]
    assert present.sum() <= 9 and not present[[4, 5, 6, 7, 9, 10, 11, 12, 13, 14, 16, 17]].any()
    assert all(result["per_class_iou"][name] == 0.0 for name, p in zip(VOC_CLASS_NAMES, present) if not p)
    assert numbers["all"] == pytest.approx(numbers["present"] * present.sum() / NUM_CLASSES, abs=1e-9)


def test_replication_protocol(context):
    """kahnchana/clippy's VOC evaluation: its names, its 39 stuff labels as background, "a photo of
    a/an {}", mIoU over all 21 classes with absent ones at 0."""
    ctx, images, labels = context
    task = eval_config.get_config("voc_replication").eval.tasks.voc_replication
    task.input_size = (SIDE, SIDE)
    texts = [[_photo(name)] for name in REPLICATION_NAMES + STUFF]
    _, present = _check(ctx, images, labels, task, texts, list(range(NUM_CLASSES)) + [0] * 39, "all")
    assert not present.all()  # some classes are neither labelled nor predicted in the subset


def _brute_force_jaccard(ctx, images, labels, num_groups: int, background: bool) -> float:
    """Mean over ground-truth segments of the best IoU with any PCA group (numpy SVD half-axes)."""
    values = []
    for image, label in zip(images, labels):
        dense = _dense(ctx, image)
        x = dense.reshape(-1, dense.shape[-1])
        centred = x - x.mean(axis=0)
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        axes = []
        for v in vt[: (num_groups + 1) // 2]:
            projection = centred @ v
            v = v if projection[np.abs(projection).argmax()] > 0 else -v
            axes += [v, -v]
        scores = (centred @ np.stack(axes[:num_groups]).T).reshape(*dense.shape[:2], num_groups)
        groups = np.asarray(geometry.upsample(scores.astype(np.float32), label.shape)).argmax(-1)
        for value in np.unique(label):
            if value == IGNORE_LABEL or (value == 0 and not background):
                continue
            segment = label == value
            valid = label != IGNORE_LABEL
            values.append(max(np.sum(segment & (groups == g)) / np.sum((segment | (groups == g)) & valid)
                              for g in range(num_groups)))
    return float(np.mean(values))


@pytest.mark.parametrize("arg, num_groups, background", [("", 2, True), ("jaccard_background=out,groups=3", 3, False)])
def test_jaccard_background_and_group_count(context, arg, num_groups, background):
    ctx, images, labels = context
    result = grouping.bottom_up(ctx, _task(arg, "voc_grouping")).summary
    assert result["num_groups"] == num_groups and result["num_segments"] == 8 - 3 * (not background)
    assert abs(result["jaccard"] - _brute_force_jaccard(ctx, images, labels, num_groups, background)) <= 1e-6


def test_protocol_options_are_checked():
    with pytest.raises(ValueError, match="miou='some'"):
        eval_config.get_config("voc,miou=some")
    with pytest.raises(ValueError, match="groups='two'"):
        eval_config.get_config("voc_grouping,groups=two")
