"""timm / DINO ViT state dicts -> `image_tower` parameters.

Source layout (timm's `VisionTransformer`, which DINO's release shares): `cls_token`, `pos_embed`
[1, 1 + N, D], `patch_embed.proj.{weight,bias}` (a strided convolution), `blocks.N.{norm1,attn.qkv,
attn.proj,norm2,mlp.fc1,mlp.fc2}.*`, `norm.*` (or `fc_norm.*` for avg/max-pooled timm models), and
a classifier or DINO projection `head.*`, which is dropped. timm's cls position embedding is folded
into our `cls` parameter (both are only ever added together).
"""

import re

import jax.numpy as jnp
import numpy as np

from clippy_jax.convert.common import (
    Converted,
    Rule,
    expected_shapes,
    map_state,
    read_state_dict,
    same,
    select,
    transpose,
)
from clippy_jax.models.vit import VIT_PRESETS, VisionTransformer

PREFIX = "image_tower/"
IGNORED = (r"head\..*",)  # timm's classifier, DINO's projection head
HEADS_BY_WIDTH = {width: heads for width, _, _, heads in VIT_PRESETS.values()}


def _layer_norm(source: str, target: str) -> list[Rule]:
    return [(rf"{source}\.weight", f"{target}/scale", same), (rf"{source}\.bias", f"{target}/bias", same)]


def vit_rules(width: int, num_heads: int) -> list[Rule]:
    """The timm -> ours mapping table for a ViT of `width` channels and `num_heads` heads."""
    head_dim = width // num_heads
    block, out = r"blocks\.(\d+)\.", PREFIX + r"encoderblock_\1/"

    def qkv_kernel(i: int):
        return lambda w: w[i * width:(i + 1) * width].T.reshape(width, num_heads, head_dim)  # [3D, D] -> [D, H, K]

    def qkv_bias(i: int):
        return lambda b: b[i * width:(i + 1) * width].reshape(num_heads, head_dim)

    names = ("query", "key", "value")
    return [
        ("cls_token", PREFIX + "cls", same),
        ("pos_embed", PREFIX + "pos_embedding", same),
        # Conv weight [D, C, p, p] -> dense kernel over flattened (p1 p2 c) pixels [p * p * C, D].
        (r"patch_embed\.proj\.weight", PREFIX + "embedding/kernel",
         lambda w: w.transpose(2, 3, 1, 0).reshape(-1, w.shape[0])),
        (r"patch_embed\.proj\.bias", PREFIX + "embedding/bias", same),
        *[(block + r"attn\.qkv\.weight", out + f"attention/{n}/kernel", qkv_kernel(i)) for i, n in enumerate(names)],
        *[(block + r"attn\.qkv\.bias", out + f"attention/{n}/bias", qkv_bias(i)) for i, n in enumerate(names)],
        (block + r"attn\.proj\.weight", out + "attention/out/kernel",
         lambda w: w.T.reshape(num_heads, head_dim, width)),
        (block + r"attn\.proj\.bias", out + "attention/out/bias", same),
        (block + r"mlp\.fc1\.weight", out + "mlp/wi/kernel", transpose),
        (block + r"mlp\.fc1\.bias", out + "mlp/wi/bias", same),
        (block + r"mlp\.fc2\.weight", out + "mlp/wo/kernel", transpose),
        (block + r"mlp\.fc2\.bias", out + "mlp/wo/bias", same),
        *_layer_norm(block + "norm1", out + "pre_attention_layer_norm"),
        *_layer_norm(block + "norm2", out + "pre_mlp_layer_norm"),
        *_layer_norm("norm", PREFIX + "encoder_norm"),
        *_layer_norm("fc_norm", PREFIX + "fc_norm"),
    ]


def _square_side(n: int) -> int | None:
    side = int(round(np.sqrt(n)))
    return side if side * side == n else None


