"""CLIPpy on single images, for notebooks and scripts.

    from clippy_jax.inference import Clippy

    clippy = Clippy.load("workdirs/demo", model_config="configs/demo.py")  # or a converted checkpoint
    out = clippy.segment(image, ["zebra", "tiger", ["grass", "sand"]], render=True)
    out.labels          # int [H, W]: index of the best prompt group at every pixel
    out.overlay         # uint8 figure with a legend
    clippy.group(image, num_groups=4).groups           # int [H, W] PCA groups
    clippy.classify(image, ["a zebra", "a tiger"]).probabilities

Images are uint8 [H, W, 3] of any size. The model sees them with the shorter side resized to
`image_size` (aspect kept, both sides rounded to the patch size; the position embeddings are
resampled by the model), or through `window` x `window` sliding windows at `stride` on that resized
image. Score maps are bilinearly upsampled back to the input's size. The protocols are those of
the evaluations (clippy_jax/evaluate/README.md).
"""

import dataclasses
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from clippy_jax.data.tokenizer import Tokenizer
from clippy_jax.evaluate import checkpoints, geometry, grouping, zero_shot
from clippy_jax.evaluate.render import classification_figure, segmentation_overlay

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass
class Segmentation:
    labels: np.ndarray  # int [H, W]: index into `names`
    scores: np.ndarray  # float [H, W, C]: cosine similarity to each label, upsampled
    names: list[str]
    overlay: np.ndarray | None = None


@dataclasses.dataclass
class Grouping:
    groups: np.ndarray  # int [H, W]: index of the PCA half-axis (+v1, -v1, +v2, ...) of every pixel
    scores: np.ndarray  # float [H, W, G]: projections on the half-axes, upsampled
    overlay: np.ndarray | None = None


@dataclasses.dataclass
class Classification:
    probabilities: np.ndarray  # [C]: softmax of the similarities at the model's learned temperature
    similarities: np.ndarray  # [C]: cosine similarity of the pooled image embedding to each label
    names: list[str]
    overlay: np.ndarray | None = None


def _prompt_groups(prompts: Sequence[str | Sequence[str]]) -> tuple[list[list[str]], list[str]]:
    """Each entry is a label: a prompt, or a list of prompts averaged into one embedding (named by the first)."""
    groups = [[p] if isinstance(p, str) else list(p) for p in prompts]
    return groups, [g[0] for g in groups]


class Clippy:
    """A model with its parameters, tokenizer and image settings; see the module docstring."""

    def __init__(self, model: nn.Module, params, tokenizer: Tokenizer, mean: Sequence[float] = CLIP_MEAN,
                 std: Sequence[float] = CLIP_STD, image_size: int = 448, window: int = 0, stride: int = 0):
        self.model, self.params, self.tokenizer = model, params, tokenizer
        self.mean, self.std = tuple(mean), tuple(std)
        self.image_size, self.window, self.stride = image_size, window, stride or window * 2 // 3
        self.patch_size = zero_shot.patch_size(model)
        self._dense = jax.jit(lambda params, images: zero_shot.encode_image(model, params, images)[1])
        self._pooled = jax.jit(lambda params, images, emb: zero_shot.encode_image(model, params, images, emb)[0])

    @classmethod
    def load(cls, checkpoint_dir: str, model_config: str = "", tokenizer_path: str = "",
             mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD, max_text_length: int = 64,
             **settings) -> "Clippy":
        """From a training workdir / checkpoint (with its training config as `model_config`, e.g.
        "configs/demo.py:size=tiny", whose data settings then replace mean / std / text length) or a
        converted checkpoint directory. `settings`: image_size, window, stride."""
        config = ml_collections.ConfigDict(dict(
            init_from=checkpoint_dir, model_config=model_config, tokenizer_path=tokenizer_path,
            data=dict(mean=tuple(mean), std=tuple(std), tokenizer_path="", max_text_length=max_text_length),
        ))
        loaded = checkpoints.load(config)
        return cls(loaded.model, loaded.params, loaded.tokenizer, loaded.data_config.mean, loaded.data_config.std,
                   **settings)

    def _geometry(self, image: np.ndarray) -> geometry.Geometry:
        if self.window:
            return geometry.Geometry(window=self.window, stride=self.stride, short_side=self.image_size)
        return geometry.Geometry(input_size=geometry.shorter_side_shape(image.shape, self.image_size, self.patch_size))

    def _score_map(self, image: np.ndarray, head) -> np.ndarray:
        """head(dense [n, gh, gw, E]) -> [n, gh, gw, K]; returns [H, W, K] at the image's size."""
        geo = self._geometry(image)
        crops, boxes, resized = geo.windows(image)
        dense = self._dense(self.params, geometry.normalize(crops, self.mean, self.std))
        scores = np.asarray(head(dense))
        return np.asarray(geometry.to_label_resolution(scores, boxes, resized, geo.window_shape, image.shape[:2]))

    def label_embeddings(self, prompts: Sequence[Sequence[str]], templates: Sequence[str] = ("{}",)) -> jax.Array:
        return zero_shot.label_embeddings(self.model, self.params, self.tokenizer, prompts, templates)

    def segment(self, image: np.ndarray, prompts: Sequence[str | Sequence[str]], render: bool = False) -> Segmentation:
        """Top-down zero-shot segmentation: every pixel takes the label with the highest cosine similarity
        (bilinearly upsampled from the patch grid) between the label's embedding, the normalised mean
        over its prompts, and the per-location image embedding."""
        groups, names = _prompt_groups(prompts)
        label_emb = self.label_embeddings(groups)
        scores = self._score_map(image, lambda dense: zero_shot.location_logits(dense, label_emb))
        labels = scores.argmax(-1)
        overlay = segmentation_overlay(image, None, labels, names) if render else None
        return Segmentation(labels, scores, names, overlay)

    def group(self, image: np.ndarray, num_groups: int = 2, render: bool = False) -> Grouping:
        """Bottom-up PCA grouping of the image's per-location embeddings (clippy_jax/evaluate/grouping.py);
        with sliding windows, PCA runs over the windows' locations together."""

        def head(dense: jax.Array) -> jax.Array:  # [n, gh, gw, E] -> [n, gh, gw, G]
            mean, axes = grouping.principal_axes(dense.reshape(-1, dense.shape[-1]), num_groups)
            return jnp.einsum("nhwe,ge->nhwg", dense - mean, axes)

        scores = self._score_map(image, head)
        groups = scores.argmax(-1)
        names = [f"group {i + 1}" for i in range(num_groups)]
        overlay = segmentation_overlay(image, None, groups, names) if render else None
        return Grouping(groups, scores, overlay)

    def classify(self, image: np.ndarray, labels: Sequence[str | Sequence[str]], templates: Sequence[str] = ("{}",),
                 render: bool = False) -> Classification:
        """Zero-shot classification of the pooled embedding of the image, resized (shorter side
        `image_size`, rounded to the patch size) without cropping."""
        groups, names = _prompt_groups(labels)
        label_emb = self.label_embeddings(groups, templates)
        shape = geometry.shorter_side_shape(image.shape, self.image_size, self.patch_size)
        pixels = geometry.normalize(geometry.resize_image(image, shape), self.mean, self.std)
        similarities = np.asarray(self._pooled(self.params, pixels[None], label_emb))[0]
        probabilities = np.asarray(jax.nn.softmax(jnp.exp(self.params["logit_scale"]) * similarities))
        overlay = classification_figure(image, names, probabilities) if render else None
        return Classification(probabilities, similarities, names, overlay)
