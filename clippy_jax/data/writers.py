"""Writers of training shards in the layouts the sources read (used by dedup, benchmarks and tests).

- img2dataset TFRecord (`output_format=tfrecord`): one `tf.train.Example` per pair with the image
  bytes under `jpg` (whatever the encoding), `txt`, `key` and metadata (`url`, `status`, `width`, ...);
- WebDataset tar: members `KEY.jpg`, `KEY.txt`, `KEY.json` in order.
"""

import io
import json
import tarfile
from collections.abc import Iterable

import tensorflow as tf


def _feature(value: bytes | str | int | float) -> tf.train.Feature:
    if isinstance(value, str):
        value = value.encode()
    if isinstance(value, bytes):
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))
    if isinstance(value, int):
        return tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))
    return tf.train.Feature(float_list=tf.train.FloatList(value=[value]))


def img2dataset_record(key: str, image: bytes, caption: str, image_key: str = "jpg", **meta) -> bytes:
    """A serialised `tf.train.Example` as img2dataset's TFRecord writer emits it."""
    features = {"key": key, image_key: image, "txt": caption, **meta}
    example = tf.train.Example(features=tf.train.Features(feature={k: _feature(v) for k, v in features.items()}))
    return example.SerializeToString()


def webdataset_members(key: str, image: bytes, caption: str, image_format: str = "jpg",
                       **meta) -> list[tuple[str, bytes]]:
    """The tar members of one WebDataset sample, as img2dataset writes them."""
    return [(f"{key}.{image_format}", image), (f"{key}.txt", caption.encode()),
            (f"{key}.json", json.dumps(dict(key=key, caption=caption, **meta)).encode())]


def write_tfrecord(path: str, records: Iterable[bytes]) -> int:
    """Writes serialised records; returns how many."""
    count = 0
    with tf.io.TFRecordWriter(path) as writer:
        for record in records:
            writer.write(record)
            count += 1
    return count


def write_tar(path: str, members: Iterable[tuple[str, bytes]]) -> int:
    """Writes (name, data) members as a tar file (local or gs://); returns how many."""
    count = 0
    with tf.io.gfile.GFile(path, "wb") as f, tarfile.open(fileobj=f, mode="w|") as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
            count += 1
    return count
