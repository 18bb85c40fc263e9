"""Building blocks shared by the image and text towers, with t5x parameter names and logical axes.

Logical axis names follow t5x: `batch`, `length`, `embed`, `mlp`, `heads`, `kv`, `vocab`; the mesh
rules in `clippy_jax.sharding` map them onto mesh axes.
"""

import functools
import math
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from clippy_jax import platforms

Dtype = jnp.dtype
Initializer = Callable[..., jax.Array]

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": nn.relu,
    "gelu": lambda x: nn.gelu(x, approximate=False),  # timm / PyTorch nn.GELU
    "gelu_tanh": lambda x: nn.gelu(x, approximate=True),  # T5.1.1 "gelu_new"
    "linear": lambda x: x,
}


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """Unit-norm along the last axis, in float32."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


def dense_init(axes: tuple[str | None, ...], init: Initializer | None = None):
    """An initializer (default Xavier-uniform) that attaches t5x logical axis names to the parameter."""
    return nn.with_logical_partitioning(init or nn.initializers.xavier_uniform(), axes)


def _dot_f32(a: jax.Array, b: jax.Array, contract: tuple[int, int]) -> jax.Array:
    """2-d matmul contracting a's axis contract[0] with b's axis contract[1], accumulated and returned in float32."""
    return jax.lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())), preferred_element_type=jnp.float32)


@jax.custom_vjp
def bf16_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [N, C] @ w [C, F] -> [N, F] in bfloat16, every product accumulated in float32, forward and backward.

    XLA:CPU runs a bf16 x bf16 -> bf16 dot (what `x @ w` and JAX's transposes emit) by converting both
    operands to float32; bf16 x bf16 -> f32 dots run on its bf16 kernels (AVX-512 BF16 / AMX) instead.
    """
    return _dot_f32(x, w, (1, 0)).astype(jnp.bfloat16)


def _bf16_matmul_fwd(x: jax.Array, w: jax.Array):
    return bf16_matmul(x, w), (x, w)


def _bf16_matmul_bwd(residuals, g: jax.Array):
    x, w = residuals
    g = g.astype(jnp.bfloat16)
    return _dot_f32(g, w, (1, 1)).astype(x.dtype), _dot_f32(x, g, (0, 0)).astype(w.dtype)


bf16_matmul.defvjp(_bf16_matmul_fwd, _bf16_matmul_bwd)


def contract_last(x: jax.Array, kernel: jax.Array, num_contract: int) -> jax.Array:
    """x [..., *C] . kernel [*C, *F] -> [..., *F], both in the compute dtype; bf16 compiled for a CPU takes
    `bf16_matmul` (`platforms.cpu_bf16_dots`)."""
    bf16 = x.dtype == jnp.bfloat16 and kernel.dtype == jnp.bfloat16
    if bf16 and platforms.cpu_bf16_dots(platforms.current()):
        contracted = math.prod(kernel.shape[:num_contract])
        y = checkpoint_name(bf16_matmul(x.reshape(-1, contracted), kernel.reshape(contracted, -1)), "bf16_matmul")
        return y.reshape(*x.shape[:x.ndim - num_contract], *kernel.shape[num_contract:])
    dims = (tuple(range(x.ndim - num_contract, x.ndim)), tuple(range(num_contract)))
    return jax.lax.dot_general(x, kernel, (dims, ((), ())))


def dense_dot_general(lhs: jax.Array, rhs: jax.Array, dimension_numbers, precision=None, **kwargs) -> jax.Array:
    """`flax.linen.Dense`'s `dot_general` (contracting the last input axis) through `contract_last`."""
    if precision is None and not kwargs and dimension_numbers == (((lhs.ndim - 1,), (0,)), ((), ())):
        return contract_last(lhs, rhs, 1)
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision, **kwargs)


