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

# CLIP's image normalisation, which the released CLIPpy checkpoints use.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

@dataclasses.dataclass(frozen=True)
class Geometry:
    input_size: tuple[int, int] = (224, 224)
    window: int = 0
    stride: int = 0
    short_side: int = 0
    method: str = "bilinear"  # `resize` method for the image

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


def _kernel(method: str):
    def triangle(x):
        return np.maximum(0.0, 1.0 - x)

    def keys_cubic(x):  # a = -0.5
        return np.where(x < 1, (1.5 * x - 2.5) * x * x + 1, np.where(x < 2, ((-0.5 * x + 2.5) * x - 4) * x + 2, 0.0))

    kernels = {"bilinear": triangle, "bicubic": keys_cubic}
    if method not in kernels:
        raise ValueError(f"Resize method {method!r} is not one of {sorted(kernels)}.")
    return kernels[method]


def _taps(size: int, new_size: int, method: str, antialias: bool) -> tuple[np.ndarray, np.ndarray]:
    """(input indices, weights), each [new_size, taps], of TensorFlow's (and jax.image's) scale_and_translate:
    half-pixel centres, the kernel widened by the downscaling factor when antialiasing, weights normalised."""
    inv_scale = size / new_size
    kernel_scale = max(inv_scale, 1.0) if antialias else 1.0
    sample = (np.arange(new_size, dtype=np.float64) + 0.5) * inv_scale - 0.5
    weights = _kernel(method)(np.abs(sample[:, None] - np.arange(size)[None, :]) / kernel_scale)  # [new, size]
    total = weights.sum(1, keepdims=True)
    weights = np.where(np.abs(total) > 1000 * np.finfo(np.float32).eps, weights / np.where(total, total, 1), 0.0)
    weights = np.where(((sample >= -0.5) & (sample <= size - 0.5))[:, None], weights, 0.0)
    nonzero = weights != 0
    some = nonzero.any(1)
    first = np.where(some, nonzero.argmax(1), 0)
    count = max(1, int(np.where(some, size - nonzero[:, ::-1].argmax(1) - first, 1).max()))
    indices = first[:, None] + np.arange(count)[None, :]
    inside = indices < size
    indices = np.minimum(indices, size - 1)
    return indices, np.where(inside, np.take_along_axis(weights, indices, 1), 0.0).astype(np.float32)


def _resize_axis(maps: np.ndarray, axis: int, new_size: int, method: str, antialias: bool) -> np.ndarray:
    indices, weights = _taps(maps.shape[axis], new_size, method, antialias)
    shape = [1] * maps.ndim
    shape[axis] = new_size
    out = np.zeros(maps.shape[:axis] + (new_size,) + maps.shape[axis + 1:], np.float32)
    for tap in range(indices.shape[1]):
        out += np.take(maps, indices[:, tap], axis=axis) * weights[:, tap].reshape(shape)
    return out


def resize(maps: np.ndarray, shape: Sequence[int], method: str = "bilinear", antialias: bool = True) -> np.ndarray:
    """float32 [..., h, w, C] -> [..., *shape, C] in numpy: tf.image.resize / jax.image.resize's
    interpolation (half-pixel centres; antialiased when downscaling), with no compilation per size."""
    maps = np.asarray(maps, np.float32)
    return _resize_axis(_resize_axis(maps, -3, shape[0], method, antialias), -2, shape[1], method, antialias)


def resize_image(image: np.ndarray, shape: Sequence[int], method: str = "bilinear") -> np.ndarray:
    """uint8 [H, W, 3] -> float32 [h, w, 3] in [0, 255] (antialiased; bicubic overshoot clipped, as
    PIL's uint8 output); unchanged when already that size."""
    if tuple(image.shape[:2]) == tuple(shape):
        return image.astype(np.float32)
    return np.clip(resize(image, tuple(shape), method), 0.0, 255.0)


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
