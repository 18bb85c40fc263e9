"""Initialising towers from converted checkpoints, as configured by `config.init`."""

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import pytest

from clippy_jax.convert import CheckpointMismatchError, save_pretrained
from clippy_jax.models import build_model
from clippy_jax.train.loop import initialize_batch_stats_from_pretrained, initialize_from_pretrained
from tests.test_sharded_step import _configs


def _params(seed: int) -> dict:
    model = build_model(_configs()[0])
    batch = dict(image=np.zeros((2, 32, 32, 3), np.float32), tokens=np.ones((2, 8), np.int32))
    return jax.device_get(jax.tree.map(np.asarray, model.init(jax.random.key(seed), batch)["params"]))


def _init(image: str, text: str = "random") -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(image=image, text=text, strict=True))


def test_image_tower_comes_from_the_checkpoint_and_the_rest_stays(tmp_path):
    params, donor = nn.unbox(_params(0)), nn.unbox(_params(1))
    save_pretrained(str(tmp_path), {"image_tower": donor["image_tower"], "text_tower": donor["text_tower"]},
                    {}, {"kind": "test"})
    merged = initialize_from_pretrained(params, _init(str(tmp_path)))
    jax.tree.map(np.testing.assert_array_equal, merged["image_tower"], donor["image_tower"])
    jax.tree.map(np.testing.assert_array_equal, merged["text_tower"], params["text_tower"])
    jax.tree.map(np.testing.assert_array_equal, merged["image_projection"], params["image_projection"])


def test_a_checkpoint_missing_a_key_is_refused_by_name(tmp_path):
    params, donor = nn.unbox(_params(0)), nn.unbox(_params(1))
    del donor["image_tower"]["encoder_norm"]
    save_pretrained(str(tmp_path), {"image_tower": donor["image_tower"]}, {}, {"kind": "test"})
    with pytest.raises(CheckpointMismatchError, match="image_tower/encoder_norm/scale"):
        initialize_from_pretrained(params, _init(str(tmp_path)))
    with pytest.raises(ValueError, match="holds no text tower"):
        initialize_from_pretrained(params, _init("random", text=str(tmp_path)))


def test_a_cnn_towers_batchnorm_statistics_come_from_the_checkpoint(tmp_path):
    """A converted EfficientNet's `batch_stats/` (running mean and variance) replace the initial ones."""
    model = build_model(_configs(cnn=True)[0])
    batch = dict(image=np.zeros((2, 32, 32, 3), np.float32), tokens=np.ones((2, 8), np.int32))
    variables = jax.device_get(nn.unbox(jax.jit(model.init)(jax.random.key(0), batch)))
    rng = np.random.default_rng(0)
    statistics = jax.tree.map(lambda x: rng.uniform(0.5, 2.0, x.shape).astype(np.float32), variables["batch_stats"])
    save_pretrained(str(tmp_path), {"image_tower": variables["params"]["image_tower"]}, {}, {"kind": "test"},
                    batch_stats=statistics)
    merged = initialize_batch_stats_from_pretrained(variables["batch_stats"], _init(str(tmp_path)))
    jax.tree.map(np.testing.assert_array_equal, merged, statistics)
    assert initialize_batch_stats_from_pretrained(variables["batch_stats"], _init("random")) is variables["batch_stats"]
