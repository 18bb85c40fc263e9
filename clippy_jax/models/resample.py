"""Resampling of learned position-embedding grids, matching timm's `resample_abs_pos_embed`.

timm resamples with `F.interpolate(mode='bicubic', antialias=True, align_corners=False)`, which is
PIL's separable bicubic filter (a = -0.5) whose support widens by the scale factor when
downsampling, with weights normalised per output pixel. We build that filter as one [out, in]
matrix per axis, in float64, and apply it with an einsum.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

_BICUBIC_A = -0.5  # PIL / PyTorch antialiased bicubic
_BICUBIC_SUPPORT = 2.0


def _cubic(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    a = _BICUBIC_A
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x < 1, near, np.where(x < 2, far, 0.0))


@functools.lru_cache(maxsize=64)
def resize_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out_size, in_size] float64 weights of antialiased bicubic resizing (align_corners=False)."""
    scale = in_size / out_size
    filter_scale = max(scale, 1.0)
    support = _BICUBIC_SUPPORT * filter_scale
    weights = np.zeros((out_size, in_size))
    for i in range(out_size):
        center = scale * (i + 0.5)
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        taps = _cubic((np.arange(lo, hi) - center + 0.5) / filter_scale)
        weights[i, lo:hi] = taps / taps.sum()
    return weights


def resample_grid(posemb: jax.Array, old_grid: tuple[int, int], new_grid: tuple[int, int]) -> jax.Array:
    """Resamples position embeddings [1, old_h * old_w, D] to [1, new_h * new_w, D]."""
    if tuple(old_grid) == tuple(new_grid):
        return posemb
    rows = jnp.asarray(resize_matrix(old_grid[0], new_grid[0]), jnp.float32)  # [new_h, old_h]
    cols = jnp.asarray(resize_matrix(old_grid[1], new_grid[1]), jnp.float32)  # [new_w, old_w]
    grid = posemb.reshape(old_grid[0], old_grid[1], -1).astype(jnp.float32)
    resized = jnp.einsum("Hh,hwd,Ww->HWd", rows, grid, cols, precision=jax.lax.Precision.HIGHEST)
    return resized.reshape(1, new_grid[0] * new_grid[1], -1).astype(posemb.dtype)
