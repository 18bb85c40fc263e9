"""Zero-shot heads shared by every evaluation: label embeddings from prompt lists, per-location
segmentation logits and image-level classification logits."""

from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from clippy_jax.data.tokenizer import Tokenizer
from clippy_jax.models.two_tower import l2_normalize


def label_embeddings(
    model: nn.Module, params, tokenizer: Tokenizer, prompts: Sequence[Sequence[str]], templates: Sequence[str] = ("{}",)
) -> jax.Array:
    """[C, E]: each label is the normalised mean of the embeddings of its prompts x templates
    (appendix I: "the average embedding across all prompts ... is associated with each label")."""
    texts = [[t.format(p) for p in label_prompts for t in templates] for label_prompts in prompts]
    flat = [text for group in texts for text in group]
    emb = model.apply({"params": params}, jnp.asarray(tokenizer.encode(flat)), method=model.encode_text)  # [T, E]
    bounds = np.cumsum([0] + [len(g) for g in texts])
    return jnp.stack([l2_normalize(emb[a:b].mean(axis=0)) for a, b in zip(bounds[:-1], bounds[1:])])


def make_dense_encoder(model: nn.Module, patch_size: int) -> Callable[[dict, jax.Array], tuple[jax.Array, jax.Array]]:
    """Jitted (params, images [B, H, W, 3]) -> (pooled [B, E], dense [B, H/p, W/p, E])."""

    @jax.jit
    def encode(params, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        pooled, dense = model.apply({"params": params}, images, dense=True, method=model.encode_image)
        grid = (images.shape[1] // patch_size, images.shape[2] // patch_size)
        return pooled, dense.reshape(dense.shape[0], *grid, dense.shape[-1])

    return encode


def segmentation_logits(dense: jax.Array, label_emb: jax.Array, output_shape: Sequence[int]) -> jax.Array:
    """Per-location cosine similarity to each label, bilinearly upsampled.

    dense: [B, h, w, E] unit embeddings; label_emb: [C, E]; output_shape: (H, W).
    Returns [B, H, W, C].
    """
    logits = jnp.einsum("bhwe,ce->bhwc", dense, label_emb)
    return jax.image.resize(logits, (logits.shape[0], *output_shape, logits.shape[-1]), method="bilinear")
