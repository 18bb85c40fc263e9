"""The training pipeline on img2dataset TFRecord and WebDataset shards with faults, and on a TFDS dataset.

Shards 0-2 hold 10 examples each, among them 2 undecodable images, 1 missing image and 2 empty
captions; shard 3 is truncated after 4 of its 6 examples; shard 4 is garbage. One pass therefore
keeps 29 examples and skips 3 bad images, 2 empty captions and 2 bad shards.
"""

import io
import json
import os
import subprocess
import sys
import tarfile
import threading

import ml_collections
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from clippy_jax.data import pipeline, preprocess, sources, writers
from clippy_jax.data.tokenizer import Tokenizer, train_sentencepiece

MEAN, STD = (0.48, 0.46, 0.41), (0.27, 0.26, 0.28)
SIZE, PATCH = 16, 4
GEOMETRY = (PATCH, PATCH)  # (patch size, stride) of the model, for patch dropping
UNDECODABLE, MISSING, EMPTY = {2, 14}, {25}, {5, 17}
TRUNCATED_AFTER = 34  # shard 3 holds 30..35 and is cut inside example 34
USABLE = sorted(set(range(34)) - UNDECODABLE - MISSING - EMPTY)
EXPECTED_SKIPS = dict(bad_image=3, empty_caption=2, bad_shard=2)


def caption(index: int) -> str:
    return f"photo number {index}"


def _image(index: int) -> tuple[bytes, str]:
    """A varied encoded image: RGB/CMYK JPEG, RGB/gray/RGBA PNG, landscape and portrait."""
    rng = np.random.default_rng(index)
    height, width = rng.integers(SIZE, 3 * SIZE, 2)
    array = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    mode, image_format = [("RGB", "JPEG"), ("RGB", "PNG"), ("L", "PNG"), ("RGBA", "PNG"), ("CMYK", "JPEG")][index % 5]
    buffer = io.BytesIO()
    Image.fromarray(array).convert(mode).save(buffer, image_format, quality=90)
    return buffer.getvalue(), "jpg" if image_format == "JPEG" else "png"


