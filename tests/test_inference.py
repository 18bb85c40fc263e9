"""The inference API on a random-init tiny model saved as a converted checkpoint: what it accepts,
what it refuses (naming the argument, before any allocation or compilation), overlays made to be looked
at, and one compilation per shape bucket."""

import colorsys
import os
import tracemalloc

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

from clippy_jax import inference
from clippy_jax.convert import load_pretrained, save_pretrained
from clippy_jax.data import synthetic
from clippy_jax.data.tokenizer import Tokenizer, train_sentencepiece
from clippy_jax.evaluate import loading
from clippy_jax.evaluate.render import MIN_DISPLAY_SIDE, labelled_overlay, palette
from clippy_jax.inference import Clippy
from clippy_jax.models import build_model
from tests.helpers import REPO

IMAGE = np.random.default_rng(0).integers(0, 256, (37, 53, 3), np.uint8)


def _save_tiny(directory: str) -> None:
    words = [name for c in synthetic.CATEGORIES for name in c.synonyms] + list(synthetic.BACKGROUND_NAMES)
    captions = [f"a photo of a {a} and a {b}" for a in words for b in words[::3]]
    tokenizer_path = train_sentencepiece(captions, os.path.join(directory, "tokenizer.model"), vocab_size=96)
    model_config = loading.load_config_file(os.path.join(REPO, "configs/demo.py:size=tiny")).model.to_dict()
    model_config["text"]["vocab_size"] = Tokenizer(tokenizer_path, 16).vocab_size
    model = build_model(ml_collections.ConfigDict(model_config))
    batch = dict(image=jnp.zeros((1, 64, 64, 3)), tokens=jnp.ones((1, 16), jnp.int32))
    params = jax.tree.map(np.asarray, nn.unbox(jax.jit(model.init)(jax.random.key(0), batch)["params"]))
    save_pretrained(directory, params, model_config, source={"kind": "test"})


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> str:
    directory = str(tmp_path_factory.mktemp("converted"))
    _save_tiny(directory)
    return directory


@pytest.fixture(scope="module")
def clippy(converted) -> Clippy:
    return Clippy.load(converted, mean=(0.5,) * 3, std=(0.25,) * 3, image_size=32)


def test_segment_any_size_image(clippy):
    out = clippy.segment(IMAGE, ["zebra", ["tiger", "striped tiger"], "sand"], render=True)
    assert out.labels.shape == IMAGE.shape[:2] and out.scores.shape == (*IMAGE.shape[:2], 3)
    np.testing.assert_array_equal(out.labels, out.scores.argmax(-1))
    assert out.names == ["zebra", "tiger", "sand"]
    assert out.overlay.dtype == np.uint8 and out.overlay.shape[0] == IMAGE.shape[0] * 11  # enlarged to >= 384
    permuted = clippy.segment(IMAGE, ["sand", "zebra", ["tiger", "striped tiger"]])
    np.testing.assert_allclose(permuted.scores, out.scores[..., [2, 0, 1]], atol=1e-6)
    assert clippy.segment(IMAGE, ["zebra"]).overlay is None


def test_group_and_sliding_windows(clippy):
    shape = (20, 90, 3)  # a wide image: the model sees 32 x 144 pixels, 4 x 18 patches
    image = np.random.default_rng(1).integers(0, 256, shape, np.uint8)
    out = clippy.group(image, num_groups=3, render=True)
    assert out.groups.shape == shape[:2] and set(np.unique(out.groups)) <= {0, 1, 2}
    assert out.overlay.shape[0] == shape[0] * 20 and out.names == ["group 1", "group 2", "group 3"]
    sliding = Clippy(clippy.model, clippy.params, clippy.tokenizer, clippy.mean, clippy.std, image_size=32, window=16)
    assert sliding.stride == 10
    assert sliding.segment(image, ["zebra", "sand"]).labels.shape == shape[:2]
    assert set(np.unique(sliding.group(image, num_groups=2).groups)) <= {0, 1}


def test_classify(clippy):
    out = clippy.classify(IMAGE, ["zebra", "tiger", ["fish", "goldfish"]], templates=("a photo of a {}.", "{}"),
                          render=True)
    assert out.probabilities.shape == (3,) and out.probabilities.sum() == pytest.approx(1.0, rel=1e-5)
    assert out.names == ["zebra", "tiger", "fish"] and out.overlay.dtype == np.uint8


def test_load_errors(converted, tmp_path):
    params, model_config = load_pretrained(converted)
    save_pretrained(str(tmp_path / "partial"), {"image_tower": params["image_tower"]}, model_config, {})
    with pytest.raises(ValueError, match="partial checkpoint without \\['text_tower'\\]"):
        Clippy.load(str(tmp_path / "partial"))
    (tmp_path / "train/checkpoints/5/default").mkdir(parents=True)
    with pytest.raises(ValueError, match="config.model_config"):
        Clippy.load(str(tmp_path / "train"))


