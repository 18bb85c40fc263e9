"""The EfficientNet image tower (Tan & Le 2019), laid out so that timm checkpoints map onto it.

The CNN baseline of the paper (appendix F, Tab. 3) is ALIGN's EfficientNet-B5. The tower returns
timm's `forward_features`: the last feature map [B, H/32, W/32, C] after the head convolution,
BatchNorm and SiLU, without pooling or classifier. Two paddings: 'pytorch' (symmetric, timm's
`efficientnet_b*`) and 'same' (TensorFlow's SAME, timm's `tf_efficientnet_b*`, the ALIGN lineage),
which differ where a stride-2 convolution meets an even side: SAME pads one pixel less at the
top/left (3x3: none before, one after).

BatchNorm statistics live in the `batch_stats` collection. In training (`train=True`) the layers
normalise with the statistics of the batch and update the running averages; apply the module with
`mutable=['batch_stats']`. Under `jit` with the batch sharded over devices, the batch mean and
variance are means over the sharded batch axis, which XLA computes as global reductions: the
statistics are those of the global batch, as on one device (inside `shard_map` or `pmap` they would
be per device, and would need a `pmean` over the batch axes). `frozen_batch_stats=True` normalises
with the running averages in training too and leaves them unchanged (fine-tuning from ImageNet).

Tree (timm's names): `conv_stem`, `bn1`, `blocks_S_I` (stage S, block I) with `conv_dw`, `bn1`,
`se/{conv_reduce,conv_expand}`, `conv_pw`, `bn2` (depthwise-separable, the first stage) or
`conv_pw`, `bn1`, `conv_dw`, `bn2`, `se/...`, `conv_pwl`, `bn3` (inverted residual, MBConv), then
`conv_head`, `bn2`. BatchNorms hold params `scale`, `bias` and batch_stats `mean`, `var`.
"""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from clippy_jax.models.layers import Dtype

# name: (width multiplier, depth multiplier, resolution), as in the EfficientNet paper and timm.
EFFICIENTNET_PRESETS: dict[str, tuple[float, float, int]] = {
    "b0": (1.0, 1.0, 224),
    "b1": (1.0, 1.1, 240),
    "b2": (1.1, 1.2, 260),
    "b3": (1.2, 1.4, 300),
    "b4": (1.4, 1.8, 380),
    "b5": (1.6, 2.2, 456),
    "b6": (1.8, 2.6, 528),
    "b7": (2.0, 3.1, 600),
}
# EfficientNet-B0's stages (the paper's Tab. 1, timm's arch_def): (repeats, kernel, stride, expansion
# ratio, output channels); expansion 1 is the depthwise-separable block, 6 the inverted residual (MBConv).
STAGES: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)
STEM_CHANNELS, HEAD_CHANNELS = 32, 1280
SE_RATIO = 0.25  # squeeze-and-excitation width, relative to the block's input channels
PADDINGS = ("pytorch", "same")
BN_EPSILON = {"pytorch": 1e-5, "same": 1e-3}  # PyTorch's default; TensorFlow's (timm's tf_ variants)

CONV_AXES = ("conv_height", "conv_width", "conv_in", "conv_out")
DEPTHWISE_AXES = ("conv_height", "conv_width", None, "conv_out")  # kernel [kh, kw, 1, C]
CHANNEL_AXES = ("conv_out",)  # biases, BatchNorm scale / bias / mean / var
# Squeeze-and-excitation's bottleneck, a quarter of a block's input channels (B5: 6 to 128), which a
# mesh axis need not divide: its own name, so that sharding rules can leave it whole.
SE_REDUCE_AXES = ("conv_height", "conv_width", "conv_in", "conv_squeeze")
SE_EXPAND_AXES = ("conv_height", "conv_width", "conv_squeeze", "conv_out")
FEATURE_MAP_AXES = ("batch", "height", "width", "conv_out")