class DenseGeneral(nn.Module):
    """Contracts the last `num_contract` input axes with a kernel [*contracted, *features].

    Unlike `flax.linen.DenseGeneral`, the kernel is created in its final shape, so its logical
    axis names (`kernel_axes`) apply to every dimension.
    """

    features: tuple[int, ...]
    kernel_axes: tuple[str | None, ...]
    num_contract: int = 1
    use_bias: bool = True
    init_scale: float = 1.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        contracted = x.shape[x.ndim - self.num_contract:]
        kernel_shape = (*contracted, *self.features)
        init = nn.initializers.variance_scaling(
            self.init_scale, "fan_avg", "uniform",
            in_axis=tuple(range(self.num_contract)), out_axis=tuple(range(self.num_contract, len(kernel_shape))),
        )
        kernel = self.param("kernel", dense_init(self.kernel_axes, init), kernel_shape, self.param_dtype)
        y = contract_last(x.astype(self.dtype), kernel.astype(self.dtype), self.num_contract)
        if self.use_bias:
            bias_axes = self.kernel_axes[self.num_contract:]
            bias = self.param("bias", dense_init(bias_axes, nn.initializers.zeros), self.features, self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y


def pad_to_even_length(
    query: jax.Array, key: jax.Array, value: jax.Array, bias: jax.Array | None, lengths: jax.Array | None
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array | None, jax.Array]:
    """[B, L, H, K] inputs of odd length L -> length L + 1: one zero token that no query attends to (its key is
    beyond `lengths`) and whose own query row the caller drops; bias [1, H, L, L] padded alike."""
    query, key, value = (jnp.pad(t, ((0, 0), (0, 1), (0, 0), (0, 0))) for t in (query, key, value))
    bias = None if bias is None else jnp.pad(bias, ((0, 0), (0, 0), (0, 1), (0, 1)))
    if lengths is None:
        lengths = jnp.full((query.shape[0],), query.shape[1] - 1, jnp.int32)
    return query, key, value, bias, lengths


class MultiHeadAttention(nn.Module):
    """Multi-head self-attention with t5x's `query/key/value` kernels [embed, heads, kv] and `out`
    kernel [heads, kv, embed], computed by `jax.nn.dot_product_attention`.

    `scale_logits=False` is T5's convention (the 1/sqrt(d) factor lives in the query initialiser).
    `attention` is one of `platforms.ATTENTION_IMPLEMENTATIONS`, resolved for the platform compiled for.
    """

    num_heads: int
    head_dim: int
    use_bias: bool = True
    scale_logits: bool = True
    attention: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self, x: jax.Array, bias: jax.Array | None = None, lengths: jax.Array | None = None
    ) -> jax.Array:
        """x: [B, L, D]; bias: additive attention bias [1, H, L, L]; lengths: [B] int32 number of real
        (leading) tokens per row, the rest being right padding that no query attends to."""
        kw = dict(use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype)
        heads = (self.num_heads, self.head_dim)
        query_scale = 1.0 if self.scale_logits else 1.0 / self.head_dim
        query = DenseGeneral(heads, ("embed", "heads", "kv"), init_scale=query_scale, name="query", **kw)(x)
        key = DenseGeneral(heads, ("embed", "heads", "kv"), name="key", **kw)(x)  # [B, L, H, K]
        value = DenseGeneral(heads, ("embed", "heads", "kv"), name="value", **kw)(x)
        axes = ("batch", "length", "heads", "kv")
        query, key, value = (nn.with_logical_constraint(t, axes) for t in (query, key, value))
        length = x.shape[1]
        implementation = platforms.attention_implementation(
            self.attention, self.dtype, self.head_dim, platforms.current()
        )
        if implementation == "cudnn":
            if bias is not None:
                bias = bias.astype(self.dtype)  # cuDNN takes the bias in the compute dtype; XLA adds it in float32
            if length % 2:  # cuDNN's flash attention trains on even lengths only
                query, key, value, bias, lengths = pad_to_even_length(query, key, value, bias, lengths)
        out = jax.nn.dot_product_attention(
            query, key, value,
            bias=bias,
            scale=(1.0 / self.head_dim**0.5) if self.scale_logits else 1.0,
            key_value_seq_lengths=lengths,
            implementation=implementation,
        )[:, :length]  # [B, L, H, K]
        out = nn.with_logical_constraint(out, axes)
        return DenseGeneral((x.shape[-1],), ("heads", "kv", "embed"), num_contract=2, name="out", **kw)(out)


class MlpBlock(nn.Module):
    """t5x's MlpBlock: `wi` (or gated `wi_0`, `wi_1`, ...) then `wo`."""

    mlp_dim: int
    activations: Sequence[str] = ("gelu",)
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, L, D] -> [B, L, D]."""
        embed = x.shape[-1]

        def dense(features: int, axes: tuple[str, str], name: str) -> nn.Dense:
            return nn.Dense(
                features,
                use_bias=self.use_bias,
                kernel_init=dense_init(axes),
                bias_init=dense_init(axes[-1:], nn.initializers.zeros),
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                dot_general=dense_dot_general,
                name=name,
            )

        names = ["wi"] if len(self.activations) == 1 else [f"wi_{i}" for i in range(len(self.activations))]
        hidden = None
        for name, activation in zip(names, self.activations, strict=True):
            h = ACTIVATIONS[activation](dense(self.mlp_dim, ("embed", "mlp"), name)(x))
            hidden = h if hidden is None else hidden * h
        hidden = nn.with_logical_constraint(hidden, ("batch", "length", "mlp"))
        return dense(embed, ("mlp", "embed"), "wo")(hidden)


def layer_norm(
    kind: str, dtype: Dtype, param_dtype: Dtype, name: str | None = None, epsilon: float = 1e-6
) -> nn.Module:
    """`layer` (LayerNorm with bias, ViT) or `rms` (scale-only RMSNorm, T5), with the `embed` axis.

    `name` is left unset when the norm is assigned to an attribute in `setup`.
    """
    scale_init = nn.with_logical_partitioning(nn.initializers.ones, ("embed",))
    if kind == "rms":
        return nn.RMSNorm(epsilon=epsilon, dtype=dtype, param_dtype=param_dtype, scale_init=scale_init, name=name)
    if kind == "layer":
        bias_init = nn.with_logical_partitioning(nn.initializers.zeros, ("embed",))
        return nn.LayerNorm(
            epsilon=epsilon, dtype=dtype, param_dtype=param_dtype, scale_init=scale_init, bias_init=bias_init, name=name
        )
    raise ValueError(f"Unknown norm kind {kind!r}; expected 'layer' or 'rms'.")


class TransformerBlock(nn.Module):
    """Pre-norm transformer block: x + attention(norm(x)), then x + mlp(norm(x))."""

    num_heads: int
    head_dim: int
    mlp_dim: int
    norm: str = "layer"
    activations: Sequence[str] = ("gelu",)
    use_bias: bool = True
    scale_logits: bool = True
    epsilon: float = 1e-6
    attention: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self, x: jax.Array, bias: jax.Array | None = None, lengths: jax.Array | None = None
    ) -> jax.Array:
        """x: [B, L, D]; bias: additive attention bias [1, H, L, L]; lengths: [B] real tokens per row."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        y = layer_norm(self.norm, name="pre_attention_layer_norm", epsilon=self.epsilon, **kw)(x)
        y = MultiHeadAttention(
            self.num_heads, self.head_dim, self.use_bias, self.scale_logits, self.attention, name="attention", **kw
        )(y, bias, lengths)
        x = x + y
        y = layer_norm(self.norm, name="pre_mlp_layer_norm", epsilon=self.epsilon, **kw)(x)
        y = MlpBlock(self.mlp_dim, tuple(self.activations), self.use_bias, name="mlp", **kw)(y)
        x = x + y
        return nn.with_logical_constraint(x, ("batch", "length", "embed"))


