"""Top-down zero-shot semantic segmentation (paper D.5): per-location similarity to one embedding
per label (the mean over its prompts), bilinear upsampling to label resolution, argmax, and mIoU
from a confusion matrix with 255 ignored. Also classifies each image from its pooled embedding."""

import dataclasses
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from clippy_jax.data.tokenizer import Tokenizer
from clippy_jax.evaluate import zero_shot
from clippy_jax.evaluate.metrics import Accuracy, ConfusionMatrix, iou_from_confusion
from clippy_jax.evaluate.render import segmentation_overlay


@dataclasses.dataclass
class SegmentationResult:
    miou: float
    per_class_iou: dict[str, float]
    classification_accuracy: float | None
    overlays: list[np.ndarray]


def evaluate_segmentation(
    model: nn.Module,
    params,
    tokenizer: Tokenizer,
    images: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    prompts: Sequence[Sequence[str]],
    patch_size: int,
    batch_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    image_labels: np.ndarray | None = None,
    num_overlays: int = 0,
) -> SegmentationResult:
    """Zero-shot segmentation of `images` uint8 [N, H, W, 3] against `labels` uint8 [N, H, W].

    `prompts[c]` lists the prompts of class c (class 0 is the background in the demo and VOC).
    With `image_labels` [N] (classes 1..C-1), also reports image-level zero-shot accuracy of the
    pooled embedding against the foreground labels.
    """
    num_classes = len(class_names)
    label_emb = zero_shot.label_embeddings(model, params, tokenizer, prompts)  # [C, E]
    encode = zero_shot.make_dense_encoder(model, patch_size)

    @jax.jit
    def predict(params, images):
        pooled, dense = encode(params, images)
        seg = zero_shot.segmentation_logits(dense, label_emb, images.shape[1:3]).argmax(-1)
        return seg, jnp.einsum("be,ce->bc", pooled, label_emb[1:])

    normalized = (images.astype(np.float32) / 255.0 - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    confusion, accuracy, overlays = None, None, []
    for start in range(0, len(images), batch_size):
        batch = slice(start, start + batch_size)
        seg, class_logits = predict(params, normalized[batch])
        update = ConfusionMatrix.from_model_output(predictions=seg, labels=labels[batch], num_classes=num_classes)
        confusion = update if confusion is None else confusion.merge(update)
        if image_labels is not None:
            acc = Accuracy.from_model_output(logits=class_logits, labels=jnp.asarray(image_labels[batch]) - 1)
            accuracy = acc if accuracy is None else accuracy.merge(acc)
        for i in range(min(num_overlays - len(overlays), len(seg))):
            overlays.append(segmentation_overlay(images[start + i], labels[start + i], np.asarray(seg[i]), class_names))
    miou, iou = iou_from_confusion(confusion.compute())
    return SegmentationResult(
        miou=miou,
        per_class_iou={name: float(v) for name, v in zip(class_names, iou)},
        classification_accuracy=None if accuracy is None else accuracy.compute(),
        overlays=overlays,
    )