def make_divisible(value: float, divisor: int = 8) -> int:
    """timm's channel rounding: the nearest multiple of `divisor`, never 10% below `value`."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def round_channels(channels: int, width_multiplier: float) -> int:
    """B0's `channels` scaled by `width_multiplier`, rounded as timm does."""
    return make_divisible(channels * width_multiplier)


def stage_repeats(depth_multiplier: float) -> tuple[int, ...]:
    """Blocks per stage: B0's repeats scaled by `depth_multiplier`, rounded up (B5: 3, 5, 5, 7, 7, 9, 3)."""
    return tuple(int(math.ceil(repeats * depth_multiplier)) for repeats, *_ in STAGES)


def stage_channels(width_multiplier: float) -> tuple[int, ...]:
    """Output channels per stage (B5: 24, 40, 64, 128, 176, 304, 512)."""
    return tuple(round_channels(out, width_multiplier) for *_, out in STAGES)


def conv_padding(padding: str, kernel: int, stride: int) -> str | tuple[tuple[int, int], tuple[int, int]]:
    """'same': TensorFlow's SAME (lax's, the extra pixel at the end); 'pytorch': timm's symmetric padding."""
    if padding == "same":
        return "SAME"
    pad = (stride - 1 + kernel - 1) // 2  # timm's get_padding: kernel // 2 for odd kernels, strides 1 and 2
    return ((pad, pad), (pad, pad))


def conv_init(axes: tuple[str | None, ...] = CONV_AXES) -> nn.initializers.Initializer:
    """timm's (and TF's) EfficientNet initialisation, normal with variance 2 / fan_out, with logical `axes`.
    A depthwise kernel [kh, kw, 1, C] (`DEPTHWISE_AXES`) has fan_out kh * kw (one output channel per group)."""
    in_axis, out_axis = (-1, -2) if axes == DEPTHWISE_AXES else (-2, -1)
    init = nn.initializers.variance_scaling(2.0, "fan_out", "normal", in_axis=in_axis, out_axis=out_axis)
    return nn.with_logical_partitioning(init, axes)


class BatchNorm(nn.Module):
    """BatchNorm over the batch and spatial axes of [B, H, W, C], with PyTorch's running statistics.

    In training it normalises with the batch mean and (biased) variance, computed in float32, and
    updates `mean` and `var` in `batch_stats` as `momentum * running + (1 - momentum) * batch`, the
    variance with Bessel's correction as PyTorch does (Flax's `nn.BatchNorm` uses the biased one),
    so that running statistics stay those of timm. `momentum` is Flax's (0.9 = PyTorch's 0.1).
    """

    momentum: float = 0.9
    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, use_running_average: bool) -> jax.Array:
        """x: [B, H, W, C] -> [B, H, W, C] in `dtype`."""
        features = x.shape[-1]
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, CHANNEL_AXES), (features,),
                           self.param_dtype)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, CHANNEL_AXES), (features,),
                          self.param_dtype)
        running_mean = self.variable("batch_stats", "mean", nn.with_logical_partitioning(jnp.zeros, CHANNEL_AXES),
                                     (features,), jnp.float32)
        running_var = self.variable("batch_stats", "var", nn.with_logical_partitioning(jnp.ones, CHANNEL_AXES),
                                    (features,), jnp.float32)
        if use_running_average:
            mean, var = running_mean.value, running_var.value
        else:
            x32 = x.astype(jnp.float32)
            mean = jnp.mean(x32, axis=(0, 1, 2))  # [C], over the global batch
            var = jnp.mean(jnp.square(x32 - mean), axis=(0, 1, 2))
            count = x.size // features
            if count < 2:
                raise ValueError(f"BatchNorm in training needs more than one value per channel, got {x.shape}.")
            if not self.is_initializing():
                running_mean.value = self.momentum * running_mean.value + (1 - self.momentum) * mean
                running_var.value = self.momentum * running_var.value + (1 - self.momentum) * var * count / (count - 1)
        multiplier = scale.astype(jnp.float32) * jax.lax.rsqrt(var + self.epsilon)
        offset = bias.astype(jnp.float32) - mean * multiplier
        return x.astype(self.dtype) * multiplier.astype(self.dtype) + offset.astype(self.dtype)


