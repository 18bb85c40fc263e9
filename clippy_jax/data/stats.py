"""Per-channel pixel mean and standard deviation of a training set, for `data.mean` / `data.std`.

  python -m clippy_jax.data.stats --pattern='gs://bucket/cc12m/*.tfrecord' --source=img2dataset_tfrecord \
      --num_examples=20000 [--image_key=jpg] [--seed=0] [--output=stats.json]
  python -m clippy_jax.data.stats --source=tfds --tfds_name=coco_captions --image_key=image \
      --text_key=captions/text --num_examples=20000

Reads shards in a seeded random order, one pass, until `num_examples` usable examples (those the
training pipeline keeps: a caption and a decodable image) have been seen, and reduces their
decoded pixels, every pixel weighted equally, in float64. Values are on the [0, 1] scale that
`preprocess.normalize` uses (paper appendix C: "statistics derived from our full training corpus").
"""

import json

import ml_collections
import numpy as np
import tensorflow as tf
from absl import app, flags

from clippy_jax.data import preprocess, sources


def _moments(image: tf.Tensor) -> tf.Tensor:
    """uint8 [H, W, 3] -> float64 [3, 3]: rows pixel count, sum and sum of squares per channel."""
    pixels = tf.cast(tf.reshape(image, [-1, 3]), tf.float64) / 255.0
    count = tf.cast(tf.fill([3], tf.shape(pixels)[0]), tf.float64)
    return tf.stack([count, tf.reduce_sum(pixels, 0), tf.reduce_sum(pixels**2, 0)])


def compute(data_config: ml_collections.ConfigDict, num_examples: int, seed: int = 0) -> dict:
    """{mean, std (per channel, [0, 1] scale), examples} over up to `num_examples` usable examples."""
    examples = sources.examples(data_config, seed, epochs=1)
    usable = examples.filter(lambda e: e["status"] == sources.OK)
    images = usable.map(lambda e: _moments(preprocess.decode_rgb(e["image"])),
                        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).ignore_errors()
    totals, seen = np.zeros([3, 3]), 0
    for moments in images.take(num_examples).as_numpy_iterator():
        totals += moments
        seen += 1
    if not seen:
        raise ValueError("No usable examples (with a caption and a decodable image) were found.")
    count, total, squares = totals
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean**2, 0.0))
    return dict(mean=mean.tolist(), std=std.tolist(), examples=seen, pixels_per_channel=int(count[0]))


def define_flags() -> None:
    """The command's flags (defined only when run as a command, so the module imports cleanly)."""
    flags.DEFINE_string("pattern", "", "Glob pattern of the shards (file sources).")
    flags.DEFINE_enum("source", "img2dataset_tfrecord", [*sources.FILE_SOURCES, "tfds"], "Data source.")
    flags.DEFINE_integer("num_examples", 10_000, "Usable examples to reduce over.")
    flags.DEFINE_string("image_key", "jpg", "Image feature / extension; comma-separated alternatives.")
    flags.DEFINE_string("text_key", "txt", "Caption features, comma-separated.")
    flags.DEFINE_string("tfds_name", "", "source=tfds: dataset name.")
    flags.DEFINE_string("tfds_data_dir", "", "source=tfds: data directory.")
    flags.DEFINE_string("tfds_split", "train", "source=tfds: split.")
    flags.DEFINE_integer("interleave", 16, "Shards read at a time.")
    flags.DEFINE_integer("seed", 0, "Seed of the shard order.")
    flags.DEFINE_string("output", "", "Optional JSON output path.")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    options = flags.FLAGS
    keys = ("source", "image_key", "text_key", "tfds_name", "tfds_data_dir", "tfds_split", "interleave")
    config = ml_collections.ConfigDict(dict(train_pattern=options.pattern, **{k: options[k].value for k in keys}))
    result = compute(config, options.num_examples, options.seed)
    print(f"{result['examples']} examples: mean={tuple(round(m, 4) for m in result['mean'])} "
          f"std={tuple(round(s, 4) for s in result['std'])}")
    if options.output:
        with tf.io.gfile.GFile(options.output, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    define_flags()
    app.run(main)
