"""The CLIPpy two-tower model: ViT image tower and T5 text tower, pooled, projected, L2-normalised.

The image embedding is `project(pool(tokens))`; the per-location embeddings used for top-down
segmentation and bottom-up grouping are `project(token)` for every patch token.
"""

from collections.abc import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from clippy_jax.models.layers import Dtype, dense_init
from clippy_jax.models.pooling import IMAGE_POOLS, TEXT_POOLS, lookup
from clippy_jax.models.t5 import T5Encoder
from clippy_jax.models.vit import VisionTransformer


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """Unit-norm along the last axis, in float32."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


class TwoTower(nn.Module):
    """CLIP-style two-tower model with a configurable image aggregation.

    Attributes:
      image: keyword arguments of `VisionTransformer`.
      text: keyword arguments of `T5Encoder`.
      image_pool: name in `IMAGE_POOLS` ('max' is CLIPpy).
      text_pool: name in `TEXT_POOLS` ('mean' is the paper's default).
      embed_dim: width of the joint embedding space (both towers are projected to it).
      temperature_init: initial softmax temperature tau; the model learns log(1 / tau).
    """

    image: Mapping
    text: Mapping
    image_pool: str = "max"
    text_pool: str = "mean"
    embed_dim: int = 512
    temperature_init: float = 0.07
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.image_tower = VisionTransformer(**self.image, **kw)
        self.text_tower = T5Encoder(**self.text, **kw)
        self.image_pool_fn = lookup(IMAGE_POOLS, self.image_pool, "model.image_pool")
        self.text_pool_fn = lookup(TEXT_POOLS, self.text_pool, "model.text_pool")

        def projection() -> nn.Dense:
            return nn.Dense(
                self.embed_dim,
                use_bias=False,
                kernel_init=dense_init(("embed", "joint_embed")),
                **kw,
            )

        self.image_projection = projection()
        self.text_projection = projection()
        self.logit_scale = self.param(
            "logit_scale", nn.initializers.constant(np.log(1.0 / self.temperature_init)), (), jnp.float32
        )

    def encode_image(
        self,
        images: jax.Array | None = None,
        *,
        patches: jax.Array | None = None,
        patch_indices: jax.Array | None = None,
        grid_shape: Sequence[int] | None = None,
        dense: bool = False,
    ) -> jax.Array | tuple[jax.Array, jax.Array]:
        """Returns the unit image embedding [B, E], and with `dense` also per-location ones [B, N, E]."""
        tokens, cls = self.image_tower(images, patches=patches, patch_indices=patch_indices, grid_shape=grid_shape)
        pooled = l2_normalize(self.image_projection(self.image_pool_fn(tokens, cls)))
        if not dense:
            return pooled
        return pooled, l2_normalize(self.image_projection(tokens))

    def encode_text(self, tokens: jax.Array) -> jax.Array:
        """Token ids [B, L] (0 = padding) -> unit text embedding [B, E]."""
        features = self.text_tower(tokens)
        return l2_normalize(self.text_projection(self.text_pool_fn(features, tokens > 0)))

    def __call__(
        self, batch: Mapping[str, jax.Array], grid_shape: Sequence[int] | None = None
    ) -> dict[str, jax.Array]:
        """batch: `tokens` [B, L] and either `image` [B, H, W, 3] or `patches` [B, K, p*p*3] with
        `patch_indices` [B, K] taken from a `grid_shape` (gh, gw) grid."""
        if "patches" in batch:
            image_emb = self.encode_image(
                patches=batch["patches"], patch_indices=batch["patch_indices"], grid_shape=grid_shape
            )
        else:
            image_emb = self.encode_image(batch["image"])
        return dict(image_emb=image_emb, text_emb=self.encode_text(batch["tokens"]), logit_scale=self.logit_scale)
