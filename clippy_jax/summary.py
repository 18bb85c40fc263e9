"""Per-tower parameter counts and forward GFLOPs per example of a config's model.

    python -m clippy_jax.summary --config=configs/demo.py [--vocab_size=N]

Parameter counts come from `jax.eval_shape` (no memory is allocated, so ViT-B and T5-base are
cheap); FLOPs from XLA's cost analysis of the compiled forward of one example (image encoder at
`data.image_size`, and with the kept tokens of patch dropping (`data.keep_ratio`, `data.keep_patches`); text
encoder at `data.max_text_length`). A CNN image tower (`model.image.tower`) reports its feature map's
locations and its BatchNorm statistics (not parameters: counted apart). A converted timm ViT has
`width` fewer parameters than timm reports: timm's cls position embedding is folded into our `cls` token.
"""

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from clippy_jax.data import preprocess
from clippy_jax.models import build_model
from clippy_jax.models.pooling import IMAGE_POOLS
from clippy_jax.models.t5 import T5_VOCAB_SIZE
from clippy_jax.models.towers import feature_grid, patch_geometry, tower_name
from clippy_jax.train import perf

_CONFIG = config_flags.DEFINE_config_file("config", "configs/demo.py", "Configuration file.", lock_config=False)
_VOCAB_SIZE = flags.DEFINE_integer(
    "vocab_size", 0, "Vocabulary size when model.text.vocab_size is 0 (default: the demo's synthetic vocabulary, "
    "else T5's 32128)."
)


def _count(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def _gflops(fn: Callable, *args) -> float:
    """GFLOPs of `fn` on abstract `args`, from XLA's cost analysis of the compiled computation."""
    return perf.compiled_flops(jax.jit(fn).lower(*args).compile()) / 1e9


def summarize(config: ml_collections.ConfigDict, vocab_size: int | None = None) -> dict[str, dict[str, float]]:
    """{'parameters': {group: count}, 'gflops': {forward: GFLOPs per example}} of `config.model` (with a CNN
    tower also 'batch_stats': {'image_tower': count})."""
    if not config.model.text.get("vocab_size") and not vocab_size:
        vocab_size = config.data.get("synthetic", {}).get("vocab_size") or T5_VOCAB_SIZE
    model = build_model(config.model, vocab_size)
    size = config.data.image_size
    grid = feature_grid(model.image, (size, size))
    image = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    tokens = jax.ShapeDtypeStruct((1, config.data.max_text_length), jnp.int32)
    variables = jax.eval_shape(lambda batch: nn.unbox(model.init(jax.random.key(0), batch)),
                               dict(image=image, tokens=tokens))
    params = variables["params"]
    counts = {name: _count(params.get(name, {})) for name in
              ("image_tower", "image_pool_head", "image_projection", "text_tower", "text_projection", "logit_scale")}
    counts["total"] = _count(params)

    def encode_text(v, t):
        return model.apply(v, t, method=model.encode_text)

    def encode_image(v, x, **kwargs):
        text_emb = jnp.zeros((1, model.embed_dim)) if IMAGE_POOLS[model.image_pool].text_conditioned else None
        return model.apply(v, x, text_emb=text_emb, method=model.encode_image, **kwargs)

    locations = "locations" if patch_geometry(model.image) is None else "tokens"
    gflops = {
        f"image encoder, {size}x{size} ({grid[0] * grid[1]} {locations})": _gflops(encode_image, variables, image),
        f"text encoder, {config.data.max_text_length} tokens": _gflops(encode_text, variables, tokens),
    }
    summary = dict(parameters=counts, gflops=gflops)
    if patch_geometry(model.image) is None:
        summary["batch_stats"] = {f"image_tower ({tower_name(model.image)})": _count(variables["batch_stats"])}
        return summary
    patch, stride = patch_geometry(model.image)
    kept = preprocess.kept_patch_count(size, patch, config.data.keep_ratio, config.data.keep_patches, stride)
    if kept is not None:
        patches = jax.ShapeDtypeStruct((1, kept, patch * patch * 3), jnp.float32)
        indices = jax.ShapeDtypeStruct((1, kept), jnp.int32)
        gflops[f"image encoder, {kept} kept tokens (training)"] = _gflops(
            lambda v, x, i: encode_image(v, None, patches=x, patch_indices=i, grid_shape=grid), variables, patches,
            indices,
        )
    return summary


def format_summary(summary: dict[str, dict[str, float]]) -> str:
    lines = [f"{'parameters':<44}{'count':>16}"]
    lines += [f"  {name:<42}{count:>16,}" for name, count in summary["parameters"].items()]
    lines += ["", f"{'forward, per example':<44}{'GFLOPs':>16}"]
    lines += [f"  {name:<42}{value:>16.3f}" for name, value in summary["gflops"].items()]
    if "batch_stats" in summary:
        lines += ["", f"{'BatchNorm statistics':<44}{'count':>16}"]
        lines += [f"  {name:<42}{count:>16,}" for name, count in summary["batch_stats"].items()]
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    print(format_summary(summarize(_CONFIG.value, _VOCAB_SIZE.value or None)))


if __name__ == "__main__":
    app.run(main)
