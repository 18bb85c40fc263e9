"""The tf.data training pipeline: encoded examples -> shuffled, decoded, cropped, tokenized batches.

Stages (one process):

  sources.examples            endless encoded examples with a status (see `sources.py`)
  block shuffle               blocks of `shuffle_buffer` encoded examples, each permuted by a stateless
                              permutation of (seed, process_index, block index); the example's
                              position is block index x shuffle_buffer + its place in the permuted
                              block. Every random draw is stateless from (seed, process_index,
                              position), so the stream is a pure function of the seed
  window + interleave(decode) windows of DECODE_WINDOW examples decoded in parallel, in order;
                              an image that fails to decode becomes a BAD_IMAGE status element
  scan(count)                 sequential: cumulative skip counters per reason, from the statuses
  filter(status == OK)
  map(prepare)                caption draw, resize, crop, normalise, patch dropping
  batch + map(tokenize)       the counters and position of the batch's last example ride along
  prefetch

Skip counters are thus computed in the stream itself: deterministic and exact (no sampling). The
dataset that `train_dataset` returns has the model inputs only (its `element_spec` shapes the compiled
step); `InputIterator` iterates the same stream with the counters and position of each batch attached
and reports the counters through `counters()`.

Iterator checkpoints hold no buffer: the state is the position of the last example delivered, the skip
counters, and the tf.data state of the source reader at the start of that example's block (shard
offsets and the reader's own read-ahead, taken when the block was read). Restoring rebuilds the
pipeline from that block: the block is read again (encoded bytes only), permuted, the examples up to
the position are dropped before decoding, and the counting scan starts from the saved counters.
Saving writes these few kilobytes and never waits for the pipeline. Host memory: the block being
consumed, the next one (read ahead, so that a new block never stalls the loop) and the one being
read: up to 3 x shuffle_buffer encoded examples (20k x 80 KB x 3 = 4.8 GB at the paper's settings).
"""

import atexit
import ctypes
import ctypes.util
import dataclasses
import io
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
# The batch entries that carry the cumulative skip counters (int32 [len(sources.REASONS)]) and the
# position of the batch's last example (int64).
SKIPPED_KEY = "data_skipped"
POSITION_KEY = "data_position"
CROPS = ("random", "center")
# Examples per decoding task: amortises the task's set-up; its decoded images are in flight (and in
# an iterator checkpoint) together.
DECODE_WINDOW = 8
# The file of an iterator checkpoint, in the directory given to `InputIterator.save`.
STATE_FILE = "iterator.npz"
# Iterators closed at exit (see InputIterator.close).
_OPEN: "weakref.WeakSet[InputIterator]" = weakref.WeakSet()
# train_dataset's result -> the function of a `Start` that makes the same batches with their skip
# counters and positions (read by InputIterator).
_WITH_COUNTERS: "weakref.WeakKeyDictionary[tf.data.Dataset, Callable]" = weakref.WeakKeyDictionary()
# The start of the error the pipeline raises after `max_consecutive_skips` unusable records in a row.
_SKIPS_MESSAGE = "consecutive records were skipped"
# Seconds between checks of the caller's cancellation while waiting for a batch.
_POLL_SECONDS = 0.5
# glibc's mallopt parameters, and the values its dynamic mmap threshold settles at on 64-bit Linux
# (DEFAULT_MMAP_THRESHOLD_MAX, and trimming at twice the threshold); see `_restore_malloc_thresholds`.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD_BYTES = 32 << 20


def _restore_malloc_thresholds() -> None:
    """Undoes what building a `from_generator` dataset does to the process's allocator.

    TensorFlow's generator dataset kernel (built when an iterator over the pipeline is made) calls
    `mallopt(M_MMAP_THRESHOLD, 128 KiB)` under Python >= 3.11. A fixed threshold turns glibc's dynamic
    one off for good: every buffer above 128 KiB is then mapped and unmapped at each use, so XLA:CPU
    faults in ~400 MB of fresh pages per train step (the demo's step ran 1.35x slower next to the
    pipeline, BENCHMARKS.md). This sets the thresholds that the dynamic mode would have reached.
    No-op where the C library has no `mallopt` (macOS).
    """
    mallopt = getattr(ctypes.CDLL(ctypes.util.find_library("c")), "mallopt", None)
    if mallopt is not None:
        mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES)
        mallopt(_M_TRIM_THRESHOLD, 2 * _MMAP_THRESHOLD_BYTES)


