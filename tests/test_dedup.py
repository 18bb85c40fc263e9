"""Exact-byte image de-duplication across shards: counts, first occurrence wins, output byte for byte."""

import json
import os
import subprocess
import sys
import tarfile

import pytest
import tensorflow as tf

from clippy_jax.data import dedup, writers
from tests.helpers import REPO

# Shard -> image ids of its examples (None: no image). Duplicates: 1 within shard 0, 1 and 3 across.
SHARDS = {"a-00000": [0, 1, 2, 1], "a-00001": [3, None, 1, 4], "a-00002": [3, 5, 0]}
KEPT = {"a-00000": [0, 1, 2], "a-00001": [0, 1, 3], "a-00002": [1]}  # positions in the shard


def _image(image_id: int) -> bytes:
    return bytes([image_id]) * (300 + image_id)  # the dedup never decodes


def _write(directory: str, source: str) -> None:
    for shard, ids in SHARDS.items():
        keys = [f"{shard}-{i}" for i in range(len(ids))]
        images = [_image(i) if i is not None else b"" for i in ids]
        if source == "img2dataset_tfrecord":
            writers.write_tfrecord(os.path.join(directory, f"{shard}.tfrecord"),
                                   [writers.img2dataset_record(k, im, f"caption {k}") for k, im in zip(keys, images)])
        else:
            members = [m for k, im in zip(keys, images) for m in writers.webdataset_members(k, im, f"caption {k}")
                       if m[1] or not m[0].endswith(".jpg")]
            writers.write_tar(os.path.join(directory, f"{shard}.tar"), members)


def _read(path: str) -> list[tuple[bytes, str]]:
    """(image bytes, caption) of every example of a shard."""
    if path.endswith(".tfrecord"):
        out = []
        for record in tf.data.TFRecordDataset(path).as_numpy_iterator():
            features = tf.train.Example.FromString(record).features.feature
            out.append((features["jpg"].bytes_list.value[0], features["txt"].bytes_list.value[0].decode()))
        return out
    with tarfile.open(path) as archive:
        members = {m.name: archive.extractfile(m).read() for m in archive}
    keys = sorted({name.split(".")[0] for name in members}, key=lambda k: int(k.rsplit("-", 1)[1]))
    return [(members.get(f"{k}.jpg", b""), members[f"{k}.txt"].decode()) for k in keys]


@pytest.mark.parametrize(("source", "extension"), [("img2dataset_tfrecord", "tfrecord"), ("webdataset", "tar")])
def test_dedup_keeps_first_occurrences_in_sorted_shard_order(tmp_path, source, extension):
    _write(str(tmp_path), source)
    output = str(tmp_path / "out")
    report = dedup.deduplicate(str(tmp_path / f"a-*.{extension}"), output, source, workers=2)
    assert (report["examples"], report["kept"], report["dropped_duplicates"]) == (11, 7, 4)
    assert report["without_image"] == 1 and report["unreadable_shards"] == []
    assert [s["kept"] for s in report["per_shard"]] == [3, 3, 1]
    originals = {shard: _read(str(tmp_path / f"{shard}.{extension}")) for shard in SHARDS}
    for shard, positions in KEPT.items():
        expected = [originals[shard][p] for p in positions]
        assert _read(os.path.join(output, f"{shard}.{extension}")) == expected


def test_command_prints_and_writes_the_report_and_survives_a_truncated_shard(tmp_path):
    _write(str(tmp_path), "img2dataset_tfrecord")
    path = str(tmp_path / "a-00002.tfrecord")
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) - 50])  # the last example is cut
    output = str(tmp_path / "out")
    result = subprocess.run(
        [sys.executable, "-m", "clippy_jax.data.dedup", f"--input={tmp_path}/a-*.tfrecord", f"--output={output}"],
        cwd=REPO, capture_output=True, text=True, check=True, timeout=120,
    )
    assert "10 examples in 3 shards: kept 7, dropped 3 duplicates; 1 unreadable shards" in result.stdout
    with open(os.path.join(output, "dedup_report.json")) as f:
        report = json.load(f)
    assert report["unreadable_shards"] == [path] and report["per_shard"][2] == dict(shard="a-00002.tfrecord",
                                                                                      examples=2, kept=1)
