"""The code paths taken on accelerators, checked on the CPU against independent references:
`jax.nn.dot_product_attention` with T5's bias and right padding, the remat policies, and the training
core importing without TensorFlow (the GPU machine has none)."""

import os
import re
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clippy_jax import platforms
from clippy_jax.models.layers import MultiHeadAttention
from clippy_jax.models.t5 import T5Encoder


def _reference_attention(params: dict, x: np.ndarray, bias: np.ndarray | None, lengths: np.ndarray | None,
                         scale_logits: bool) -> np.ndarray:
    """The einsum formula in float64: softmax(q k^T (/ sqrt(d)) + bias, padded keys excluded) v."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    x = x.astype(np.float64)
    q, k, v = (np.einsum("bld,dhk->blhk", x, p[n]["kernel"]) + p[n].get("bias", 0) for n in ("query", "key", "value"))
    logits = np.einsum("bqhk,bvhk->bhqv", q, k)
    if scale_logits:
        logits /= np.sqrt(q.shape[-1])
    if bias is not None:
        logits = logits + bias
    if lengths is not None:
        logits = np.where(np.arange(x.shape[1])[None, None, None, :] < lengths[:, None, None, None], logits, -np.inf)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    out = np.einsum("bhqv,bvhk->bqhk", weights, v)
    return np.einsum("bqhk,hkd->bqd", out, p["out"]["kernel"]) + p["out"].get("bias", 0)


@pytest.mark.parametrize("t5_style", [False, True], ids=["vit", "t5_bias_and_padding"])
def test_dot_product_attention_equals_the_einsum_formula(t5_style):
    rng = np.random.default_rng(0)
    batch, length, heads, head_dim = 3, 10, 4, 8
    x = rng.normal(size=(batch, length, heads * head_dim)).astype(np.float32)
    bias = lengths = None
    if t5_style:
        bias = rng.normal(size=(1, heads, length, length)).astype(np.float32)
        lengths = np.array([10, 4, 1], np.int32)  # a full row, a padded row, a single real token
    module = MultiHeadAttention(heads, head_dim, use_bias=not t5_style, scale_logits=not t5_style)
    params = nn.unbox(module.init(jax.random.key(0), x, bias, lengths))["params"]
    out = np.asarray(jax.jit(module.apply)({"params": params}, x, bias, lengths))
    expected = _reference_attention(params, x, bias, lengths, scale_logits=not t5_style)
    # Padded rows (queries at padding) too: they attend to the real keys, as t5x computes them.
    np.testing.assert_allclose(out, expected, atol=1e-5, rtol=0)


def test_padding_does_not_leak_into_real_tokens():
    """Real tokens' features do not depend on what the padded positions hold."""
    encoder = T5Encoder(vocab_size=50, embed_dim=32, depth=2, num_heads=4, head_dim=8, mlp_dim=64)
    tokens = np.array([[5, 6, 7, 1, 0, 0], [9, 1, 0, 0, 0, 0]], np.int32)
    params = jax.jit(encoder.init)(jax.random.key(0), tokens)
    features = jax.jit(encoder.apply)(params, tokens)
    # Same real tokens, longer padding: the padded positions hold other features but change nothing.
    longer = np.pad(tokens, ((0, 0), (0, 4)))
    features_longer = jax.jit(encoder.apply)(params, longer)
    mask = tokens > 0
    np.testing.assert_allclose(np.asarray(features)[mask], np.asarray(features_longer)[:, :6][mask], atol=1e-5)


def test_cudnn_is_chosen_only_for_gpus_for_16_bit_shapes_it_supports():
    choose = platforms.attention_implementation
    assert choose("auto", jnp.bfloat16, 64, "gpu") == "cudnn"
    assert [choose("auto", jnp.bfloat16, 64, p) for p in ("cpu", "tpu")] == ["xla", "xla"]
    assert choose("auto", jnp.float32, 64, "gpu") == "xla" and choose("auto", jnp.bfloat16, 12, "gpu") == "xla"
    assert choose("cudnn", jnp.bfloat16, 64, "cpu") == "cudnn"
    with pytest.raises(ValueError, match="attention='flash'"):
        choose("flash", jnp.float32, 64, "gpu")


