"""Evaluation metrics as `clu.metrics` that merge across batches, devices and hosts, and the numeric
definitions of mIoU, Jaccard similarity and Hungarian matching.

Metrics are computed on each host from its own examples (device outputs are first brought back to
the host that fed them) in int64 / float64 numpy, merged with `merge`, and combined over hosts with
`merge_across_hosts`.
"""

import functools

import flax.struct
import jax
import numpy as np
import scipy.optimize
from clu import metrics
from jax.experimental import multihost_utils

from clippy_jax.data.labels import IGNORE_LABEL


@flax.struct.dataclass
class ConfusionMatrix(metrics.Metric):
    """Pixel counts [C, K] (int64): rows are ground-truth classes, columns predictions; `ignore_label`
    pixels are skipped. K = C for semantic segmentation, K = clusters for unsupervised segmentation."""

    matrix: np.ndarray

    @classmethod
    def from_model_output(
        cls, *, predictions: np.ndarray, labels: np.ndarray, num_classes: int, num_predictions: int | None = None,
        ignore_label: int = IGNORE_LABEL, **_,
    ) -> "ConfusionMatrix":
        """predictions, labels: int arrays of equal shape; predictions in [0, num_predictions)."""
        num_predictions = num_predictions or num_classes
        labels = np.asarray(labels).reshape(-1).astype(np.int64)
        predictions = np.asarray(predictions).reshape(-1).astype(np.int64)
        valid = labels != ignore_label
        if np.any(labels[valid] >= num_classes) or np.any(predictions[valid] >= num_predictions):
            raise ValueError(f"Labels must be < {num_classes} (or {ignore_label}) and predictions < {num_predictions}.")
        flat = labels[valid] * num_predictions + predictions[valid]
        counts = np.bincount(flat, minlength=num_classes * num_predictions)
        return cls(matrix=counts.reshape(num_classes, num_predictions))

    def merge(self, other: "ConfusionMatrix") -> "ConfusionMatrix":
        return type(self)(matrix=self.matrix + other.matrix)

    def compute(self) -> np.ndarray:
        return np.asarray(self.matrix)


MIOU_OVER = ("present", "all")


def iou_from_confusion(matrix: np.ndarray, over: str = "present") -> tuple[float, np.ndarray]:
    """(mIoU, per-class IoU [C]) from a square confusion matrix: IoU_c = TP / (TP + FP + FN).

    Classes absent from both the ground truth and the predictions have IoU NaN and are left out of
    the mean with `over="present"` (the paper's protocol, mmsegmentation's); with `over="all"` their
    IoU is 0 and the mean runs over all C classes (kahnchana/clippy's `PascalMIoU`: TP / (union + eps),
    then `nanmean`). Both agree when every class occurs, e.g. on the full VOC val set."""
    if over not in MIOU_OVER:
        raise ValueError(f"miou={over!r}; choose one of {MIOU_OVER}.")
    matrix = np.asarray(matrix, np.float64)
    intersection = np.diag(matrix)
    union = matrix.sum(axis=0) + matrix.sum(axis=1) - intersection
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, intersection / union, np.nan if over == "present" else 0.0)
    return float(np.nanmean(iou)) if np.any(union > 0) else float("nan"), iou


def pixel_accuracy(matrix: np.ndarray) -> float:
    """Fraction of non-ignored pixels whose prediction equals the label (square confusion matrix)."""
    matrix = np.asarray(matrix, np.float64)
    return float(np.trace(matrix) / max(matrix.sum(), 1.0))


@flax.struct.dataclass
class Accuracy(metrics.Metric):
    """Top-k accuracy counts; `from_model_output(logits [B, C], labels [B], k, mask [B])`."""

    correct: np.ndarray
    total: np.ndarray

    @classmethod
    def from_model_output(
        cls, *, logits: np.ndarray, labels: np.ndarray, k: int = 1, mask: np.ndarray | None = None, **_
    ) -> "Accuracy":
        logits, labels = np.asarray(logits), np.asarray(labels)
        mask = np.ones(labels.shape, bool) if mask is None else np.asarray(mask, bool)
        # The k highest logits, ties broken towards the lower class index (as `jax.lax.top_k`).
        top_k = np.argsort(-logits, axis=1, kind="stable")[:, :k]  # [B, k]
        correct = np.any(top_k == labels[:, None], axis=1)
        return cls(correct=np.int64((correct & mask).sum()), total=np.int64(mask.sum()))

    def merge(self, other: "Accuracy") -> "Accuracy":
        return type(self)(correct=self.correct + other.correct, total=self.total + other.total)

    def compute(self) -> float:
        return float(self.correct) / max(float(self.total), 1.0)


