"""The ViT image tower (Dosovitskiy et al.), laid out so that timm and DINO checkpoints map onto it.

Patches are embedded by one dense layer over flattened `(p1 p2 c)` pixels, which equals timm's
strided convolution and also accepts pre-patchified inputs from the pipeline's patch dropping.
"""

from collections.abc import Sequence

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

from clippy_jax.models.layers import Dtype, TransformerBlock, dense_init, layer_norm
from clippy_jax.models.resample import resample_grid

# name: (width, depth, mlp_dim, num_heads), as in the ViT paper and timm.
VIT_PRESETS: dict[str, tuple[int, int, int, int]] = {
    "Ti": (192, 12, 768, 3),
    "S": (384, 12, 1536, 6),
    "B": (768, 12, 3072, 12),
    "L": (1024, 24, 4096, 16),
}


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
    """[B, H, W, C] -> [B, (H/p) * (W/p), p * p * C], row-major over the patch grid."""
    return einops.rearrange(images, "b (h p1) (w p2) c -> b (h w) (p1 p2 c)", p1=patch_size, p2=patch_size)


class VisionTransformer(nn.Module):
    """ViT encoder returning per-token features.

    Attributes:
      posemb_grid: the grid the learned position embeddings are stored at; other grids are
        resampled on the fly (timm's bicubic resampling).
    """

    patch_size: int = 16
    width: int = 768
    depth: int = 12
    mlp_dim: int = 3072
    num_heads: int = 12
    posemb_grid: Sequence[int] = (14, 14)
    use_cls_token: bool = True
    final_norm: bool = True
    remat: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        images: jax.Array | None = None,
        *,
        patches: jax.Array | None = None,
        patch_indices: jax.Array | None = None,
        grid_shape: Sequence[int] | None = None,
    ) -> tuple[jax.Array, jax.Array | None]:
        """Encodes images or pre-patchified kept patches.

        Args:
          images: [B, H, W, 3]; H and W multiples of the patch size.
          patches: [B, K, p * p * 3] flattened patches (instead of `images`).
          patch_indices: [B, K] int row-major grid indices of the tokens to keep. With `images`,
            tokens are gathered after position embeddings are added; with `patches`, they name the
            grid cells the patches came from.
          grid_shape: (gh, gw) of the full grid; required with `patches`.

        Returns:
          (tokens [B, K or gh*gw, D] patch features, cls [B, D] or None).
        """
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if images is not None:
            grid_shape = (images.shape[1] // self.patch_size, images.shape[2] // self.patch_size)
            patches = patchify(images, self.patch_size)
        elif patches is None or grid_shape is None or patch_indices is None:
            raise ValueError("Pass `images`, or `patches` together with `patch_indices` and `grid_shape`.")
        x = nn.Dense(
            self.width,
            kernel_init=dense_init((None, "embed"), nn.initializers.lecun_normal()),
            bias_init=dense_init(("embed",), nn.initializers.zeros),
            name="embedding",
            **kw,
        )(patches.astype(self.dtype))  # [B, N, D]
        posemb = self.param(
            "pos_embedding",
            dense_init((None, "length", "embed"), nn.initializers.normal(stddev=0.02)),
            (1, self.posemb_grid[0] * self.posemb_grid[1], self.width),
            self.param_dtype,
        )
        posemb = resample_grid(posemb, tuple(self.posemb_grid), tuple(grid_shape))  # [1, gh*gw, D]
        if images is not None:
            x = x + posemb.astype(self.dtype)
            if patch_indices is not None:
                x = jnp.take_along_axis(x, patch_indices[..., None], axis=1)
        else:
            x = x + jnp.take(posemb[0], patch_indices, axis=0).astype(self.dtype)

        num_prefix = 0
        if self.use_cls_token:
            cls = self.param(
                "cls", dense_init((None, None, "embed"), nn.initializers.normal(stddev=1e-6)), (1, 1, self.width),
                self.param_dtype,
            )
            x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, self.width)).astype(self.dtype), x], axis=1)
            num_prefix = 1
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))

        block = nn.remat(TransformerBlock) if self.remat else TransformerBlock
        for i in range(self.depth):
            x = block(
                num_heads=self.num_heads,
                head_dim=self.width // self.num_heads,
                mlp_dim=self.mlp_dim,
                norm="layer",
                activations=("gelu",),
                name=f"encoderblock_{i}",
                **kw,
            )(x)
        if self.final_norm:
            x = layer_norm("layer", name="encoder_norm", **kw)(x)
        cls_out = x[:, 0] if num_prefix else None
        return x[:, num_prefix:], cls_out


def vit_config(variant: str) -> dict[str, int]:
    """Keyword arguments of `VisionTransformer` for a name like 'B/16' (presets Ti, S, B, L)."""
    size, patch = variant.split("/")
    if size not in VIT_PRESETS:
        raise ValueError(f"Unknown ViT size {size!r} in {variant!r}; choose from {sorted(VIT_PRESETS)}.")
    width, depth, mlp_dim, num_heads = VIT_PRESETS[size]
    return dict(width=width, depth=depth, mlp_dim=mlp_dim, num_heads=num_heads, patch_size=int(patch))
