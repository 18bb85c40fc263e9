"""Training data that cannot give a batch fails fast and by name: shard checks at start-up, the
input watchdog (time and consecutive skips), key matching (case, WebP, a JSON caption field)."""

import io
import json
import os
import re
import signal
import subprocess
import tarfile
import threading
import time

import numpy as np
import pytest
from PIL import Image

from clippy_jax.data import pipeline, sources, writers
from clippy_jax.data.tokenizer import Tokenizer, train_sentencepiece
from tests.helpers import REPO, main_command, run_main
from tests.test_pipeline import GEOMETRY, data_config, decode_captions

CAPTIONS = [f"a \"quoted\" photo\\ number {i}/{i} é 日本" for i in range(12)]


def _encoded(index: int, image_format: str) -> bytes:
    array = np.random.default_rng(index).integers(0, 256, (20, 24, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, image_format)
    return buffer.getvalue()


def _tar(path: str, extension: str = "jpg", image_format: str = "JPEG", images: bool = True) -> None:
    members = []
    for i, text in enumerate(CAPTIONS):
        image = _encoded(i, image_format) if images else b""
        members += [(name, data) for name, data in writers.webdataset_members(f"{i:04d}", image, text, extension)
                    if data]
    writers.write_tar(path, members)


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("tokenizer") / "spm.model")
    train_sentencepiece(CAPTIONS + ["a photo", "an image"], path, vocab_size=48)
    return path


@pytest.fixture(scope="module")
def tokenizer(tokenizer_path) -> Tokenizer:
    return Tokenizer(tokenizer_path, max_length=64)


def _first_batch(config, tokenizer, **iterator_options) -> dict:
    dataset = pipeline.train_dataset(config, tokenizer, 4, patch_geometry=GEOMETRY, seed=0)
    return next(pipeline.InputIterator(dataset, **iterator_options))


@pytest.mark.parametrize(("name", "content", "fault"), [
    ("garbage.tar", np.random.default_rng(0).bytes(3000), "not a tar archive"),
    ("empty.tar", b"", "empty (0 bytes)"),
    ("shard.tar.gz", b"\x1f\x8b\x08\x00" + bytes(600), "gzip-compressed"),
])
def test_no_readable_shard_fails_at_start_up_naming_the_pattern_and_fault(tmp_path, tokenizer, name, content,
                                                                          fault):
    (tmp_path / name).write_bytes(content)
    pattern = str(tmp_path / "*")
    with pytest.raises(sources.DataError, match=f"train_pattern={re.escape(repr(pattern))}.*{re.escape(fault)}"):
        pipeline.train_dataset(data_config(source="webdataset", train_pattern=pattern), tokenizer, 2,
                               patch_geometry=GEOMETRY, seed=0)


def test_stray_files_are_named_in_the_log(tmp_path, tokenizer, caplog):
    _tar(str(tmp_path / "00000.tar"))
    (tmp_path / "00000.parquet").write_bytes(b"PAR1" + bytes(100) + b"PAR1")
    (tmp_path / "00000_stats.json").write_text("{}")
    config = data_config(source="webdataset", train_pattern=str(tmp_path / "*"))
    with caplog.at_level("WARNING"):
        assert _first_batch(config, tokenizer)["image"].shape == (4, 16, 16, 3)
    assert "2 of 3 shards" in caplog.text and "00000.parquet" in caplog.text and "00000_stats.json" in caplog.text


@pytest.mark.parametrize(("source", "key", "found"), [("webdataset", "image_key", "jpg"),
                                                      ("webdataset", "text_key", "txt"),
                                                      ("img2dataset_tfrecord", "image_key", "jpg")])
def test_a_key_the_shards_lack_fails_at_start_up_naming_what_they_hold(tmp_path, tokenizer, source, key, found):
    if source == "webdataset":
        _tar(str(tmp_path / "00000.tar"))
    else:
        writers.write_tfrecord(str(tmp_path / "00000.tfrecord"),
                               [writers.img2dataset_record(f"{i}", _encoded(i, "JPEG"), c)
                                for i, c in enumerate(CAPTIONS)])
    config = data_config(source=source, train_pattern=str(tmp_path / "0*"), **{key: "png" if key == "image_key"
                                                                                else "caption"})
    start = time.monotonic()
    with pytest.raises(sources.DataError, match=f"config.data.{key}=.*'{found}'.*e.g. --config.data.{key}={found}"):
        pipeline.train_dataset(config, tokenizer, 2, patch_geometry=GEOMETRY, seed=0)
    assert time.monotonic() - start < 60


