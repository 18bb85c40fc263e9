"""The tf.data training pipeline: encoded examples -> shuffled, decoded, cropped, tokenized batches.

Stages (one process):

  sources.examples            endless encoded examples with a status (see `sources.py`)
  shuffle(shuffle_buffer)     of encoded bytes, so iterator checkpoints stay small
  enumerate                   the example's position: every random draw is stateless from
                              (seed, process_index, position), so the stream is a pure function
                              of the seed
  window + interleave(decode) windows of DECODE_WINDOW examples decoded in parallel, in order;
                              an image that fails to decode raises and is dropped inside its
                              window (`ignore_errors`), leaving a gap in the positions
  scan(count)                 sequential: cumulative skip counters per reason, from the statuses
                              and from position gaps (undecodable images)
  filter(status == OK)
  map(prepare)                caption draw, resize, crop, normalise, patch dropping
  batch + map(tokenize)       the counters of the batch's last example ride along
  prefetch

Skip counters are thus computed in the stream itself: deterministic, exact (no sampling), and
saved with the iterator state since the `scan` state is part of it. The dataset that
`train_dataset` returns has the model inputs only (its `element_spec` shapes the compiled step);
`InputIterator` iterates the same stream with the counters of each batch attached (`SKIPPED_KEY`)
and reports them through `counters()`.

Iterator checkpoint size per process (explicit tf.data checkpointing saves every buffer), at most
  shuffle_buffer x encoded example (image bytes + captions)     e.g. 20k x 80 KB = 1.6 GB
  + (prefetch + 1) x local batch x output example               e.g. 3 x 256 x 0.6 MB = 460 MB
  + parallel calls (about the core count) x (DECODE_WINDOW x decoded image H x W x 3 B + output example)
  + interleave x (a TFRecord offset | a tar's unparsed tail: < one member + 256 KiB)
where an output example is S^2 x 3 x 4 B (image) or K x p^2 x 3 x 4 B (kept patches), plus L x 4 B
of tokens. Measured: 109 MiB with 25 KiB JPEGs, shuffle_buffer=1000, batch 64 at 224, prefetch=2.
"""

import os
import re
import threading
import time
import weakref
from collections.abc import Callable

import ml_collections
import numpy as np
import tensorflow as tf

from clippy_jax.data import preprocess, sources
from clippy_jax.data.tokenizer import Tokenizer

AUTOTUNE = tf.data.AUTOTUNE
# The batch entry that carries the cumulative skip counters (int32 [len(sources.REASONS)]).
SKIPPED_KEY = "data_skipped"
CROPS = ("random", "center")
# Examples per decoding task: amortises the task's set-up; its decoded images are in flight (and in
# an iterator checkpoint) together.
DECODE_WINDOW = 8
# train_dataset's result -> the same batches with their skip counters (read by InputIterator).
_WITH_COUNTERS: "weakref.WeakKeyDictionary[tf.data.Dataset, tf.data.Dataset]" = weakref.WeakKeyDictionary()
# Data keys that configs written before them may lack.
DEFAULTS = dict(crop="random", tfds_name="", tfds_data_dir="", tfds_split="train", max_input_wait_seconds=300.0,
                max_consecutive_skips=10_000)
# The start of the error the pipeline raises after `max_consecutive_skips` unusable records in a row.
_SKIPS_MESSAGE = "consecutive records were skipped"


# Seconds between checks of the caller's cancellation while waiting for a batch.
_POLL_SECONDS = 0.5


class InputStalledError(RuntimeError):
    """No batch arrived in time, or too many records in a row were unusable."""


