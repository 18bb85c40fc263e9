"""timm EfficientNet state dicts (`efficientnet_b*`, `tf_efficientnet_b*`) -> `image_tower` parameters
and BatchNorm statistics.

Source layout (timm's `EfficientNet`): `conv_stem.weight`, `bn1.*`, `blocks.S.I.{conv_dw,bn1,
se.conv_reduce,se.conv_expand,conv_pw,bn2}` (depthwise-separable first stage) or `blocks.S.I.{conv_pw,
bn1,conv_dw,bn2,se.*,conv_pwl,bn3}` (inverted residuals), `conv_head.weight`, `bn2.*`, and the
classifier `classifier.*`, which is dropped, as are BatchNorm's `num_batches_tracked` counters. Our
module keeps timm's names, so keys map one to one: convolution weights [O, I, kh, kw] (depthwise
[C, 1, kh, kw]) become kernels [kh, kw, I, O], BatchNorm `weight`/`bias` the params `scale`/`bias`,
`running_mean`/`running_var` the batch_stats `mean`/`var`.

The weights do not say which padding the model was trained with: `efficientnet_b*` use PyTorch's
('pytorch'), `tf_efficientnet_b*` TensorFlow's SAME ('same', with BatchNorm epsilon 1e-3).
"""

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from clippy_jax.convert.common import (
    Converted,
    ConvertError,
    Rule,
    map_state,
    read_state_dict,
    same,
    select,
)
from clippy_jax.models.efficientnet import (
    EFFICIENTNET_PRESETS,
    PADDINGS,
    STEM_CHANNELS,
    EfficientNet,
    efficientnet_config,
    round_channels,
    stage_repeats,
)

PREFIX = "image_tower/"
PARAMS, BATCH_STATS = "params/", "batch_stats/"
IGNORED = (r"classifier\..*", r".*num_batches_tracked")


def oihw_to_hwio(w: np.ndarray) -> np.ndarray:
    """PyTorch convolution weight [O, I, kh, kw] -> Flax kernel [kh, kw, I, O]."""
    return w.transpose(2, 3, 1, 0)


def _batch_norm(source: str, target: str) -> list[Rule]:
    return [
        (rf"{source}\.weight", f"{PARAMS}{target}/scale", same),
        (rf"{source}\.bias", f"{PARAMS}{target}/bias", same),
        (rf"{source}\.running_mean", f"{BATCH_STATS}{target}/mean", same),
        (rf"{source}\.running_var", f"{BATCH_STATS}{target}/var", same),
    ]


def efficientnet_rules() -> list[Rule]:
    """The timm -> ours mapping table; targets start with the collection (`params/`, `batch_stats/`)."""
    block, out = r"blocks\.(\d+)\.(\d+)\.", PREFIX + r"blocks_\1_\2/"
    return [
        (r"(conv_stem|conv_head)\.weight", PARAMS + PREFIX + r"\1/kernel", oihw_to_hwio),
        *_batch_norm(r"(bn[12])", PREFIX + r"\1"),
        (block + r"(conv_\w+)\.weight", PARAMS + out + r"\3/kernel", oihw_to_hwio),
        (block + r"se\.(conv_reduce|conv_expand)\.weight", PARAMS + out + r"se/\3/kernel", oihw_to_hwio),
        (block + r"se\.(conv_reduce|conv_expand)\.bias", PARAMS + out + r"se/\3/bias", same),
        *_batch_norm(block + r"(bn[123])", out + r"\3"),
    ]


def source_shapes(state: dict[str, np.ndarray], expected: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """The [O, I, kh, kw] each convolution weight must have (checked before it is transposed), from the
    model's kernel [kh, kw, I, O] its rule writes."""
    shapes = {}
    for key in state:
        for pattern, target, transform in efficientnet_rules():
            if transform is oihw_to_hwio and (match := re.fullmatch(pattern, key)) and match.expand(target) in expected:
                kh, kw, fan_in, fan_out = expected[match.expand(target)]
                shapes[re.escape(key)] = (fan_out, fan_in, kh, kw)
    return shapes


def efficientnet_preset(state: dict[str, np.ndarray]) -> str:
    """The preset ('b0' ... 'b7') whose stem width and blocks per stage the state dict has."""
    if "conv_stem.weight" not in state or "blocks.0.0.conv_dw.weight" not in state:
        raise KeyError(f"Not a timm EfficientNet state dict: no 'conv_stem.weight' / 'blocks.0.0.conv_dw.weight' "
                       f"(keys start {sorted(state)[:5]}).")
    stem = state["conv_stem.weight"].shape[0]
    blocks = {(int(m.group(1)), int(m.group(2))) for k in state if (m := re.match(r"blocks\.(\d+)\.(\d+)\.", k))}
    repeats = tuple(1 + max((i for s, i in blocks if s == stage), default=-1)
                    for stage in range(1 + max(s for s, _ in blocks)))
    for name, (width, depth, _) in EFFICIENTNET_PRESETS.items():
        if round_channels(STEM_CHANNELS, width) == stem and stage_repeats(depth) == repeats:
            return name
    layouts = ", ".join(f"{n}: stem {round_channels(STEM_CHANNELS, w)}, blocks {stage_repeats(d)}"
                        for n, (w, d, _) in EFFICIENTNET_PRESETS.items())
    raise ConvertError(f"An EfficientNet with a {stem}-channel stem and blocks per stage {repeats} is no "
                       f"B0-B7 ({layouts}): a truncated checkpoint?")


@functools.cache
def expected_variables(preset: str) -> dict[str, tuple[int, ...]]:
    """Flat {'params/image_tower/...' or 'batch_stats/image_tower/...': shape} of a preset (the padding
    changes no shape), from `jax.eval_shape`."""
    module = EfficientNet(**efficientnet_config(preset))
    abstract = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    flat = traverse_util.flatten_dict(nn.unbox(abstract), sep="/")  # 'params/conv_stem/kernel', ...
    return {k.replace("/", "/" + PREFIX, 1): tuple(v.shape) for k, v in flat.items()}


def convert_efficientnet(state: dict[str, np.ndarray], padding: str) -> Converted:
    """A timm EfficientNet state dict -> `image_tower` params and batch_stats ('pytorch' or 'same' padding)."""
    if padding not in PADDINGS:
        raise ConvertError(f"--from=timm_efficientnet needs --padding=pytorch (timm efficientnet_b*) or "
                           f"--padding=same (tf_efficientnet_b*), got {padding!r}.")
    preset = efficientnet_preset(state)
    expected = expected_variables(preset)
    flat, report = map_state(state, efficientnet_rules(), expected, IGNORED, source_shapes(state, expected))
    params = {k.removeprefix(PARAMS): v for k, v in flat.items() if k.startswith(PARAMS)}
    batch_stats = {k.removeprefix(BATCH_STATS): v for k, v in flat.items() if k.startswith(BATCH_STATS)}
    return Converted(params, dict(image=dict(tower="efficientnet", preset=preset, padding=padding)), report,
                     batch_stats=batch_stats)


def import_timm_efficientnet(path: str, padding: str | None = None) -> Converted:
    """timm `efficientnet_b*` / `tf_efficientnet_b*` weights (.safetensors, .pth or .bin)."""
    return convert_efficientnet(select(read_state_dict(path), containers=("state_dict", "model"),
                                       prefixes=("module.",)), padding)
