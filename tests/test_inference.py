"""The inference API on a random-init tiny model saved as a converted checkpoint."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from clippy_jax.convert import load_pretrained, save_pretrained
from clippy_jax.data import synthetic
from clippy_jax.data.tokenizer import Tokenizer, train_sentencepiece
from clippy_jax.evaluate import checkpoints
from clippy_jax.inference import Clippy
from clippy_jax.models import build_model
from tests.helpers import REPO

IMAGE = np.random.default_rng(0).integers(0, 256, (37, 53, 3), np.uint8)


def _save_tiny(directory: str) -> None:
    words = [name for c in synthetic.CATEGORIES for name in c.synonyms] + list(synthetic.BACKGROUND_NAMES)
    captions = [f"a photo of a {a} and a {b}" for a in words for b in words[::3]]
    tokenizer_path = train_sentencepiece(captions, os.path.join(directory, "tokenizer.model"), vocab_size=96)
    model_config = checkpoints.load_config_file(os.path.join(REPO, "configs/demo.py:size=tiny")).model.to_dict()
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
    assert out.overlay.dtype == np.uint8 and out.overlay.ndim == 3 and out.overlay.shape[2] == 3
    permuted = clippy.segment(IMAGE, ["sand", "zebra", ["tiger", "striped tiger"]])
    np.testing.assert_allclose(permuted.scores, out.scores[..., [2, 0, 1]], atol=1e-6)
    assert clippy.segment(IMAGE, ["zebra"]).overlay is None


def test_group_and_sliding_windows(clippy):
    shape = (20, 90, 3)  # a wide image: the model sees 32 x 144 pixels, 4 x 18 patches
    image = np.random.default_rng(1).integers(0, 256, shape, np.uint8)
    out = clippy.group(image, num_groups=3, render=True)
    assert out.groups.shape == shape[:2] and set(np.unique(out.groups)) <= {0, 1, 2}
    assert out.overlay.dtype == np.uint8
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