@pytest.mark.parametrize(("extension", "image_format"), [("JPG", "JPEG"), ("webp", "WEBP"), ("jpeg", "JPEG")])
def test_extensions_match_without_case_and_the_default_keys_cover_webp_and_jpeg(tmp_path, tokenizer, extension,
                                                                               image_format):
    _tar(str(tmp_path / "00000.tar"), extension, image_format)
    config = data_config(source="webdataset", train_pattern=str(tmp_path / "*.tar"), image_key="jpg,jpeg,png,webp",
                         shuffle_buffer=1, interleave=1, crop="center")
    batch = _first_batch(config, tokenizer)
    # Independent reference: PIL's decoding, resized and normalised in float64.
    reference = np.asarray(Image.open(io.BytesIO(_encoded(0, image_format))).convert("RGB"), np.float64)
    assert batch["image"].shape == (4, 16, 16, 3)
    side = min(reference.shape[:2])
    left = (reference.shape[1] - side) // 2
    expected = (np.asarray(Image.fromarray(reference[:, left:left + side].astype(np.uint8)).resize(
        (16, 16), Image.BILINEAR), np.float64) / 255 - np.array(config.mean)) / np.array(config.std)
    assert np.abs(batch["image"][0] - expected).mean() < 0.2


def test_a_json_field_can_be_the_caption(tmp_path, tokenizer):
    _tar(str(tmp_path / "00000.tar"))
    config = data_config(source="webdataset", train_pattern=str(tmp_path / "*.tar"), text_key="json:caption",
                         shuffle_buffer=1, interleave=1)
    captions = decode_captions(tokenizer, _first_batch(config, tokenizer)["tokens"])
    # The reference: json.loads of the members (quotes, a backslash, a slash and \\uXXXX escapes in the captions).
    with tarfile.open(tmp_path / "00000.tar") as archive:
        expected = [json.loads(archive.extractfile(f"{i:04d}.json").read())["caption"] for i in range(4)]
    processor = tokenizer.processor
    assert captions == [processor.decode([t for t in processor.encode(e) if t > 1]) for e in expected]
    assert all("é" in c for c in captions)
    with pytest.raises(sources.DataError, match="have no field 'title'"):
        pipeline.train_dataset(data_config(source="webdataset", train_pattern=str(tmp_path / "*.tar"),
                                           text_key="json:title"), tokenizer, 2, patch_geometry=GEOMETRY, seed=0)


def test_shards_whose_images_do_not_decode_stop_at_start_up_with_the_count_and_the_first_error(tmp_path, tokenizer):
    writers.write_tar(str(tmp_path / "00000.tar"),
                      [m for i in range(8) for m in writers.webdataset_members(f"{i:04d}", b"<html>404</html>", "x")])
    config = data_config(source="webdataset", train_pattern=str(tmp_path / "*.tar"))
    start = time.monotonic()
    with pytest.raises(sources.DataError, match=r"None of the first 8 images of .*00000.tar .* decodes "
                                                r"\(bad_image=8; the first error: Unknown image file format\. One of"):
        _first_batch(config, tokenizer)
    assert time.monotonic() - start < 20


def test_undecodable_images_are_counted_as_they_are_skipped(tmp_path, tokenizer):
    # One image that decodes, then 80 that do not: the start-up check passes, the stream stops at the
    # consecutive-skip limit with every undecodable image counted.
    writers.write_tar(str(tmp_path / "00000.tar"), [
        m for i in range(81) for m in writers.webdataset_members(
            f"{i:04d}", _encoded(i, "JPEG") if i == 0 else b"<html>404</html>", "x")])
    config = data_config(source="webdataset", train_pattern=str(tmp_path / "*.tar"), max_consecutive_skips=50,
                         shuffle_buffer=1)
    with pytest.raises(pipeline.InputStalledError, match=r"50 consecutive records were skipped.*bad_image=50,"):
        _first_batch(config, tokenizer, max_wait_seconds=60)


