"""Flax modules: the ViT image tower, the T5 text tower, pooling heads and the two-tower model."""

import jax.numpy as jnp
import ml_collections

from clippy_jax.models.two_tower import TwoTower

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def build_model(config: ml_collections.ConfigDict, vocab_size: int | None = None) -> TwoTower:
    """The two-tower model from the `model` config section; `vocab_size` fills `text.vocab_size`
    when the config leaves it unset (the demo's tokenizer is trained at run time)."""
    text = dict(config.text)
    if not text.get("vocab_size"):
        text["vocab_size"] = vocab_size
    return TwoTower(
        image=dict(config.image),
        text=text,
        image_pool=config.image_pool,
        text_pool=config.text_pool,
        embed_dim=config.embed_dim,
        temperature_init=config.temperature_init,
        dtype=DTYPES[config.dtype],
        param_dtype=DTYPES[config.param_dtype],
    )
