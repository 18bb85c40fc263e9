"""The train loop: data, sharded state, jitted steps, checkpoints, CLU logging, evaluations."""

import functools
import os
import signal
import time

import jax
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers, periodic_actions
from jax.experimental import multihost_utils

from clippy_jax import config_checks
from clippy_jax.convert import load_pretrained, merge_pretrained
from clippy_jax.data import demo_data, pipeline, sources
from clippy_jax.data.tokenizer import Tokenizer
from clippy_jax.evaluate import runner
from clippy_jax.models import build_model
from clippy_jax.train import perf, sharding
from clippy_jax.train.checkpoint import Checkpointer
from clippy_jax.train.optimizer import make_optimizer
from clippy_jax.train.step import batch_spec, create_train_state, make_train_step


class NonFiniteLossError(FloatingPointError):
    """A NaN or Inf appeared in the loss or the gradients."""


class TrainingStopped(Exception):  # noqa: N818 (a stop, not a failure)
    """A termination signal stopped the run; its last checkpoint is complete, rerun to resume."""


class PreemptionWatcher:
    """Turns SIGTERM (TPU maintenance, preemption notices, SLURM's time limit) and a first Ctrl-C
    into a clean stop; a second Ctrl-C interrupts at once.

    Inside the train loop (`in_loop`) a signal only sets `requested`: the loop stops at the end of
    its step after saving. Elsewhere (compilation, evaluation) it raises `TrainingStopped` as soon
    as Python code runs. With several processes, JAX's preemption sync point makes every process
    stop at the same step.
    """

    def __init__(self):
        self.requested, self.in_loop, self._previous = False, False, {}
        if jax.process_count() == 1:
            self._previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}

    def close(self) -> None:
        """Puts back the signal handlers of before."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _on_signal(self, signum, frame):
        del frame
        signal.signal(signal.SIGINT, signal.default_int_handler)
        self.requested = True
        if not self.in_loop:
            raise TrainingStopped(f"Stopped by signal {signal.Signals(signum).name} before the train loop or "
                                  "during the evaluation; the checkpoints are complete, rerun to resume.")
        logging.warning("Received signal %s: saving a checkpoint and stopping.", signal.Signals(signum).name)

    def should_stop(self, step: int) -> bool:
        if jax.process_count() > 1:
            return multihost_utils.reached_preemption_sync_point(step)
        return self.requested


def initialize_from_pretrained(params: dict, init: ml_collections.ConfigDict) -> dict:
    """Puts converted checkpoints (`python -m clippy_jax.convert`) into freshly initialised params.

    `init.image` / `init.text` name converted checkpoint directories (or "random"); only the entries
    of that tower (`image_*` / `text_*`) are taken, so one converted CLIPpy checkpoint can serve both.
    """
    for tower in ("image", "text"):
        source = init[tower]
        if source == "random":
            continue
        pretrained, _ = load_pretrained(source)
        subtree = {k: v for k, v in pretrained.items() if k.startswith(f"{tower}_")}
        if not subtree:
            raise ValueError(f"config.init.{tower}={source!r} holds no {tower} tower (it has {sorted(pretrained)}).")
        params = merge_pretrained(params, subtree, strict=init.strict)
        logging.info("Initialised the %s tower from %s.", tower, source)
    return params


def _grid_shape(config: ml_collections.ConfigDict) -> tuple[int, int]:
    side = config.data.image_size // config.model.image.patch_size
    return side, side


def _check_finite(fetched: list[dict], first_step: int) -> None:
    for offset, metrics in enumerate(fetched):
        if metrics["nonfinite"]:
            raise NonFiniteLossError(
                f"Non-finite loss or gradients at step {first_step + offset} (loss={metrics['loss']}); the last "
                "checkpoint before it is intact. Lower optim.learning_rate or set train.on_nonfinite='skip'."
            )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains `config.train.steps` steps (resuming from `workdir`), then runs the evaluations.

    Raises `TrainingStopped` after a termination signal (the last checkpoint is complete).
    """
    preemption = PreemptionWatcher()
    try:
        return _train_and_evaluate(config, workdir, preemption)
    finally:
        preemption.close()


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, preemption: PreemptionWatcher) -> dict:
    config_checks.validate(config, jax.device_count(), jax.process_count())
    total_steps = config.train.steps
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), config.train.checkpoint_every,
                                config.train.keep_checkpoints)
    settings = config_checks.flatten(config)
    if checkpointer.steps():
        config_checks.check_resume(settings, checkpointer.saved_settings(), workdir, checkpointer.steps()[0],
                                   total_steps)
    data_config = demo_data.prepare_data(config, workdir)
    tokenizer = Tokenizer(data_config.tokenizer_path, config.data.max_text_length)
    config_checks.check_vocab(config, tokenizer.vocab_size)
    model = build_model(config.model, tokenizer.vocab_size)
    mesh = sharding.make_mesh(config.mesh)
    tx, schedule = make_optimizer(config.optim, total_steps)
    grid_shape = _grid_shape(config)

    local_batch_size = config.train.batch_size // jax.process_count()
    dataset = pipeline.train_dataset(
        data_config, tokenizer, local_batch_size, config.seed, jax.process_index(), jax.process_count()
    )
    iterator = pipeline.InputIterator(dataset, pipeline.with_defaults(config.data).max_input_wait_seconds,
                                      functools.partial(sources.describe, data_config))
    example = batch_spec(
        {k: np.zeros(v.shape, v.dtype.as_numpy_dtype) for k, v in dataset.element_spec.items()}, jax.process_count()
    )
    state, state_shardings = create_train_state(model, tx, example, mesh, config.seed, grid_shape)
    restored = checkpointer.restore(state, iterator)
    if restored is not None:
        state = restored
    else:
        state = state.replace(params=initialize_from_pretrained(state.params, config.init))
        checkpointer.write_settings(settings)
    start_step = int(state.step)
    if start_step:
        logging.info("Resuming training at step %d of %d.", start_step, total_steps)

    writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
    if start_step == 0:
        writer.write_hparams(settings)
    skip_nonfinite = config.train.on_nonfinite == "skip"
    train_step = make_train_step(model, tx, schedule, state_shardings, mesh, config.train.max_logit_scale,
                                 grid_shape, skip_nonfinite, config.train.loss_block_size)
    hooks = [periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer,
                                             every_steps=config.train.log_every)]
    if config.train.profile_steps and jax.process_index() == 0:
        hooks.append(periodic_actions.Profile(num_profile_steps=config.train.profile_steps,
                                              first_profile=start_step + config.train.profile_first_step,
                                              every_secs=None, logdir=workdir))
    batch_shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding.batch_sharding(mesh))
                    for k, v in example.items()}
    compiled_step = train_step.lower(state, batch_shapes).compile()
    flops_per_step = perf.compiled_flops(compiled_step)
    peak_flops, peak_source = perf.device_peak_flops()
    logging.info("XLA: %s FLOPs per step per device; device peak %.3g FLOP/s (%s).", flops_per_step, peak_flops,
                 peak_source)
    try:
        preemption.in_loop = True
        state, step = _train_loop(config, state, compiled_step, iterator, checkpointer, hooks, writer, preemption,
                                  mesh, flops_per_step, peak_flops, start_step,
                                  lambda params, at: runner.run_evaluations(config, model, params, tokenizer,
                                                                            data_config, writer, workdir, at))
    finally:  # a save in flight completes on any exit: only finite states are ever saved (`_check_finite`)
        checkpointer.wait()
        preemption.in_loop = False
    if step < total_steps:
        raise TrainingStopped(f"Stopped at step {step} after a termination signal; the checkpoint of step "
                              f"{max(checkpointer.steps(), default=0)} is complete, rerun to resume.")
    checkpointer.close()
    results = runner.run_evaluations(config, model, state.params, tokenizer, data_config, writer, workdir,
                                     total_steps)
    writer.flush()
    return results


