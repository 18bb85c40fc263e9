"""Zero-shot image classification (paper D.5, following CLIP): each class embedding is the normalised
mean over a prompt-template ensemble of the class name's embeddings; an image is resized (shorter
side), centre-cropped, and classified by the similarity of its pooled embedding; top-1 and top-5."""

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from clippy_jax.evaluate import engine, geometry, zero_shot
from clippy_jax.evaluate.metrics import Accuracy, merge_across_hosts


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """The central size x size crop of [H, W, C] (H, W >= size)."""
    top, left = (image.shape[0] - size) // 2, (image.shape[1] - size) // 2
    return image[top:top + size, left:left + size]


def preprocess(image: np.ndarray, resize: int, crop: int, method: str) -> np.ndarray:
    """CLIP's evaluation transform: shorter side to `resize` (aspect kept), central `crop` square."""
    if crop > resize:
        raise ValueError(f"The crop ({crop}) must not exceed the resized shorter side ({resize}).")
    return center_crop(geometry.resize_image(image, geometry.shorter_side_shape(image.shape, resize), method), crop)


def predict(model: nn.Module, params, images: jax.Array, label_emb: jax.Array) -> jax.Array:
    """Image-level logits [B, C]."""
    return zero_shot.encode_image(model, params, images, label_emb)[0]


def classification(ctx: engine.EvalContext, task: ml_collections.ConfigDict) -> engine.EvalResult:
    """Top-1 / top-5 zero-shot accuracy on `task.dataset` with the class names of `task.classes` and
    the templates of `task.templates` (files in `prompts/` or paths; default CLIP's ImageNet names and
    80 templates)."""
    examples = engine.dataset_examples(ctx, task)
    class_names = zero_shot.read_lines(task.classes)
    num_classes = examples.info.features["label"].num_classes
    if len(class_names) != num_classes:
        raise ValueError(
            f"{task.classes} has {len(class_names)} names; {task.dataset} has {num_classes} classes."
        )
    templates = zero_shot.read_lines(task.templates)
    label_emb = ctx.label_embeddings([[c] for c in class_names], templates)  # [C, E]
    resize, crop = task.resize, task.crop

    runner = ctx.runner(predict)
    top_k = tuple(task.top_k)
    accuracy = {k: Accuracy(correct=np.int64(0), total=np.int64(0)) for k in top_k}
    for chunk in examples.chunks(ctx.local_batch_size, ctx.progress(examples.num_local, task.dataset)):
        images = [preprocess(e["image"], resize, crop, task.resize_method) for e in chunk]
        logits = runner(ctx.model_inputs(images, (crop, crop)), label_emb)
        if chunk:
            labels = np.asarray([e["label"] for e in chunk])
            for k in top_k:
                accuracy[k] = accuracy[k].merge(Accuracy.from_model_output(logits=logits, labels=labels, k=k))
    values = {f"top{k}": merge_across_hosts(metric).compute() for k, metric in accuracy.items()}
    return engine.EvalResult(
        summary=dict(**values, num_images=examples.num_global, num_templates=len(templates)),
        scalars=values,
        headline=[f"- {name} accuracy: {value:.4f}" for name, value in values.items()]
        + [f"- {examples.num_global} images, {len(class_names)} classes x {len(templates)} templates"],
    )
