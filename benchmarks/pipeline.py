"""Training-pipeline throughput on one CPU core: images/s for 256-512 px JPEGs at 224 and at 448 with
80% of the patches dropped, from img2dataset TFRecord and WebDataset shards.

  taskset -c 0 .venv/bin/python benchmarks/pipeline.py [--threads=1] [--batches=20]

Writes (once) shards of natural-looking JPEGs (smooth colour fields with edges and noise, about the
size of img2dataset's resized web images) under --workdir, then times whole batches out of
`pipeline.train_dataset` (read, shuffle, decode, crop, resize, normalise, patch-drop, tokenize)
with tf.data's thread pool limited to --threads. Run `taskset -c 0` so that nothing else (Python,
TensorFlow's other pools) borrows a second core. Images per CPU-second (this process's CPU time)
is the per-core rate without the time lost to other processes on a shared machine.
"""

import io
import os
import sys
import time

import ml_collections
import numpy as np
import tensorflow as tf
from absl import app, flags
from PIL import Image, ImageDraw, ImageFilter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script from anywhere
from clippy_jax.data import pipeline, writers  # noqa: E402
from clippy_jax.data.tokenizer import Tokenizer, train_sentencepiece  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", "/tmp/clippy_pipeline_benchmark", "Where the shards are written.")
_NUM_IMAGES = flags.DEFINE_integer("num_images", 2048, "Images written (in 8 shards per format).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "Local batch size.")
_BATCHES = flags.DEFINE_integer("batches", 20, "Timed batches per configuration (after 3 warm-up batches).")
_THREADS = flags.DEFINE_integer("threads", 1, "tf.data private thread-pool size.")

NUM_SHARDS = 8
WARMUP_BATCHES = 3
PATCH_GEOMETRY = (16, 16)  # ViT-B/16: (patch size, stride)
# (label, image_size, keep_ratio)
SETTINGS = [("224", 224, 1.0), ("448, keep 20%", 448, 0.2)]
FORMATS = [("img2dataset_tfrecord", "tfrecord"), ("webdataset", "tar")]


def _photo(rng: np.random.Generator, low: int = 256, high: int = 512) -> bytes:
    """A JPEG of `low`-`high` px per side with smooth regions, shapes and sensor-like noise."""
    height, width = (int(s) for s in rng.integers(low, high + 1, 2))
    low = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    image = Image.fromarray(low).resize((width, height), Image.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        box = (x0, y0, x0 + int(rng.integers(20, 200)), y0 + int(rng.integers(20, 200)))
        draw.ellipse(box, fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    image = image.filter(ImageFilter.GaussianBlur(1))
    noisy = np.asarray(image, np.int16) + rng.normal(0, 4, (height, width, 3)).astype(np.int16)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _write_shards(directory: str, num_images: int) -> tuple[list[str], float]:
    """Writes both formats once; returns the captions and the mean JPEG size in bytes."""
    rng = np.random.default_rng(0)
    captions = [f"a photo of {rng.choice(['a cat', 'two dogs', 'the sea', 'a red car'])} number {i}"
                for i in range(num_images)]
    marker = os.path.join(directory, "COMPLETE")
    if not os.path.exists(marker):
        os.makedirs(directory, exist_ok=True)
        photos = [_photo(rng) for _ in range(num_images)]
        for shard, indices in enumerate(np.array_split(np.arange(num_images), NUM_SHARDS)):
            keys = [f"{i:09d}" for i in indices]
            writers.write_tfrecord(os.path.join(directory, f"{shard:05d}.tfrecord"), [
                writers.img2dataset_record(k, photos[i], captions[i]) for k, i in zip(keys, indices)])
            writers.write_tar(os.path.join(directory, f"{shard:05d}.tar"), [
                m for k, i in zip(keys, indices) for m in writers.webdataset_members(k, photos[i], captions[i])])
        train_sentencepiece(captions, os.path.join(directory, "tokenizer.model"), vocab_size=256)
        with open(marker, "w") as f:
            f.write(f"{np.mean([len(p) for p in photos]):.0f}\n")
    with open(marker) as f:
        return captions, float(f.read())


def _throughput(config: ml_collections.ConfigDict, tokenizer: Tokenizer) -> tuple[float, float]:
    """(images per second of wall time, images per second of this process's CPU time)."""
    options = tf.data.Options()
    options.threading.private_threadpool_size = _THREADS.value
    options.threading.max_intra_op_parallelism = 1
    dataset = pipeline.train_dataset(config, tokenizer, _BATCH_SIZE.value, patch_geometry=PATCH_GEOMETRY, seed=0)
    dataset = dataset.with_options(options)
    iterator = iter(dataset)
    for _ in range(WARMUP_BATCHES):
        next(iterator)
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(_BATCHES.value):
        {k: v.numpy() for k, v in next(iterator).items()}
    images = _BATCHES.value * _BATCH_SIZE.value
    return images / (time.perf_counter() - wall), images / (time.process_time() - cpu)


def main(argv: list[str]) -> None:
    del argv
    tf.config.set_visible_devices([], "GPU")
    directory = _WORKDIR.value
    _, mean_bytes = _write_shards(directory, _NUM_IMAGES.value)
    tokenizer = Tokenizer(os.path.join(directory, "tokenizer.model"), max_length=64)
    cores = len(os.sched_getaffinity(0))
    print(f"{_NUM_IMAGES.value} JPEGs of 256-512 px (mean {mean_bytes / 1024:.0f} KiB), batch {_BATCH_SIZE.value}, "
          f"tf.data threads {_THREADS.value}, {cores} core(s) allowed, load average "
          f"{os.getloadavg()[0]:.2f}, TensorFlow {tf.__version__}")
    print("| source | resolution | images/s (wall) | images per CPU-second |\n|---|---|---|---|")
    for source, extension in FORMATS:
        for label, image_size, keep_ratio in SETTINGS:
            config = ml_collections.ConfigDict(dict(
                source=source, train_pattern=os.path.join(directory, f"*.{extension}"), image_key="jpg",
                text_key="txt", tfds_name="", tfds_data_dir="", tfds_split="train", crop="random",
                image_size=image_size, keep_ratio=keep_ratio, keep_patches=0, mean=(0.5, 0.5, 0.5),
                std=(0.25, 0.25, 0.25), shuffle_buffer=1000, interleave=NUM_SHARDS, prefetch=2,
                max_input_wait_seconds=300.0, max_consecutive_skips=10_000,
            ))
            wall, cpu = _throughput(config, tokenizer)
            print(f"| {source} | {label} | {wall:.0f} | {cpu:.0f} |", flush=True)


if __name__ == "__main__":
    app.run(main)