def _train_loop(config, state, compiled_step, iterator, checkpointer, hooks, writer, preemption, mesh,
                flops_per_step, peak_flops, start_step, evaluate) -> tuple:
    """Steps from `start_step` until `config.train.steps` or a stop request; returns (state, last step)."""
    total_steps = config.train.steps
    skip_nonfinite = config.train.on_nonfinite == "skip"
    last_log_time, last_log_step, pending = time.time(), start_step, []
    step = start_step
    with jax.set_mesh(mesh):
        while step < total_steps:
            batch = iterator.next_batch(cancelled=lambda: preemption.requested)
            if batch is None:  # stopped while waiting for data: the iterator is mid-read, keep the last checkpoint
                logging.warning("Stopped at step %d while waiting for input; no new checkpoint.", step)
                return state, step
            step += 1
            with jax.profiler.StepTraceAnnotation("train", step_num=step):
                state, metrics = compiled_step(state, sharding.global_batch(batch, mesh))
            pending.append(metrics)
            for hook in hooks:
                hook(step)
            stop = preemption.should_stop(step)
            will_save = stop or step == total_steps or checkpointer.manager.should_save(step)
            if step % config.train.log_every == 0 or will_save:
                fetched = jax.device_get(pending)
                if not skip_nonfinite:
                    _check_finite(fetched, last_log_step + 1)  # never checkpoint a NaN
            if step % config.train.log_every == 0 or step == total_steps or stop:
                scalars = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
                seconds_per_step = (time.time() - last_log_time) / (step - last_log_step)
                scalars["examples_per_second"] = config.train.batch_size / seconds_per_step
                if flops_per_step:
                    scalars["flops_per_step_per_device"] = flops_per_step
                    scalars["mfu"] = flops_per_step / seconds_per_step / peak_flops
                writer.write_scalars(step, {**{f"train/{k}": v for k, v in scalars.items()}, **iterator.counters()})
                pending, last_log_time, last_log_step = [], time.time(), step
            checkpointer.save(step, state, iterator, force=step == total_steps or stop)
            if stop:
                return state, step
            if config.eval.every_steps and step % config.eval.every_steps == 0 and step < total_steps:
                evaluate(state.params, step)
    return state, step
