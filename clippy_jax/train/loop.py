"""The train loop: data, sharded state, jitted steps, checkpoints, CLU logging, evaluations."""

import datetime
import functools
import json
import os
import signal
import textwrap
import time

import jax
import ml_collections
import numpy as np
import tensorflow as tf
from absl import logging
from clu import periodic_actions
from jax.experimental import multihost_utils

from clippy_jax import checkpoints, config_checks, deadlines, sharding
from clippy_jax.convert import load_pretrained, merge_pretrained
from clippy_jax.data import demo_data, pipeline, sources
from clippy_jax.data.tokenizer import Tokenizer
from clippy_jax.evaluate import runner
from clippy_jax.models import build_model
from clippy_jax.models.vit import patch_geometry, patch_grid
from clippy_jax.train import perf
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


def _check_finite(fetched: list[dict], first_step: int) -> None:
    for offset, metrics in enumerate(fetched):
        if metrics["nonfinite"]:
            raise NonFiniteLossError(
                f"Non-finite loss or gradients at step {first_step + offset} (loss={metrics['loss']}); the last "
                "checkpoint before it is intact. Lower optim.learning_rate or set train.on_nonfinite='skip'."
            )


def _finished_results(workdir: str, total_steps: int) -> dict | None:
    """`results.json` of a run that trained all `total_steps` steps and was evaluated at the last one, else None."""
    path = os.path.join(workdir, "results.json")
    if not tf.io.gfile.exists(path) or not tf.io.gfile.exists(checkpoints.step_dir(workdir, total_steps)):
        return None
    with tf.io.gfile.GFile(path) as f:
        results = json.load(f)
    return results if results.get("step") == total_steps else None


def _log_where(workdir: str, step: int) -> None:
    logging.info("Results: %s | TensorBoard: tensorboard --logdir %s | checkpoint: %s",
                 os.path.join(workdir, "results.md"), workdir, checkpoints.step_dir(workdir, step))


