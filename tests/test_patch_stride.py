"""Overlapping patches (appendix E) outside the ViT: dense maps at the checkpoint's stride, the grid
the training step and the pipeline use, and the start-up checks of the patch settings."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clippy_jax import config_checks
from clippy_jax.data import preprocess
from clippy_jax.evaluate import loading, zero_shot
from clippy_jax.models import build_model
from clippy_jax.models.vit import patch_geometry, patch_grid
from tests.helpers import REPO


def _demo(arg: str = ""):
    return loading.load_config_file(os.path.join(REPO, f"configs/demo.py:size=tiny{arg}"))


@pytest.mark.parametrize("shape, grid", [((224, 224), (27, 27)), ((224, 320), (27, 39))])
def test_dense_maps_follow_the_stride(shape, grid):
    """A 224 image at patch 16, stride 8 gives a 27 x 27 map of per-location embeddings."""
    config = _demo()
    config.model.image.update(patch_size=16, patch_stride=8, posemb_grid=(14, 14))
    model = build_model(config.model, vocab_size=64)
    images = jnp.zeros((1, *shape, 3))
    params = jax.jit(model.init)(jax.random.key(0), dict(image=images, tokens=jnp.ones((1, 4), jnp.int32)))["params"]
    _, dense = zero_shot.encode_image(model, params, images)
    assert dense.shape == (1, *grid, config.model.embed_dim)
    np.testing.assert_allclose(np.linalg.norm(dense, axis=-1), 1.0, atol=1e-5)


def test_demo_stride_variant_keeps_the_sequence_length():
    """The geometry the train step and the pipeline read (`patch_geometry` of the model) follows the stride."""
    config = _demo(",stride=4")
    assert (config.model.image.patch_stride, config.data.keep_patches) == (4, 64)
    geometry = patch_geometry(build_model(config.model, vocab_size=64).image)
    assert geometry == (8, 4)
    assert patch_grid((64, 64), *geometry) == (15, 15)  # (64 - 8) / 4 + 1
    assert patch_grid((64, 64), *patch_geometry(build_model(_demo().model, vocab_size=64).image)) == (8, 8)
    data = config.data
    assert preprocess.kept_patch_count(data.image_size, *geometry[:1], data.keep_ratio, data.keep_patches,
                                       geometry[1]) == 64


@pytest.mark.parametrize("key, value, message", [
    ("model.image.patch_stride", 9, "patch_stride=9 must be in"),
    ("model.image.patch_stride", 5, "image_size=64 is not covered by 8-pixel patches 5 pixels apart"),
])
def test_patch_settings_are_checked_at_start_up(key, value, message):
    config = _demo()
    config.update_from_flattened_dict({key: value})
    with pytest.raises(ValueError, match=message):
        config_checks.validate(config, num_devices=1)


@pytest.mark.parametrize("key", ["patch_size", "patch_stride"])
def test_a_patch_setting_in_the_data_section_fails_at_start_up_naming_the_model_setting(key):
    """The patches are set once, in config.model.image; a data copy that could disagree is refused."""
    config = _demo()
    config.data[key] = 16
    with pytest.raises(config_checks.ConfigError,
                       match=rf"config.data.{key}=16 is not a data setting.*set config.model.image.{key} only"):
        config_checks.validate(config, num_devices=1)