def test_overlay_of_a_small_image_is_enlarged_with_the_legend_beside_it(clippy):
    image = np.random.default_rng(2).integers(0, 256, (64, 64, 3), np.uint8)
    out = clippy.segment(image, ["zebra", "sand", "tiger"], background=["floor", "wall"], render=True)
    assert out.names == ["background", "zebra", "sand", "tiger"]
    scale = MIN_DISPLAY_SIDE // 64
    expected = np.round(0.5 * image + 0.5 * 255 * palette(4)[out.labels]).astype(np.uint8)
    expected = np.kron(expected, np.ones((scale, scale, 1), np.uint8))  # nearest neighbour: labels stay sharp
    shown = out.overlay[:, :expected.shape[1]]
    assert out.overlay.shape[0] == expected.shape[0]
    covered = (np.abs(shown.astype(int) - expected).max(-1) > 1).mean()
    assert covered < 0.25  # before: the legend covered about two thirds of a 64x64 overlay
    legend = out.overlay[:, expected.shape[1]:]
    assert (legend < 64).all(-1).sum() > 100  # its text and swatches
    assert (legend[:, -2:] == 255).all() and (legend[-2:] == 255).all()  # nothing cut at the edges


def test_palette_neighbours_differ_in_hue():
    hues = [colorsys.rgb_to_hsv(*color)[0] for color in palette(41)[1:]]
    steps = [min(abs(a - b), 1 - abs(a - b)) for a, b in zip(hues, hues[1:])]
    assert min(steps) > 0.1  # before: tab20's pairs, two shades of one hue side by side (a step of 0)


def test_legend_of_a_large_photo_is_legible_at_screen_width():
    labels = np.zeros((3000, 4000), np.int64)
    labels[:, 2000:] = 1
    figure = labelled_overlay(np.zeros((3000, 4000, 3), np.uint8), labels, ["zebra", "tiger"], palette(3)[1:],
                              title="label: share of the image")
    ink = (figure[:, 4000:] < 64).all(-1).any(1)  # rows of the legend with text or swatches
    first_line = np.argmax(ink[np.argmax(ink):] == 0)  # height of the title's letters
    assert first_line * 1280 / figure.shape[1] >= 9  # pixels on a 1280-pixel-wide screen; before: ~5 at 4000x3000


def test_accepted_image_forms_match_the_rgb_uint8_image(clippy, tmp_path):
    rgb = np.random.default_rng(3).integers(0, 256, (30, 44, 3), np.uint8)
    gray = rgb[..., 0]
    reference = clippy.segment(rgb, ["zebra", "sand"]).scores
    same_as_rgb = [
        rgb.astype(np.float32) / 255.0,  # float in [0, 1]
        rgb.astype(np.uint16) * 257,  # uint16 in [0, 65535]
        np.concatenate([rgb, np.full((30, 44, 1), 7, np.uint8)], axis=-1),  # RGBA: alpha ignored
        Image.fromarray(rgb),
        Image.fromarray(rgb).convert("RGBA"),
        jnp.asarray(rgb),
    ]
    for image in same_as_rgb:
        np.testing.assert_allclose(clippy.segment(image, ["zebra", "sand"]).scores, reference, atol=1e-5)
    gray_reference = clippy.segment(np.repeat(gray[..., None], 3, axis=-1), ["zebra", "sand"]).scores
    for image in (gray, gray[..., None], Image.fromarray(gray), gray.astype(np.float64) / 255.0):
        np.testing.assert_allclose(clippy.segment(image, ["zebra", "sand"]).scores, gray_reference, atol=1e-5)
    # EXIF orientation 6 (rotate 90 degrees clockwise to display) is applied to PIL images.
    tagged = Image.fromarray(rgb)
    exif = tagged.getexif()
    exif[0x0112] = 6
    tagged.save(tmp_path / "exif.jpg", exif=exif, quality=100)
    assert inference.read_image(str(tmp_path / "exif.jpg")).shape == (44, 30, 3)


def test_a_list_of_mixed_sizes_compiles_the_image_tower_once_per_bucket(clippy):
    sizes = [(37, 53), (40, 60), (45, 64), (60, 40)]  # aspect 1.43, 1.5, 1.42: one landscape bucket; a portrait
    images = [np.random.default_rng(i).integers(0, 256, (*s, 3), np.uint8) for i, s in enumerate(sizes)]
    before = clippy._dense._cache_size()
    out = clippy.segment(images, ["zebra", "sand"])
    assert [o.labels.shape for o in out] == sizes
    assert clippy._dense._cache_size() - before <= 2  # (32, 48) and (48, 32), whatever ran before
    assert {inference.bucketed_shape(s, 32, 8) for s in sizes} == {(32, 48), (48, 32)}
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, duration, **kw: compiles.append(event) if "backend_compile" in event else None)
    again = clippy.segment(np.random.default_rng(9).integers(0, 256, (41, 61, 3), np.uint8), ["zebra", "sand"])
    assert again.labels.shape == (41, 61) and not compiles, compiles
    clippy.segment(np.zeros((20, 60, 3), np.uint8), ["zebra", "sand"])  # a new bucket, (32, 96): the listener sees it
    assert compiles