def _example(index: int) -> dict:
    image, image_format = _image(index)
    if index in UNDECODABLE:
        image = image[: len(image) // 3] if index % 2 else b"<html>not found</html>"
    text = {5: "", 17: "   "}.get(index, caption(index))
    return dict(key=f"{index:06d}", image=b"" if index in MISSING else image, image_format=image_format, caption=text)


def _write_shards(directory: str, data_format: str) -> None:
    os.makedirs(directory)
    examples = [_example(i) for i in range(36)]
    for shard, start, stop in [(0, 0, 10), (1, 10, 20), (2, 20, 30), (3, 30, 36)]:
        path = os.path.join(directory, f"train-{shard:05d}.{data_format}")
        chunk = examples[start:stop]
        if data_format == "tfrecord":
            records = [writers.img2dataset_record(e["key"], e["image"], e["caption"], e["image_format"],
                                                  url=f"http://x/{e['key']}", status="success", width=1, height=1)
                       if e["image"] else writers.img2dataset_record(e["key"], b"", e["caption"]) for e in chunk]
            writers.write_tfrecord(path, records)
            cut = sum(len(r) + 16 for r in records[: TRUNCATED_AFTER - start]) + 20
        else:
            members = [m for e in chunk for m in writers.webdataset_members(e["key"], e["image"], e["caption"],
                                                                            e["image_format"])
                       if m[1] or not m[0].endswith(("jpg", "png"))]
            writers.write_tar(path, members)
            with tarfile.open(path) as archive:
                cut = {m.name: m.offset_data + 100 for m in archive}.get(f"{TRUNCATED_AFTER:06d}.jpg")
        if shard == 3:  # cut inside example 34
            with open(path, "rb") as f:
                data = f.read()[:cut]
            with open(path, "wb") as f:
                f.write(data)
    with open(os.path.join(directory, f"train-00004.{data_format}"), "wb") as f:
        f.write(np.random.default_rng(0).bytes(3000))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    path = str(tmp_path_factory.mktemp("tokenizer") / "spm.model")
    train_sentencepiece([caption(i) for i in range(100)] + ["a photo", "an image"], path, vocab_size=40)
    return Tokenizer(path, max_length=16)


@pytest.fixture(scope="module", params=["tfrecord", "tar"])
def shards(request, tmp_path_factory) -> ml_collections.ConfigDict:
    directory = str(tmp_path_factory.mktemp("shards") / request.param)
    _write_shards(directory, request.param)
    source = "img2dataset_tfrecord" if request.param == "tfrecord" else "webdataset"
    return data_config(source=source, train_pattern=os.path.join(directory, f"train-*.{request.param}"))


def data_config(**overrides) -> ml_collections.ConfigDict:
    config = dict(source="img2dataset_tfrecord", train_pattern="", image_key="jpg,png", text_key="txt",
                  tfds_name="", tfds_data_dir="", tfds_split="train", crop="random", image_size=SIZE,
                  keep_ratio=1.0, keep_patches=0, mean=MEAN, std=STD, shuffle_buffer=8, interleave=2, prefetch=2,
                  max_input_wait_seconds=300.0, max_consecutive_skips=10_000)
    return ml_collections.ConfigDict({**config, **overrides})


def decode_captions(tokenizer: Tokenizer, tokens: np.ndarray) -> list[str]:
    return [tokenizer.processor.decode([int(t) for t in row if t > 1]) for row in tokens]


def take(iterator, count: int) -> list[dict]:
    return [next(iterator) for _ in range(count)]


def test_one_pass_over_the_sources_has_every_example_and_fault_once(shards):
    elements = list(sources.examples(shards, seed=0, epochs=1).as_numpy_iterator())
    statuses = [int(e["status"]) for e in elements]
    assert statuses.count(sources.BAD_SHARD) == 2
    assert statuses.count(sources.EMPTY_CAPTION) == 2
    assert statuses.count(sources.BAD_IMAGE) == 1  # missing; undecodable bytes are found when decoding
    usable = sorted(e["captions"][0].decode() for e in elements if e["status"] == sources.OK)
    assert usable == sorted(caption(i) for i in [*USABLE, *UNDECODABLE])


def _expected_stream(config, tokenizer, seed: int, count: int) -> tuple[list[str], list[dict]]:
    """The usable captions in order, and the skip counters after each, replayed from the encoded stream."""
    stream, _ = pipeline.shuffled_examples(config, seed)(pipeline.Start())
    undecodable = {_example(i)["image"] for i in UNDECODABLE}
    counts, captions, counters = dict.fromkeys(sources.REASONS, 0), [], []
    for element in stream.as_numpy_iterator():
        if element["status"] != sources.OK:
            counts[sources.REASONS[element["status"] - 1]] += 1
        elif element["image"] in undecodable:
            counts["bad_image"] += 1
        else:
            captions.append(element["captions"][0].decode())
            counters.append({f"data/skipped_{k}": v for k, v in counts.items()})
            if len(captions) == count:
                return captions, counters
    raise AssertionError("the stream ended")


def test_batches_hold_the_usable_examples_in_order_with_their_skip_counters(shards, tokenizer):
    batch, steps = 4, 16  # 64 examples: more than two passes
    iterator = pipeline.InputIterator(pipeline.train_dataset(shards, tokenizer, batch, patch_geometry=GEOMETRY, seed=3))
    captions, counters = [], []
    for _ in range(steps):
        captions += decode_captions(tokenizer, next(iterator)["tokens"])
        counters.append(iterator.counters())
    expected_captions, expected_counters = _expected_stream(shards, tokenizer, 3, batch * steps)
    assert captions == expected_captions
    assert counters == expected_counters[batch - 1 :: batch]
    assert sorted(captions[:29]) != sorted(captions[29:58])  # reshuffled every pass
    for reason, count in EXPECTED_SKIPS.items():  # 64 examples: pass 1 done, pass 3 begun
        assert count <= counters[-1][f"data/skipped_{reason}"] <= 3 * count


def test_each_pass_without_shuffling_holds_every_usable_example_once(shards, tokenizer):
    config = data_config(**{**shards.to_dict(), "shuffle_buffer": 1, "interleave": 1})
    iterator = pipeline.InputIterator(pipeline.train_dataset(config, tokenizer, 1, patch_geometry=GEOMETRY, seed=0))
    counters = []
    for _ in range(2):
        captions = [decode_captions(tokenizer, next(iterator)["tokens"])[0] for _ in range(len(USABLE))]
        assert sorted(captions) == sorted(caption(i) for i in USABLE)
        counters.append(iterator.counters())
    for reason, count in EXPECTED_SKIPS.items():
        # Faults after a pass's last usable example are counted with the next pass.
        assert counters[0][f"data/skipped_{reason}"] <= count <= counters[1][f"data/skipped_{reason}"] <= 2 * count


def _reference_image(index: int) -> np.ndarray:
    image, _ = _image(index)
    decoded = preprocess.decode_rgb(tf.constant(image))
    return preprocess.crop_to_square(decoded, SIZE, None).numpy()


@pytest.mark.parametrize("keep_patches, stride", [(0, PATCH), (7, PATCH), (20, PATCH // 2)])
def test_center_crop_normalisation_and_kept_patches(shards, tokenizer, keep_patches, stride):
    """Kept patches are the windows of the normalised crop at their grid positions, `stride` pixels
    apart (the model's patch_stride)."""
    config = data_config(**{**shards.to_dict(), "crop": "center", "keep_patches": keep_patches})
    batch = next(pipeline.InputIterator(pipeline.train_dataset(config, tokenizer, 8, patch_geometry=(PATCH, stride),
                                                               seed=0)))
    indices = [int(c.split()[-1]) for c in decode_captions(tokenizer, batch["tokens"])]
    assert batch["tokens"].shape == (8, 16) and batch["tokens"].dtype == np.int32
    for row, index in enumerate(indices):
        expected = (_reference_image(index) / 255.0 - np.array(MEAN)) / np.array(STD)
        if not keep_patches:
            assert batch["image"].shape == (8, SIZE, SIZE, 3) and batch["image"].dtype == np.float32
            np.testing.assert_allclose(batch["image"][row], expected, atol=1e-5)
            continue
        patch_indices = batch["patch_indices"][row]
        assert batch["patches"].shape == (8, keep_patches, PATCH * PATCH * 3)
        grid = (SIZE - PATCH) // stride + 1
        assert len(set(patch_indices)) == keep_patches and 0 <= patch_indices.min()
        assert patch_indices.max() < grid**2
        for index, patch in zip(patch_indices, batch["patches"][row]):
            top, left = stride * (index // grid), stride * (index % grid)
            np.testing.assert_allclose(patch, expected[top:top + PATCH, left:left + PATCH].reshape(-1), atol=1e-5)


def test_random_crops_vary_and_the_stream_is_a_function_of_the_seed(shards, tokenizer):
    def batches(seed: int) -> list[dict]:
        dataset = pipeline.train_dataset(shards, tokenizer, 4, patch_geometry=GEOMETRY, seed=seed)
        return take(pipeline.InputIterator(dataset), 3)

    first, again, other = batches(5), batches(5), batches(6)
    for a, b in zip(first, again):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    assert not all(np.array_equal(a["tokens"], b["tokens"]) for a, b in zip(first, other))


def test_processes_read_disjoint_shards(shards, tokenizer):
    per_process = []
    for index in range(2):
        stream = sources.examples(shards, seed=0, process_index=index, process_count=2, epochs=1)
        per_process.append({e["captions"][0] for e in stream.as_numpy_iterator() if e["status"] == sources.OK})
        dataset = pipeline.train_dataset(shards, tokenizer, 2, patch_geometry=GEOMETRY, seed=0, process_index=index,
                                         process_count=2)
        captions = decode_captions(tokenizer, next(pipeline.InputIterator(dataset))["tokens"])
        assert {c.encode() for c in captions} <= per_process[-1]
    assert not per_process[0] & per_process[1]
    assert sorted(per_process[0] | per_process[1]) == sorted(caption(i).encode() for i in [*USABLE, *UNDECODABLE])


def test_restored_iterator_continues_mid_epoch_with_its_counters(shards, tokenizer, tmp_path):
    config = data_config(**{**shards.to_dict(), "keep_patches": 5})
    iterator = pipeline.InputIterator(pipeline.train_dataset(config, tokenizer, 4, patch_geometry=GEOMETRY, seed=1))
    take(iterator, 3)  # 12 of the 29 examples of the first pass
    iterator.save(str(tmp_path))
    saved_counters = iterator.counters()
    expected = take(iterator, 6)
    restored = pipeline.InputIterator(pipeline.train_dataset(config, tokenizer, 4, patch_geometry=GEOMETRY, seed=1))
    restored.restore(str(tmp_path))
    assert restored.counters() == saved_counters
    for want, got in zip(expected, take(restored, 6)):
        assert want.keys() == got.keys() == {"tokens", "patches", "patch_indices"}
        for key in want:
            np.testing.assert_array_equal(want[key], got[key])
    assert restored.counters() == iterator.counters()


def test_unknown_source_and_empty_pattern_fail_naming_them(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="source='laion'"):
        pipeline.train_dataset(data_config(source="laion"), tokenizer, 2, patch_geometry=GEOMETRY, seed=0)
    pattern = str(tmp_path / "nothing-*.tar")
    with pytest.raises(FileNotFoundError, match="nothing-"):
        pipeline.train_dataset(data_config(source="webdataset", train_pattern=pattern), tokenizer, 2,
                               patch_geometry=GEOMETRY, seed=0)


@pytest.mark.parametrize("data_format", ["tfrecord", "tar"])
def test_a_shard_cut_after_start_up_is_counted_or_stops_the_run_but_never_hangs(tmp_path, tokenizer, data_format):
    """A TFRecord shard read short is a bad shard; a tar whose size changed cannot be read in blocks and
    stops the pipeline with the reader's error (errors before decoding are never ignored)."""
    directory = str(tmp_path / "shards")
    _write_shards(directory, data_format)
    source = "img2dataset_tfrecord" if data_format == "tfrecord" else "webdataset"
    config = data_config(source=source, train_pattern=os.path.join(directory, f"train-0000[01].{data_format}"))
    dataset = pipeline.train_dataset(config, tokenizer, 2, patch_geometry=GEOMETRY, seed=0)
    path = os.path.join(directory, f"train-00001.{data_format}")
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) - 700])
    outcome = []

    def read() -> None:
        iterator = pipeline.InputIterator(dataset)
        try:
            take(iterator, 20)
            outcome.append(iterator.counters())
        except tf.errors.InvalidArgumentError as error:
            outcome.append(error)

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    thread.join(timeout=60)
    assert outcome, "the pipeline hung"
    if data_format == "tfrecord":
        assert outcome[0]["data/skipped_bad_shard"] >= 1
    else:
        assert isinstance(outcome[0], tf.errors.InvalidArgumentError) and "train-00001.tar" in str(outcome[0])


def test_each_block_is_a_permutation_of_the_source_stream(shards):
    block = shards.shuffle_buffer
    source = sources.examples(shards, seed=2).take(3 * block).as_numpy_iterator()
    shuffled, _ = pipeline.shuffled_examples(shards, seed=2)(pipeline.Start())
    shuffled = list(shuffled.take(3 * block).as_numpy_iterator())

    def key(element) -> tuple:
        return int(element["status"]), element["image"], tuple(element["captions"])

    source_keys = [key(e) for e in source]
    assert [int(e["position"]) for e in shuffled] == list(range(3 * block))
    for start in range(0, 3 * block, block):
        assert sorted(key(e) for e in shuffled[start : start + block]) == sorted(source_keys[start : start + block])
    assert [key(e) for e in shuffled] != source_keys


def test_iterator_state_does_not_grow_with_the_shuffle_buffer(shards, tokenizer, tmp_path):
    """The state holds no buffered example: a buffer 64x larger (more than the whole data set, ~7 passes)
    leaves it within a few hundred bytes, under 64 KiB, while a single encoded example is ~1 KiB here."""
    sizes = {}
    for shuffle_buffer in (4, 256):
        config = data_config(**{**shards.to_dict(), "shuffle_buffer": shuffle_buffer})
        iterator = pipeline.InputIterator(pipeline.train_dataset(config, tokenizer, 4, patch_geometry=GEOMETRY, seed=0))
        take(iterator, 3)
        directory = tmp_path / str(shuffle_buffer)
        iterator.save(str(directory))
        sizes[shuffle_buffer] = sum(f.stat().st_size for f in directory.iterdir())
    encoded = sum(len(e["image"]) for e in sources.examples(shards, seed=0, epochs=1).as_numpy_iterator())
    assert encoded > 64 * 1024  # the 256-example buffer would hold more than the bound
    assert sizes[256] < 64 * 1024 and sizes[256] <= sizes[4] + 512, sizes


_ALLOCATOR_PROBE = """
import ctypes, ctypes.util, json, resource, sys
import numpy as np
import ml_collections
from clippy_jax.data import pipeline
from clippy_jax.data.tokenizer import Tokenizer

def faults_per_buffer():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(100):
        np.ones(1 << 20, np.uint8)  # 1 MiB, freed at once: 256 fresh pages whenever it is mapped anew
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 100

ctypes.CDLL(ctypes.util.find_library("c")).mallopt(-3, 128 << 10)  # what TensorFlow's generator kernel sets
with_tensorflow_threshold = faults_per_buffer()
config, tokenizer_path, patch_geometry = json.loads(sys.argv[1])
dataset = pipeline.train_dataset(ml_collections.ConfigDict(config), Tokenizer(tokenizer_path, 16), 4, seed=0,
                                 patch_geometry=tuple(patch_geometry))
next(pipeline.InputIterator(dataset))
print(json.dumps([with_tensorflow_threshold, faults_per_buffer()]))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_the_pipeline_leaves_large_buffers_reused_not_mapped_anew(tokenizer, tmp_path):
    """TensorFlow's generator kernel fixes glibc's mmap threshold at 128 KiB, after which every freed
    1 MiB buffer is unmapped and faults in 256 fresh pages when allocated again (the control, measured
    first in the same fresh process). After the pipeline's iterator is made, such buffers are reused."""
    directory = str(tmp_path / "shards")
    _write_shards(directory, "tfrecord")
    config = data_config(train_pattern=os.path.join(directory, "train-*.tfrecord"))
    tokenizer_path = tmp_path / "spm.model"
    tokenizer_path.write_bytes(tokenizer.model_proto)
    # Without glibc tunables: with `glibc.malloc.hugetlb=1` (the Makefile's) a mapped 1 MiB chunk is one
    # huge page and the control would not show the threshold.
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    probe = subprocess.run([sys.executable, "-c", _ALLOCATOR_PROBE,
                            json.dumps([config.to_dict(), str(tokenizer_path), GEOMETRY])],
                           capture_output=True, text=True, check=True, env=env)
    with_tensorflow_threshold, with_pipeline = json.loads(probe.stdout.splitlines()[-1])
    assert with_tensorflow_threshold > 200, with_tensorflow_threshold
    assert with_pipeline < 10, with_pipeline
