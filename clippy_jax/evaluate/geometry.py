"""How an image of any size becomes fixed-size model inputs, and how per-window score maps come back
to label resolution.

Two modes, both giving windows of one shape so that batches shard over the mesh:

* resize (`window=0`): the whole image is resized to `input_size` (h, w); one window.
* sliding (`window>0`): the image is resized so that its shorter side is `short_side` (aspect kept),
  then covered by `window` x `window` crops at `stride`, the last crop of a row/column flush with
  the border (mmsegmentation's `slide_inference`).

Score maps (per-location logits, group or cluster scores) at the patch grid of each window are
bilinearly upsampled: in resize mode straight to label resolution; in sliding mode first to the
window's pixels, averaged over overlapping windows on the resized image, then to label resolution.
"""

import dataclasses
import functools
import math
from collections.abc import Sequence

import jax
import numpy as np
import tensorflow as tf

# CLIP's image normalisation, which the released CLIPpy checkpoints use.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

@dataclasses.dataclass(frozen=True)
class Geometry:
    input_size: tuple[int, int] = (224, 224)
    window: int = 0
    stride: int = 0
    short_side: int = 0
    method: str = "bilinear"  # tf.image.resize method for the image

    @classmethod
    def from_config(cls, task) -> "Geometry":
        geometry = cls(
            input_size=tuple(task.input_size), window=int(task.window), stride=int(task.stride),
            short_side=int(task.short_side),
        )
        if geometry.window and not (0 < geometry.stride <= geometry.window <= geometry.short_side):
            raise ValueError(
                f"Sliding windows need 0 < stride <= window <= short_side, got stride={geometry.stride}, "
                f"window={geometry.window}, short_side={geometry.short_side}."
            )
        return geometry

    @property
    def window_shape(self) -> tuple[int, int]:
        return (self.window, self.window) if self.window else tuple(self.input_size)

    def resized_shape(self, shape: Sequence[int]) -> tuple[int, int]:
        if not self.window:
            return tuple(self.input_size)
        return shorter_side_shape(shape[:2], self.short_side)

    def windows(self, image: np.ndarray) -> tuple[np.ndarray, list[tuple[int, int]], tuple[int, int]]:
        """uint8 [H, W, 3] -> (crops float32 [n, h, w, 3] in [0, 255], their (y, x) origins on the
        resized image, the resized image's (H', W'))."""
        shape = self.resized_shape(image.shape)
        resized = resize_image(image, shape, self.method)
        wh, ww = self.window_shape
        rows, columns = window_origins(shape[0], wh, self.stride), window_origins(shape[1], ww, self.stride)
        boxes = [(y, x) for y in rows for x in columns]
        return np.stack([resized[y:y + wh, x:x + ww] for y, x in boxes]), boxes, shape


def shorter_side_shape(shape: Sequence[int], short_side: int, multiple: int = 1) -> tuple[int, int]:
    """(H', W') with min(H', W') ~= short_side and the aspect ratio kept, each rounded to `multiple`."""
    scale = short_side / min(shape[0], shape[1])
    return tuple(max(multiple, int(round(s * scale / multiple)) * multiple) for s in shape[:2])


def resize_image(image: np.ndarray, shape: Sequence[int], method: str = "bilinear") -> np.ndarray:
    """uint8 [H, W, 3] -> float32 [h, w, 3] in [0, 255] (antialiased; bicubic overshoot clipped, as
    PIL's uint8 output); unchanged when already that size."""
    if tuple(image.shape[:2]) == tuple(shape):
        return image.astype(np.float32)
    return np.clip(tf.image.resize(image, tuple(shape), method=method, antialias=True).numpy(), 0.0, 255.0)


def window_origins(length: int, window: int, stride: int) -> list[int]:
    """Start offsets of windows covering [0, length); one window when it spans the whole length."""
    if window >= length:
        return [0]
    count = math.ceil((length - window) / stride) + 1
    return [min(i * stride, length - window) for i in range(count)]


def normalize(images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """[..., 3] pixel values in [0, 255] -> float32 (x / 255 - mean) / std."""
    return (images.astype(np.float32) / 255.0 - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


@functools.partial(jax.jit, static_argnames="shape")
def upsample(scores: jax.Array, shape: tuple[int, int]) -> jax.Array:
    """Bilinear resize of [..., h, w, K] score maps to [..., *shape, K]."""
    return jax.image.resize(scores, (*scores.shape[:-3], *shape, scores.shape[-1]), method="bilinear")


def to_label_resolution(
    window_scores: np.ndarray, boxes: Sequence[tuple[int, int]], resized_shape: tuple[int, int],
    window_shape: tuple[int, int], label_shape: tuple[int, int], resize=upsample,
) -> jax.Array:
    """Per-window score maps [n, gh, gw, K] of one image -> [H, W, K] at label resolution; `resize`
    (default `upsample`) is the bilinear resize (maps [..., h, w, K], shape) -> [..., *shape, K]."""
    if len(boxes) == 1 and tuple(resized_shape) == tuple(window_shape):
        return resize(window_scores[0], tuple(label_shape))
    pixels = np.asarray(resize(window_scores, tuple(window_shape)))  # [n, wh, ww, K]
    total = np.zeros((*resized_shape, pixels.shape[-1]), np.float32)
    count = np.zeros((*resized_shape, 1), np.float32)
    for (y, x), window in zip(boxes, pixels):
        total[y:y + window_shape[0], x:x + window_shape[1]] += window
        count[y:y + window_shape[0], x:x + window_shape[1]] += 1
    return resize(total / count, tuple(label_shape))
