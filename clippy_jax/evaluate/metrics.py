"""Evaluation metrics as `clu.metrics` that merge across batches, devices and hosts."""

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from clu import metrics

IGNORE_LABEL = 255


@flax.struct.dataclass
class ConfusionMatrix(metrics.Metric):
    """Pixel counts [C, C]: rows are ground-truth classes, columns predictions; `ignore_label` skipped."""

    matrix: jax.Array

    @classmethod
    def from_model_output(
        cls, *, predictions: jax.Array, labels: jax.Array, num_classes: int, ignore_label: int = IGNORE_LABEL,
        **_,
    ) -> "ConfusionMatrix":
        """predictions, labels: int arrays of equal shape."""
        labels = labels.reshape(-1).astype(jnp.int32)
        predictions = predictions.reshape(-1).astype(jnp.int32)
        valid = labels != ignore_label
        flat = jnp.where(valid, labels * num_classes + predictions, 0)
        counts = jnp.zeros(num_classes * num_classes, jnp.int32).at[flat].add(valid.astype(jnp.int32))
        return cls(matrix=counts.reshape(num_classes, num_classes))

    def merge(self, other: "ConfusionMatrix") -> "ConfusionMatrix":
        return type(self)(matrix=self.matrix + other.matrix)

    def reduce(self) -> "ConfusionMatrix":
        return type(self)(matrix=self.matrix.sum(axis=0) if self.matrix.ndim == 3 else self.matrix)

    def compute(self) -> np.ndarray:
        return np.asarray(self.matrix)


def iou_from_confusion(matrix: np.ndarray) -> tuple[float, np.ndarray]:
    """(mIoU, per-class IoU [C]) from a confusion matrix; classes absent from both the ground truth
    and the predictions have IoU NaN and are left out of the mean."""
    matrix = np.asarray(matrix, np.float64)
    intersection = np.diag(matrix)
    union = matrix.sum(axis=0) + matrix.sum(axis=1) - intersection
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, intersection / union, np.nan)
    return float(np.nanmean(iou)) if np.any(union > 0) else float("nan"), iou


@flax.struct.dataclass
class Accuracy(metrics.Metric):
    """Top-k accuracy counts; `from_model_output(logits [B, C], labels [B], k)`."""

    correct: jax.Array
    total: jax.Array

    @classmethod
    def from_model_output(cls, *, logits: jax.Array, labels: jax.Array, k: int = 1, **_) -> "Accuracy":
        top_k = jax.lax.top_k(logits, k)[1]  # [B, k]
        correct = jnp.any(top_k == labels[:, None], axis=-1)
        return cls(correct=correct.sum(), total=jnp.asarray(labels.shape[0]))

    def merge(self, other: "Accuracy") -> "Accuracy":
        return type(self)(correct=self.correct + other.correct, total=self.total + other.total)

    def compute(self) -> float:
        return float(self.correct) / max(float(self.total), 1.0)
