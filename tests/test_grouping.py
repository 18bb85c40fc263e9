"""Bottom-up grouping: PCA half-axes against numpy's SVD, recovery of planted groups, spherical k-means."""

import jax.numpy as jnp
import numpy as np
import pytest

from clippy_jax.evaluate import grouping


def _planted(rng: np.random.Generator, centres: np.ndarray, counts: list[int], noise: float = 0.05) -> tuple:
    """Unit features around unit `centres` [K, E] and their cluster ids."""
    ids = np.repeat(np.arange(len(centres)), counts)
    x = centres[ids] + noise * rng.normal(size=(len(ids), centres.shape[1]))
    return x / np.linalg.norm(x, axis=1, keepdims=True), ids


def _unit(rng, k, e):
    c = rng.normal(size=(k, e))
    return c / np.linalg.norm(c, axis=1, keepdims=True)


@pytest.mark.parametrize(("n", "e"), [(40, 8), (8, 40)])  # covariance and Gram-matrix paths
def test_principal_axes_match_numpy_svd_with_the_sign_convention(n, e):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, e)) * np.linspace(3, 0.5, e)  # distinct variances: well-defined directions
    mean, axes = grouping.principal_axes(jnp.asarray(x), 5)
    centred = x - x.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    np.testing.assert_allclose(mean, x.mean(axis=0), atol=1e-5)
    assert axes.shape == (5, e)
    for i in range(3):
        v = vt[i] * np.sign(np.dot(axes[2 * i], vt[i]))
        np.testing.assert_allclose(axes[2 * i], v, atol=1e-4)  # +v_i
        if 2 * i + 1 < 5:
            np.testing.assert_allclose(axes[2 * i + 1], -v, atol=1e-4)  # -v_i
        projections = centred @ np.asarray(axes[2 * i])
        assert projections[np.abs(projections).argmax()] > 0  # largest-magnitude projection is positive


def test_two_groups_split_planted_halves_by_the_first_component():
    rng = np.random.default_rng(1)
    x, ids = _planted(rng, _unit(rng, 2, 16), [30, 34])
    dense = jnp.asarray(x.reshape(1, 8, 8, 16))
    groups = np.asarray(grouping.group_scores(dense, 2)).argmax(-1).reshape(-1)
    assert len(set(zip(groups, ids))) == 2  # a bijection between groups and planted halves


def test_batched_group_scores_equal_per_image():
    rng = np.random.default_rng(2)
    dense = jnp.asarray(rng.normal(size=(3, 4, 5, 8)))
    batched = np.asarray(grouping.group_scores(dense, 3))
    for i in range(3):
        np.testing.assert_allclose(batched[i], np.asarray(grouping.group_scores(dense[i:i + 1], 3))[0], atol=1e-5)


@pytest.mark.parametrize("seed", [0, 1])
def test_spherical_kmeans_recovers_planted_clusters(seed):
    rng = np.random.default_rng(seed)
    centres = _unit(rng, 4, 12)
    x, ids = _planted(rng, centres, [50, 20, 35, 40])
    centroids = grouping.spherical_kmeans(x, 4, iterations=20, seed=seed)
    np.testing.assert_allclose(np.linalg.norm(centroids, axis=1), 1.0, rtol=1e-5)
    assignment = (x @ centroids.T).argmax(axis=1)
    assert len(set(zip(assignment, ids))) == 4
