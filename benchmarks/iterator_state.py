"""Size of the input iterator's checkpoint and the time its save blocks the train loop.

  python benchmarks/iterator_state.py --setting=paper [--data_dir=/tmp/clippy_iterator_state]
  python benchmarks/iterator_state.py --setting=demo    # configs/demo.py's data (tiny: the tests' run)

`paper`: the paper's data settings (shuffle buffer 20k, 448 px with 80% of the patches dropped,
batch 256 per host, 16-shard interleave, prefetch 4) over img2dataset TFRecord shards of synthetic
448-640 px JPEGs (written once; distinct photos repeat under distinct captions). `demo` / `tiny`:
the demo's synthetic data at `configs/demo.py`'s (or `:size=tiny`'s) batch size. After --batches_before_save
batches the iterator is saved (the wall time of `InputIterator.save` is what the loop waits for),
restored into a fresh pipeline, and the next batch of both is compared bit for bit.
"""

import importlib.util
import os
import shutil
import sys
import time

import ml_collections
import numpy as np
import tensorflow as tf
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script from anywhere
from clippy_jax.data import demo_data, pipeline, writers  # noqa: E402
from clippy_jax.data.tokenizer import Tokenizer, train_sentencepiece  # noqa: E402
from clippy_jax.models import tower_kwargs  # noqa: E402
from clippy_jax.models.vit import patch_geometry  # noqa: E402

_SETTING = flags.DEFINE_enum("setting", "paper", ["tiny", "demo", "paper"], "Data settings to measure.")
_DATA_DIR = flags.DEFINE_string("data_dir", "/tmp/clippy_iterator_state", "Where the shards are written.")
_TAKEN = flags.DEFINE_integer("batches_before_save", 3, "Batches taken before the save.")

PAPER_SHARDS, PAPER_PHOTOS, PAPER_RECORDS = 16, 512, 24_000


def _benchmark_pipeline_module():
    """benchmarks/pipeline.py (its synthetic photo writer)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pipeline.py")
    spec = importlib.util.spec_from_file_location("benchmarks_pipeline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def paper_data(directory: str) -> tuple[ml_collections.ConfigDict, int, float]:
    """(data config, local batch size, mean JPEG bytes) of the paper's settings over synthetic shards."""
    marker = os.path.join(directory, "COMPLETE")
    if not os.path.exists(marker):
        os.makedirs(directory, exist_ok=True)
        rng = np.random.default_rng(0)
        photo = _benchmark_pipeline_module()._photo  # noqa: SLF001
        photos = [photo(rng, 448, 640) for _ in range(PAPER_PHOTOS)]
        captions = [f"photo {i} of {rng.choice(['a cat', 'two dogs', 'the sea', 'a red car'])}"
                    for i in range(PAPER_RECORDS)]
        for shard, indices in enumerate(np.array_split(np.arange(PAPER_RECORDS), PAPER_SHARDS)):
            writers.write_tfrecord(os.path.join(directory, f"{shard:05d}.tfrecord"), [
                writers.img2dataset_record(f"{i:09d}", photos[i % PAPER_PHOTOS], captions[i]) for i in indices])
        train_sentencepiece(captions, os.path.join(directory, "tokenizer.model"), vocab_size=256)
        with open(marker, "w") as f:
            f.write(f"{np.mean([len(p) for p in photos]):.0f}\n")
    with open(marker) as f:
        mean_bytes = float(f.read())
    config = ml_collections.ConfigDict(dict(
        source="img2dataset_tfrecord", train_pattern=os.path.join(directory, "*.tfrecord"), image_key="jpg",
        text_key="txt", tfds_name="", tfds_data_dir="", tfds_split="train", crop="random", image_size=448,
        keep_ratio=0.2, keep_patches=0, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), max_text_length=64,
        shuffle_buffer=20_000, interleave=16, prefetch=4, tokenizer_path=os.path.join(directory, "tokenizer.model"),
        max_input_wait_seconds=900.0, max_consecutive_skips=10_000,
    ))  # configs/paper.py's data settings
    return config, (16, 16), 256, mean_bytes  # ViT-B/16's patches


def demo_settings(size: str, directory: str) -> tuple[ml_collections.ConfigDict, tuple[int, int], int, float]:
    spec = importlib.util.spec_from_file_location(
        "demo", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "demo.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(f"size={size}")
    config.data.synthetic.directory = os.path.join(directory, f"demo_{size}")
    geometry = patch_geometry(tower_kwargs(config.model.image, config.model.text)[0])
    data = demo_data.prepare_data(demo_data.data_paths(config, directory))
    return data, geometry, config.train.batch_size, float("nan")


def _directory_bytes(directory: str) -> int:
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(directory) for f in files)


def main(argv: list[str]) -> None:
    del argv
    tf.config.set_visible_devices([], "GPU")
    directory = _DATA_DIR.value
    if _SETTING.value == "paper":
        config, geometry, batch, mean_bytes = paper_data(os.path.join(directory, "paper"))
    else:
        config, geometry, batch, mean_bytes = demo_settings(_SETTING.value, directory)
    tokenizer = Tokenizer(config.tokenizer_path, config.max_text_length)
    iterator = pipeline.InputIterator(pipeline.train_dataset(config, tokenizer, batch, patch_geometry=geometry, seed=0))
    start = time.perf_counter()
    for _ in range(_TAKEN.value):
        next(iterator)
    first = time.perf_counter() - start
    state_dir = os.path.join(directory, f"state_{_SETTING.value}")
    shutil.rmtree(state_dir, ignore_errors=True)
    start = time.perf_counter()
    iterator.save(state_dir)
    save_seconds = time.perf_counter() - start
    state_bytes = _directory_bytes(state_dir)
    expected = next(iterator)
    restored = pipeline.InputIterator(pipeline.train_dataset(config, tokenizer, batch, patch_geometry=geometry, seed=0))
    start = time.perf_counter()
    restored.restore(state_dir)
    got = next(restored)
    restore_seconds = time.perf_counter() - start
    exact = all(np.array_equal(expected[k], got[k]) for k in expected) and restored.counters() == iterator.counters()
    print(f"| setting | shuffle buffer | batch | image size | mean JPEG | iterator state | save (blocks the loop) "
          f"| restore + first batch | first {_TAKEN.value} batches | next batch bit-identical after restore |\n"
          "|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {_SETTING.value} | {config.shuffle_buffer} | {batch} | {config.image_size} | {mean_bytes / 1024:.0f} KiB "
          f"| {state_bytes / 2**20:.3f} MiB ({state_bytes:,} B) | {save_seconds:.3f} s | {restore_seconds:.1f} s "
          f"| {first:.1f} s | {exact} |")


if __name__ == "__main__":
    app.run(main)