def test_bucketed_shapes_keep_the_aspect_within_an_eighth():
    rng = np.random.default_rng(0)
    shapes = set()
    for _ in range(500):
        h, w = rng.integers(16, 4000, 2)
        if max(h, w) / min(h, w) > 3:
            continue
        out = inference.bucketed_shape((h, w), 448, 16)
        assert min(out) == 448 and all(s % 16 == 0 for s in out) and (out[0] == out[1] or (out[0] < out[1]) == (h < w))
        assert abs(np.log((max(out) / min(out)) / (max(h, w) / min(h, w)))) < np.log(1.13)
        shapes.add(out)
    assert len(shapes) <= 2 * 9  # ratios 1, 1.25, ..., 3 in either orientation


HUGE = np.broadcast_to(np.zeros((1, 1, 3), np.uint8), (9000, 12000, 3))  # 324 MB as an array, no memory here
BAD_CALLS = [
    ("segment", dict(images=np.zeros((2, 16, 16, 3), np.uint8)), "image has shape \\(2, 16, 16, 3\\).*pass a list"),
    ("segment", dict(images=np.zeros((16, 16, 2), np.uint8)), "image has shape \\(16, 16, 2\\)"),
    ("segment", dict(images=np.zeros((0, 0, 3), np.uint8)), "image is empty"),
    ("segment", dict(images=np.zeros((1, 1000, 3), np.uint8)), "image has shape \\(1, 1000, 3\\).*aspect ratio"),
    ("segment", dict(images=np.full((16, 16, 3), 200.0)), "image is float64 with values in \\[200, 200\\].*\\[0, 1\\]"),
    ("segment", dict(images=np.full((16, 16), np.nan, np.float32)), "image is float32 .*nan"),
    ("segment", dict(images=np.zeros((16, 16, 3), np.int32)), "image has dtype int32"),
    ("segment", dict(images=[IMAGE, np.zeros((4, 400), np.uint8)]), "images\\[1\\] has shape \\(4, 400\\)"),
    ("segment", dict(images=[]), "images is an empty list"),
    ("segment", dict(images=[[1, 2], [3, 4]]), "images\\[0\\] is a list"),
    ("segment", dict(images=HUGE), "image of 9000x12000 pixels .* over the budget max_bytes"),
    ("segment", dict(images=IMAGE, prompts=[]), "prompts must be a non-empty list"),
    ("segment", dict(images=IMAGE, prompts="zebra"), "prompts must be a non-empty list"),
    ("segment", dict(images=IMAGE, prompts=["zebra", " "]), "prompts has an empty prompt"),
    ("segment", dict(images=IMAGE, background=[""]), "background has an empty prompt"),
    ("group", dict(images=IMAGE, num_groups=0), "num_groups must be an integer >= 1, got 0"),
    ("group", dict(images=IMAGE, num_groups=2.5), "num_groups must be an integer >= 1, got 2.5"),
    ("classify", dict(images=IMAGE, labels=[]), "labels must be a non-empty list"),
    ("classify", dict(images=IMAGE, templates=("a photo",)), "templates must be a non-empty list"),
]


@pytest.mark.parametrize(("method", "arguments", "message"), BAD_CALLS, ids=[m for _, _, m in BAD_CALLS])
def test_bad_input_is_refused_naming_the_argument_before_any_work(clippy, method, arguments, message):
    arguments = dict(arguments)
    images = arguments.pop("images")
    if method != "group":
        key = "prompts" if method == "segment" else "labels"
        arguments.setdefault(key, ["zebra", "sand"])
    compiled = clippy._dense._cache_size(), clippy._pooled._cache_size()
    tracemalloc.start()
    with pytest.raises(ValueError, match=message):
        getattr(clippy, method)(images, **arguments)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 1 << 20, f"{peak} bytes allocated before refusing"  # far below the 2 GiB budget
    assert (clippy._dense._cache_size(), clippy._pooled._cache_size()) == compiled  # the model never ran


def test_an_image_within_a_small_budget_runs_and_one_above_is_refused(clippy):
    small = Clippy(clippy.model, clippy.params, clippy.tokenizer, clippy.mean, clippy.std, image_size=32,
                   max_bytes=100 * 160 * (2 + 4) * 4)
    assert small.segment(np.zeros((100, 160, 3), np.uint8), ["zebra", "sand"]).labels.shape == (100, 160)
    with pytest.raises(ValueError, match="image of 100x161 pixels with 2 score maps .* max_bytes=384000"):
        small.segment(np.zeros((100, 161, 3), np.uint8), ["zebra", "sand"])
