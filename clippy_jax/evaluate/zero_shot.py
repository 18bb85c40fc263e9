"""Zero-shot heads shared by every evaluation: prompt files, label embeddings from prompt lists,
image-level logits and per-location features of the image tower."""

import os
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from clippy_jax.data.tokenizer import Tokenizer
from clippy_jax.models import as_variables, towers
from clippy_jax.models.pooling import IMAGE_POOLS
from clippy_jax.models.two_tower import l2_normalize, pair_similarity

PROMPTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prompts")
TEXT_BATCH_SIZE = 2048
# Named prompt templates (`fill_template`): the bare prompt (the paper's segmentation prompts), and
# kahnchana/clippy's VOC template "a photo of a/an {}".
TEMPLATES = {"none": ("{}",), "photo": ("a photo of {a} {}",)}


def read_lines(filename: str) -> list[str]:
    """Non-empty lines of a file in `prompts/` (or any path), without `#` comment lines."""
    path = filename if os.path.sep in filename else os.path.join(PROMPTS_DIR, filename)
    with open(path) as f:
        return [line.strip() for line in f if line.strip() and not line.startswith("#")]


def read_label_prompts(filename: str, class_names: Sequence[str]) -> list[list[str]]:
    """Prompt lists in `class_names` order from a file of `class name: prompt, prompt, ...` lines
    (the file may list more classes, e.g. all 133 COCO panoptic ones for a subset of them).

    Prompts are kept as written, duplicates included (a duplicate weighs twice in the mean)."""
    table = {}
    for line in read_lines(filename):
        name, sep, prompts = line.partition(": ")
        if not sep or name in table:
            raise ValueError(f"{filename}: malformed or repeated line {line!r}.")
        table[name] = [p.strip() for p in prompts.split(",")]
    missing = [c for c in class_names if c not in table]
    if missing:
        raise ValueError(f"{filename} has no prompts for the classes {missing}.")
    return [table[c] for c in class_names]


def read_templates(name: str) -> tuple[str, ...]:
    """Prompt templates by name (`TEMPLATES`) or from a file of one template per line (`prompts/` or a path)."""
    return TEMPLATES[name] if name in TEMPLATES else tuple(read_lines(name))


def patch_grid(model: nn.Module, image_shape: Sequence[int]) -> tuple[int, int]:
    """(gh, gw) of the model's per-location features on an (H, W) image: the ViT's patch grid (its patch size
    and stride), or a CNN's last feature map (`towers.feature_grid`)."""
    return towers.feature_grid(model.image, image_shape)


def encode_texts(model: nn.Module, params, tokenizer: Tokenizer, texts: Sequence[str],
                 batch_size: int = TEXT_BATCH_SIZE) -> jax.Array:
    """[T, E] unit text embeddings, in chunks of `batch_size` texts.

    The text tower runs op by op (not jitted): the embeddings then do not depend on XLA's fusion
    choices for a prompt count, nothing is compiled per count, and the matmuls dominate anyway."""
    tokens = tokenizer.encode(list(texts))  # [T, L]
    chunks = [
        model.apply(as_variables(params), tokens[start:start + batch_size], method=model.encode_text)
        for start in range(0, len(tokens), batch_size)
    ]
    return jnp.concatenate(chunks)


def fill_template(template: str, prompt: str) -> str:
    """`template` with `{}` replaced by the prompt and `{a}` by its indefinite article ('an' before a
    vowel letter, else 'a', as kahnchana/clippy's "a photo of a/an {}")."""
    return template.format(prompt, a="an" if prompt[:1].lower() in "aeiou" else "a")


def label_embeddings(
    model: nn.Module, params, tokenizer: Tokenizer, prompts: Sequence[Sequence[str]], templates: Sequence[str] = ("{}",)
) -> jax.Array:
    """[C, E]: each label is the normalised mean of the embeddings of its prompts x templates
    (appendix I: "the average embedding across all prompts ... is associated with each label";
    CLIP's prompt ensembling for ImageNet); templates as in `fill_template`."""
    texts = [[fill_template(t, p) for p in label_prompts for t in templates] for label_prompts in prompts]
    emb = encode_texts(model, params, tokenizer, [text for group in texts for text in group])  # [T, E]
    bounds = np.cumsum([0] + [len(g) for g in texts])
    return jnp.stack([l2_normalize(emb[a:b].mean(axis=0)) for a, b in zip(bounds[:-1], bounds[1:])])


def encode_image(
    model: nn.Module, params, images: jax.Array, label_emb: jax.Array | None = None
) -> tuple[jax.Array | None, jax.Array]:
    """`params`: the parameters, or the variables with a CNN's BatchNorm statistics (`models.as_variables`).

    Returns (image-level logits [B, C] against unit label embeddings [C, E], or None without them; unit
    per-location embeddings [B, gh, gw, E] on the model's patch grid) of normalised images [B, H, W, 3].
    Text-conditioned heads pool once per label (per-location embeddings do not depend on the labels)."""
    conditioning = None
    if IMAGE_POOLS[model.image_pool].text_conditioned:
        conditioning = jnp.zeros((1, model.embed_dim), jnp.float32) if label_emb is None else label_emb
    pooled, dense = model.apply(
        as_variables(params), images, dense=True, text_emb=conditioning, method=model.encode_image
    )
    dense = dense.reshape(dense.shape[0], *patch_grid(model, images.shape[1:3]), dense.shape[-1])
    return (None if label_emb is None else pair_similarity(pooled, label_emb)), dense


def location_logits(dense: jax.Array, label_emb: jax.Array) -> jax.Array:
    """Per-location cosine similarity to each label: dense [B, h, w, E], label_emb [C, E] -> [B, h, w, C]."""
    return jnp.einsum("bhwe,ce->bhwc", dense, label_emb)