def test_the_platform_bound_while_tracing_decides_the_path_not_the_default_backend():
    """A bf16 dense layer traced for a GPU or TPU is a plain bf16 dot; for the CPU (bound, or the default
    device outside any binding) it is `bf16_matmul`'s bf16 x bf16 -> f32 dot."""
    from clippy_jax.models.layers import DenseGeneral

    layer = DenseGeneral((8,), ("embed", "mlp"), dtype=jnp.bfloat16)
    x = jnp.ones((4, 16), jnp.float32)
    params = layer.init(jax.random.key(0), x)

    assert platforms.current() == "cpu"
    assert "custom_vjp_call" in str(jax.make_jaxpr(lambda p, x: layer.apply(p, x))(params, x))
    for platform in ("gpu", "tpu"):
        with platforms.compiled_for(platform):
            text = str(jax.make_jaxpr(lambda p, x: layer.apply(p, x))(params, x))
        assert "custom_vjp_call" not in text and re.search(r"bf16\[4,8\] = dot_general", text), text
    with platforms.compiled_for("cpu"):
        assert "custom_vjp_call" in str(jax.make_jaxpr(lambda p, x: layer.apply(p, x))(params, x))
    assert platforms.platform_of(jax.devices()) == "cpu"
    with pytest.raises(ValueError, match="platform 'cuda'"):
        with platforms.compiled_for("cuda"):
            pass


def test_odd_lengths_padded_for_cudnn_give_the_unpadded_attention():
    """The padding that lets cuDNN train on odd lengths (one masked key, its query dropped) changes nothing:
    computed with XLA's kernel on both sides, with and without T5's bias and padding."""
    from clippy_jax.models.layers import pad_to_even_length

    rng = np.random.default_rng(1)
    q, k, v = (jnp.asarray(rng.normal(size=(3, 7, 2, 8)), jnp.float32) for _ in range(3))
    bias = jnp.asarray(rng.normal(size=(1, 2, 7, 7)), jnp.float32)
    for b, lengths in ((None, None), (bias, jnp.array([7, 3, 1], jnp.int32))):
        expected = jax.nn.dot_product_attention(q, k, v, bias=b, key_value_seq_lengths=lengths)
        padded = pad_to_even_length(q, k, v, b, lengths)
        assert padded[0].shape[1] == 8
        got = jax.nn.dot_product_attention(*padded[:3], bias=padded[3], key_value_seq_lengths=padded[4])[:, :7]
        np.testing.assert_allclose(got, expected, atol=1e-6)


@pytest.mark.parametrize("remat", ["dots", "full"])
def test_remat_policies_give_the_same_gradients_with_fewer_saved_activations(remat):
    from clippy_jax.models.vit import VisionTransformer

    kw = dict(patch_size=4, width=32, depth=2, mlp_dim=64, num_heads=4, posemb_grid=(4, 4))
    images = np.random.default_rng(0).normal(size=(2, 16, 16, 3)).astype(np.float32)
    plain, rematerialised = VisionTransformer(**kw), VisionTransformer(**kw, remat=remat)
    params = nn.unbox(jax.jit(plain.init)(jax.random.key(0), images))

    def loss(model):
        return lambda p: jnp.sum(model.apply(p, images)[0] ** 2)

    grads = jax.jit(jax.grad(loss(plain)))(params)
    grads_remat = jax.jit(jax.grad(loss(rematerialised)))(params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), grads, grads_remat)

    def saved_bytes(model) -> int:
        _, residuals = jax.vjp(loss(model), params)
        return sum(leaf.nbytes for leaf in jax.tree.leaves(residuals))

    assert saved_bytes(rematerialised) < saved_bytes(plain)


def test_remat_rejects_unknown_policies():
    from clippy_jax.models.layers import transformer_block

    with pytest.raises(ValueError, match="remat='some'"):
        transformer_block("some")


def test_training_core_imports_without_tensorflow():
    """Model, loss, optimiser, train step and sharding import with TensorFlow blocked (as on the GPU
    machine, which has none); the TensorFlow-free train-step benchmark runs a step that way."""
    code = (
        "import sys; sys.modules['tensorflow'] = None\n"
        "import clippy_jax.models, clippy_jax.models.two_tower, clippy_jax.train.loss, clippy_jax.train.optimizer\n"
        "import clippy_jax.train.step, clippy_jax.sharding, clippy_jax.train.perf\n"
        "assert 'tensorflow' not in {m.split('.')[0] for m, v in sys.modules.items() if v is not None}\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={"JAX_PLATFORMS": "cpu", "PATH": ""})


def test_each_platform_compiles_with_its_xla_options_and_the_users_flags_win(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    assert platforms.compiler_options("cpu") == platforms.COMPILER_OPTIONS["cpu"]
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_DEFAULT")
    assert platforms.compiler_options("cpu") == {}
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    # XLA checks the options (it refuses an unknown value) and applies them: the CPU's memory-optimised scheduler
    # leaves a ViT's gradient far fewer temporaries than the default scheduler of a plain `jax.jit`.
    from clippy_jax.models.vit import VisionTransformer

    images = jax.ShapeDtypeStruct((32, 32, 32, 3), jnp.float32)
    model = VisionTransformer(patch_size=4, width=64, depth=4, mlp_dim=256, num_heads=4, posemb_grid=(8, 8))
    params = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.key(0), jnp.zeros(images.shape))))
    grad = jax.grad(lambda p, x: jnp.sum(model.apply(p, x)[0] ** 2))

    def temporaries(jitted) -> int:
        return jitted.lower(params, images).compile().memory_analysis().temp_size_in_bytes

    assert temporaries(platforms.jit(grad, jax.devices()[0])) < 0.8 * temporaries(jax.jit(grad))
    with pytest.raises(Exception, match="not a valid enum value"):
        jax.jit(lambda a: a, compiler_options={"xla_cpu_scheduler_type": "NO_SUCH"}).lower(images).compile()