def _resolved(config: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
    """The config with its data paths resolved (`demo_data.data_paths`): what each checkpoint records."""
    resolved = ml_collections.ConfigDict(config.to_dict())
    resolved.data = demo_data.data_paths(config, workdir).to_dict()
    return resolved


def load_tokenizer(data: ml_collections.ConfigDict, wait_seconds: float | None) -> Tokenizer:
    """The tokenizer of `data.tokenizer_path`, read under the start-up deadline; ConfigError naming the setting."""
    try:
        return deadlines.call_with_deadline(lambda: Tokenizer(data.tokenizer_path, data.max_text_length),
                                            wait_seconds, data.tokenizer_path)
    except deadlines.DeadlineExceeded:
        raise config_checks.ConfigError(
            f"config.data.tokenizer_path={data.tokenizer_path!r} did not answer within "
            f"data.max_input_wait_seconds={wait_seconds:g} s; make the file readable.") from None
    except (ValueError, OSError, RuntimeError, tf.errors.OpError) as error:
        raise config_checks.ConfigError(
            f"config.data.tokenizer_path={data.tokenizer_path!r} cannot be used: {str(error).rstrip('.')}; pass a "
            "SentencePiece model file (e.g. T5's spiece.model).") from None


def _keep_tokenizer(tokenizer_path: str, workdir: str) -> None:
    """Copies the tokenizer into the workdir, so that the workdir alone loads the model."""
    copy = checkpoints.tokenizer_file(workdir)
    if jax.process_index() == 0 and os.path.abspath(tokenizer_path) != os.path.abspath(copy):
        tf.io.gfile.copy(tokenizer_path, copy, overwrite=True)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, reevaluate: bool = False) -> dict:
    """Trains `config.train.steps` steps (resuming from `workdir`), then runs the evaluations.

    A run that already trained and evaluated all its steps returns its recorded results at once,
    unless `reevaluate`. Raises `TrainingStopped` after a termination signal (the last checkpoint is
    complete).
    """
    preemption = PreemptionWatcher()
    try:
        return _train_and_evaluate(config, workdir, preemption, reevaluate)
    finally:
        preemption.close()


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, preemption: PreemptionWatcher,
                        reevaluate: bool) -> dict:
    config_checks.validate(config, jax.device_count(), jax.process_count())
    total_steps = config.train.steps
    finished = None if reevaluate else _finished_results(workdir, total_steps)
    if finished is not None:
        logging.info("This run already finished: %d of %d steps trained and evaluated; rerun with --reevaluate to "
                     "evaluate again, or raise --config.train.steps to train further.", total_steps, total_steps)
        _log_where(workdir, total_steps)
        return finished["evaluations"]
    checkpointer = checkpoints.Checkpointer(workdir, config.train.checkpoint_every, config.train.keep_checkpoints,
                                            config.data.max_input_wait_seconds)
    interrupted = lambda: preemption.requested  # noqa: E731 (a stop request is not a corrupt checkpoint)
    resolved = _resolved(config, workdir)
    settings = config_checks.flatten(resolved)
    newest = checkpointer.newest_config(interrupted)
    if newest is not None:
        latest, saved = newest
        config_checks.check_resume(settings, None if saved is None else config_checks.flatten(saved), workdir,
                                   latest, total_steps)
    data_config = demo_data.prepare_data(resolved.data)
    tokenizer = load_tokenizer(data_config, config.data.max_input_wait_seconds)
    _keep_tokenizer(data_config.tokenizer_path, workdir)
    config_checks.check_vocab(config, tokenizer.vocab_size)
    model = build_model(config.model, tokenizer.vocab_size)
    mesh = sharding.make_mesh(config.mesh)
    tx, schedule = make_optimizer(config.optim, total_steps)
    geometry = patch_geometry(model.image)
    grid_shape = patch_grid((config.data.image_size,) * 2, *geometry)

    local_batch_size = config.train.batch_size // jax.process_count()
    dataset = pipeline.train_dataset(data_config, tokenizer, local_batch_size, config.seed, jax.process_index(),
                                     jax.process_count(), patch_geometry=geometry)
    iterator = pipeline.InputIterator(dataset, config.data.max_input_wait_seconds,
                                      functools.partial(sources.describe, data_config))
    example = batch_spec(
        {k: np.zeros(v.shape, v.dtype.as_numpy_dtype) for k, v in dataset.element_spec.items()}, jax.process_count()
    )
    state, state_shardings = create_train_state(model, tx, example, mesh, config.seed, grid_shape)
    try:
        restored = checkpointer.restore(state, iterator, interrupted)
    except checkpoints.StateMismatchError as error:
        raise config_checks.state_mismatch(config, error, workdir, recorded=newest[1] is not None) from None
    if restored is not None:
        state = restored
    else:
        state = state.replace(params=initialize_from_pretrained(state.params, config.init))
    start_step = int(state.step)
    if start_step >= total_steps:
        logging.info("All %d steps are trained: evaluating the checkpoint of step %d again.", total_steps, start_step)
    elif start_step:
        logging.info("Resuming training at step %d of %d.", start_step, total_steps)

    writer = runner.create_writer(workdir)
    evaluator = runner.Evaluator(config, model, tokenizer, data_config, mesh, writer, workdir)
    if start_step == 0:
        writer.write_hparams(settings)
        logging.info("Hyperparameters (also in TensorBoard's HPARAMS tab and recorded with every checkpoint):\n%s",
                     hyperparameter_block(config))
    skip_nonfinite = config.train.on_nonfinite == "skip"
    hooks = []
    if config.train.profile_steps and jax.process_index() == 0:
        hooks.append(periodic_actions.Profile(num_profile_steps=config.train.profile_steps,
                                              first_profile=start_step + config.train.profile_first_step,
                                              every_secs=None, logdir=workdir))
    compiled_step, flops_per_step, peak_flops = None, None, None
    if start_step < total_steps:
        train_step = make_train_step(model, tx, schedule, state_shardings, mesh, config.train.max_logit_scale,
                                     grid_shape, skip_nonfinite, config.train.loss_block_size)
        batch_shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding.batch_sharding(mesh))
                        for k, v in example.items()}
        compiled_step = train_step.lower(state, batch_shapes).compile()
        flops_per_step = perf.compiled_flops(compiled_step)
        peak_flops, peak_source = perf.device_peak_flops()
        logging.info("XLA: %s FLOPs per step per device; device peak %.3g FLOP/s (%s).", flops_per_step, peak_flops,
                     peak_source)
    try:
        preemption.in_loop = True
        state, step = _train_loop(config, resolved, state, compiled_step, iterator, checkpointer, hooks, writer,
                                  preemption, mesh, flops_per_step, peak_flops, start_step, evaluator)
    finally:  # a save in flight completes on any exit: only finite states are ever saved (`_check_finite`)
        checkpointer.wait()
        preemption.in_loop = False
    if step < total_steps:
        raise TrainingStopped(f"Stopped at step {step} after a termination signal; the checkpoint of step "
                              f"{max(checkpointer.steps(), default=0)} is complete, rerun to resume.")
    checkpointer.close()
    results = evaluator(state.params, total_steps)
    writer.flush()
    _log_where(workdir, total_steps)
    return results


def _train_loop(config, resolved, state, compiled_step, iterator, checkpointer, hooks, writer, preemption, mesh,
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
            will_save = stop or step == total_steps or checkpointer.should_save(step)
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
                _log_progress(step, total_steps, scalars, seconds_per_step)
                pending, last_log_time, last_log_step = [], time.time(), step
            checkpointer.save(step, state, resolved, iterator, force=step == total_steps or stop)
            if stop:
                return state, step
            if config.eval.every_steps and step % config.eval.every_steps == 0 and step < total_steps:
                evaluate(state.params, step)
    return state, step


def _log_progress(step: int, total_steps: int, scalars: dict, seconds_per_step: float) -> None:
    eta = datetime.timedelta(seconds=round(seconds_per_step * (total_steps - step)))
    logging.info("step %d/%d (%.0f%%) | loss %.4f | %.1f examples/s | ETA %s", step, total_steps,
                 100.0 * step / total_steps, scalars["loss"], scalars["examples_per_second"], eta)


def hyperparameter_block(config: ml_collections.ConfigDict, width: int = 116) -> str:
    """One indented, wrapped paragraph per top-level section: `section: key=value key=value ...`."""
    lines = []
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            text = f"{key}: " + " ".join(f"{k}={v}" for k, v in config_checks.flatten(value).items())
        else:
            text = f"{key}: {value}"
        lines.append(textwrap.fill(text, width, initial_indent="  ", subsequent_indent="      ",
                                   break_on_hyphens=False))
    return "\n".join(lines)
