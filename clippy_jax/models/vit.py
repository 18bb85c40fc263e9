"""The ViT image tower (Dosovitskiy et al.), laid out so that timm and DINO checkpoints map onto it.

Patches are embedded by one dense layer over flattened `(p1 p2 c)` pixels, which equals timm's
strided convolution and also accepts pre-patchified inputs from the pipeline's patch dropping. With
`patch_stride` < `patch_size` the patches overlap (paper appendix E, "overlapping patch generation"):
the grid has (H - p) // s + 1 rows, as timm's convolution with that stride (224 at p=16, s=8: 27x27).
Learned position embeddings are stored at `posemb_grid` and resampled to any input grid with
timm's interpolation, so a 224-trained model runs at 448 (784 tokens) or at non-square sizes.

Tree: `embedding/{kernel,bias}`, `pos_embedding`, `cls`, `encoderblock_N/{pre_attention_layer_norm,
attention/{query,key,value,out},pre_mlp_layer_norm,mlp/{wi,wo}}`, then `encoder_norm` (norm before
pooling, timm's `norm`) or `fc_norm` (norm after pooling, timm's `fc_norm` for avg/max pooling).
"""

from collections.abc import Mapping, Sequence

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from clippy_jax.models.layers import Dtype, dense_init, layer_norm, transformer_block
from clippy_jax.models.resample import resample_grid

# name: (width, depth, mlp_dim, num_heads), as in the ViT paper and timm.
VIT_PRESETS: dict[str, tuple[int, int, int, int]] = {
    "Ti": (192, 12, 768, 3),
    "S": (384, 12, 1536, 6),
    "B": (768, 12, 3072, 12),
    "L": (1024, 24, 4096, 16),
}
# 'pre_pool': final norm on every token, then pooling (timm's `norm`, big_vision); 'post_pool': pooling,
# then the norm on the pooled vector and on each dense token (timm's `fc_norm` when global_pool is avg/max).
NORM_PLACEMENTS = ("pre_pool", "post_pool")


def grid_size(length: int, patch_size: int, stride: int) -> int:
    """Patches along a side of `length` pixels (a VALID convolution: the remainder is dropped)."""
    if length < patch_size:
        raise ValueError(f"An image side of {length} pixels is shorter than the patch size {patch_size}.")
    return (length - patch_size) // stride + 1


def patch_grid(image_shape: Sequence[int], patch_size: int, stride: int | None = None) -> tuple[int, int]:
    """(gh, gw) of the patch grid of an (H, W) image; `stride` None: `patch_size`."""
    return tuple(grid_size(n, patch_size, stride or patch_size) for n in image_shape[:2])


def patch_geometry(image: Mapping) -> tuple[int, int]:
    """(patch size, stride) of the ViT built from tower settings `image` (presets expanded, e.g.
    `TwoTower.image`): the one source of the geometry the pipeline cuts and the model embeds."""
    return image["patch_size"], image.get("patch_stride") or image["patch_size"]


def patchify(images: jax.Array, patch_size: int, stride: int | None = None) -> jax.Array:
    """[B, H, W, C] -> [B, gh * gw, p * p * C], row-major over the patch grid, the patches `stride`
    pixels apart (default: `patch_size`, no overlap); gh = `grid_size(H, p, stride)`."""
    stride = stride or patch_size
    if stride == patch_size and images.shape[1] % patch_size == 0 and images.shape[2] % patch_size == 0:
        return einops.rearrange(images, "b (h p1) (w p2) c -> b (h w) (p1 p2 c)", p1=patch_size, p2=patch_size)
    rows, cols = (stride * np.arange(grid_size(n, patch_size, stride))[:, None] + np.arange(patch_size)
                  for n in images.shape[1:3])  # [gh, p], [gw, p] pixel indices
    windows = images[:, rows[:, :, None, None], cols[None, None, :, :]]  # [B, gh, p, gw, p, C]
    return einops.rearrange(windows, "b h p1 w p2 c -> b (h w) (p1 p2 c)")