# What a rematerialised block keeps for the backward pass ('none': no rematerialisation). 'dots' keeps
# the outputs of the weight matmuls and recomputes the attention matrices, norms and activations;
# 'full' keeps only the block's input.
REMAT_POLICIES: dict[str, Callable | None] = {
    "dots": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        jax.checkpoint_policies.save_only_these_names("bf16_matmul"),  # the weight matmuls in bf16 on a CPU
    ),
    "full": jax.checkpoint_policies.nothing_saveable,
}


def _zero_after(tree) -> jax.Array:
    """A float32 zero computed from every floating-point array of `tree` (0 even where they hold inf or NaN)."""
    leaves = [leaf for leaf in jax.tree.leaves(tree) if jnp.issubdtype(leaf.dtype, jnp.floating)]
    return jnp.nan_to_num(sum(jnp.sum(leaf, dtype=jnp.float32) for leaf in leaves) * 0)


def _after(tree, dependency):
    """`tree` with every floating-point array made data-dependent on `dependency` (by adding an exact zero)."""
    zero = _zero_after(dependency)
    return jax.tree.map(lambda x: x + zero.astype(x.dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


class RematTransformerBlock(TransformerBlock):
    """`TransformerBlock` that keeps what `remat_policy` (a key of `REMAT_POLICIES`) saves and recomputes
    the rest in the backward pass, one block at a time.

    Its custom vjp makes the kept residuals wait for the block's output cotangent before the recomputation
    starts, and the cotangent of the block's input wait for the gradients of the block's parameters.
    XLA:CPU drops JAX's optimisation barriers before it schedules; without these data dependencies its
    schedulers compute the recomputation in the forward pass and run the input-gradient chain of every
    block before all weight-gradient matmuls, keeping every block's activations live, so that
    `jax.checkpoint` alone saves no memory there (BENCHMARKS.md, issue 11). The values are unchanged.
    Compiled for a GPU or TPU, whose compilers keep the optimisation barriers, the block is `nn.checkpoint`
    alone (`platforms.orders_remat_by_data`): the extra reductions would only cost memory bandwidth there.
    """

    remat_policy: str = "full"

    def __call__(
        self, x: jax.Array, bias: jax.Array | None = None, lengths: jax.Array | None = None
    ) -> jax.Array:
        block = nn.checkpoint(TransformerBlock.__call__, policy=REMAT_POLICIES[self.remat_policy])
        if not platforms.orders_remat_by_data(platforms.current()):
            return block(self, x, bias, lengths)

        def forward(module, x, bias, lengths):
            return nn.vjp(block, module, x, bias, lengths)  # the residuals: what the policy keeps

        def backward(vjp_fn, cotangent):
            params_t, *inputs_t = _after(vjp_fn, cotangent)(cotangent)
            return (params_t, *_after(inputs_t, params_t))

        return nn.custom_vjp(block, forward_fn=forward, backward_fn=backward)(self, x, bias, lengths)


def transformer_block(remat: str) -> Callable[..., TransformerBlock]:
    """`TransformerBlock`, or `RematTransformerBlock` with the named policy of `REMAT_POLICIES`."""
    if remat == "none":
        return TransformerBlock
    if remat not in REMAT_POLICIES:
        raise ValueError(f"Unknown remat={remat!r}; choose 'none' or one of {sorted(REMAT_POLICIES)}.")
    return functools.partial(RematTransformerBlock, remat_policy=remat)
