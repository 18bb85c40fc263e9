"""The symmetric image-text contrastive loss of the paper (appendix D.1)."""

import jax
import jax.numpy as jnp

from clippy_jax.models.two_tower import pair_similarity


def contrastive_loss(
    image_emb: jax.Array, text_emb: jax.Array, logit_scale: jax.Array, max_logit_scale: float
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """L = image-to-text + text-to-image cross-entropy over the global batch (appendix D.1).

    Every example's negatives are all other examples of the (global, possibly sharded) batch.

    Args:
      image_emb: [B, E] unit image embeddings, or [B, B, E] from a text-conditioned pooling head
        (image i pooled for text j).
      text_emb: [B, E] unit text embeddings; row i is image i's caption.
      logit_scale: scalar log(1 / tau), learned.
      max_logit_scale: clip on log(1 / tau) (CLIP clips 1 / tau at 100).

    Returns:
      (scalar loss, metrics with both directions, the temperature and the in-batch accuracy).
    """
    scale = jnp.exp(jnp.clip(logit_scale, 0.0, max_logit_scale))
    logits = scale * pair_similarity(image_emb, text_emb)  # [B, B]
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


def blocked_contrastive_loss(
    image_emb: jax.Array,
    text_emb: jax.Array,
    logit_scale: jax.Array,
    max_logit_scale: float,
    mesh: jax.sharding.Mesh,
    batch_axes: tuple[str, ...],
    block_size: int,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`contrastive_loss` over a batch sharded on `batch_axes`, without materialising [B, B].

    Each of the n devices holds b = B / n image and text rows. It gathers all B text embeddings and
    walks over them in blocks of `block_size` columns, keeping running row log-sum-exps
    (image-to-text) and per-column partial log-sum-exps that are combined across devices
    (text-to-image). Per-device memory: B * E (gathered text) + b * block_size (one logits block)
    + O(B) floats, instead of b * B for the row-sharded full matrix (B * B unsharded).
    """

    def local(image, text, logit_scale):  # image, text: [b, E]
        scale = jnp.exp(jnp.clip(logit_scale, 0.0, max_logit_scale))
        all_text = jax.lax.all_gather(text, batch_axes, tiled=True)  # [B, E]
        b, global_batch = image.shape[0], all_text.shape[0]
        blocks = all_text.reshape(global_batch // block_size, block_size, -1)  # [B / c, c, E]

        def scan_block(carry, block):
            row_max, row_sum, best, best_index, start = carry
            logits = scale * jnp.einsum("ie,je->ij", image, block, preferred_element_type=jnp.float32)  # [b, c]
            new_max = jax.lax.stop_gradient(jnp.maximum(row_max, logits.max(axis=1)))
            row_sum = row_sum * jnp.exp(row_max - new_max) + jnp.exp(logits - new_max[:, None]).sum(axis=1)
            col_max = jax.lax.stop_gradient(logits.max(axis=0))  # [c]
            col_sum = jnp.exp(logits - col_max).sum(axis=0)
            better = logits.max(axis=1) > best
            best_index = jnp.where(better, start + logits.argmax(axis=1), best_index)
            best = jnp.maximum(best, logits.max(axis=1))
            return (new_max, row_sum, best, best_index, start + block_size), (col_max, col_sum)

        init = (jnp.full(b, -jnp.inf), jnp.zeros(b), jnp.full(b, -jnp.inf), jnp.zeros(b, jnp.int32), 0)
        (row_max, row_sum, _, best_index, _), (col_max, col_sum) = jax.lax.scan(scan_block, init, blocks)
        row_lse = row_max + jnp.log(row_sum)  # [b]
        col_max, col_sum = col_max.reshape(global_batch), col_sum.reshape(global_batch)
        global_max = jax.lax.stop_gradient(jax.lax.pmax(col_max, batch_axes))
        col_lse = global_max + jnp.log(jax.lax.psum(col_sum * jnp.exp(col_max - global_max), batch_axes))  # [B]
        offset = jax.lax.axis_index(batch_axes) * b
        positives = scale * jnp.sum(image.astype(jnp.float32) * text.astype(jnp.float32), axis=-1)  # [b]
        image_to_text = jax.lax.psum(jnp.sum(row_lse - positives), batch_axes) / global_batch
        own_cols = jax.lax.dynamic_slice(col_lse, (offset,), (b,))
        text_to_image = jax.lax.psum(jnp.sum(own_cols - positives), batch_axes) / global_batch
        correct = jax.lax.psum(jnp.sum(best_index == offset + jnp.arange(b)), batch_axes)
        return image_to_text, text_to_image, correct / global_batch, 1.0 / scale

    spec = jax.sharding.PartitionSpec(batch_axes)
    replicated = jax.sharding.PartitionSpec()
    image_to_text, text_to_image, accuracy, temperature = jax.shard_map(
        local, mesh=mesh, in_specs=(spec, spec, replicated), out_specs=replicated, check_vma=False
    )(image_emb, text_emb, logit_scale)
    metrics = dict(
        loss_image_to_text=image_to_text,
        loss_text_to_image=text_to_image,
        temperature=temperature,
        batch_accuracy=accuracy,
    )
    return image_to_text + text_to_image, metrics
