"""The contrastive loss against a float64 numpy implementation of appendix D.1."""

import jax.numpy as jnp
import numpy as np

from clippy_jax.train.loss import contrastive_loss


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
