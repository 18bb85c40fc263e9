"""Per-example preprocessing: decoding to RGB, crop/resize geometry, normalisation, patch dropping."""

import io

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from clippy_jax.data import preprocess

MEAN, STD = (0.48, 0.46, 0.41), (0.27, 0.26, 0.28)


def _encode(array: np.ndarray, mode: str, image_format: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).convert(mode).save(buffer, image_format, quality=95)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("mode", "image_format", "tolerance"),
    [("RGB", "PNG", 0), ("L", "PNG", 0), ("RGBA", "PNG", 0), ("P", "PNG", 0), ("RGB", "JPEG", 3), ("L", "JPEG", 3),
     ("CMYK", "JPEG", 3)],
)
def test_decode_gives_rgb(mode, image_format, tolerance):
    blocks = np.random.default_rng(0).integers(0, 256, (6, 5, 3), dtype=np.uint8)
    data = _encode(np.kron(blocks, np.ones((8, 8, 1), np.uint8)), mode, image_format)
    reference = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), np.float64)
    decoded = preprocess.decode_rgb(tf.constant(data)).numpy()
    assert decoded.shape == (48, 40, 3) and decoded.dtype == np.uint8
    assert np.abs(decoded - reference).mean() <= tolerance


@pytest.mark.parametrize("shape", [(16, 40), (40, 16)])
def test_crop_takes_a_full_square_of_the_shorter_side(shape):
    """At scale 1 the output is exactly a window; random windows cover every offset, centred is in the middle."""
    size = 16
    image = np.random.default_rng(1).integers(0, 256, (*shape, 3), dtype=np.uint8)
    windows = [image[o : o + size] if shape[0] > shape[1] else image[:, o : o + size]
               for o in range(max(shape) - size + 1)]

    def offset(crop: np.ndarray) -> int:
        (match,) = [o for o, w in enumerate(windows) if np.array_equal(crop, w)]
        return match

    center = preprocess.crop_to_square(tf.constant(image), size, None).numpy()
    assert center.shape == (size, size, 3) and center.dtype == np.float32
    assert offset(center) == (max(shape) - size) // 2
    offsets = {offset(preprocess.crop_to_square(tf.constant(image), size, tf.constant([s, 7], tf.int64)).numpy())
               for s in range(200)}
    assert offsets == set(range(max(shape) - size + 1))


def test_crop_resizes_the_shorter_side_to_the_target():
    """Downscaling: the centred square of side min(H, W) resized with an antialiasing filter (as PIL's)."""
    image = np.random.default_rng(2).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    out = preprocess.crop_to_square(tf.constant(image), 32, None).numpy()
    reference = np.asarray(Image.fromarray(image[:, 16:80]).resize((32, 32), Image.BILINEAR), np.float64)
    assert np.abs(out - reference).max() <= 1.5
    upscaled = preprocess.crop_to_square(tf.constant(image), 128, None).numpy()
    reference = np.asarray(Image.fromarray(image[:, 16:80]).resize((128, 128), Image.BILINEAR), np.float64)
    assert upscaled.shape == (128, 128, 3) and np.abs(upscaled - reference).max() <= 1.5


def test_normalize_matches_numpy_for_pixels_and_patches():
    image = np.random.default_rng(3).uniform(0, 255, (8, 8, 3)).astype(np.float32)
    expected = (image / 255.0 - np.array(MEAN)) / np.array(STD)
    np.testing.assert_allclose(preprocess.normalize(tf.constant(image), MEAN, STD).numpy(), expected, atol=1e-6)
    patches = preprocess.patchify(tf.constant(image), 4)
    np.testing.assert_allclose(preprocess.normalize(patches, MEAN, STD).numpy(),
                               preprocess.patchify(tf.constant(expected, tf.float32), 4).numpy(), atol=1e-6)


@pytest.mark.parametrize("stride", [4, 2, 3])
def test_drop_patches_keeps_unique_grid_cells_with_their_pixels(stride):
    """Kept patches are the p x p windows of the image at their grid positions, `stride` pixels apart
    (overlapping when stride < p; with stride 3 the last 28 - 27 = 1 pixel row and column are dropped)."""
    size, patch, keep = 32, 4, 13
    grid = (size - patch) // stride + 1
    image = np.random.default_rng(4).uniform(0, 255, (size, size, 3)).astype(np.float32)
    subsets = set()
    for seed in range(20):
        out = preprocess.drop_patches(tf.constant(image), patch, keep, tf.constant([seed, 0], tf.int64), stride)
        indices, patches = out["patch_indices"].numpy(), out["patches"].numpy()
        assert indices.dtype == np.int32 and patches.shape == (keep, patch * patch * 3)
        assert len(set(indices)) == keep and np.all(np.diff(indices) > 0)
        assert indices.min() >= 0 and indices.max() < grid * grid
        for index, values in zip(indices, patches):
            row, col = divmod(int(index), grid)
            top, left = row * stride, col * stride
            np.testing.assert_array_equal(values, image[top : top + patch, left : left + patch].reshape(-1))
        subsets.add(tuple(indices))
    assert len(subsets) == 20


def test_kept_patch_count():
    assert preprocess.kept_patch_count(448, 16, 0.2, 0) == 157  # the paper: drop 80% at 2x resolution
    assert preprocess.kept_patch_count(448, 16, 1.0, 196) == 196  # the 224 sequence length
    assert preprocess.kept_patch_count(224, 16, 1.0, 0) is None
    assert preprocess.kept_patch_count(224, 16, 1.0, 196, stride=8) == 196  # of the 27 x 27 overlapping grid
    assert preprocess.kept_patch_count(224, 16, 0.5, 0, stride=8) == 364  # round(729 / 2)
    with pytest.raises(ValueError, match="keep_patches=730"):
        preprocess.kept_patch_count(224, 16, 1.0, 730, stride=8)
    with pytest.raises(ValueError, match="keep_patches=900"):
        preprocess.kept_patch_count(448, 16, 1.0, 900)