class VisionTransformer(nn.Module):
    """ViT encoder returning per-token features.

    Attributes:
      patch_stride: pixels between neighbouring patches; None: `patch_size` (no overlap).
      posemb_grid: the grid the learned position embeddings are stored at; other grids are
        resampled on the fly (timm's antialiased bicubic resampling).
      use_cls_token: prepend a learned CLS token (timm's cls position embedding is folded into it).
      norm_placement: one of `NORM_PLACEMENTS`; with 'post_pool' the returned tokens are not yet
        normalised and `pool_norm` must be applied after pooling (and to dense per-location tokens).
      remat: what each block keeps for the backward pass: 'none', or a policy of
        `layers.REMAT_POLICIES` ('dots', 'full') that trades recomputation for activation memory.
      attention: the attention kernel, one of `platforms.ATTENTION_IMPLEMENTATIONS`.
      dtype: compute dtype (e.g. bfloat16); param_dtype: storage dtype of the parameters.
    """

    patch_size: int = 16
    patch_stride: int | None = None
    width: int = 768
    depth: int = 12
    mlp_dim: int = 3072
    num_heads: int = 12
    posemb_grid: Sequence[int] = (14, 14)
    use_cls_token: bool = True
    norm_placement: str = "pre_pool"
    remat: str = "none"
    attention: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        if self.norm_placement not in NORM_PLACEMENTS:
            raise ValueError(f"Unknown norm_placement={self.norm_placement!r}; choose from {NORM_PLACEMENTS}.")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.embedding = nn.Dense(
            self.width,
            kernel_init=dense_init((None, "embed"), nn.initializers.lecun_normal()),
            bias_init=dense_init(("embed",), nn.initializers.zeros),
            **kw,
        )
        self.pos_embedding = self.param(
            "pos_embedding",
            dense_init((None, "length", "embed"), nn.initializers.normal(stddev=0.02)),
            (1, self.posemb_grid[0] * self.posemb_grid[1], self.width),
            self.param_dtype,
        )
        if self.use_cls_token:
            self.cls = self.param(
                "cls", dense_init((None, None, "embed"), nn.initializers.normal(stddev=1e-6)), (1, 1, self.width),
                self.param_dtype,
            )
        block = transformer_block(self.remat)
        self.encoderblock = [
            block(
                num_heads=self.num_heads,
                head_dim=self.width // self.num_heads,
                mlp_dim=self.mlp_dim,
                norm="layer",
                activations=("gelu",),
                attention=self.attention,
                **kw,
            )
            for _ in range(self.depth)
        ]
        if self.norm_placement == "pre_pool":
            self.encoder_norm = layer_norm("layer", **kw)
        else:
            self.fc_norm = layer_norm("layer", **kw)

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
          images: [B, H, W, 3], at least one patch in each direction.
          patches: [B, K, p * p * 3] flattened patches (instead of `images`).
          patch_indices: [B, K] int row-major grid indices of the tokens to keep. With `images`,
            tokens are gathered after position embeddings are added; with `patches`, they name the
            grid cells the patches came from.
          grid_shape: (gh, gw) of the full grid; required with `patches`.

        Returns:
          (tokens [B, K or gh*gw, D] patch features, cls [B, D] or None).
        """
        if images is not None:
            grid_shape = patch_grid(images.shape[1:3], self.patch_size, self.patch_stride)
            patches = patchify(images, self.patch_size, self.patch_stride)
        elif patches is None or grid_shape is None or patch_indices is None:
            raise ValueError("Pass `images`, or `patches` together with `patch_indices` and `grid_shape`.")
        x = self.embedding(patches.astype(self.dtype))  # [B, N, D]
        posemb = resample_grid(self.pos_embedding, tuple(self.posemb_grid), tuple(grid_shape))  # [1, gh*gw, D]
        if images is not None:
            x = x + posemb.astype(self.dtype)
            if patch_indices is not None:
                x = jnp.take_along_axis(x, patch_indices[..., None], axis=1)  # [B, K, D]
        else:
            x = x + jnp.take(posemb[0], patch_indices, axis=0).astype(self.dtype)

        num_prefix = 0
        if self.use_cls_token:
            cls = jnp.broadcast_to(self.cls, (x.shape[0], 1, self.width)).astype(self.dtype)
            x = jnp.concatenate([cls, x], axis=1)  # [B, 1 + K, D]
            num_prefix = 1
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        for block in self.encoderblock:
            x = block(x)
        if self.norm_placement == "pre_pool":
            x = self.encoder_norm(x)
        cls_out = x[:, 0] if num_prefix else None
        return x[:, num_prefix:], cls_out

    def pool_norm(self, x: jax.Array) -> jax.Array:
        """The norm after pooling ('post_pool' placement), for pooled [B, D] or dense [B, N, D]
        features; the identity with 'pre_pool' placement, where `__call__` already normalised."""
        return self.fc_norm(x) if self.norm_placement == "post_pool" else x


def vit_config(variant: str) -> dict[str, int]:
    """Keyword arguments of `VisionTransformer` for a name like 'B/16' (presets Ti, S, B, L)."""
    size, _, patch = variant.partition("/")
    if size not in VIT_PRESETS or not patch.isdigit():
        raise ValueError(f"Unknown ViT variant {variant!r}; use SIZE/PATCH with SIZE in {sorted(VIT_PRESETS)}.")
    width, depth, mlp_dim, num_heads = VIT_PRESETS[size]
    return dict(width=width, depth=depth, mlp_dim=mlp_dim, num_heads=num_heads, patch_size=int(patch))
