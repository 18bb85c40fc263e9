"""The symmetric image-text contrastive loss of the paper (appendix D.1)."""

import jax
import jax.numpy as jnp


def contrastive_loss(
    image_emb: jax.Array, text_emb: jax.Array, logit_scale: jax.Array, max_logit_scale: float
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """L = image-to-text + text-to-image cross-entropy over the global batch (appendix D.1).

    Every example's negatives are all other examples of the (global, possibly sharded) batch.

    Args:
      image_emb: [B, E] unit image embeddings.
      text_emb: [B, E] unit text embeddings; row i is image i's caption.
      logit_scale: scalar log(1 / tau), learned.
      max_logit_scale: clip on log(1 / tau) (CLIP clips 1 / tau at 100).

    Returns:
      (scalar loss, metrics with both directions, the temperature and the in-batch accuracy).
    """
    scale = jnp.exp(jnp.clip(logit_scale, 0.0, max_logit_scale))
    logits = scale * jnp.einsum("ie,je->ij", image_emb, text_emb, preferred_element_type=jnp.float32)  # [B, B]
    image_to_text = -jnp.mean(jnp.diagonal(jax.nn.log_softmax(logits, axis=1)))
    text_to_image = -jnp.mean(jnp.diagonal(jax.nn.log_softmax(logits, axis=0)))
    accuracy = jnp.mean(jnp.argmax(logits, axis=1) == jnp.arange(logits.shape[0]))
    metrics = dict(
        loss_image_to_text=image_to_text,
        loss_text_to_image=text_to_image,
        temperature=1.0 / scale,
        batch_accuracy=accuracy,
    )
    return image_to_text + text_to_image, metrics
