"""The T5 encoder (Raffel et al.) with t5x's parameter tree, so t5x and HF checkpoints map over.

Tree: `token_embedder/embedding`, `encoder/relpos_bias/rel_embedding`,
`encoder/layers_N/{pre_attention_layer_norm,attention/{query,key,value,out},pre_mlp_layer_norm,
mlp/{wi | wi_0,wi_1},wo}`, `encoder/encoder_norm`. T5 v1.0 uses a ReLU MLP; T5.1.1 a gated GELU.
"""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from clippy_jax.models.layers import Dtype, dense_init, layer_norm, transformer_block

# The embedding table of T5's SentencePiece vocabulary (32,000 pieces, padded to a multiple of 128).
T5_VOCAB_SIZE = 32128
# name: (embed, depth, num_heads, head_dim, mlp_dim) of the encoder: HF's t5-small/base/large configs
# (d_model, num_layers, num_heads, d_kv, d_ff); 'tiny' is ours, for tests.
T5_PRESETS: dict[str, tuple[int, int, int, int, int]] = {
    "tiny": (64, 2, 4, 16, 128),
    "small": (512, 6, 8, 64, 2048),
    "base": (768, 12, 12, 64, 3072),
    "large": (1024, 24, 16, 64, 4096),
}
# variant: MLP activations (t5x's `mlp_activations`).
T5_VARIANTS: dict[str, tuple[str, ...]] = {"t5_1_0": ("relu",), "t5_1_1": ("gelu_tanh", "linear")}
# T5.1.1 changes the shapes of some presets (gated MLP, and a deeper small model): google/t5-v1_1-*.
T5_1_1_PRESETS: dict[str, tuple[int, int, int, int, int]] = {
    "tiny": (64, 2, 4, 16, 128),
    "small": (512, 8, 6, 64, 1024),
    "base": (768, 12, 12, 64, 2048),
    "large": (1024, 24, 16, 64, 2816),
}


def relative_position_bucket(
    relative_position: np.ndarray, num_buckets: int = 32, max_distance: int = 128
) -> np.ndarray:
    """t5x's bidirectional bucketing of (key - query) offsets: half the buckets per sign, exact
    buckets for small offsets and logarithmic ones up to `max_distance` (equal to HF's buckets)."""
    num_buckets //= 2
    bucket = (relative_position > 0).astype(np.int32) * num_buckets
    n = np.abs(relative_position)
    max_exact = num_buckets // 2
    is_small = n < max_exact
    log_ratio = np.log(np.maximum(n, 1) / max_exact) / np.log(max_distance / max_exact)
    large = max_exact + (log_ratio * (num_buckets - max_exact)).astype(np.int32)
    large = np.minimum(large, num_buckets - 1)
    return bucket + np.where(is_small, n, large)


class RelativePositionBiases(nn.Module):
    """Per-head learned bias indexed by the relative-position bucket: [1, H, L, L].

    Computed once per forward and shared by every layer (t5x; HF keeps it in the first layer).
    """

    num_heads: int
    num_buckets: int = 32
    max_distance: int = 128
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, length: int) -> jax.Array:
        positions = np.arange(length)
        buckets = relative_position_bucket(positions[None, :] - positions[:, None], self.num_buckets, self.max_distance)
        table = self.param(
            "rel_embedding",
            dense_init(("heads", "relpos_buckets"), nn.initializers.variance_scaling(1.0, "fan_avg", "uniform")),
            (self.num_heads, self.num_buckets),
            self.param_dtype,
        )
        return jnp.take(table, jnp.asarray(buckets), axis=1)[None].astype(jnp.float32)  # [1, H, L, L]


class T5Encoder(nn.Module):
    """Token ids [B, L] (0 = padding, always after the real tokens) -> token features [B, L, D] after
    the final RMSNorm. `remat` and `attention` as in `VisionTransformer`."""

    vocab_size: int = 32128
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    head_dim: int = 64
    mlp_dim: int = 3072
    activations: Sequence[str] = ("relu",)
    num_buckets: int = 32
    max_distance: int = 128
    epsilon: float = 1e-6
    remat: str = "none"
    attention: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        """tokens: [B, L] int ids -> [B, L, D]."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        embedder = nn.Embed(
            self.vocab_size,
            self.embed_dim,
            embedding_init=dense_init(("vocab", "embed"), nn.initializers.normal(stddev=1.0)),
            name="token_embedder",
            **kw,
        )
        # The lookup runs on a table whole along `embed` (under FSDP: gathered over `fsdp`, like every other
        # weight), so the rows come out sharded like the batch; a lookup into the `embed`-sharded table
        # made XLA gather the whole batch's embeddings over `data` instead (BENCHMARKS.md, pod plan).
        table = nn.with_logical_constraint(embedder.embedding, ("vocab", None))  # [V, D]
        x = jnp.take(table.astype(self.dtype), tokens, axis=0)  # [B, L, D]
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        return _T5Stack(
            depth=self.depth,
            num_heads=self.num_heads,
            head_dim=self.head_dim,
            mlp_dim=self.mlp_dim,
            activations=tuple(self.activations),
            num_buckets=self.num_buckets,
            max_distance=self.max_distance,
            epsilon=self.epsilon,
            remat=self.remat,
            attention=self.attention,
            name="encoder",
            **kw,
        )(x, jnp.sum(tokens > 0, axis=1, dtype=jnp.int32))


class _T5Stack(nn.Module):
    depth: int
    num_heads: int
    head_dim: int
    mlp_dim: int
    activations: Sequence[str]
    num_buckets: int
    max_distance: int
    epsilon: float
    remat: str
    attention: str
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, x: jax.Array, lengths: jax.Array) -> jax.Array:
        """x: [B, L, D]; lengths: [B] int32 number of real tokens (the rest is right padding)."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        bias = RelativePositionBiases(
            self.num_heads, self.num_buckets, self.max_distance, self.param_dtype, name="relpos_bias"
        )(x.shape[1])  # [1, H, L, L]
        block = transformer_block(self.remat)
        for i in range(self.depth):
            x = block(
                num_heads=self.num_heads,
                head_dim=self.head_dim,
                mlp_dim=self.mlp_dim,
                norm="rms",
                activations=self.activations,
                use_bias=False,
                scale_logits=False,
                epsilon=self.epsilon,
                attention=self.attention,
                name=f"layers_{i}",
                **kw,
            )(x, bias, lengths)
        x = layer_norm("rms", name="encoder_norm", epsilon=self.epsilon, **kw)(x)
        return nn.with_logical_constraint(x, ("batch", "length", "embed"))


def t5_config(size: str, variant: str = "t5_1_1") -> dict:
    """Keyword arguments of `T5Encoder` for a preset size and variant ('t5_1_0' or 't5_1_1')."""
    if size not in T5_PRESETS:
        raise ValueError(f"Unknown T5 size {size!r}; choose from {sorted(T5_PRESETS)}.")
    if variant not in T5_VARIANTS:
        raise ValueError(f"Unknown T5 variant {variant!r}; choose from {sorted(T5_VARIANTS)}.")
    presets = T5_1_1_PRESETS if variant == "t5_1_1" else T5_PRESETS
    embed, depth, heads, head_dim, mlp_dim = presets[size]
    return dict(
        embed_dim=embed, depth=depth, num_heads=heads, head_dim=head_dim, mlp_dim=mlp_dim,
        activations=T5_VARIANTS[variant],
    )
