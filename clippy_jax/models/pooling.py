"""Aggregation of per-location features into one embedding, chosen by name from registries.

Image heads are Flax modules that declare what they need as class attributes (`ImagePool`): the
two-tower model, the config checks, zero-shot evaluation and the model summary read those instead
of head names, so a new head (one with parameters too) is one class added to `IMAGE_POOLS`.
Text heads are functions of token features [B, L, D] and the padding mask [B, L].
"""

from collections.abc import Callable
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from clippy_jax.models.layers import Dtype, l2_normalize


def weighted_max(tokens: jax.Array, temperature: float) -> jax.Array:
    """Weighted Max Pooling (WMP, appendix A.3): per channel, a softmax over locations of the values
    divided by `temperature` weights the sum; it tends to the spatial max as temperature -> 0.
    [B, N, D] -> [B, D]."""
    tokens = tokens.astype(jnp.float32)
    weights = jax.nn.softmax(tokens / temperature, axis=1)  # [B, N, D]
    return (weights * tokens).sum(axis=1)


def text_similarity(tokens: jax.Array, queries: jax.Array, temperature: float) -> jax.Array:
    """Text-Similarity Pooling (TSP, appendix A.3): per (image, text) pair, a softmax over locations of
    the cosine similarity between each location's joint-space embedding and the text embedding,
    divided by `temperature`, weights an average of the locations.

    tokens: [B, N, E] per-location joint-space embeddings; queries: [T, E] unit text embeddings.
    Returns [B, T, E]: one (unnormalised) image embedding per pair.
    """
    tokens = tokens.astype(jnp.float32)
    similarity = jnp.einsum("bne,te->btn", l2_normalize(tokens), queries.astype(jnp.float32))  # [B, T, N]
    weights = jax.nn.softmax(similarity / temperature, axis=-1)
    return jnp.einsum("btn,bne->bte", weights, tokens)


class ImagePool(nn.Module):
    """An image aggregation head: `head(tokens [B, N, D], cls [B, D] | None, queries [T, E] | None)`.

    Class attributes (what the head needs; read by the model, the config checks and the evaluators):
      needs_cls: reads the CLS token, so the ViT must have one (model.image.use_cls_token=True).
      text_conditioned: pools once per text `queries` [T, E], giving [B, T, ...] (one image embedding
        per image-text pair); the model passes the batch's or the labels' text embeddings.
      pools_joint_space: pools the per-location joint-space embeddings (tower features after the
        post-pool norm and the projection; `cls` likewise) and its output [B, (T,) E] is the image
        embedding before L2 normalisation; otherwise it pools the tower features into [B, (T,) D],
        which the model then normalises and projects.
    A head may hold parameters (`self.param`, with logical axes for sharding); they live under
    `image_pool_head` in the two-tower model's parameters.

    Attributes:
      temperature: softmax temperature of the soft heads (appendix A.3, Tab. 10); others ignore it.
      dtype, param_dtype: computation and parameter dtypes, for heads with parameters.
    """

    needs_cls: ClassVar[bool] = False
    text_conditioned: ClassVar[bool] = False
    pools_joint_space: ClassVar[bool] = False

    temperature: float = 0.1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32


class SpatialMax(ImagePool):
    """CLIPpy: max over locations, per channel. [B, N, D] -> [B, D]."""

    def __call__(self, tokens: jax.Array, cls: jax.Array | None, queries: jax.Array | None = None) -> jax.Array:
        return tokens.max(axis=1)


class SpatialMaxWithCls(ImagePool):
    """Max over the locations and the CLS token (the released CLIPpy checkpoint). [B, N, D] -> [B, D]."""

    needs_cls: ClassVar[bool] = True

    def __call__(self, tokens: jax.Array, cls: jax.Array | None, queries: jax.Array | None = None) -> jax.Array:
        return jnp.maximum(tokens.max(axis=1), cls)


class SpatialAverage(ImagePool):
    """Average over locations. [B, N, D] -> [B, D]."""

    def __call__(self, tokens: jax.Array, cls: jax.Array | None, queries: jax.Array | None = None) -> jax.Array:
        return tokens.mean(axis=1)


class ClsToken(ImagePool):
    """The CLS token (CLIP). [B, D]."""

    needs_cls: ClassVar[bool] = True

    def __call__(self, tokens: jax.Array, cls: jax.Array | None, queries: jax.Array | None = None) -> jax.Array:
        return cls


class WeightedMax(ImagePool):
    """`weighted_max` at `temperature`. [B, N, D] -> [B, D]."""

    def __call__(self, tokens: jax.Array, cls: jax.Array | None, queries: jax.Array | None = None) -> jax.Array:
        return weighted_max(tokens, self.temperature)


class TextSimilarity(ImagePool):
    """`text_similarity` at `temperature`: joint-space embeddings [B, N, E] and queries [T, E] -> [B, T, E]."""

    text_conditioned: ClassVar[bool] = True
    pools_joint_space: ClassVar[bool] = True

    def __call__(self, tokens: jax.Array, cls: jax.Array | None, queries: jax.Array | None = None) -> jax.Array:
        return text_similarity(tokens, queries, self.temperature)


IMAGE_POOLS: dict[str, type[ImagePool]] = {
    "max": SpatialMax,
    "max_with_cls": SpatialMaxWithCls,
    "avg": SpatialAverage,
    "cls": ClsToken,
    "wmp": WeightedMax,
    "tsp": TextSimilarity,
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
