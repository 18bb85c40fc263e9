"""tf.data input pipelines: image-text training shards and the demo's labelled evaluation split.

Training shards use img2dataset's TFRecord layout (features `jpg` or `png`, `txt`, `key`). Each
process reads a disjoint, deterministic subset of the files and yields its slice of the global
batch; randomness is stateless per example, so the stream is a pure function of the seed, and the
iterator state is saved with every checkpoint (`InputIterator.save` / `restore`).
"""

import os

import ml_collections
import numpy as np
import tensorflow as tf

from clippy_jax.data import preprocess
from clippy_jax.data.tokenizer import Tokenizer

AUTOTUNE = tf.data.AUTOTUNE


def list_files(pattern: str) -> list[str]:
    """Sorted files matching a local or `gs://` glob pattern; fails naming the pattern if none."""
    files = sorted(tf.io.gfile.glob(pattern))
    if not files:
        raise FileNotFoundError(f"No files match the data pattern {pattern!r}; check config.data paths.")
    return files


def process_files(files: list[str], process_index: int, process_count: int) -> list[str]:
    """The disjoint subset of shards read by one process."""
    if len(files) < process_count:
        raise ValueError(f"{len(files)} shards cannot be split over {process_count} processes; write more shards.")
    return files[process_index::process_count]


def parse_image_text(record: tf.Tensor, image_key: str, text_key: str) -> dict[str, tf.Tensor]:
    features = {image_key: tf.io.FixedLenFeature([], tf.string), text_key: tf.io.FixedLenFeature([], tf.string)}
    parsed = tf.io.parse_single_example(record, features)
    return dict(image=parsed[image_key], text=parsed[text_key])


def train_dataset(
    config: ml_collections.ConfigDict,
    tokenizer: Tokenizer,
    local_batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
) -> tf.data.Dataset:
    """Endless batches {image [B, S, S, 3] | patches, patch_indices; tokens [B, L]} for one process."""
    files = process_files(list_files(config.train_pattern), process_index, process_count)
    keep = preprocess.kept_patch_count(config.image_size, config.patch_size, config.keep_ratio, config.keep_patches)
    base_seed = tf.constant([seed, process_index], tf.int64)

    def prepare(index: tf.Tensor, example: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        crop_seed, drop_seed = tf.unstack(tf.random.experimental.stateless_split(
            tf.random.experimental.stateless_fold_in(base_seed, index), 2))
        image = preprocess.resize_shortest_side(preprocess.decode_rgb(example["image"]), config.image_size)
        image = preprocess.crop_square(image, config.image_size, crop_seed)
        image = preprocess.normalize(image, config.mean, config.std)
        image = tf.ensure_shape(image, [config.image_size, config.image_size, 3])
        out = dict(tokens=tokenizer.tf_encode(example["text"]))
        if keep is None:
            out["image"] = image
        else:
            out.update(preprocess.drop_patches(image, config.patch_size, keep, drop_seed))
        return out

    records = tf.data.Dataset.from_tensor_slices(files).shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
    records = records.repeat()
    records = records.interleave(
        tf.data.TFRecordDataset, cycle_length=min(len(files), config.interleave), num_parallel_calls=AUTOTUNE,
        deterministic=True,
    )
    records = records.shuffle(config.shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    examples = records.map(lambda r: parse_image_text(r, config.image_key, config.text_key))
    examples = examples.enumerate().map(prepare, num_parallel_calls=AUTOTUNE, deterministic=True)
    return examples.batch(local_batch_size, drop_remainder=True).prefetch(config.prefetch)


class InputIterator:
    """A numpy iterator over a tf.data pipeline whose position can be checkpointed."""

    def __init__(self, dataset: tf.data.Dataset):
        self._iterator = iter(dataset)
        self._checkpoint = tf.train.Checkpoint(iterator=self._iterator)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return {k: v.numpy() for k, v in next(self._iterator).items()}

    def save(self, directory: str) -> None:
        tf.io.gfile.makedirs(directory)
        self._checkpoint.write(os.path.join(directory, "iterator"))

    def restore(self, directory: str) -> None:
        self._checkpoint.read(os.path.join(directory, "iterator")).assert_consumed()