def vit_kwargs(state: dict[str, np.ndarray]) -> dict:
    """`VisionTransformer` keyword arguments implied by a timm-layout state dict.

    The depth is the highest block index + 1 (`python -m clippy_jax.convert` compares it with the
    preset of that width or `--image-depth`); the heads are those of the preset of that width.
    """
    for key in ("patch_embed.proj.weight", "pos_embed", "blocks.0.mlp.fc1.weight"):
        if key not in state:
            raise KeyError(f"Not a timm/DINO ViT state dict: no {key!r} (keys start {sorted(state)[:5]}).")
    width, _, patch, _ = state["patch_embed.proj.weight"].shape
    if width not in HEADS_BY_WIDTH:
        raise ValueError(f"patch_embed.proj.weight has width {width}, which no ViT preset has; known widths "
                         f"{sorted(HEADS_BY_WIDTH)}.")
    pos_embed = state["pos_embed"]
    if pos_embed.ndim != 3 or pos_embed.shape[0] != 1 or pos_embed.shape[2] != width:
        raise ValueError(f"pos_embed has shape {pos_embed.shape}; a ViT of width {width} needs "
                         f"[1, positions, {width}].")
    num_pos = pos_embed.shape[1]
    use_cls = "cls_token" in state
    if use_cls and tuple(state["cls_token"].shape) != (1, 1, width):
        raise ValueError(f"cls_token has shape {state['cls_token'].shape}; a ViT of width {width} needs "
                         f"(1, 1, {width}).")
    side = (_square_side(num_pos - 1) if use_cls else None) or _square_side(num_pos)
    if side is None:
        if not use_cls and _square_side(num_pos - 1):
            raise KeyError(f"pos_embed has {num_pos} = 1 + {num_pos - 1} entries (a cls entry and a square grid) "
                           "but there is no cls_token.")
        raise ValueError(f"pos_embed has {num_pos} entries, not a square grid{' plus a cls entry' if use_cls else ''}.")
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)))
    return dict(
        patch_size=int(patch), width=int(width), depth=depth, mlp_dim=int(state["blocks.0.mlp.fc1.weight"].shape[0]),
        num_heads=HEADS_BY_WIDTH[width], posemb_grid=(side, side), use_cls_token=use_cls,
        norm_placement="post_pool" if "fc_norm.weight" in state else "pre_pool",
    )


def source_shapes(width: int) -> dict[str, tuple[int, ...]]:
    """The shapes of the source keys that are sliced or reshaped (checked before any transform)."""
    block = r"blocks\.\d+\."
    return {block + r"attn\.qkv\.weight": (3 * width, width), block + r"attn\.qkv\.bias": (3 * width,),
            block + r"attn\.proj\.weight": (width, width)}


def _encode_and_pool_norm(module: VisionTransformer, images: jnp.ndarray) -> jnp.ndarray:
    """Touches every parameter, the post-pool norm included (the two-tower model applies it)."""
    tokens, _ = module(images)
    return module.pool_norm(tokens)


def fold_cls_position(state: dict[str, np.ndarray], grid: tuple[int, int]) -> dict[str, np.ndarray]:
    """Adds timm's cls position embedding (pos_embed[:, 0]) to `cls_token` and drops it from `pos_embed`."""
    state = dict(state)
    if "cls_token" in state and state["pos_embed"].shape[1] == grid[0] * grid[1] + 1:
        state["cls_token"] = state["cls_token"] + state["pos_embed"][:, :1]
        state["pos_embed"] = state["pos_embed"][:, 1:]
    return state


def convert_vit(state: dict[str, np.ndarray]) -> Converted:
    """A timm-layout ViT state dict (prefixes already stripped) -> `image_tower` parameters."""
    kwargs = vit_kwargs(state)
    side = kwargs["posemb_grid"][0] * kwargs["patch_size"]
    expected = expected_shapes(VisionTransformer(**kwargs), jnp.zeros((1, side, side, 3)), prefix=PREFIX,
                               method=_encode_and_pool_norm)
    params, report = map_state(
        fold_cls_position(state, kwargs["posemb_grid"]), vit_rules(kwargs["width"], kwargs["num_heads"]), expected,
        IGNORED, source_shapes(kwargs["width"]),
    )
    return Converted(params, dict(image=kwargs), report)


def import_timm_vit(path: str) -> Converted:
    """timm `vit_*` weights, e.g. `vit_base_patch16_224` (.safetensors, .pth or .bin)."""
    return convert_vit(select(read_state_dict(path), containers=("state_dict", "model"), prefixes=("module.",)))


def convert_dino(contents: dict) -> Converted:
    """DINO weights: the backbone release (`dino_vitbase16_pretrain.pth`) or a full training
    checkpoint, whose `teacher` backbone is used (`module.` / `backbone.` prefixes stripped)."""
    return convert_vit(
        select(contents, containers=("teacher", "student", "state_dict", "model"), prefixes=("module.", "backbone."))
    )


def import_dino(path: str) -> Converted:
    """DINO ViT weights file (see `convert_dino`)."""
    return convert_dino(read_state_dict(path))
