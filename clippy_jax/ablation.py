"""The aggregation ablation of the paper on the demo: train and evaluate one model per image pooling
(max = CLIPpy, avg, cls) with the same data and budget, then print a comparison table.

    python -m clippy_jax.ablation --config=configs/demo.py --workdir=workdirs/ablation

Each run lives in `<workdir>/<pool>` (and resumes there); the demo data is shared in `<workdir>/data`.
"""

import json
import os

import tensorflow as tf
from absl import app, flags
from ml_collections import config_flags

from clippy_jax import logs
from clippy_jax.train.loop import train_and_evaluate

_CONFIG = config_flags.DEFINE_config_file("config", "configs/demo.py", "Base configuration.", lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", "workdirs/ablation", "Parent directory of the runs.")
_POOLS = flags.DEFINE_list("pools", ["max", "avg", "cls"], "Image aggregations to compare.")
EVALUATOR = "synthetic_segmentation"


def comparison_table(results: dict[str, dict]) -> str:
    """Markdown table: pool | mIoU | foreground mIoU | largest-object accuracy."""
    lines = ["| image pool | mIoU | mIoU without background | largest-object accuracy |", "|---|---|---|---|"]
    for pool, result in results.items():
        ious = [v for k, v in result["per_class_iou"].items() if k != "background"]
        accuracy = result["classification_accuracy"]
        lines.append(f"| {pool} | {result['miou']:.4f} | {sum(ious) / len(ious):.4f} | {accuracy:.4f} |")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    del argv
    tf.config.set_visible_devices([], "GPU")
    logs.quiet_libraries()
    logs.start_backends()
    workdir = os.path.abspath(_WORKDIR.value)
    results = {}
    for pool in _POOLS.value:
        config = _CONFIG.value.copy_and_resolve_references()
        config.model.image_pool = pool
        config.data.synthetic.directory = config.data.synthetic.directory or os.path.join(workdir, "data")
        results[pool] = train_and_evaluate(config, os.path.join(workdir, pool))[EVALUATOR]
    table = comparison_table(results)
    with tf.io.gfile.GFile(os.path.join(workdir, "comparison.md"), "w") as f:
        f.write(table + "\n")
    with tf.io.gfile.GFile(os.path.join(workdir, "comparison.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(table)


if __name__ == "__main__":
    app.run(main)
