"""The CLIPpy two-tower model: ViT (or CNN) image tower and T5 text tower, pooled, projected, L2-normalised.

The image embedding is `project(norm(pool(tokens)))` (the norm is the ViT's post-pool norm, or the
identity when the ViT normalises before pooling, and for a CNN); the per-location embeddings used for
top-down segmentation and bottom-up grouping are `project(norm(token))` for every patch token, or
every location of a CNN's last feature map [B, H/32, W/32, C] (row-major tokens [B, h * w, C]). A head that
pools in the joint space (TSP) pools those per-location embeddings instead; a text-conditioned head
pools once per text, giving image embeddings [B, T, E]; `pair_similarity` turns either form into
[B, T] similarities. What a head needs is declared by its class (`pooling.ImagePool`).
"""

from collections.abc import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from clippy_jax.models.layers import Dtype, dense_init, l2_normalize
from clippy_jax.models.pooling import IMAGE_POOLS, TEXT_POOLS, lookup
from clippy_jax.models.t5 import T5Encoder
from clippy_jax.models.towers import build_image_tower, has_cls, is_cnn

__all__ = ["TwoTower", "l2_normalize", "pair_similarity"]


def pair_similarity(image_emb: jax.Array, text_emb: jax.Array) -> jax.Array:
    """[B, T] dot products of image embeddings [B, E] (or per-pair [B, T, E]) with text embeddings [T, E]."""
    if image_emb.ndim == 3:
        return jnp.einsum("ite,te->it", image_emb, text_emb, preferred_element_type=jnp.float32)
    return jnp.einsum("ie,te->it", image_emb, text_emb, preferred_element_type=jnp.float32)