def with_defaults(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The `data` config with `DEFAULTS` for the keys it lacks."""
    return ml_collections.ConfigDict({**DEFAULTS, **config.to_dict()})


def _decode(example: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    """Decodes the image of a usable example (raises on undecodable bytes); others get 1x1 pixels."""
    image = tf.cond(example["status"] == sources.OK, lambda: preprocess.decode_rgb(example["image"]),
                    lambda: tf.zeros([1, 1, 3], tf.uint8))
    return dict(example, image=image)


def _decoded(window: dict[str, tf.data.Dataset]) -> tf.data.Dataset:
    """The window's examples, decoded, without those whose image does not decode.

    The errors are ignored inside the window, whose elements are already in memory, so that errors
    from the stages before (a shard that changed since start-up) stop the pipeline: `ignore_errors`
    on the whole stream would retry a failing reader forever.
    """
    return tf.data.Dataset.zip(window).map(_decode).ignore_errors()


def _count(state: tuple[tf.Tensor, tf.Tensor, tf.Tensor], example: dict[str, tf.Tensor]):
    """Adds the example's own skip reason, and the undecodable images just before it, to the counters;
    `run` counts the records skipped since the last usable one."""
    counts, last_position, run = state
    reasons = len(sources.REASONS)
    undecodable = tf.cast(example["position"] - last_position - 1, tf.int32)
    counts += undecodable * tf.one_hot(sources.BAD_IMAGE - 1, reasons, dtype=tf.int32)
    counts += tf.one_hot(example["status"] - 1, reasons, dtype=tf.int32)  # OK (0) adds nothing
    run = tf.where(example["status"] == sources.OK, 0, run + undecodable + 1)
    return (counts, example["position"], run), dict(example, skipped=counts, run=run)


def _check_skips(example: dict[str, tf.Tensor], limit: int) -> dict[str, tf.Tensor]:
    """Fails the stream (`InputIterator` names the cause) after `limit` unusable records in a row."""
    check = tf.debugging.Assert(example["run"] < limit, [_SKIPS_MESSAGE, example["run"], "counters",
                                                           example["skipped"]], summarize=len(sources.REASONS))
    with tf.control_dependencies([check]):
        return {k: tf.identity(v) for k, v in example.items() if k != "run"}


def train_dataset(
    config: ml_collections.ConfigDict,
    tokenizer: Tokenizer,
    local_batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
) -> tf.data.Dataset:
    """Endless batches {image [B, S, S, 3] | patches [B, K, p * p * 3], patch_indices [B, K]; tokens [B, L]}
    of one process; `InputIterator` also reports their skip counters."""
    config = with_defaults(config)
    if config.crop not in CROPS:
        raise ValueError(f"config.data.crop={config.crop!r} must be one of {CROPS}.")
    keep = preprocess.kept_patch_count(config.image_size, config.patch_size, config.keep_ratio, config.keep_patches)
    base_seed = tf.constant([seed, process_index], tf.int64)

    def prepare(example: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        caption_seed, crop_seed, drop_seed = tf.unstack(tf.random.experimental.stateless_split(
            tf.random.experimental.stateless_fold_in(base_seed, example["position"]), 3))
        captions = example["captions"]
        caption = captions[tf.random.stateless_uniform([], caption_seed, maxval=tf.size(captions), dtype=tf.int32)]
        image = preprocess.crop_to_square(example["image"], config.image_size,
                                          crop_seed if config.crop == "random" else None)
        out = dict(caption=caption, skipped=example["skipped"])
        if keep is None:
            out["image"] = preprocess.normalize(image, config.mean, config.std)
        else:  # normalise only the kept patches
            out.update(preprocess.drop_patches(image, config.patch_size, keep, drop_seed))
            out["patches"] = preprocess.normalize(out["patches"], config.mean, config.std)
        return out

    def tokenize(batch: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        batch = dict(batch)
        batch["tokens"] = tokenizer.tf_encode(batch.pop("caption"))
        batch[SKIPPED_KEY] = batch.pop("skipped")[-1]
        return batch

    examples = sources.examples(config, seed, process_index, process_count)
    examples = examples.shuffle(config.shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    examples = examples.enumerate().map(lambda position, example: dict(example, position=position))
    # Windows decoded in parallel, each in order and whole before the next (block_length): stream order.
    decoded = examples.window(DECODE_WINDOW).interleave(
        _decoded, cycle_length=AUTOTUNE, block_length=DECODE_WINDOW, num_parallel_calls=AUTOTUNE, deterministic=True)
    initial = (tf.zeros([len(sources.REASONS)], tf.int32), tf.constant(-1, tf.int64), tf.constant(0, tf.int32))
    counted = decoded.scan(initial, _count).map(lambda example: _check_skips(example, config.max_consecutive_skips))
    counted = counted.filter(lambda example: example["status"] == sources.OK)
    ready = counted.map(prepare, num_parallel_calls=AUTOTUNE, deterministic=True)
    batches = ready.batch(local_batch_size, drop_remainder=True)
    # Sequential: a parallel map would buffer (and checkpoint) up to one batch per core.
    with_counters = batches.map(tokenize).prefetch(config.prefetch)
    inputs = with_counters.map(lambda batch: {k: v for k, v in batch.items() if k != SKIPPED_KEY})
    _WITH_COUNTERS[inputs] = with_counters
    return inputs


class _Read:
    """One `next` of a tf.data iterator in a daemon thread, so that the caller can wait for it with a
    time limit and Python signal handlers keep running meanwhile."""

    def __init__(self, iterator):
        self.done, self.value, self.error = threading.Event(), None, None
        threading.Thread(target=self._run, args=(iterator,), daemon=True).start()

    def _run(self, iterator) -> None:
        try:
            self.value = next(iterator)
        except BaseException as error:  # noqa: BLE001 (handed to the waiting thread)
            self.error = error
        self.done.set()


class InputIterator:
    """A numpy iterator over a `train_dataset` whose position and skip counters can be checkpointed.

    A watchdog stops the run when no batch arrives within `max_wait_seconds` (or the stream fails
    after `data.max_consecutive_skips` unusable records): `InputStalledError` then says what was
    waited for, with `describe()` (the pattern, keys and shard contents) and the skip counters.
    """

    def __init__(self, dataset: tf.data.Dataset, max_wait_seconds: float | None = None,
                 describe: Callable[[], str] = lambda: ""):
        if dataset not in _WITH_COUNTERS:
            raise TypeError("InputIterator reads the dataset that pipeline.train_dataset returned, untransformed.")
        self._iterator = iter(_WITH_COUNTERS[dataset])
        self._skipped = tf.Variable(tf.zeros([len(sources.REASONS)], tf.int32), trainable=False)
        self._checkpoint = tf.train.Checkpoint(iterator=self._iterator, skipped=self._skipped)
        self._max_wait, self._describe = max_wait_seconds, describe
        self._read: _Read | None = None

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return self.next_batch()

    def next_batch(self, cancelled: Callable[[], bool] = lambda: False) -> dict[str, np.ndarray] | None:
        """The next batch; None when `cancelled()` turns true while waiting for it (checked every
        `_POLL_SECONDS`; the iterator then cannot be saved)."""
        self._read = self._read or _Read(self._iterator)
        deadline = None if self._max_wait is None else time.monotonic() + self._max_wait
        while not self._read.done.wait(_POLL_SECONDS):
            if cancelled():
                return None
            if deadline is not None and time.monotonic() > deadline:
                raise InputStalledError(f"No training batch within data.max_input_wait_seconds={self._max_wait:g}: "
                                        f"{self._diagnosis(self._skipped.numpy())}")
        read, self._read = self._read, None
        if isinstance(read.error, tf.errors.InvalidArgumentError) and _SKIPS_MESSAGE in read.error.message:
            run, counts = re.search(r"\] \[(\d+)\] \[counters\] \[([\d ]+)\]", read.error.message).groups()
            raise InputStalledError(f"{run} {_SKIPS_MESSAGE} (data.max_consecutive_skips): "
                                    f"{self._diagnosis([int(n) for n in counts.split()])}") from None
        if read.error is not None:
            raise read.error
        batch = read.value
        self._skipped.assign(batch.pop(SKIPPED_KEY))
        return {k: v.numpy() for k, v in batch.items()}

    def _diagnosis(self, counts) -> str:
        skipped = ", ".join(f"{reason}={int(n)}" for reason, n in zip(sources.REASONS, counts))
        return f"{self._describe()} Skip counters so far: {skipped}."

    def counters(self) -> dict[str, int]:
        """{'data/skipped_<reason>': count}, cumulative over this process's stream up to the last batch."""
        return {f"data/skipped_{reason}": int(n) for reason, n in zip(sources.REASONS, self._skipped.numpy())}

    def save(self, directory: str) -> None:
        if self._read is not None:
            raise RuntimeError("The input iterator is still reading a batch and cannot be saved.")
        tf.io.gfile.makedirs(directory)
        self._checkpoint.write(os.path.join(directory, "iterator"))

    def restore(self, directory: str) -> None:
        self._checkpoint.read(os.path.join(directory, "iterator")).assert_consumed()
