"""Aggregation of per-location features into one embedding, chosen by name from registries.

Image heads take patch tokens [B, N, D], the CLS token [B, D] (or None) and a softmax temperature
(used by the soft heads of appendix A.3, Tab. 10); text heads take token features [B, L, D] and the
padding mask [B, L].
"""

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from clippy_jax.models.layers import l2_normalize


def spatial_max(tokens: jax.Array, cls: jax.Array | None, temperature: float) -> jax.Array:
    """CLIPpy: max over locations, per channel. [B, N, D] -> [B, D]."""
    del cls, temperature
    return tokens.max(axis=1)


def spatial_max_with_cls(tokens: jax.Array, cls: jax.Array | None, temperature: float) -> jax.Array:
    """Max over the locations and the CLS token (the released CLIPpy checkpoint). [B, N, D] -> [B, D]."""
    del temperature
    if cls is None:
        raise ValueError("Pooling 'max_with_cls' needs a ViT with a CLS token (model.image.use_cls_token=True).")
    return jnp.maximum(tokens.max(axis=1), cls)


def spatial_average(tokens: jax.Array, cls: jax.Array | None, temperature: float) -> jax.Array:
    """Average over locations. [B, N, D] -> [B, D]."""
    del cls, temperature
    return tokens.mean(axis=1)


def cls_token(tokens: jax.Array, cls: jax.Array | None, temperature: float) -> jax.Array:
    """The CLS token (CLIP). [B, D]."""
    del tokens, temperature
    if cls is None:
        raise ValueError("Pooling 'cls' needs a ViT with a CLS token (model.image.use_cls_token=True).")
    return cls


def weighted_max(tokens: jax.Array, cls: jax.Array | None, temperature: float) -> jax.Array:
    """Weighted Max Pooling (WMP, appendix A.3): per channel, a softmax over locations of the values
    divided by `temperature` weights the sum; it tends to the spatial max as temperature -> 0.
    [B, N, D] -> [B, D]."""
    del cls
    tokens = tokens.astype(jnp.float32)
    weights = jax.nn.softmax(tokens / temperature, axis=1)  # [B, N, D]
    return (weights * tokens).sum(axis=1)


def text_similarity(tokens: jax.Array, cls: jax.Array | None, temperature: float, queries: jax.Array) -> jax.Array:
    """Text-Similarity Pooling (TSP, appendix A.3): per (image, text) pair, a softmax over locations of
    the cosine similarity between each location's joint-space embedding and the text embedding,
    divided by `temperature`, weights an average of the locations.

    tokens: [B, N, E] per-location joint-space embeddings; queries: [T, E] unit text embeddings.
    Returns [B, T, E]: one (unnormalised) image embedding per pair.
    """
    del cls
    tokens = tokens.astype(jnp.float32)
    similarity = jnp.einsum("bne,te->btn", l2_normalize(tokens), queries.astype(jnp.float32))  # [B, T, N]
    weights = jax.nn.softmax(similarity / temperature, axis=-1)
    return jnp.einsum("btn,bne->bte", weights, tokens)


@dataclasses.dataclass(frozen=True)
class ImagePool:
    """An image aggregation head.

    Attributes:
      fn: `fn(tokens [B, N, D], cls [B, D] | None, temperature) -> [B, D]` on the tower's features
        (the pooled vector is then normalised and projected); text-conditioned heads take
        `queries` [T, E] too, pool joint-space per-location embeddings and return [B, T, E].
      text_conditioned: whether the head needs the text embeddings (one image embedding per pair).
    """

    fn: Callable[..., jax.Array]
    text_conditioned: bool = False


IMAGE_POOLS: dict[str, ImagePool] = {
    "max": ImagePool(spatial_max),
    "max_with_cls": ImagePool(spatial_max_with_cls),
    "avg": ImagePool(spatial_average),
    "cls": ImagePool(cls_token),
    "wmp": ImagePool(weighted_max),
    "tsp": ImagePool(text_similarity, text_conditioned=True),
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