class TwoTower(nn.Module):
    """CLIP-style two-tower model with a configurable image aggregation.

    Attributes:
      image: expanded image tower settings (`towers.expand_image`): `tower` ('vit', absent, or
        'efficientnet') and the keyword arguments of `VisionTransformer` or `EfficientNet`.
      text: keyword arguments of `T5Encoder`.
      image_pool: name in `IMAGE_POOLS` ('max' is CLIPpy); the head's parameters, if any, are under
        `image_pool_head`.
      text_pool: name in `TEXT_POOLS` ('mean' is the paper's default).
      embed_dim: width of the joint embedding space (both towers are projected to it).
      temperature_init: initial softmax temperature tau; the model learns log(1 / tau).
      pool_temperature: softmax temperature of the soft heads, 'wmp' and 'tsp' (appendix Tab. 10).
      project_image, project_text: whether a bias-free dense layer maps each tower to the joint
        space; without it the tower width must equal `embed_dim` (the released CLIPpy image tower).
    """

    image: Mapping
    text: Mapping
    image_pool: str
    text_pool: str
    embed_dim: int
    temperature_init: float
    pool_temperature: float
    project_image: bool
    project_text: bool
    dtype: Dtype
    param_dtype: Dtype

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.image_tower = build_image_tower(self.image, **kw)
        self.text_tower = T5Encoder(**self.text, **kw)
        head = lookup(IMAGE_POOLS, self.image_pool, "model.image_pool")
        if head.needs_cls and not has_cls(self.image):
            raise ValueError(f"model.image_pool={self.image_pool!r} reads the CLS token, which this image tower "
                             "lacks (a CNN, or model.image.use_cls_token=False): choose another head.")
        self.image_pool_head = head(temperature=self.pool_temperature, **kw)
        self.text_pool_fn = lookup(TEXT_POOLS, self.text_pool, "model.text_pool")
        for name, enabled, width in (
            ("image", self.project_image, self.image_tower.width),
            ("text", self.project_text, self.text_tower.embed_dim),
        ):
            if not enabled and width != self.embed_dim:
                raise ValueError(
                    f"model.project_{name}=False needs the {name} tower width ({width}) to equal "
                    f"model.embed_dim ({self.embed_dim})."
                )

        def projection() -> nn.Dense:
            return nn.Dense(self.embed_dim, use_bias=False, kernel_init=dense_init(("embed", "joint_embed")), **kw)

        self.image_projection = projection() if self.project_image else None
        self.text_projection = projection() if self.project_text else None
        self.logit_scale = self.param(
            "logit_scale", nn.initializers.constant(np.log(1.0 / self.temperature_init)), (), jnp.float32
        )

    @staticmethod
    def _to_joint(features: jax.Array, projection: nn.Module | None) -> jax.Array:
        return features if projection is None else projection(features)

    def _pool_norm(self, x: jax.Array) -> jax.Array:
        """The ViT's norm after pooling (`VisionTransformer.pool_norm`); the identity for a CNN."""
        return x if is_cnn(self.image) else self.image_tower.pool_norm(x)

    def encode_image(
        self,
        images: jax.Array | None = None,
        *,
        patches: jax.Array | None = None,
        patch_indices: jax.Array | None = None,
        grid_shape: Sequence[int] | None = None,
        dense: bool = False,
        text_emb: jax.Array | None = None,
        train: bool = False,
    ) -> jax.Array | tuple[jax.Array, jax.Array]:
        """Returns the unit image embedding [B, E] (or [B, T, E] for a text-conditioned head, which
        needs `text_emb` [T, E]), and with `dense` also the per-location ones [B, N, E]. `train`: a
        CNN's BatchNorm normalises with the batch's statistics and updates its running ones (apply with
        `mutable=['batch_stats']`), and drop path is on."""
        if is_cnn(self.image):
            if images is None:
                raise ValueError("A CNN image tower takes whole images, not patches: pass `images`.")
            feature_map = self.image_tower(images, train=train)  # [B, h, w, C]
            tokens, cls = feature_map.reshape(feature_map.shape[0], -1, feature_map.shape[-1]), None  # [B, h*w, C]
        else:
            tokens, cls = self.image_tower(images, patches=patches, patch_indices=patch_indices,
                                           grid_shape=grid_shape)
        head = self.image_pool_head
        if head.text_conditioned and text_emb is None:
            raise ValueError(f"model.image_pool={self.image_pool!r} pools per text: pass `text_emb` [T, E].")
        queries = text_emb if head.text_conditioned else None
        per_location = None
        if dense or head.pools_joint_space:
            per_location = self._to_joint(self._pool_norm(tokens), self.image_projection)  # [B, N, E]
        if head.pools_joint_space:
            cls = None if cls is None else self._to_joint(self._pool_norm(cls), self.image_projection)
            pooled = head(per_location, cls, queries)  # [B, (T,) E]
        else:
            pooled = head(tokens, cls, queries)  # [B, (T,) D]
            pooled = self._to_joint(self._pool_norm(pooled), self.image_projection)
        pooled = l2_normalize(pooled)
        if not dense:
            return pooled
        return pooled, l2_normalize(per_location)

    def encode_text(self, tokens: jax.Array) -> jax.Array:
        """Token ids [B, L] (0 = padding) -> unit text embedding [B, E]."""
        pooled = self.text_pool_fn(self.text_tower(tokens), tokens > 0)  # [B, D]
        return l2_normalize(self._to_joint(pooled, self.text_projection))

    def __call__(
        self, batch: Mapping[str, jax.Array], grid_shape: Sequence[int] | None = None, train: bool = False
    ) -> dict[str, jax.Array]:
        """batch: `tokens` [B, L] and either `image` [B, H, W, 3] or `patches` [B, K, p*p*3] with
        `patch_indices` [B, K] taken from a `grid_shape` (gh, gw) grid; `train` as in `encode_image`.

        Returns `image_emb` [B, E] ([B, B, E] for a text-conditioned head: image i pooled for text j),
        `text_emb` [B, E] and `logit_scale`; `pair_similarity` gives the [B, B] similarities of both forms.
        """
        text_emb = self.encode_text(batch["tokens"])
        conditioning = text_emb if self.image_pool_head.text_conditioned else None
        if "patches" in batch:
            image_emb = self.encode_image(
                patches=batch["patches"], patch_indices=batch["patch_indices"], grid_shape=grid_shape,
                text_emb=conditioning,
            )
        else:
            image_emb = self.encode_image(batch["image"], text_emb=conditioning, train=train)
        return dict(image_emb=image_emb, text_emb=text_emb, logit_scale=self.logit_scale)
