"""The train loop: data, sharded state, jitted steps, checkpoints, CLU logging, then evaluation."""

import os
import time

import jax
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers, periodic_actions

from clippy_jax import config_checks
from clippy_jax.data import demo_data, pipeline
from clippy_jax.data.tokenizer import Tokenizer
from clippy_jax.evaluate import runner
from clippy_jax.models import build_model
from clippy_jax.train import sharding
from clippy_jax.train.checkpoint import Checkpointer
from clippy_jax.train.optimizer import make_optimizer
from clippy_jax.train.step import batch_spec, create_train_state, make_train_step


def _grid_shape(config: ml_collections.ConfigDict) -> tuple[int, int]:
    side = config.data.image_size // config.model.image.patch_size
    return side, side


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains `config.train.steps` steps (resuming from `workdir`), then runs the evaluations."""
    config_checks.validate(config, jax.device_count())
    data_config = demo_data.prepare_data(config, workdir)
    tokenizer = Tokenizer(data_config.tokenizer_path, config.data.max_text_length)
    model = build_model(config.model, tokenizer.vocab_size)
    mesh = sharding.make_mesh(config.mesh)
    total_steps = config.train.steps
    tx, schedule = make_optimizer(config.optim, total_steps)
    grid_shape = _grid_shape(config)

    local_batch_size = config.train.batch_size // jax.process_count()
    dataset = pipeline.train_dataset(
        data_config, tokenizer, local_batch_size, config.seed, jax.process_index(), jax.process_count()
    )
    iterator = pipeline.InputIterator(dataset)
    example = batch_spec(
        {k: np.zeros(v.shape, v.dtype.as_numpy_dtype) for k, v in dataset.element_spec.items()}, jax.process_count()
    )
    state, state_shardings = create_train_state(model, tx, example, mesh, config.seed, grid_shape)
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), config.train.checkpoint_every,
                                config.train.keep_checkpoints)
    restored = checkpointer.restore(state, iterator)
    if restored is not None:
        state = restored
    start_step = int(state.step)
    if start_step:
        logging.info("Resuming training at step %d of %d.", start_step, total_steps)

    writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
    if start_step == 0:
        writer.write_hparams(_flatten(config))
    train_step = make_train_step(model, tx, schedule, state_shardings, mesh, config.train.max_logit_scale, grid_shape)
    report = periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer,
                                             every_steps=config.train.log_every)
    hooks = [report]
    last_log_time, last_log_step = time.time(), start_step
    pending = []
    with jax.set_mesh(mesh):
        for step in range(start_step + 1, total_steps + 1):
            with jax.profiler.StepTraceAnnotation("train", step_num=step):
                batch = sharding.global_batch(next(iterator), mesh)
                state, metrics = train_step(state, batch)
            pending.append(metrics)
            for hook in hooks:
                hook(step)
            if step % config.train.log_every == 0 or step == total_steps:
                scalars = {k: float(np.mean([jax.device_get(m[k]) for m in pending])) for k in pending[0]}
                elapsed = time.time() - last_log_time
                scalars["examples_per_second"] = (step - last_log_step) * config.train.batch_size / elapsed
                writer.write_scalars(step, {f"train/{k}": v for k, v in scalars.items()})
                pending, last_log_time, last_log_step = [], time.time(), step
            checkpointer.save(step, state, iterator, force=step == total_steps)
    checkpointer.wait()
    checkpointer.close()
    results = runner.run_evaluations(config, model, state.params, tokenizer, data_config, writer, workdir, total_steps)
    writer.flush()
    return results


def _flatten(config: ml_collections.ConfigDict, prefix: str = "") -> dict:
    out = {}
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return out
