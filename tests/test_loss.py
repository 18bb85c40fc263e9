"""The contrastive loss against a float64 numpy implementation of appendix D.1."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from clippy_jax.sharding import BATCH_AXES, MESH_AXES
from clippy_jax.train.loss import blocked_contrastive_loss, contrastive_loss


def _reference(image: np.ndarray, text: np.ndarray, logit_scale: float, max_logit_scale: float) -> float:
    tau = 1.0 / np.exp(np.clip(logit_scale, 0.0, max_logit_scale))
    n = len(image)
    sims = image @ text.T / tau
    i2t = -np.mean([sims[i, i] - np.log(np.sum(np.exp(sims[i, :]))) for i in range(n)])
    t2i = -np.mean([sims[i, i] - np.log(np.sum(np.exp(sims[:, i]))) for i in range(n)])
    return i2t + t2i


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_matches_float64_reference():
    rng = np.random.default_rng(0)
    image, text = _unit(rng.normal(size=(12, 16))), _unit(rng.normal(size=(12, 16)))
    for logit_scale in (0.3, np.log(1 / 0.07), 7.0):  # 7.0 is beyond the clip at log(100)
        loss, metrics = contrastive_loss(
            jnp.asarray(image, jnp.float32), jnp.asarray(text, jnp.float32), jnp.float32(logit_scale), np.log(100.0)
        )
        expected = _reference(image, text, logit_scale, np.log(100.0))
        np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
        np.testing.assert_allclose(float(metrics["temperature"]), 1 / np.exp(min(logit_scale, np.log(100))), rtol=1e-6)


def test_perfect_alignment_gives_low_loss_and_full_accuracy():
    emb = jnp.eye(8)
    loss, metrics = contrastive_loss(emb, emb, jnp.float32(np.log(100.0)), np.log(100.0))
    assert float(loss) < 1e-3
    assert float(metrics["batch_accuracy"]) == 1.0


@pytest.mark.parametrize(("mesh_shape", "block_size"), [((8, 1, 1), 4), ((2, 2, 2), 8), ((4, 2, 1), 32)])
def test_blocked_loss_and_gradients_match_the_full_matrix(mesh_shape, block_size):
    mesh = Mesh(np.asarray(jax.devices()).reshape(mesh_shape), MESH_AXES)
    rng = np.random.default_rng(1)
    image = jnp.asarray(_unit(rng.normal(size=(32, 16))), jnp.float32)
    text = jnp.asarray(_unit(rng.normal(size=(32, 16))), jnp.float32)
    scale = jnp.float32(2.5)

    def full(image, text, scale):
        return contrastive_loss(image, text, scale, np.log(100.0))

    def blocked(image, text, scale):
        return blocked_contrastive_loss(image, text, scale, np.log(100.0), mesh, BATCH_AXES, block_size)

    sharded = NamedSharding(mesh, PartitionSpec(BATCH_AXES))
    args = (jax.device_put(image, sharded), jax.device_put(text, sharded), scale)
    (loss, metrics), grads = jax.jit(jax.value_and_grad(blocked, argnums=(0, 1, 2), has_aux=True))(*args)
    (ref_loss, ref_metrics), ref_grads = jax.value_and_grad(full, argnums=(0, 1, 2), has_aux=True)(image, text, scale)
    np.testing.assert_allclose(float(loss), _reference(np.asarray(image), np.asarray(text), 2.5, np.log(100.0)),
                               rtol=1e-5)
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6)
    for key in ref_metrics:
        np.testing.assert_allclose(float(metrics[key]), float(ref_metrics[key]), rtol=1e-5)
    for grad, ref in zip(grads, ref_grads):
        np.testing.assert_allclose(np.asarray(grad), np.asarray(ref), atol=1e-6)