@pytest.mark.parametrize("remat", ["dots", "full"])
def test_remat_block_gradients_equal_plain_autodiff(remat):
    """The rematerialised block (its custom vjp orders the backward pass) gives the gradients of plain
    autodiff of `TransformerBlock`, for the parameters, the input and T5's attention bias, with padded rows."""
    from clippy_jax.models.layers import TransformerBlock, transformer_block

    kw = dict(num_heads=2, head_dim=8, mlp_dim=32, norm="rms", activations=("relu",), use_bias=False,
              scale_logits=False)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(3, 6, 16)), jnp.float32)
    bias = jnp.asarray(rng.normal(size=(1, 2, 6, 6)), jnp.float32)
    lengths = jnp.array([6, 4, 1], jnp.int32)
    plain, rematerialised = TransformerBlock(**kw), transformer_block(remat)(**kw)
    params = plain.init(jax.random.key(0), x, bias, lengths)

    def loss(model):
        return lambda p, x, b: jnp.sum(jnp.sin(model.apply(p, x, b, lengths)))

    expected = jax.grad(loss(plain), argnums=(0, 1, 2))(params, x, bias)
    got = jax.jit(jax.grad(loss(rematerialised), argnums=(0, 1, 2)))(params, x, bias)
    assert jax.tree.structure(got) == jax.tree.structure(expected)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), got, expected)
    np.testing.assert_allclose(rematerialised.apply(params, x, bias, lengths), plain.apply(params, x, bias, lengths),
                               rtol=1e-6, atol=1e-6)


def test_remat_shrinks_xla_cpu_temporaries():
    """On XLA:CPU (its default scheduler) the compiled gradient of a rematerialised ViT needs far less
    temporary memory than without remat; with `jax.checkpoint` alone it needed 9% more."""
    code = """
import flax.linen as nn, jax, jax.numpy as jnp
from clippy_jax.models.vit import VisionTransformer
images = jax.ShapeDtypeStruct((32, 32, 32, 3), jnp.float32)
def temporaries(remat):
    model = VisionTransformer(patch_size=4, width=64, depth=4, mlp_dim=256, num_heads=4, posemb_grid=(8, 8),
                              remat=remat)
    params = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.key(0), jnp.zeros(images.shape))))
    grad = jax.jit(jax.grad(lambda p, x: jnp.sum(model.apply(p, x)[0] ** 2)))
    return grad.lower(params, images).compile().memory_analysis().temp_size_in_bytes
plain = temporaries("none")
assert temporaries("full") < 0.5 * plain and temporaries("dots") < 0.6 * plain, plain
"""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_DEFAULT"}
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=repo)


def test_bf16_matmul_matches_float64_and_runs_bf16_dots_on_the_cpu():
    """`bf16_matmul` (the towers' dense layers in bf16 on a CPU): value and gradients equal float64 numpy on the
    bf16-rounded operands to bf16 precision, and XLA:CPU keeps its forward and input-gradient dots in bf16."""
    import re

    from clippy_jax.models.layers import bf16_matmul

    rng = np.random.default_rng(0)
    x, w, g = (rng.normal(size=s).astype(np.float32) for s in ((37, 48), (48, 20), (37, 20)))
    xb, wb, gb = (np.asarray(jnp.asarray(a, jnp.bfloat16), np.float64) for a in (x, w, g))
    y, vjp = jax.vjp(bf16_matmul, jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16))
    dx, dw = vjp(jnp.asarray(g, jnp.bfloat16))
    for got, expected in ((y, xb @ wb), (dx, gb @ wb.T), (dw, xb.T @ gb)):
        assert got.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(got, np.float64), expected, rtol=1e-2, atol=1e-2 * np.abs(expected).max())

    def loss(x, w):
        return jnp.sum(bf16_matmul(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)).astype(jnp.float32) ** 2)

    hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, w).compile().as_text()
    operand_types = []
    for computation in re.split(r"\n(?=\S)", hlo):
        if " dot(" in computation:
            operand_types.append(re.findall(r"= (\w+)\[[\d,]*\]\{[\d,]*\} parameter", computation)[:2])
    assert operand_types.count(["bf16", "bf16"]) >= 2, operand_types
