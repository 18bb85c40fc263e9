"""Bottom-up grouping (paper D.5, appendix A.1) and unsupervised segmentation with Hungarian
matching (Tab. 5).

Grouping by PCA ("we compute PCA across the spatial map of image features. Each principal component
corresponds to a candidate group and we cluster the proximity of each feature vector to these
components"), exactly: with x_n the unit per-location embeddings of one image (or of a dataset
sample), mu their mean and v_1, v_2, ... the principal directions (right singular vectors of the
centred x), each oriented so that its largest-magnitude projection is positive, the candidate groups
for G groups are the first G of the half-axes (+v_1, -v_1, +v_2, -v_2, ...). Location n joins the
half-axis a with the largest projection (x_n - mu) . a. G = 2 splits the map by the sign of the first
component (a spectral bipartition). Scores are bilinearly upsampled before the argmax, which equals
projecting bilinearly interpolated features.

Unsupervised segmentation (the Cityscapes-27 setup of PiCIE / STEGO): as many clusters as classes are
fitted on features sampled from the whole dataset, by spherical k-means (cosine similarity to unit centroids,
k-means++ initialisation) or by the PCA half-axes above; every pixel takes its best-scoring cluster;
clusters are matched one-to-one to classes by the Hungarian algorithm on the [classes x clusters]
pixel confusion matrix; mIoU and pixel accuracy follow from the matched confusion matrix.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from clu import metrics as clu_metrics
from jax.experimental import multihost_utils

from clippy_jax.evaluate import engine, zero_shot
from clippy_jax.evaluate.geometry import Geometry
from clippy_jax.evaluate.metrics import ConfusionMatrix, hungarian_match, merge_across_hosts, segment_jaccard
from clippy_jax.evaluate.render import segmentation_overlay
from clippy_jax.evaluate.segmentation import iou_result


def principal_axes(x: jax.Array, num_groups: int) -> tuple[jax.Array, jax.Array]:
    """(mean [..., E], the first `num_groups` signed half-axes [..., G, E]) of features x [..., N, E].

    The principal directions are the top eigenvectors of the covariance X^T X [E, E] or, when N < E,
    X^T u for the top eigenvectors u of the Gram matrix X X^T [N, N]: whichever has full rank (XLA's
    eigensolver and SVD are slow on rank-deficient or tall inputs)."""
    x = x.astype(jnp.float32)
    mean = x.mean(axis=-2)
    centred = x - mean[..., None, :]
    k = math.ceil(num_groups / 2)
    hp = jax.lax.Precision.HIGHEST
    if x.shape[-2] < x.shape[-1]:
        _, u = jnp.linalg.eigh(jnp.einsum("...ne,...me->...nm", centred, centred, precision=hp))  # ascending
        directions = jnp.einsum("...ne,...nk->...ke", centred, u[..., ::-1][..., :k], precision=hp)
        directions = directions / jnp.maximum(jnp.linalg.norm(directions, axis=-1, keepdims=True), 1e-12)
    else:
        _, v = jnp.linalg.eigh(jnp.einsum("...ne,...nf->...ef", centred, centred, precision=hp))
        directions = jnp.swapaxes(v[..., ::-1][..., :k], -1, -2)  # [..., k, E]
    projections = jnp.einsum("...ne,...ke->...nk", centred, directions)
    extreme_index = jnp.abs(projections).argmax(axis=-2)[..., None, :]  # [..., 1, k]
    extreme = jnp.take_along_axis(projections, extreme_index, axis=-2)
    directions = directions * jnp.where(extreme[..., 0, :, None] < 0, -1.0, 1.0)
    axes = jnp.stack([directions, -directions], axis=-2)  # [..., k, 2, E]: +v_i, -v_i
    axes = axes.reshape(*axes.shape[:-3], -1, axes.shape[-1])[..., :num_groups, :]
    return mean, axes


def group_scores(dense: jax.Array, num_groups: int) -> jax.Array:
    """Per-image PCA group scores: dense [B, h, w, E] -> projections on the half-axes [B, h, w, G]."""
    flat = dense.reshape(dense.shape[0], -1, dense.shape[-1])
    mean, axes = principal_axes(flat, num_groups)
    scores = jnp.einsum("bne,bge->bng", flat - mean[:, None], axes)
    return scores.reshape(*dense.shape[:3], num_groups)


def dense_features(model: nn.Module, params, images: jax.Array) -> jax.Array:
    """Unit per-location embeddings [B, h, w, E]."""
    return zero_shot.encode_image(model, params, images)[1]


def predict_groups(model: nn.Module, params, images: jax.Array, *, num_groups: int) -> dict[str, jax.Array]:
    return {"scores": group_scores(dense_features(model, params, images), num_groups)}


def predict_clusters(model: nn.Module, params, images: jax.Array, weights: jax.Array, bias: jax.Array) -> dict:
    """Linear cluster scores x.w_k + b_k [B, h, w, K] (cosine similarity for k-means centroids)."""
    return {"scores": jnp.einsum("bhwe,ke->bhwk", dense_features(model, params, images), weights) + bias}


def spherical_kmeans(x: np.ndarray, num_clusters: int, iterations: int, seed: int) -> np.ndarray:
    """Unit centroids [K, E] of unit features x [n, E]: greedy k-means++ seeding (as scikit-learn: each
    new seed is the best of 2 + log K candidates drawn with probability proportional to the cosine
    distance 1 - x.c to the nearest seed, i.e. half the squared Euclidean distance on the sphere), then
    Lloyd iterations (assign to the most similar centroid, centroid = normalised mean of its members;
    an empty cluster keeps its centroid)."""
    rng = np.random.default_rng(seed)
    x = np.asarray(x, np.float32)
    candidates_per_step = 2 + int(np.log(num_clusters))
    distance = np.full(len(x), np.inf, np.float32)
    centroids = []
    for _ in range(num_clusters):
        finite = np.isfinite(distance).all() and distance.sum() > 0
        candidates = rng.choice(len(x), candidates_per_step, p=distance / distance.sum() if finite else None)
        trial = np.minimum(distance, np.clip(1.0 - x @ x[candidates].T, 0.0, None).T)  # [candidates, n]
        best = int(trial.sum(axis=1).argmin())
        centroids.append(x[candidates[best]])
        distance = trial[best]
    centroids = np.stack(centroids)
    for _ in range(iterations):
        assignment = (x @ centroids.T).argmax(axis=1)
        for k in range(num_clusters):
            members = x[assignment == k]
            if len(members):
                total = members.sum(axis=0)
                centroids[k] = total / max(np.linalg.norm(total), 1e-12)
    return centroids


def bottom_up(ctx: engine.EvalContext, task: ml_collections.ConfigDict) -> engine.EvalResult:
    """Per-image PCA groups scored by the best-match Jaccard similarity of every ground-truth segment
    (`metrics.segment_jaccard`), averaged over all segments of the split. `task.exclude_classes`
    names classes whose segments are not scored (e.g. VOC's background)."""
    examples = engine.dataset_examples(ctx, task)
    class_names = examples.info.metadata["class_names"]
    exclude = tuple(class_names.index(name) for name in task.exclude_classes)
    geometry = Geometry.from_config(task)
    if geometry.window:
        raise ValueError("Bottom-up grouping runs PCA per image: use resize mode (window=0), not sliding windows.")
    num_groups = task.num_groups

    jaccard = clu_metrics.Average.empty()
    overlays = []
    group_names = [f"group {i + 1}" for i in range(num_groups)]
    num_overlays = task.get("num_overlays", ctx.config.eval.num_overlays)
    runner = ctx.runner(predict_groups, num_groups=num_groups)
    for example, groups, _ in engine.dense_predictions(ctx, examples, geometry, runner, desc=f"{task.dataset} groups"):
        values = segment_jaccard(groups, example["label"], exclude=exclude)
        if len(values):
            jaccard = jaccard.merge(clu_metrics.Average.from_model_output(values=jnp.asarray(values, jnp.float32)))
        if len(overlays) < num_overlays:
            overlays.append(segmentation_overlay(example["image"], None, groups, group_names))
    jaccard = merge_across_hosts(jaccard)
    mean = float(jaccard.compute())
    return engine.EvalResult(
        summary=dict(jaccard=mean, num_segments=int(jaccard.count), num_groups=num_groups,
                     num_images=examples.num_global, excluded=list(task.exclude_classes)),
        scalars={"jaccard": mean},
        headline=[f"- Jaccard similarity (best-match IoU per ground-truth segment, {num_groups} groups): {mean:.4f}",
                  f"- segments: {int(jaccard.count)} in {examples.num_global} images"],
        overlays=overlays,
    )


def _sample_features(ctx: engine.EvalContext, task: ml_collections.ConfigDict, geometry: Geometry) -> np.ndarray:
    """`task.samples_per_window` random per-location embeddings of every window of the split, in
    example order; example k draws its locations with the seed (task.seed, k), so the sample does not
    depend on how the examples are spread over hosts."""
    examples = engine.dataset_examples(ctx, task)
    per_window = task.samples_per_window
    runner = ctx.runner(dense_features)
    samples, owners, position = [], [], 0
    for chunk in examples.chunks(ctx.local_batch_size, ctx.progress(examples.num_local, f"{task.dataset} features")):
        windows = [geometry.windows(example["image"])[0] for example in chunk]
        dense = runner(ctx.model_inputs([c for crops in windows for c in crops], geometry.window_shape))
        start = 0
        for crops in windows:
            index = jax.process_index() + jax.process_count() * position  # the example's index in the split
            rng = np.random.default_rng([task.seed, index])
            flat = dense[start:start + len(crops)].reshape(len(crops), -1, dense.shape[-1])  # [n, N, E]
            for locations in flat:
                samples.append(locations[rng.choice(len(locations), min(per_window, len(locations)), replace=False)])
                owners.append(np.full(len(samples[-1]), index))
            start, position = start + len(crops), position + 1
    local = np.concatenate(samples) if samples else np.zeros((0, ctx.model.embed_dim), np.float32)
    owner = np.concatenate(owners) if owners else np.zeros(0, np.int64)
    if jax.process_count() > 1:
        count = engine.sync_max(len(local))
        gathered = multihost_utils.process_allgather(dict(
            x=np.pad(local, ((0, count - len(local)), (0, 0))), owner=np.pad(owner, (0, count - len(owner))),
            n=np.asarray(len(local)),
        ))
        local = np.concatenate([x[:n] for x, n in zip(gathered["x"], gathered["n"])])
        owner = np.concatenate([o[:n] for o, n in zip(gathered["owner"], gathered["n"])])
    return local[np.argsort(owner, kind="stable")]


def unsupervised_segmentation(ctx: engine.EvalContext, task: ml_collections.ConfigDict) -> engine.EvalResult:
    """Dataset-level clusters (`task.method`: "kmeans" or "pca"), as many as classes, matched one-to-one
    to classes by the Hungarian algorithm; mIoU and pixel accuracy."""
    geometry = Geometry.from_config(task)
    examples = engine.dataset_examples(ctx, task)
    class_names = examples.info.metadata["class_names"]
    num_clusters = len(class_names)
    samples = _sample_features(ctx, task, geometry)
    method = task.method
    if method == "kmeans":
        weights = spherical_kmeans(samples, num_clusters, task.kmeans_iterations, task.seed)
        bias = np.zeros(num_clusters, np.float32)
    elif method == "pca":
        mean, weights = (np.asarray(a) for a in principal_axes(jnp.asarray(samples), num_clusters))
        bias = -weights @ mean
    else:
        raise ValueError(f"Unknown unsupervised clustering method {method!r}; choose 'kmeans' or 'pca'.")

    confusion = ConfusionMatrix(matrix=np.zeros((len(class_names), num_clusters), np.int64))
    kept = []
    num_overlays = task.get("num_overlays", ctx.config.eval.num_overlays)
    for example, clusters, _ in engine.dense_predictions(
        ctx, examples, geometry, ctx.runner(predict_clusters), jnp.asarray(weights), jnp.asarray(bias),
        desc=f"{task.dataset} clusters",
    ):
        confusion = confusion.merge(ConfusionMatrix.from_model_output(
            predictions=clusters, labels=example["label"], num_classes=len(class_names), num_predictions=num_clusters
        ))
        if len(kept) < num_overlays:
            kept.append((example["image"], example["label"], clusters))
    matrix = merge_across_hosts(confusion).compute()
    cluster_of_class = hungarian_match(matrix)
    class_of_cluster = np.argsort(cluster_of_class)
    overlays = [segmentation_overlay(image, label, class_of_cluster[clusters], class_names)
                for image, label, clusters in kept]
    result = iou_result(
        ConfusionMatrix(matrix=matrix[:, cluster_of_class]), class_names, overlays, task.miou,
        method=method,
        num_samples=len(samples), cluster_of_class=cluster_of_class.tolist(),
        num_images=examples.num_global,
    )
    result.headline.insert(0, f"- {method} clusters: {num_clusters}, matched to classes by the Hungarian algorithm")
    return result