class InputStalledError(RuntimeError):
    """No batch arrived in time, or too many records in a row were unusable."""


def _decode(example: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    """Decodes the image of a usable example (raises on undecodable bytes); others get 1x1 pixels."""
    image = tf.cond(example["status"] == sources.OK, lambda: preprocess.decode_rgb(example["image"]),
                    lambda: tf.zeros([1, 1, 3], tf.uint8))
    return dict(example, image=image)


def _decoded(window: dict[str, tf.data.Dataset]) -> tf.data.Dataset:
    """The window's examples, decoded; an example whose image does not decode becomes a BAD_IMAGE status
    element, counted in order like every other skip.

    The decoding error is caught per example (`ignore_errors` on a one-example dataset, the status
    element in its place), so that errors from the stages before (a shard that changed since start-up)
    still stop the pipeline: `ignore_errors` on the whole stream would retry a failing reader forever.
    """
    def decode_or_status(example: dict[str, tf.Tensor]) -> tf.data.Dataset:
        undecodable = dict(example, status=tf.constant(sources.BAD_IMAGE, tf.int32),
                           image=tf.zeros([1, 1, 3], tf.uint8))
        decoded = tf.data.Dataset.from_tensors(example).map(_decode).ignore_errors()
        return decoded.concatenate(tf.data.Dataset.from_tensors(undecodable)).take(1)

    return tf.data.Dataset.zip(window).flat_map(decode_or_status)


def _count(state: tuple[tf.Tensor, tf.Tensor], example: dict[str, tf.Tensor]):
    """Adds the example's skip reason to the counters; `run` counts the records skipped since the last
    usable one."""
    counts, run = state
    counts += tf.one_hot(example["status"] - 1, len(sources.REASONS), dtype=tf.int32)  # OK (0) adds nothing
    run = tf.where(example["status"] == sources.OK, 0, run + 1)
    return (counts, run), dict(example, skipped=counts, run=run)


def _check_skips(example: dict[str, tf.Tensor], limit: int) -> dict[str, tf.Tensor]:
    """Fails the stream (`InputIterator` names the cause) after `limit` unusable records in a row."""
    check = tf.debugging.Assert(example["run"] < limit, [_SKIPS_MESSAGE, example["run"], "counters",
                                                           example["skipped"]], summarize=len(sources.REASONS))
    with tf.control_dependencies([check]):
        return {k: tf.identity(v) for k, v in example.items() if k != "run"}


@dataclasses.dataclass(frozen=True)
class Start:
    """Where a stream starts: `skip` examples into `block`, whose source reader state is `source_state`
    (None: the beginning of the stream), with the skip counters so far (`skipped`) and the position of
    the last example delivered (`last_position`)."""

    block: int = 0
    skip: int = 0
    source_state: bytes | None = None
    skipped: tuple[int, ...] = (0,) * len(sources.REASONS)
    last_position: int = -1


class _BlockReader:
    """Generates (block index, examples to skip, block of encoded examples) from a start, and keeps
    the source reader's state at the start of every block not yet delivered in full.

    A source error ends the generated stream (`from_generator` would turn it into an UnknownError)
    and is kept in `error`.
    """

    def __init__(self, source: tf.data.Dataset, size: int, start: Start):
        self._blocks = source.ragged_batch(size)
        self._start = start
        self._states = {start.block: start.source_state}
        self._changed = threading.Condition()
        self._ended = False
        self.error: tf.errors.OpError | None = None  # the source's error, raised when the stream reaches it

    def __call__(self):
        iterator = iter(self._blocks)
        if self._start.source_state is not None:
            iterator._restore(tf.constant(self._start.source_state))  # noqa: SLF001 (tf.data's in-memory state)
        block, skip = self._start.block, self._start.skip
        try:
            while True:
                state = iterator._save().numpy()  # noqa: SLF001
                with self._changed:
                    self._states[block] = state
                    self._changed.notify_all()
                try:
                    examples = next(iterator)
                except StopIteration:
                    return
                except tf.errors.OpError as error:  # ends the stream here; InputIterator raises it unchanged
                    self.error = error
                    return
                yield block, skip, examples
                block, skip = block + 1, 0
        finally:
            with self._changed:
                self._ended = True
                self._changed.notify_all()

    def source_state(self, block: int) -> bytes | None:
        """The source's state at the start of `block`; waits for the generator to reach the block if the
        last example delivered ended the block before."""
        with self._changed:
            self._changed.wait_for(lambda: block in self._states or self._ended)
            return self._states[block]

    def forget_before(self, block: int) -> None:
        with self._changed:
            for old in [b for b in self._states if b < block]:
                del self._states[old]


def _permuted_block(block: tf.Tensor, skip: tf.Tensor, examples: dict[str, tf.Tensor], shuffle_seed: tf.Tensor,
                    size: int) -> tf.data.Dataset:
    """The block's examples in the order of a stateless permutation, with their positions, from `skip` on."""
    count = tf.shape(examples["status"])[0]
    order = tf.argsort(tf.random.stateless_uniform([count], tf.random.experimental.stateless_fold_in(
        shuffle_seed, block)))
    permuted = {k: tf.gather(v, order) for k, v in examples.items()}
    permuted["position"] = block * size + tf.range(tf.cast(count, tf.int64))
    # from_tensors + unbatch, not from_tensor_slices: its graph of ragged components fails TensorFlow's
    # type inference (a 55-line warning on every run).
    return tf.data.Dataset.from_tensors(permuted).unbatch().skip(skip)


def shuffled_examples(config: ml_collections.ConfigDict, seed: int, process_index: int = 0,
                      process_count: int = 1) -> Callable[[Start], tuple[tf.data.Dataset, _BlockReader]]:
    """Lists the source once; returns the function of a `Start` that gives the block-shuffled encoded
    stream from there (each example with its `position`) and its block reader."""
    source = sources.examples(config, seed, process_index, process_count)
    spec = source.element_spec
    signature = (
        tf.TensorSpec([], tf.int64),
        tf.TensorSpec([], tf.int64),
        {k: tf.RaggedTensorSpec([None, *v.shape], v.dtype, ragged_rank=1, row_splits_dtype=tf.int64) if v.shape.rank
         else tf.TensorSpec([None], v.dtype) for k, v in spec.items()},
    )
    shuffle_seed = tf.random.experimental.stateless_fold_in(tf.constant([seed, process_index], tf.int64), -1)

    def from_start(start: Start) -> tuple[tf.data.Dataset, _BlockReader]:
        reader = _BlockReader(source, config.shuffle_buffer, start)
        # One block read ahead, so that a new block never waits for the source.
        blocks = tf.data.Dataset.from_generator(reader, output_signature=signature).prefetch(1)
        examples = blocks.flat_map(lambda block, skip, examples: _permuted_block(
            block, skip, examples, shuffle_seed, config.shuffle_buffer))
        return examples, reader

    return from_start


def train_dataset(
    config: ml_collections.ConfigDict,
    tokenizer: Tokenizer,
    local_batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    *,
    patch_geometry: tuple[int, int] | None,
) -> tf.data.Dataset:
    """Endless batches {image [B, S, S, 3] | patches [B, K, p * p * 3], patch_indices [B, K]; tokens [B, L]}
    of one process; `InputIterator` also reports their skip counters. `patch_geometry`: the ViT's
    (patch size, stride) (`clippy_jax.models.towers.patch_geometry`), for patch dropping; None for a
    CNN, which takes whole images."""
    if config.crop not in CROPS:
        raise ValueError(f"config.data.crop={config.crop!r} must be one of {CROPS}.")
    keep = None
    if patch_geometry is not None:
        patch_size, stride = patch_geometry
        keep = preprocess.kept_patch_count(config.image_size, patch_size, config.keep_ratio, config.keep_patches,
                                           stride)
    base_seed = tf.constant([seed, process_index], tf.int64)

    def prepare(example: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        caption_seed, crop_seed, drop_seed = tf.unstack(tf.random.experimental.stateless_split(
            tf.random.experimental.stateless_fold_in(base_seed, example["position"]), 3))
        captions = example["captions"]
        caption = captions[tf.random.stateless_uniform([], caption_seed, maxval=tf.size(captions), dtype=tf.int32)]
        image = preprocess.crop_to_square(example["image"], config.image_size,
                                          crop_seed if config.crop == "random" else None)
        out = dict(caption=caption, skipped=example["skipped"], position=example["position"])
        if keep is None:
            out["image"] = preprocess.normalize(image, config.mean, config.std)
        else:  # normalise only the kept patches
            out.update(preprocess.drop_patches(image, patch_size, keep, drop_seed, stride))
            out["patches"] = preprocess.normalize(out["patches"], config.mean, config.std)
        return out

    def tokenize(batch: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        batch = dict(batch)
        batch["tokens"] = tokenizer.tf_encode(batch.pop("caption"))
        batch[SKIPPED_KEY] = batch.pop("skipped")[-1]
        batch[POSITION_KEY] = batch.pop("position")[-1]
        return batch

    shuffled = shuffled_examples(config, seed, process_index, process_count)

    def batches(start: Start) -> tuple[tf.data.Dataset, _BlockReader]:
        examples, reader = shuffled(start)
        # Windows decoded in parallel, each in order and whole before the next (block_length): stream order.
        decoded = examples.window(DECODE_WINDOW).interleave(
            _decoded, cycle_length=AUTOTUNE, block_length=DECODE_WINDOW, num_parallel_calls=AUTOTUNE,
            deterministic=True)
        initial = (tf.constant(start.skipped, tf.int32), tf.constant(0, tf.int32))
        counted = decoded.scan(initial, _count).map(lambda example: _check_skips(example, config.max_consecutive_skips))
        counted = counted.filter(lambda example: example["status"] == sources.OK)
        ready = counted.map(prepare, num_parallel_calls=AUTOTUNE, deterministic=True)
        batched = ready.batch(local_batch_size, drop_remainder=True)
        return batched.map(tokenize).prefetch(config.prefetch), reader

    with_counters, _ = batches(Start())
    inputs = with_counters.map(lambda batch: {k: v for k, v in batch.items() if k not in (SKIPPED_KEY, POSITION_KEY)})
    _WITH_COUNTERS[inputs] = (batches, config.shuffle_buffer)
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
    """A numpy iterator over a `train_dataset` whose position and skip counters can be checkpointed
    in a few kilobytes (see the module docstring).

    A watchdog stops the run when no batch arrives within `max_wait_seconds` (or the stream fails
    after `data.max_consecutive_skips` unusable records): `InputStalledError` then says what was
    waited for, with `describe()` (the pattern, keys and shard contents) and the skip counters.
    """

    def __init__(self, dataset: tf.data.Dataset, max_wait_seconds: float | None = None,
                 describe: Callable[[], str] = lambda: ""):
        if dataset not in _WITH_COUNTERS:
            raise TypeError("InputIterator reads the dataset that pipeline.train_dataset returned, untransformed.")
        self._build, self._block_size = _WITH_COUNTERS[dataset]
        self._max_wait, self._describe = max_wait_seconds, describe
        self._read: _Read | None = None  # the batch being read
        self._begin(Start())
        _OPEN.add(self)

    def close(self) -> None:
        """Stops the pipeline. Called at exit: a block read still in flight when the interpreter is torn
        down would wait for the interpreter lock forever."""
        self._iterator = None

    def _begin(self, start: Start) -> None:
        self._batches, self._reader = self._build(start)
        self._iterator = None  # made at the first batch: nothing is read before a restore
        self._read = None
        self._skipped, self._position = np.asarray(start.skipped, np.int32), start.last_position

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return self.next_batch()

    def next_batch(self, cancelled: Callable[[], bool] = lambda: False) -> dict[str, np.ndarray] | None:
        """The next batch; None when `cancelled()` turns true while waiting for it (checked every
        `_POLL_SECONDS`; the iterator then cannot be saved)."""
        if self._iterator is None:
            self._iterator = iter(self._batches)
            _restore_malloc_thresholds()
        self._read = self._read or _Read(self._iterator)
        deadline = None if self._max_wait is None else time.monotonic() + self._max_wait
        while not self._read.done.wait(_POLL_SECONDS):
            if cancelled():
                return None
            if deadline is not None and time.monotonic() > deadline:
                raise InputStalledError(f"No training batch within data.max_input_wait_seconds={self._max_wait:g}: "
                                        f"{self._diagnosis(self._skipped)}")
        read, self._read = self._read, None
        if isinstance(read.error, tf.errors.InvalidArgumentError) and _SKIPS_MESSAGE in read.error.message:
            run, counts = re.search(r"\] \[(\d+)\] \[counters\] \[([\d ]+)\]", read.error.message).groups()
            raise InputStalledError(f"{run} {_SKIPS_MESSAGE} (data.max_consecutive_skips): "
                                    f"{self._diagnosis([int(n) for n in counts.split()])}") from None
        if isinstance(read.error, StopIteration) and self._reader.error is not None:
            raise self._reader.error from None
        if read.error is not None:
            raise read.error
        batch = read.value
        self._skipped = batch.pop(SKIPPED_KEY).numpy()
        self._position = int(batch.pop(POSITION_KEY))
        self._reader.forget_before((self._position + 1) // self._block_size)
        return {k: v.numpy() for k, v in batch.items()}

    def _diagnosis(self, counts) -> str:
        skipped = ", ".join(f"{reason}={int(n)}" for reason, n in zip(sources.REASONS, counts))
        return f"{self._describe()} Skip counters so far: {skipped}."

    def counters(self) -> dict[str, int]:
        """{'data/skipped_<reason>': count}, cumulative over this process's stream up to the last batch."""
        return {f"data/skipped_{reason}": int(n) for reason, n in zip(sources.REASONS, self._skipped)}

    def state(self) -> Start:
        """Where the stream continues after the last batch delivered."""
        block, skip = divmod(self._position + 1, self._block_size)
        return Start(block, skip, self._reader.source_state(block), tuple(int(n) for n in self._skipped),
                     self._position)

    def save(self, directory: str) -> None:
        if self._read is not None:
            raise RuntimeError("The input iterator is still reading a batch and cannot be saved.")
        state = self.state()
        buffer = io.BytesIO()
        np.savez(buffer, block=state.block, skip=state.skip, skipped=np.asarray(state.skipped, np.int32),
                 last_position=state.last_position, has_source_state=state.source_state is not None,
                 source_state=np.frombuffer(state.source_state or b"", np.uint8))
        tf.io.gfile.makedirs(directory)
        with tf.io.gfile.GFile(os.path.join(directory, STATE_FILE), "wb") as f:
            f.write(buffer.getvalue())

    def restore(self, directory: str) -> None:
        path = os.path.join(directory, STATE_FILE)
        if not tf.io.gfile.exists(path):
            raise FileNotFoundError(f"No input iterator state {path}; the checkpoint was written by an older "
                                    "version of clippy_jax. Restore its parameters with config.init_from instead.")
        with tf.io.gfile.GFile(path, "rb") as f:
            saved = np.load(io.BytesIO(f.read()))
        self._begin(Start(int(saved["block"]), int(saved["skip"]),
                          saved["source_state"].tobytes() if saved["has_source_state"] else None,
                          tuple(int(n) for n in saved["skipped"]), int(saved["last_position"])))


@atexit.register
def _close_open_iterators() -> None:
    for iterator in list(_OPEN):
        iterator.close()
