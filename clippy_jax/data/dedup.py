"""Global exact-byte image de-duplication of training shards (paper appendix C).

  python -m clippy_jax.data.dedup --input='gs://bucket/cc12m/*.tfrecord' --output=gs://bucket/cc12m-dedup \
      [--source=img2dataset_tfrecord|webdataset] [--image_key=jpg] [--workers=16]

Pass 1 hashes (sha256) the image bytes of every example, shards in parallel. The keep decision
then walks the shards in sorted order, so the first occurrence wins. Pass 2 writes each shard's
kept examples, byte for byte and in order, to a file of the same name under --output, and a JSON
report (`dedup_report.json` there unless --report says otherwise) with the counts, which are also
printed. Examples without image bytes are kept (the pipeline skips and counts them). A shard that
cannot be read to its end keeps what was read and is listed in the report. Memory: one 32-byte
digest per distinct image (about 1.2 GB of Python objects for 12M images).
"""

import concurrent.futures
import dataclasses
import hashlib
import json
import os
import re
import tarfile
from collections.abc import Callable, Iterator

import tensorflow as tf
from absl import app, flags, logging

from clippy_jax.data import sources, writers

_KEY_EXTENSION = re.compile(sources.KEY_EXTENSION)


@dataclasses.dataclass
class Example:
    """One example as stored: its bytes (a record, or tar members) and its image bytes."""

    stored: bytes | list[tuple[str, bytes]]
    image: bytes


@dataclasses.dataclass
class ShardResult:
    examples: int = 0
    intact: bool = True


def _read_tfrecord(path: str, image_keys: tuple[str, ...], result: ShardResult) -> Iterator[Example]:
    try:
        for record in tf.data.TFRecordDataset(path).as_numpy_iterator():
            features = tf.train.Example.FromString(record).features.feature
            images = [features[k].bytes_list.value[0] for k in image_keys if features[k].bytes_list.value]
            yield Example(record, next((i for i in images if i), b""))
    except tf.errors.OpError as error:
        logging.warning("Shard %s is unreadable after %d examples: %s", path, result.examples, error.message)
        result.intact = False


def _read_webdataset(path: str, image_keys: tuple[str, ...], result: ShardResult) -> Iterator[Example]:
    def sample(members: list[tuple[str, bytes]]) -> Example:
        images = {_KEY_EXTENSION.match(n).group(2).lower(): d for n, d in members}
        return Example(members, next((images[k] for k in image_keys if k in images), b""))

    key, members = None, []
    try:
        with tf.io.gfile.GFile(path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as archive:
            for info in archive:
                match = _KEY_EXTENSION.match(info.name)
                if not info.isfile() or not match:
                    continue
                if match.group(1) != key and members:
                    yield sample(members)
                    members = []
                key = match.group(1)
                members.append((info.name, archive.extractfile(info).read()))
    except (tarfile.TarError, EOFError, OSError, tf.errors.OpError) as error:
        logging.warning("Shard %s is unreadable after %d examples: %s", path, result.examples, error)
        result.intact = False
        return
    if members:
        yield sample(members)


READERS: dict[str, Callable[[str, tuple[str, ...], ShardResult], Iterator[Example]]] = {
    "img2dataset_tfrecord": _read_tfrecord,
    "webdataset": _read_webdataset,
}


def _hash_shard(path: str, source: str, image_keys: tuple[str, ...]) -> tuple[list[bytes | None], bool]:
    """sha256 digests of the shard's images in order (None: no image), and whether it was intact."""
    result, digests = ShardResult(), []
    for example in READERS[source](path, image_keys, result):
        digests.append(hashlib.sha256(example.image).digest() if example.image else None)
        result.examples += 1
    return digests, result.intact


def _write_shard(path: str, output: str, source: str, image_keys: tuple[str, ...], keep: list[bool]) -> int:
    kept = (e.stored for e, k in zip(READERS[source](path, image_keys, ShardResult()), keep) if k)
    if source == "webdataset":
        members = (member for stored in kept for member in stored)
        writers.write_tar(output, members)
    else:
        writers.write_tfrecord(output, kept)
    return sum(keep)


def deduplicate(pattern: str, output_dir: str, source: str = "img2dataset_tfrecord", image_key: str = "jpg",
                workers: int = 16) -> dict:
    """De-duplicates the shards matching `pattern` into `output_dir`; returns the report."""
    files = sources.list_files(pattern)
    names = [os.path.basename(f) for f in files]
    if len(set(names)) != len(names):
        raise ValueError(f"Shards matching {pattern!r} share file names; they would overwrite each other.")
    image_keys = sources.split_keys(image_key)
    tf.io.gfile.makedirs(output_dir)
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        hashed = list(pool.map(lambda f: _hash_shard(f, source, image_keys), files))
        seen, keeps = set(), []
        for digests, _ in hashed:
            keep = []
            for digest in digests:
                keep.append(digest is None or digest not in seen)
                if digest is not None:
                    seen.add(digest)
            keeps.append(keep)
        outputs = [os.path.join(output_dir, n) for n in names]
        kept = list(pool.map(lambda args: _write_shard(args[0], args[1], source, image_keys, args[2]),
                             zip(files, outputs, keeps)))
    examples = sum(len(d) for d, _ in hashed)
    return dict(
        input=pattern,
        output=output_dir,
        source=source,
        shards=len(files),
        examples=examples,
        kept=sum(kept),
        dropped_duplicates=examples - sum(kept),
        without_image=sum(d is None for digests, _ in hashed for d in digests),
        unreadable_shards=[f for f, (_, intact) in zip(files, hashed) if not intact],
        per_shard=[dict(shard=n, examples=len(d), kept=k) for n, (d, _), k in zip(names, hashed, kept)],
    )


def define_flags() -> None:
    """The command's flags (defined only when run as a command, so the module imports cleanly)."""
    flags.DEFINE_string("input", None, "Glob pattern of the input shards (local or gs://).", required=True)
    flags.DEFINE_string("output", None, "Output directory for the de-duplicated shards.", required=True)
    flags.DEFINE_enum("source", "img2dataset_tfrecord", list(READERS), "Shard format (the output has the same).")
    flags.DEFINE_string("image_key", "jpg", "Image feature / extension; comma-separated alternatives.")
    flags.DEFINE_integer("workers", 16, "Shards read or written in parallel.")
    flags.DEFINE_string("report", "", "Path of the JSON report (default: OUTPUT/dedup_report.json).")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    options = flags.FLAGS
    report = deduplicate(options.input, options.output, options.source, options.image_key, options.workers)
    path = options.report or os.path.join(options.output, "dedup_report.json")
    with tf.io.gfile.GFile(path, "w") as f:
        json.dump(report, f, indent=2)
    print(f"{report['examples']} examples in {report['shards']} shards: kept {report['kept']}, dropped "
          f"{report['dropped_duplicates']} duplicates; {len(report['unreadable_shards'])} unreadable shards. "
          f"Report: {path}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
