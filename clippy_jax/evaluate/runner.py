"""Runs the configured evaluations and reports them: CLU scalars and overlay images, and
`results.json` / `results.md` in the workdir."""

import json
import os

import flax.linen as nn
import ml_collections
import numpy as np
import tensorflow as tf
from absl import logging
from clu import metric_writers

from clippy_jax.data import demo_data, synthetic
from clippy_jax.data.tokenizer import Tokenizer
from clippy_jax.evaluate.segmentation import SegmentationResult, evaluate_segmentation


def synthetic_segmentation(config, model, params, tokenizer, data_config) -> SegmentationResult:
    """Top-down zero-shot segmentation and largest-object classification on the demo's held-out split."""
    split = demo_data.load_eval_split(data_config.eval_pattern)
    class_names = ["background"] + [c.name for c in synthetic.CATEGORIES]
    prompts = [list(synthetic.BACKGROUND_NAMES)] + [list(c.synonyms) for c in synthetic.CATEGORIES]
    return evaluate_segmentation(
        model, params, tokenizer, split["image"], split["segmentation"], class_names, prompts,
        patch_size=config.model.image.patch_size, batch_size=config.eval.batch_size,
        mean=data_config.mean, std=data_config.std, image_labels=split["largest_label"] + 1,
        num_overlays=config.eval.num_overlays,
    )


EVALUATORS = {"synthetic_segmentation": synthetic_segmentation}


def run_evaluations(
    config: ml_collections.ConfigDict,
    model: nn.Module,
    params,
    tokenizer: Tokenizer,
    data_config: ml_collections.ConfigDict,
    writer: metric_writers.MetricWriter,
    workdir: str,
    step: int,
) -> dict:
    """Runs `config.eval.evaluators`, logs them at `step` and writes the results files."""
    results = {}
    for name in config.eval.evaluators:
        if name not in EVALUATORS:
            raise ValueError(f"Unknown config.eval.evaluators entry {name!r}; choose from {sorted(EVALUATORS)}.")
        result = EVALUATORS[name](config, model, params, tokenizer, data_config)
        scalars = {f"{name}/miou": result.miou}
        scalars.update({f"{name}/iou/{k}": v for k, v in result.per_class_iou.items() if not np.isnan(v)})
        if result.classification_accuracy is not None:
            scalars[f"{name}/classification_accuracy"] = result.classification_accuracy
        writer.write_scalars(step, scalars)
        if result.overlays:
            writer.write_images(step, {f"{name}/overlays": np.stack(_pad_to_same(result.overlays))})
        results[name] = dict(
            miou=result.miou, per_class_iou=result.per_class_iou,
            classification_accuracy=result.classification_accuracy,
        )
        logging.info("%s: mIoU %.4f, classification accuracy %s", name, result.miou, result.classification_accuracy)
    write_results(workdir, dict(step=step, image_pool=config.model.image_pool, evaluations=results))
    return results


def _pad_to_same(images: list[np.ndarray]) -> list[np.ndarray]:
    h = max(i.shape[0] for i in images)
    w = max(i.shape[1] for i in images)
    return [np.pad(i, ((0, h - i.shape[0]), (0, w - i.shape[1]), (0, 0)), constant_values=255) for i in images]


def write_results(workdir: str, results: dict) -> None:
    """`results.json` and a markdown table `results.md` in the workdir."""
    with tf.io.gfile.GFile(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    lines = [f"# Results at step {results['step']} (image pool: {results['image_pool']})", ""]
    for name, result in results["evaluations"].items():
        lines += [f"## {name}", "", f"- mIoU: {result['miou']:.4f}"]
        if result.get("classification_accuracy") is not None:
            accuracy = result["classification_accuracy"]
            lines.append(f"- zero-shot classification accuracy (largest object): {accuracy:.4f}")
        lines += ["", "| class | IoU |", "|---|---|"]
        lines += [f"| {k} | {v:.4f} |" for k, v in result["per_class_iou"].items()]
        lines.append("")
    with tf.io.gfile.GFile(os.path.join(workdir, "results.md"), "w") as f:
        f.write("\n".join(lines))
