"""Flax modules: the image towers (ViT, EfficientNet), the T5 text tower, pooling heads and the two-tower model."""

from collections.abc import Mapping

import jax.numpy as jnp
import ml_collections

from clippy_jax.models.t5 import t5_config
from clippy_jax.models.towers import expand_image
from clippy_jax.models.two_tower import TwoTower

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def tower_kwargs(image: Mapping, text: Mapping) -> tuple[dict, dict]:
    """Expands presets: `image.variant` ('B/16', ...) or `image.preset` ('b5', ... for
    `image.tower='efficientnet'`) and `text.size` ('base', ...) with `text.variant` ('t5_1_0' or
    't5_1_1'); keys given explicitly override the preset's."""
    image, text = expand_image(image), dict(text)
    if "size" in text:
        text = {**t5_config(text.pop("size"), text.pop("variant", "t5_1_1")), **text}
    return image, text


def as_variables(weights: Mapping) -> Mapping:
    """The Flax variables of what evaluation receives: a variables dict ({'params': ..., 'batch_stats': ...},
    e.g. `TrainState.variables`, a CNN's BatchNorm running statistics with it), or the parameters alone."""
    return weights if "params" in weights else {"params": weights}


def build_model(config: ml_collections.ConfigDict, vocab_size: int | None = None) -> TwoTower:
    """The two-tower model from the `model` config section; `vocab_size` fills `text.vocab_size`
    when the config leaves it unset (the demo's tokenizer is trained at run time)."""
    image, text = tower_kwargs(config.image, config.text)
    if not text.get("vocab_size"):
        text["vocab_size"] = vocab_size
    return TwoTower(
        image=image,
        text=text,
        image_pool=config.image_pool,
        text_pool=config.text_pool,
        embed_dim=config.embed_dim,
        temperature_init=config.temperature_init,
        pool_temperature=config.pool_temperature,
        project_image=config.project_image,
        project_text=config.project_text,
        dtype=DTYPES[config.dtype],
        param_dtype=DTYPES[config.param_dtype],
    )
