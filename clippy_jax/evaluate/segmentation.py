"""Top-down zero-shot semantic segmentation (paper D.5, appendix I): per-location similarity to one
embedding per label (the normalised mean over its prompts), bilinear upsampling to label resolution,
argmax, and mIoU from a confusion matrix with 255 ignored. The demo's evaluator also classifies each
image (its largest object) from its pooled embedding."""

from collections.abc import Sequence

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from clippy_jax.data import demo_data, synthetic
from clippy_jax.evaluate import engine, zero_shot
from clippy_jax.evaluate.geometry import Geometry
from clippy_jax.evaluate.metrics import (
    Accuracy,
    ConfusionMatrix,
    iou_from_confusion,
    merge_across_hosts,
    pixel_accuracy,
)
from clippy_jax.evaluate.render import segmentation_overlay


def iou_result(confusion: ConfusionMatrix, class_names: Sequence[str], overlays: list[np.ndarray],
               miou_over: str = "present", **summary) -> engine.EvalResult:
    """mIoU (over present or all classes, `metrics.iou_from_confusion`), pixel accuracy and the
    per-class IoU table of a square confusion matrix."""
    matrix = confusion.compute()
    miou, iou = iou_from_confusion(matrix, miou_over)
    per_class = {name: float(v) for name, v in zip(class_names, iou)}
    accuracy = pixel_accuracy(matrix)
    scalars = {"miou": miou, "pixel_accuracy": accuracy}
    scalars.update({f"iou/{k}": v for k, v in per_class.items() if not np.isnan(v)})
    return engine.EvalResult(
        summary=dict(miou=miou, pixel_accuracy=accuracy, per_class_iou=per_class, **summary),
        scalars=scalars,
        headline=[f"- mIoU: {miou:.4f}", f"- pixel accuracy: {accuracy:.4f}"],
        tables={"per_class_iou": engine.markdown_table(["class", "IoU"], list(per_class.items()))},
        overlays=overlays,
    )


def predict(model: nn.Module, params, images: jax.Array, label_emb: jax.Array) -> dict[str, jax.Array]:
    """Per-location logits `scores` [B, h, w, C] and image-level `logits` [B, C]."""
    logits, dense = zero_shot.encode_image(model, params, images, label_emb)
    return {"scores": zero_shot.location_logits(dense, label_emb), "logits": logits}


def top_down(
    ctx: engine.EvalContext, examples: engine.Examples, class_names: Sequence[str],
    prompts: Sequence[Sequence[str]], geometry: Geometry, num_overlays: int, desc: str,
    templates: Sequence[str] = ("{}",), label_classes: Sequence[int] | None = None,
) -> tuple[ConfusionMatrix, Accuracy, list[np.ndarray]]:
    """Zero-shot segmentation of `examples` ({"image", "label"} and, for image-level accuracy,
    "image_label": the index of the image's class among classes 1..C-1).

    `prompts` [L] lists each label's prompts (filled into each of `templates`); `label_classes` [L]
    maps the argmax label to its class (default: label l is class l, L = C), e.g. extra background
    labels to the background class. Returns the confusion matrix and image-level accuracy merged
    over hosts, and this host's overlays.
    """
    num_classes = len(class_names)
    label_emb = ctx.label_embeddings(prompts, templates)  # [L, E]
    label_classes = np.arange(len(prompts)) if label_classes is None else np.asarray(label_classes)

    confusion = ConfusionMatrix(matrix=np.zeros((num_classes, num_classes), np.int64))
    accuracy = Accuracy(correct=np.int64(0), total=np.int64(0))
    overlays = []
    predictions = engine.dense_predictions(ctx, examples, geometry, ctx.runner(predict), label_emb, desc=desc)
    for example, prediction, outputs in predictions:
        prediction = label_classes[prediction]
        confusion = confusion.merge(
            ConfusionMatrix.from_model_output(predictions=prediction, labels=example["label"], num_classes=num_classes)
        )
        if "image_label" in example:
            accuracy = accuracy.merge(Accuracy.from_model_output(
                logits=outputs["logits"][None, 1:], labels=np.asarray([example["image_label"]])
            ))
        if len(overlays) < num_overlays:
            overlays.append(segmentation_overlay(example["image"], example["label"], prediction, class_names))
    return merge_across_hosts(confusion), merge_across_hosts(accuracy), overlays


def synthetic_segmentation(ctx: engine.EvalContext, task: ml_collections.ConfigDict) -> engine.EvalResult:
    """Top-down zero-shot segmentation and largest-object classification on the demo's held-out split."""
    del task
    split = demo_data.load_eval_split(ctx.data_config.eval_pattern)
    class_names = ["background"] + [c.name for c in synthetic.CATEGORIES]
    prompts = [list(synthetic.BACKGROUND_NAMES)] + [list(c.synonyms) for c in synthetic.CATEGORIES]
    examples = engine.array_examples(
        dict(image=split["image"], label=split["segmentation"], image_label=split["largest_label"])
    )
    confusion, accuracy, overlays = top_down(
        ctx, examples, class_names, prompts, Geometry(input_size=split["image"].shape[1:3]),
        ctx.config.eval.num_overlays, "synthetic",
    )
    result = iou_result(confusion, class_names, overlays, classification_accuracy=accuracy.compute())
    result.scalars["classification_accuracy"] = accuracy.compute()
    result.headline.append(f"- zero-shot classification accuracy (largest object): {accuracy.compute():.4f}")
    return result


def background_labels(class_names: Sequence[str], filename: str) -> tuple[list[list[str]], list[int]]:
    """(prompts, class index) of the extra labels of `filename` (one name per line, its own prompt),
    each mapped to the dataset's background class (kahnchana/clippy's 39 VOC stuff labels)."""
    if "background" not in class_names:
        raise ValueError(f"background_labels={filename!r} needs a 'background' class; the dataset has none.")
    names = zero_shot.read_lines(filename)
    return [[name] for name in names], [list(class_names).index("background")] * len(names)


def segmentation(ctx: engine.EvalContext, task: ml_collections.ConfigDict) -> engine.EvalResult:
    """Top-down zero-shot segmentation of a segmentation dataset (`task.dataset`) with the prompts
    of `task.prompts` (default `prompts/<dataset>.txt`) in the templates `task.templates` (default
    none), the extra labels of `task.background_labels` mapped to background, and mIoU over
    `task.miou` classes (present | all); see README.md, "Protocol switches"."""
    examples = engine.dataset_examples(ctx, task)
    class_names = examples.info.metadata["class_names"]
    prompts = zero_shot.read_label_prompts(task.prompts or f"{task.dataset}.txt", class_names)
    label_classes = list(range(len(class_names)))
    if task.background_labels:
        extra_prompts, extra_classes = background_labels(class_names, task.background_labels)
        prompts, label_classes = prompts + extra_prompts, label_classes + extra_classes
    templates = zero_shot.read_templates(task.templates)
    geometry = Geometry.from_config(task)
    num_overlays = task.get("num_overlays", ctx.config.eval.num_overlays)
    confusion, _, overlays = top_down(ctx, examples, class_names, prompts, geometry, num_overlays, task.dataset,
                                      templates, label_classes)
    return iou_result(confusion, class_names, overlays, task.miou, num_images=examples.num_global,
                      geometry=str(geometry), num_labels=len(prompts), templates=list(templates))
