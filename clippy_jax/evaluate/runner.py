"""Runs the configured evaluations and reports them: CLU scalars, markdown tables as text and overlay
images, and `results.json` / `results.md` (one section per evaluator) in the workdir.

`config.eval.evaluators` names the evaluations to run. A name with settings in `config.eval.tasks`
runs the evaluator `tasks[name].kind` with them (e.g. `voc_448 = dict(kind="segmentation",
dataset="voc2012_seg", input_size=(448, 448))`); otherwise the name is the evaluator itself.
"""

import json
import os
import time

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import tensorflow as tf
from absl import logging
from clu import metric_writers
from jax.sharding import Mesh

from clippy_jax.data.tokenizer import Tokenizer
from clippy_jax.evaluate import classification, engine, grouping, segmentation, waterbirds

EVALUATORS = {
    "synthetic_segmentation": segmentation.synthetic_segmentation,
    "segmentation": segmentation.segmentation,
    "grouping": grouping.bottom_up,
    "unsupervised_segmentation": grouping.unsupervised_segmentation,
    "classification": classification.classification,
    "waterbirds": waterbirds.waterbirds,
}


def create_writer(workdir: str) -> metric_writers.MetricWriter:
    """TensorBoard events in `workdir` (process 0 only); nothing on the console, which gets the
    headlines and progress lines instead of every scalar and table."""
    if jax.process_index() > 0:
        return metric_writers.MultiWriter([])
    return metric_writers.SummaryWriter(workdir)


def resolve_tasks(config: ml_collections.ConfigDict) -> list[tuple[str, ml_collections.ConfigDict]]:
    """(name, task settings with `kind`) for every entry of `config.eval.evaluators`."""
    tasks = config.eval.get("tasks") or {}
    resolved = []
    for name in config.eval.evaluators:
        task = ml_collections.ConfigDict(tasks[name].to_dict() if name in tasks else {})
        task.kind = task.get("kind", name)
        if task.kind not in EVALUATORS:
            raise ValueError(
                f"Unknown evaluator {task.kind!r} for config.eval.evaluators entry {name!r}; choose one of "
                f"{sorted(EVALUATORS)} or name a task of config.eval.tasks ({sorted(tasks)})."
            )
        resolved.append((name, task))
    return resolved


class Evaluator:
    """The evaluations of `config.eval.evaluators` for one model, built once (big_vision's evaluators):
    calling it with parameters runs them all, logs them at a step and writes the results files. Its
    compiled functions survive from call to call, so a periodic evaluation compiles only the first time.
    """

    def __init__(self, config: ml_collections.ConfigDict, model: nn.Module, tokenizer: Tokenizer,
                 data_config: ml_collections.ConfigDict, mesh: Mesh, writer: metric_writers.MetricWriter,
                 workdir: str):
        self.tasks = resolve_tasks(config)
        self.context = engine.EvalContext(config, model, tokenizer, data_config, mesh)
        self.writer, self.workdir = writer, workdir

    def __call__(self, params, step: int) -> dict:
        """Runs the evaluations of `params`; returns {name: summary} (the `evaluations` of `results.json`)."""
        start = time.perf_counter()
        self.context.use_params(params)
        results, sections = {}, {}
        # One mesh context for every call (jit caches are per context): the periodic evaluations inside the
        # train loop's mesh and the final one after it reuse the same compilations.
        with engine.counting_compilations() as compilations, jax.set_mesh(self.context.mesh):
            for name, task in self.tasks:
                result = EVALUATORS[task.kind](self.context, task)
                self.writer.write_scalars(step, {f"{name}/{k}": v for k, v in result.scalars.items()})
                if result.tables:
                    self.writer.write_texts(step, {f"{name}/{k}": v for k, v in result.tables.items()})
                if result.overlays:
                    self.writer.write_images(step, {f"{name}/overlays": np.stack(_pad_to_same(result.overlays))})
                results[name] = result.summary
                sections[name] = result
                logging.info("%s: %s", name, "; ".join(line.lstrip("- ") for line in result.headline))
        seconds = time.perf_counter() - start
        self.writer.write_scalars(step, {"eval/seconds": seconds, "eval/compilations": compilations[0]})
        logging.info("Evaluated step %d in %.1f s (%d XLA compilations).", step, seconds, compilations[0])
        self.writer.flush()
        if jax.process_index() == 0:
            write_results(self.workdir, dict(step=step, image_pool=self.context.model.image_pool,
                                             evaluations=results), sections)
        return results


def _pad_to_same(images: list[np.ndarray]) -> list[np.ndarray]:
    h = max(i.shape[0] for i in images)
    w = max(i.shape[1] for i in images)
    return [np.pad(i, ((0, h - i.shape[0]), (0, w - i.shape[1]), (0, 0)), constant_values=255) for i in images]


def write_results(workdir: str, results: dict, sections: dict[str, engine.EvalResult]) -> None:
    """`results.json` and `results.md` (one section per evaluator: headline, then tables) in the workdir."""
    tf.io.gfile.makedirs(workdir)
    with tf.io.gfile.GFile(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    lines = [f"# Results at step {results['step']} (image pool: {results['image_pool']})", ""]
    for name, result in sections.items():
        lines += [f"## {name}", "", *result.headline, ""]
        for title, table in result.tables.items():
            lines += [f"### {title}", "", table, ""]
    with tf.io.gfile.GFile(os.path.join(workdir, "results.md"), "w") as f:
        f.write("\n".join(lines))
