"""Aggregation of per-location features into one embedding, chosen by name from registries.

Image heads take patch tokens [B, N, D] and the CLS token [B, D] (or None); text heads take token
features [B, L, D] and the padding mask [B, L].
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp

ImagePool = Callable[[jax.Array, jax.Array | None], jax.Array]


def spatial_max(tokens: jax.Array, cls: jax.Array | None) -> jax.Array:
    """CLIPpy: max over locations, per channel. [B, N, D] -> [B, D]."""
    del cls
    return tokens.max(axis=1)


def spatial_max_with_cls(tokens: jax.Array, cls: jax.Array | None) -> jax.Array:
    """Max over the locations and the CLS token (the released CLIPpy checkpoint). [B, N, D] -> [B, D]."""
    if cls is None:
        raise ValueError("Pooling 'max_with_cls' needs a ViT with a CLS token (model.image.use_cls_token=True).")
    return jnp.maximum(tokens.max(axis=1), cls)


def spatial_average(tokens: jax.Array, cls: jax.Array | None) -> jax.Array:
    """Average over locations. [B, N, D] -> [B, D]."""
    del cls
    return tokens.mean(axis=1)


def cls_token(tokens: jax.Array, cls: jax.Array | None) -> jax.Array:
    """The CLS token (CLIP). [B, D]."""
    del tokens
    if cls is None:
        raise ValueError("Pooling 'cls' needs a ViT with a CLS token (model.image.use_cls_token=True).")
    return cls


IMAGE_POOLS: dict[str, ImagePool] = {
    "max": spatial_max,
    "max_with_cls": spatial_max_with_cls,
    "avg": spatial_average,
    "cls": cls_token,
}


def masked_mean(tokens: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean over real tokens (the paper's default text pooling, appendix Tab. 8). [B, L, D] -> [B, D]."""
    weights = mask.astype(tokens.dtype)[..., None]  # [B, L, 1]
    return (tokens * weights).sum(axis=1) / jnp.maximum(weights.sum(axis=1), 1)


def masked_max(tokens: jax.Array, mask: jax.Array) -> jax.Array:
    """Max over real tokens (appendix Tab. 8). [B, L, D] -> [B, D]."""
    return jnp.where(mask[..., None], tokens, jnp.finfo(tokens.dtype).min).max(axis=1)


def first_token(tokens: jax.Array, mask: jax.Array) -> jax.Array:
    """The first token's features. [B, L, D] -> [B, D]."""
    del mask
    return tokens[:, 0]


TEXT_POOLS: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {
    "mean": masked_mean,
    "max": masked_max,
    "first": first_token,
}


def lookup(registry: dict, name: str, setting: str):
    """Returns `registry[name]` or raises an error that names the config setting and the choices."""
    if name not in registry:
        raise ValueError(f"Unknown {setting}={name!r}; choose one of {sorted(registry)}.")
    return registry[name]
