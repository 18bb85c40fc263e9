"""Per-example image preprocessing in TensorFlow: decode, resize, crop, normalise, drop patches."""

from collections.abc import Sequence

import tensorflow as tf


def decode_rgb(encoded: tf.Tensor) -> tf.Tensor:
    """JPEG / PNG / GIF / BMP bytes -> uint8 [H, W, 3] (grayscale, CMYK and alpha become RGB)."""
    return tf.ensure_shape(tf.io.decode_image(encoded, channels=3, expand_animations=False), [None, None, 3])


def resize_shortest_side(image: tf.Tensor, size: int) -> tf.Tensor:
    """Resizes so that the shorter side is `size` (bilinear, antialiased); float32 output."""
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = size / tf.reduce_min(shape)
    new_shape = tf.maximum(tf.cast(tf.round(shape * scale), tf.int32), size)
    return tf.image.resize(image, new_shape, method="bilinear", antialias=True)


def crop_square(image: tf.Tensor, size: int, seed: tf.Tensor | None) -> tf.Tensor:
    """Random crop (with a stateless `seed`) or, when `seed` is None, a center crop to [size, size]."""
    height, width = tf.shape(image)[0], tf.shape(image)[1]
    if seed is None:
        top, left = (height - size) // 2, (width - size) // 2
    else:
        offsets = tf.random.stateless_uniform([2], seed, maxval=tf.int32.max, dtype=tf.int32)
        top, left = offsets[0] % (height - size + 1), offsets[1] % (width - size + 1)
    return image[top : top + size, left : left + size]


def normalize(image: tf.Tensor, mean: Sequence[float], std: Sequence[float]) -> tf.Tensor:
    """Pixel values in [0, 255] -> (x / 255 - mean) / std per channel."""
    return (tf.cast(image, tf.float32) / 255.0 - tf.constant(mean)) / tf.constant(std)


def patchify(image: tf.Tensor, patch_size: int) -> tf.Tensor:
    """[H, W, C] -> [(H/p) * (W/p), p * p * C], row-major over the grid (as `models.vit.patchify`)."""
    height, width, channels = image.shape
    grid_h, grid_w = height // patch_size, width // patch_size
    patches = tf.reshape(image, [grid_h, patch_size, grid_w, patch_size, channels])
    patches = tf.transpose(patches, [0, 2, 1, 3, 4])
    return tf.reshape(patches, [grid_h * grid_w, patch_size * patch_size * channels])


def drop_patches(image: tf.Tensor, patch_size: int, keep: int, seed: tf.Tensor) -> dict[str, tf.Tensor]:
    """Keeps a uniformly random subset of `keep` patches (paper appendix D.4, E).

    Returns `patches` [keep, p * p * C] and their sorted grid `patch_indices` [keep] int32, so that
    only the kept pixels travel to the device.
    """
    patches = patchify(image, patch_size)
    scores = tf.random.stateless_uniform([patches.shape[0]], seed)
    indices = tf.sort(tf.argsort(scores)[:keep])
    return dict(patches=tf.gather(patches, indices), patch_indices=tf.cast(indices, tf.int32))


def kept_patch_count(image_size: int, patch_size: int, keep_ratio: float | None, keep_count: int | None) -> int | None:
    """Number of patches kept per image from the config (None: no dropping)."""
    total = (image_size // patch_size) ** 2
    if keep_count:
        if not 0 < keep_count <= total:
            raise ValueError(f"data.keep_patches={keep_count} must be in (0, {total}] for this image and patch size.")
        return keep_count
    if keep_ratio is None or keep_ratio >= 1.0:
        return None
    if not 0.0 < keep_ratio:
        raise ValueError(f"data.keep_ratio={keep_ratio} must be in (0, 1].")
    return max(1, round(total * keep_ratio))