def test_consecutive_skipped_records_stop_the_run_with_the_counters(tmp_path, tokenizer):
    # Every sample has an image and a blank caption: each pass over the shard skips 12 records.
    writers.write_tar(str(tmp_path / "00000.tar"), [m for i in range(12) for m in
                                                    writers.webdataset_members(f"{i:04d}", _encoded(i, "JPEG"), " ")])
    config = data_config(source="webdataset", train_pattern=str(tmp_path / "00000.tar"), max_consecutive_skips=50)
    with pytest.raises(pipeline.InputStalledError, match=r"50 consecutive records were skipped.*empty_caption=50"):
        _first_batch(config, tokenizer)


def test_waiting_for_a_batch_can_be_cancelled(tmp_path, tokenizer):
    shard = str(tmp_path / "00000.tfrecord")
    writers.write_tfrecord(shard, [writers.img2dataset_record(f"{i:04d}", _encoded(i, "JPEG"), text)
                                   for i, text in enumerate(CAPTIONS)])
    iterator = pipeline.InputIterator(pipeline.train_dataset(
        data_config(train_pattern=str(tmp_path / "*.tfrecord")), tokenizer, 2, patch_geometry=GEOMETRY, seed=0))
    os.remove(shard)
    os.mkfifo(shard)  # the shard now blocks its reader: a stalled network mount after start-up
    cancel = threading.Event()
    threading.Timer(1.0, cancel.set).start()
    start = time.monotonic()
    try:
        assert iterator.next_batch(cancelled=cancel.is_set) is None
        assert time.monotonic() - start < 10
    finally:
        with open(os.open(shard, os.O_WRONLY | os.O_NONBLOCK), "wb"):  # lets the blocked read end
            pass


def test_main_with_a_wrong_image_key_exits_2_naming_the_key_found(tmp_path, tokenizer_path):
    os.makedirs(tmp_path / "shards")
    _tar(str(tmp_path / "shards" / "00000.tar"))
    start = time.monotonic()
    result = run_main(str(tmp_path / "work"), "--config.data.source=webdataset",
                      f"--config.data.train_pattern={tmp_path / 'shards' / '*.tar'}", "--config.data.image_key=png",
                      f"--config.data.tokenizer_path={tokenizer_path}", "--config.eval.evaluators=()",
                      check=False, timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    assert time.monotonic() - start < 60
    assert "config.data.image_key='png' matches none of the member extensions ['jpg', 'json', 'txt']" in \
        result.stderr
    assert "Traceback" not in result.stderr


def _main_flags(tmp_path, tokenizer_path, *flags: str) -> list[str]:
    return main_command(str(tmp_path / "work"), "--config.data.source=webdataset",
                        f"--config.data.train_pattern={tmp_path / 'shards' / '*.tar'}",
                        f"--config.data.tokenizer_path={tokenizer_path}", "--config.eval.evaluators=()", *flags)


def test_a_shard_that_never_answers_is_named_within_the_deadline_and_sigterm_stops_the_wait(tmp_path, tokenizer,
                                                                                              tokenizer_path):
    os.makedirs(tmp_path / "shards")
    _tar(str(tmp_path / "shards" / "00000.tar"))
    fifo = str(tmp_path / "shards" / "00001.tar")  # stands in for a file on a stalled network mount
    os.mkfifo(fifo)
    config = data_config(source="webdataset", train_pattern=str(tmp_path / "shards" / "*.tar"),
                         max_input_wait_seconds=2)
    start = time.monotonic()
    with pytest.raises(sources.DataError, match=rf"did not answer .*1 of 2 reads did not finish within 2 s: {fifo}"):
        pipeline.train_dataset(config, tokenizer, 2, patch_geometry=GEOMETRY, seed=0)
    assert time.monotonic() - start < 15

    process = subprocess.Popen(_main_flags(tmp_path, tokenizer_path, "--config.data.max_input_wait_seconds=600"),
                               cwd=REPO, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        for line in process.stderr:
            lines.append(line)
            if "Checking the 2 shards" in line:
                break
        time.sleep(1)
        process.send_signal(signal.SIGTERM)
        start = time.monotonic()
        stderr = "".join(lines) + process.communicate(timeout=60)[1]
    finally:
        process.kill()
        with open(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK), "wb"):  # lets this process's blocked read end
            pass
    assert process.returncode == 75, stderr[-3000:]
    assert time.monotonic() - start < 10
    assert "Stopped by signal SIGTERM" in stderr and "Traceback" not in stderr