class SqueezeExcite(nn.Module):
    """Gates the channels of [B, H, W, C] by sigmoid(expand(silu(reduce(spatial mean))))."""

    reduced: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        def conv(features: int, axes: tuple[str, ...], name: str) -> nn.Conv:
            return nn.Conv(features, (1, 1), kernel_init=conv_init(axes), name=name, dtype=self.dtype,
                           param_dtype=self.param_dtype,
                           bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[-1:]))

        s = jnp.mean(x, axis=(1, 2), keepdims=True, dtype=jnp.float32).astype(self.dtype)  # [B, 1, 1, C]
        s = nn.silu(conv(self.reduced, SE_REDUCE_AXES, "conv_reduce")(s))  # [B, 1, 1, R]
        s = conv(x.shape[-1], SE_EXPAND_AXES, "conv_expand")(s)  # [B, 1, 1, C]
        return x * nn.sigmoid(s)


class MBConvBlock(nn.Module):
    """timm's InvertedResidual (`expansion` > 1: expand, depthwise, SE, project) or
    DepthwiseSeparableConv (`expansion` 1: depthwise, SE, project), with a residual connection
    and drop path (stochastic depth of the residual branch, per sample) when shapes allow."""

    features: int
    kernel: int
    stride: int
    expansion: int
    padding: str
    drop_path_rate: float
    bn_momentum: float
    bn_epsilon: float
    frozen_batch_stats: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        """x: [B, H, W, C] -> [B, H / stride, W / stride, features]."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        use_running_average = not train or self.frozen_batch_stats

        def norm(y: jax.Array, name: str, act: bool = True) -> jax.Array:
            y = BatchNorm(self.bn_momentum, self.bn_epsilon, name=name, **kw)(y, use_running_average)
            return nn.silu(y) if act else y

        def pointwise(y: jax.Array, features: int, name: str) -> jax.Array:
            return nn.Conv(features, (1, 1), use_bias=False, kernel_init=conv_init(), name=name, **kw)(y)

        in_features = x.shape[-1]
        inverted = self.expansion != 1
        y = x
        if inverted:
            y = norm(pointwise(y, make_divisible(in_features * self.expansion), "conv_pw"), "bn1")  # [B, H, W, E]
        mid = y.shape[-1]
        y = nn.Conv(mid, (self.kernel, self.kernel), strides=self.stride, feature_group_count=mid, use_bias=False,
                    padding=conv_padding(self.padding, self.kernel, self.stride), kernel_init=conv_init(DEPTHWISE_AXES),
                    name="conv_dw", **kw)(y)  # [B, H / s, W / s, E]
        y = norm(y, "bn2" if inverted else "bn1")
        y = SqueezeExcite(max(1, round(in_features * SE_RATIO)), name="se", **kw)(y)
        y = pointwise(y, self.features, "conv_pwl" if inverted else "conv_pw")  # [B, H / s, W / s, features]
        y = norm(y, "bn3" if inverted else "bn2", act=False)
        if self.stride == 1 and in_features == self.features:
            y = nn.Dropout(self.drop_path_rate, broadcast_dims=(1, 2, 3), deterministic=not train)(y)
            y = y + x
        return nn.with_logical_constraint(y, FEATURE_MAP_AXES)


class EfficientNet(nn.Module):
    """EfficientNet feature extractor: [B, H, W, 3] -> last feature map [B, H/32, W/32, `width`].

    Attributes:
      width_multiplier, depth_multiplier: the compound scaling of B0 (`EFFICIENTNET_PRESETS`,
        `efficientnet_config`); channels are rounded to multiples of 8, repeats rounded up, as in timm.
      padding: one of `PADDINGS`, 'pytorch' (timm `efficientnet_b*`) or 'same' (`tf_efficientnet_b*`).
      bn_epsilon: BatchNorm epsilon; None: `BN_EPSILON[padding]` (1e-5 PyTorch, 1e-3 TensorFlow).
      bn_momentum: Flax's momentum of the running statistics: 0.9 equals PyTorch's 0.1, which timm
        uses for both variants (the TF reference implementation trains with 0.99).
      frozen_batch_stats: normalise with the running statistics in training too, never updating them.
      drop_path_rate: stochastic depth: block i of n (from 0) drops its residual branch with probability
        rate * i / n, per sample, as in timm. Training with a rate > 0 needs a 'dropout' rng.
      dtype: compute dtype (e.g. bfloat16); param_dtype: storage dtype of the parameters. BatchNorm
        statistics are computed and stored in float32.
    """

    width_multiplier: float = 1.0
    depth_multiplier: float = 1.0
    padding: str = "pytorch"
    bn_epsilon: float | None = None
    bn_momentum: float = 0.9
    frozen_batch_stats: bool = False
    drop_path_rate: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def width(self) -> int:
        """Channels of the output feature map (timm's `num_features`; B5: 2048)."""
        return round_channels(HEAD_CHANNELS, self.width_multiplier)

    @nn.compact
    def __call__(self, images: jax.Array, *, train: bool = False) -> jax.Array:
        """images: [B, H, W, 3]; `train`: batch statistics (unless frozen) and drop path.

        Returns the feature map [B, ceil(H / 32), ceil(W / 32), width] ('same'; 'pytorch' gives the
        same size: every stride-2 convolution maps n to ceil(n / 2)).
        """
        if self.padding not in PADDINGS:
            raise ValueError(f"Unknown padding={self.padding!r}; choose from {PADDINGS}.")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        epsilon = BN_EPSILON[self.padding] if self.bn_epsilon is None else self.bn_epsilon
        use_running_average = not train or self.frozen_batch_stats
        batch_norm = functools.partial(BatchNorm, self.bn_momentum, epsilon, **kw)

        x = nn.Conv(round_channels(STEM_CHANNELS, self.width_multiplier), (3, 3), strides=2, use_bias=False,
                    padding=conv_padding(self.padding, 3, 2), kernel_init=conv_init(), name="conv_stem",
                    **kw)(images.astype(self.dtype))  # [B, H / 2, W / 2, C]
        x = nn.silu(batch_norm(name="bn1")(x, use_running_average))
        repeats = stage_repeats(self.depth_multiplier)
        channels = stage_channels(self.width_multiplier)
        total, index = sum(repeats), 0
        for stage, ((_, kernel, stride, expansion, _), count, features) in enumerate(
                zip(STAGES, repeats, channels, strict=True)):
            for i in range(count):
                x = MBConvBlock(
                    features, kernel, stride if i == 0 else 1, expansion, self.padding,
                    drop_path_rate=self.drop_path_rate * index / total, bn_momentum=self.bn_momentum,
                    bn_epsilon=epsilon, frozen_batch_stats=self.frozen_batch_stats, name=f"blocks_{stage}_{i}",
                    **kw,
                )(x, train)
                index += 1
        x = nn.Conv(self.width, (1, 1), use_bias=False, kernel_init=conv_init(), name="conv_head", **kw)(x)
        x = nn.silu(batch_norm(name="bn2")(x, use_running_average))  # [B, H / 32, W / 32, width]
        return nn.with_logical_constraint(x, FEATURE_MAP_AXES)


def efficientnet_config(preset: str) -> dict[str, float]:
    """Keyword arguments of `EfficientNet` for a preset name 'b0' ... 'b7'."""
    if preset not in EFFICIENTNET_PRESETS:
        raise ValueError(f"Unknown EfficientNet preset {preset!r}; choose from {sorted(EFFICIENTNET_PRESETS)}.")
    width, depth, _ = EFFICIENTNET_PRESETS[preset]
    return dict(width_multiplier=width, depth_multiplier=depth)
