"""Writes the synthetic demo dataset to disk, once, in the formats the real pipelines read.

The training split is TFRecord shards in img2dataset's layout (`jpg`, `txt`, `key`, `width`,
`height`); the held-out split adds PNG `segmentation` and `instances` masks and the `labels` of
the instances. A SentencePiece model is trained on the training captions. TensorFlow is imported by
the functions that write and read the records only: `data_paths` (model loading, inference) runs without it.
"""

import concurrent.futures
import functools
import multiprocessing
import os

import ml_collections
import numpy as np
from absl import logging
from etils import epath

from clippy_jax.data import synthetic
from clippy_jax.data.tokenizer import train_sentencepiece

COMPLETE_MARKER = "COMPLETE"


def _serialize(example: dict, with_masks: bool) -> bytes:
    import tensorflow as tf  # noqa: PLC0415 (see the module docstring)

    def _bytes(*values: bytes) -> tf.train.Feature:
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=list(values)))

    def _ints(*values: int) -> tf.train.Feature:
        return tf.train.Feature(int64_list=tf.train.Int64List(value=list(values)))

    features = dict(
        key=_bytes(example["key"].encode()),
        jpg=_bytes(example["jpg"]),
        txt=_bytes(example["txt"].encode()),
        width=_ints(example["width"]),
        height=_ints(example["height"]),
    )
    if with_masks:
        features.update(
            segmentation=_bytes(example["segmentation"]),
            instances=_bytes(example["instances"]),
            labels=_ints(*example["labels"]),
        )
    return tf.train.Example(features=tf.train.Features(feature=features)).SerializeToString()


def _write_split(directory: str, split: str, seed: int, count: int, num_shards: int, image_size: int,
                 pool: concurrent.futures.Executor) -> list[str]:
    """Writes `count` examples of a split; returns their captions."""
    import tensorflow as tf  # noqa: PLC0415 (see the module docstring)

    encode = functools.partial(synthetic.encode_example, seed, image_size=image_size)
    captions = []
    bounds = np.linspace(0, count, num_shards + 1).astype(int)
    for shard, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:])):
        path = os.path.join(directory, f"{split}-{shard:05d}-of-{num_shards:05d}.tfrecord")
        with tf.io.TFRecordWriter(path) as writer:
            for example in pool.map(encode, range(start, stop), chunksize=64):
                writer.write(_serialize(example, with_masks=split != "train"))
                captions.append(example["txt"])
    return captions


def ensure_demo_data(config: ml_collections.ConfigDict, directory: str) -> str:
    """Generates the demo data into `directory` unless a complete copy is already there."""
    if epath.Path(directory, COMPLETE_MARKER).exists():
        logging.info("Demo data found in %s.", directory)
        return directory
    logging.info("Generating the synthetic demo data into %s ...", directory)
    epath.Path(directory).mkdir(parents=True, exist_ok=True)
    workers = config.workers or os.cpu_count() or 1
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        captions = _write_split(directory, "train", config.seed, config.train_examples, config.train_shards,
                                config.image_size, pool)
        _write_split(directory, "eval", config.seed + 1, config.eval_examples, 1, config.image_size, pool)
    train_sentencepiece(captions, os.path.join(directory, "tokenizer.model"), config.vocab_size)
    epath.Path(directory, COMPLETE_MARKER).write_text(f"{config.train_examples} train, {config.eval_examples} eval\n")
    return directory


def load_eval_split(pattern: str) -> dict[str, np.ndarray]:
    """The labelled held-out split as arrays: image uint8 [N, H, W, 3], segmentation and instances
    uint8 [N, H, W], largest_label int [N] (category of the largest visible instance), caption."""
    import tensorflow as tf  # noqa: PLC0415 (see the module docstring)

    features = dict(
        jpg=tf.io.FixedLenFeature([], tf.string),
        txt=tf.io.FixedLenFeature([], tf.string),
        segmentation=tf.io.FixedLenFeature([], tf.string),
        instances=tf.io.FixedLenFeature([], tf.string),
        labels=tf.io.VarLenFeature(tf.int64),
    )
    images, segmentations, instances, largest, captions = [], [], [], [], []
    for record in tf.data.TFRecordDataset(sorted(tf.io.gfile.glob(pattern))):
        example = tf.io.parse_single_example(record, features)
        images.append(tf.io.decode_image(example["jpg"], channels=3).numpy())
        segmentations.append(tf.io.decode_png(example["segmentation"])[..., 0].numpy())
        inst = tf.io.decode_png(example["instances"])[..., 0].numpy()
        instances.append(inst)
        labels = tf.sparse.to_dense(example["labels"]).numpy()
        areas = np.bincount(inst.ravel(), minlength=len(labels) + 1)[1:]
        largest.append(int(labels[np.argmax(areas)]))
        captions.append(example["txt"].numpy().decode())
    if not images:
        raise FileNotFoundError(f"No evaluation examples match {pattern!r}.")
    return dict(image=np.stack(images), segmentation=np.stack(segmentations), instances=np.stack(instances),
                largest_label=np.asarray(largest), caption=np.asarray(captions))


def data_paths(config: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
    """The `data` section with concrete paths (for the synthetic demo, those of its data folder); writes nothing."""
    data = ml_collections.ConfigDict(config.data.to_dict())
    if data.source == "synthetic":
        directory = data.synthetic.directory or os.path.join(workdir, "data")
        data.train_pattern = os.path.join(directory, "train-*.tfrecord")
        data.eval_pattern = os.path.join(directory, "eval-*.tfrecord")
        data.tokenizer_path = os.path.join(directory, "tokenizer.model")
    return data


def prepare_data(data: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The `data` section resolved by `data_paths`, after generating the synthetic demo data on first use."""
    if data.source == "synthetic":
        ensure_demo_data(data.synthetic, os.path.dirname(data.tokenizer_path))
    required = ("tokenizer_path",) if data.source == "tfds" else ("train_pattern", "tokenizer_path")
    for key in required:
        if not data.get(key):
            raise ValueError(
                f"config.data.{key} is required for data.source={data.source!r}; pass --config.data.{key}=..."
            )
    return data
