"""Per-example image preprocessing in TensorFlow: decode, resize, crop, normalise, drop patches."""

from collections.abc import Sequence

import tensorflow as tf


def decode_rgb(encoded: tf.Tensor) -> tf.Tensor:
    """JPEG / PNG / GIF / BMP bytes -> uint8 [H, W, 3] (grayscale, CMYK and alpha become RGB)."""
    return tf.ensure_shape(tf.io.decode_image(encoded, channels=3, expand_animations=False), [None, None, 3])


def _square_window(height: tf.Tensor, width: tf.Tensor, seed: tf.Tensor | None) -> tuple[tf.Tensor, ...]:
    """(top, left, side) of the largest square: random along the longer side with a stateless
    `seed`, centred when `seed` is None."""
    side = tf.minimum(height, width)
    if seed is None:
        return (height - side) // 2, (width - side) // 2, side
    offset = tf.random.stateless_uniform([], seed, maxval=tf.maximum(height, width) - side + 1, dtype=tf.int32)
    return tf.where(height > width, offset, 0), tf.where(height > width, 0, offset), side


def crop_to_square(image: tf.Tensor, size: int, seed: tf.Tensor | None) -> tf.Tensor:
    """uint8 [H, W, 3] -> float32 [size, size, 3] in [0, 255] (paper appendix C): the shorter side
    resized to `size` and the longer side cropped, at random (stateless `seed`) or, when `seed` is
    None, in the centre.

    The square is cut in source pixels and then resized (bilinear, antialiased when shrinking):
    the same window as resizing first, without resizing pixels that are cropped away.
    """
    top, left, side = _square_window(tf.shape(image)[0], tf.shape(image)[1], seed)
    square = image[top : top + side, left : left + side]
    image = tf.cond(
        side > size,
        lambda: tf.image.resize(square, [size, size], method="bilinear", antialias=True),
        lambda: tf.image.resize(square, [size, size], method="bilinear"),
    )
    return tf.ensure_shape(image, [size, size, 3])


def normalize(pixels: tf.Tensor, mean: Sequence[float], std: Sequence[float]) -> tf.Tensor:
    """Values in [0, 255] -> (x / 255 - mean) / std per channel; channels are innermost in the last
    axis, which holds one pixel ([..., C]) or whole flattened patches ([..., p * p * C])."""
    reps = pixels.shape[-1] // len(mean)
    mean, std = tf.tile(tf.constant(mean, tf.float32), [reps]), tf.tile(tf.constant(std, tf.float32), [reps])
    return (tf.cast(pixels, tf.float32) / 255.0 - mean) / std


def patchify(image: tf.Tensor, patch_size: int, stride: int | None = None) -> tf.Tensor:
    """[H, W, C] -> [gh * gw, p * p * C], the p x p windows `stride` pixels apart (default: p; overlapping
    when smaller), row-major over the grid and flattened (p1 p2 c), as `models.vit.patchify`."""
    stride = stride or patch_size
    windows = tf.image.extract_patches(image[None], sizes=[1, patch_size, patch_size, 1],
                                       strides=[1, stride, stride, 1], rates=[1, 1, 1, 1], padding="VALID")
    return tf.reshape(windows, [-1, patch_size * patch_size * image.shape[-1]])  # [gh * gw, p * p * C]


def drop_patches(image: tf.Tensor, patch_size: int, keep: int, seed: tf.Tensor,
                 stride: int | None = None) -> dict[str, tf.Tensor]:
    """Keeps a uniformly random subset of `keep` patches (paper appendix D.4, E) of the grid at
    `stride` (default: the patch size; smaller: overlapping patches, appendix E).

    Returns `patches` [keep, p * p * C] and their sorted grid `patch_indices` [keep] int32, so that
    only the kept pixels travel to the device.
    """
    patches = patchify(image, patch_size, stride)
    scores = tf.random.stateless_uniform([patches.shape[0]], seed)
    indices = tf.sort(tf.argsort(scores)[:keep])
    return dict(patches=tf.gather(patches, indices), patch_indices=tf.cast(indices, tf.int32))


def kept_patch_count(image_size: int, patch_size: int, keep_ratio: float | None, keep_count: int | None,
                     stride: int | None = None) -> int | None:
    """Number of patches kept per image from the config (None: no dropping); the grid has
    (image_size - p) // stride + 1 patches per side."""
    total = ((image_size - patch_size) // (stride or patch_size) + 1) ** 2
    if keep_count:
        if not 0 < keep_count <= total:
            raise ValueError(f"data.keep_patches={keep_count} must be in (0, {total}] for this image size, patch "
                             f"size and stride.")
        return keep_count
    if keep_ratio is None or keep_ratio >= 1.0:
        return None
    if not 0.0 < keep_ratio:
        raise ValueError(f"data.keep_ratio={keep_ratio} must be in (0, 1].")
    return max(1, round(total * keep_ratio))