@flax.struct.dataclass
class GroupAccuracy(metrics.Metric):
    """Accuracy per group (e.g. Waterbirds' background x bird cells): counts [G] of correct and total."""

    correct: np.ndarray
    total: np.ndarray

    @classmethod
    def from_model_output(cls, *, correct: np.ndarray, groups: np.ndarray, num_groups: int, **_) -> "GroupAccuracy":
        groups = np.asarray(groups, np.int64)
        return cls(
            correct=np.bincount(groups, weights=np.asarray(correct, np.float64), minlength=num_groups).astype(np.int64),
            total=np.bincount(groups, minlength=num_groups).astype(np.int64),
        )

    def merge(self, other: "GroupAccuracy") -> "GroupAccuracy":
        return type(self)(correct=self.correct + other.correct, total=self.total + other.total)

    def compute(self) -> np.ndarray:
        """[G] accuracies; NaN for empty groups."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.total > 0, self.correct / np.maximum(self.total, 1), np.nan)


def segment_jaccard(groups: np.ndarray, labels: np.ndarray, ignore_label: int = IGNORE_LABEL,
                    exclude: tuple[int, ...] = ()) -> np.ndarray:
    """Best-match Jaccard similarity of every ground-truth segment of one image (DINO / GroupViT).

    Ground-truth segments are the sets of pixels sharing one label value (not `ignore_label`, not in
    `exclude`); predicted groups are the sets of pixels sharing one group id. Ignored pixels belong to
    neither. For each segment S: J(S) = max over groups G of |S ∩ G| / |S ∪ G|.

    groups, labels: int [H, W]. Returns [number of segments] float64, in increasing label order.
    """
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    groups = np.asarray(groups).reshape(-1).astype(np.int64)
    valid = labels != ignore_label
    labels, groups = labels[valid], groups[valid]
    segment_ids, segment_index = np.unique(labels, return_inverse=True)
    group_ids, group_index = np.unique(groups, return_inverse=True)
    overlap = np.zeros((len(segment_ids), len(group_ids)), np.int64)
    np.add.at(overlap, (segment_index, group_index), 1)
    union = overlap.sum(axis=1, keepdims=True) + overlap.sum(axis=0, keepdims=True) - overlap
    best = (overlap / np.maximum(union, 1)).max(axis=1, initial=0.0)
    return best[~np.isin(segment_ids, exclude)]


def hungarian_match(confusion: np.ndarray) -> np.ndarray:
    """The one-to-one assignment of predicted clusters to classes that maximises the matched pixels.

    confusion: [C, K] counts (classes x clusters), K >= C. Returns `cluster_of_class` [C]: the cluster
    matched to each class (`scipy.optimize.linear_sum_assignment`, maximising the matched counts).
    `confusion[:, cluster_of_class]` is then the [C, C] confusion matrix of the relabelled clusters.
    """
    confusion = np.asarray(confusion)
    if confusion.shape[1] < confusion.shape[0]:
        raise ValueError(f"Hungarian matching needs at least as many clusters as classes, got {confusion.shape}.")
    rows, cols = scipy.optimize.linear_sum_assignment(confusion, maximize=True)
    cluster_of_class = np.empty(confusion.shape[0], np.int64)
    cluster_of_class[rows] = cols
    return cluster_of_class


def merge_across_hosts(metric: metrics.Metric) -> metrics.Metric:
    """Merges one metric per host (same structure everywhere) into the global one, on every host."""
    if jax.process_count() == 1:
        return metric
    stacked = multihost_utils.process_allgather(metric)  # every leaf gains a leading [P] axis
    per_host = [jax.tree.map(lambda x, i=i: np.asarray(x[i]), stacked) for i in range(jax.process_count())]
    return functools.reduce(lambda a, b: a.merge(b), per_host)
