"""Training sources: encoded image-text examples from img2dataset TFRecords, WebDataset tars or TFDS.

`examples` yields an endless stream for one process, every element
`{"image": encoded bytes, "captions": string [N], "status": int32}`. Examples that cannot be used
are not dropped here but kept as small status elements (empty image and captions), so that the
pipeline can count them in order (see `pipeline.py`):

- `BAD_IMAGE`: no image bytes under any of the image keys (undecodable bytes are found later);
- `EMPTY_CAPTION`: no caption that is non-empty after stripping whitespace (paper appendix C);
- `BAD_SHARD`: one per pass over a shard that could not be read to its end (missing, truncated or
  corrupt); the examples read before the fault are kept.

File sources list their shards with `tf.io.gfile` (local paths or `gs://`), give each process a
disjoint subset (`files[process_index::process_count]`), reshuffle the shard order every epoch
and interleave `data.interleave` shards at a time, all from the seed, so the stream is
deterministic and its iterator can be checkpointed. Shard sizes are read once at start-up: a
shard is complete when its records account for every byte. A shard deleted since start-up reads
as empty; one that exists but cannot be opened is an error that tf.data's `ignore_errors` (used
for TFRecord read errors) would retry forever, so make shards readable before training.
"""

import concurrent.futures

import ml_collections
import tensorflow as tf
from absl import logging

from clippy_jax.data import tar

AUTOTUNE = tf.data.AUTOTUNE
OK, BAD_IMAGE, EMPTY_CAPTION, BAD_SHARD = range(4)
# Counter names, indexed by status - 1.
REASONS = ("bad_image", "empty_caption", "bad_shard")
FILE_SOURCES = ("synthetic", "img2dataset_tfrecord", "webdataset")
# TFRecord framing around each record: length (8 bytes) and two CRCs (4 bytes each).
_TFRECORD_OVERHEAD = 16
# WebDataset's split of a member name into sample key and extension (webdataset.tariterators).
_KEY_EXTENSION = r"^((?:.*/|)[^./]+)\.([^/]*)$"
# Parallel `stat` calls when listing shard sizes (they are network round trips on gs://).
_STAT_THREADS = 32


def split_keys(spec: str) -> tuple[str, ...]:
    """A comma-separated config value ('jpg,png') -> ('jpg', 'png')."""
    return tuple(k.strip() for k in spec.split(",") if k.strip())


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


def file_sizes(files: list[str]) -> list[int]:
    """Byte sizes of `files`; -1 (read as a bad shard) where a file cannot be stat-ed."""

    def size(path: str) -> int:
        try:
            return tf.io.gfile.stat(path).length
        except tf.errors.OpError as error:
            logging.warning("Cannot stat shard %s (%s); it will be skipped and counted.", path, error.message)
            return -1

    with concurrent.futures.ThreadPoolExecutor(_STAT_THREADS) as pool:
        return list(pool.map(size, files))


def status_element(status: int) -> dict[str, tf.Tensor]:
    return dict(image=tf.constant(""), captions=tf.zeros([0], tf.string), status=tf.constant(status, tf.int32))


def validate(example: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    """Keeps the non-empty captions and sets the status; unusable examples lose their bytes."""
    captions = tf.strings.strip(example["captions"])
    captions = tf.boolean_mask(captions, tf.strings.length(captions) > 0)
    status = example["status"]
    status = tf.where((status == OK) & (tf.strings.length(example["image"]) == 0), BAD_IMAGE, status)
    status = tf.where((status == OK) & (tf.size(captions) == 0), EMPTY_CAPTION, status)
    ok = status == OK
    return dict(
        image=tf.where(ok, example["image"], ""),
        captions=tf.boolean_mask(captions, tf.fill(tf.shape(captions), ok)),
        status=status,
    )


def _existing(path: tf.Tensor, size: tf.Tensor) -> tf.Tensor:
    """[path] if the shard could be stat-ed and is still there, else [] (read as empty)."""
    return tf.io.matching_files(path)[: tf.cast(size >= 0, tf.int32)]


def _tfrecord_shard(path: tf.Tensor, size: tf.Tensor, image_keys: tuple[str, ...],
                    text_keys: tuple[str, ...]) -> tf.data.Dataset:
    """Examples of one img2dataset TFRecord shard, then a BAD_SHARD element if it was not read whole.

    Read or parse errors end (record errors) or skip (parse errors) through `ignore_errors`; the
    shard is complete when the records read account for all of its bytes.
    """
    features = {k: tf.io.FixedLenFeature([], tf.string, default_value="") for k in image_keys}
    features.update({k: tf.io.VarLenFeature(tf.string) for k in text_keys})

    def parse(record: tf.Tensor) -> tuple[dict[str, tf.Tensor], tf.Tensor]:
        parsed = tf.io.parse_single_example(record, features)
        images = tf.stack([parsed[k] for k in image_keys])
        present = tf.strings.length(images) > 0
        image = tf.where(tf.reduce_any(present), images[tf.argmax(tf.cast(present, tf.int32))], "")
        captions = tf.concat([parsed[k].values for k in text_keys], 0)
        nbytes = tf.cast(tf.strings.length(record), tf.int64) + _TFRECORD_OVERHEAD
        return dict(image=image, captions=captions, status=tf.constant(OK, tf.int32)), nbytes

    records = tf.data.TFRecordDataset(_existing(path, size)).map(parse).ignore_errors()
    end = tf.data.Dataset.from_tensors((status_element(BAD_SHARD), tf.constant(-1, tf.int64)))

    def account(total: tf.Tensor, element):
        example, nbytes = element
        last = nbytes < 0
        total += tf.where(last, tf.constant(0, tf.int64), nbytes)
        return total, (example, ~last | (total != tf.cast(size, tf.int64)))

    checked = records.concatenate(end).scan(tf.constant(0, tf.int64), account)
    return checked.filter(lambda example, keep: keep).map(lambda example, keep: example)


def _webdataset_shard(path: tf.Tensor, size: tf.Tensor, image_keys: tuple[str, ...],
                      text_keys: tuple[str, ...]) -> tf.data.Dataset:
    """Examples of one WebDataset tar: consecutive members with the same key form a sample.

    The image is the member whose extension comes first in `image_keys`; each extension in
    `text_keys` ('txt') contributes a caption. A truncated or corrupt tar yields the samples read
    before the fault, then a BAD_SHARD element.
    """
    no_image_rank = len(image_keys)
    no_captions = tf.fill([len(text_keys)], "")
    initial = dict(key=tf.constant(""), image=tf.constant(""), rank=tf.constant(no_image_rank), captions=no_captions)

    def group(state, member):
        named = tf.strings.regex_full_match(member["name"], _KEY_EXTENSION) & ~member["end"]
        key = tf.strings.regex_replace(member["name"], _KEY_EXTENSION, r"\1")
        key = tf.where(member["end"], "", tf.where(named, key, state["key"]))  # unnamed members change nothing
        extension = tf.strings.lower(tf.strings.regex_replace(member["name"], _KEY_EXTENSION, r"\2"))
        flush = (key != state["key"]) & (state["key"] != "")
        bad_shard = member["end"] & ~member["intact"]
        out = dict(
            image=tf.boolean_mask(tf.stack([state["image"], ""]), [flush, bad_shard]),
            captions=tf.boolean_mask(tf.stack([state["captions"], no_captions]), [flush, bad_shard]),
            status=tf.boolean_mask(tf.constant([OK, BAD_SHARD]), [flush, bad_shard]),
        )
        new = key != state["key"]
        state = dict(
            key=key,
            image=tf.where(new, "", state["image"]),
            rank=tf.where(new, no_image_rank, state["rank"]),
            captions=tf.where(new, no_captions, state["captions"]),
        )
        matches = named & tf.equal(extension, tf.constant(image_keys))
        rank = tf.cast(tf.reduce_min(tf.where(matches, tf.range(no_image_rank), no_image_rank)), tf.int32)
        better = rank < state["rank"]
        state["image"] = tf.where(better, member["data"], state["image"])
        state["rank"] = tf.minimum(rank, state["rank"])
        is_text = named & tf.equal(extension, tf.constant(text_keys))
        state["captions"] = tf.where(is_text, member["data"], state["captions"])
        return state, out

    return tar.read_members(path, size).scan(initial, group).unbatch()


def _shard_examples(config: ml_collections.ConfigDict, seed: int, process_index: int, process_count: int,
                    epochs: int | None) -> tf.data.Dataset:
    files = process_files(list_files(config.train_pattern), process_index, process_count)
    sizes = file_sizes(files)
    read = _webdataset_shard if config.source == "webdataset" else _tfrecord_shard
    image_keys, text_keys = split_keys(config.image_key), split_keys(config.text_key)
    shards = tf.data.Dataset.from_tensor_slices((files, tf.constant(sizes, tf.int64)))
    shards = shards.shuffle(len(files), seed=seed, reshuffle_each_iteration=True).repeat(epochs)
    return shards.interleave(
        lambda path, size: read(path, size, image_keys, text_keys),
        cycle_length=min(len(files), config.interleave), num_parallel_calls=AUTOTUNE, deterministic=True,
    )


def _feature(example: dict, path: str) -> tf.Tensor:
    """A (possibly nested, '/'-separated) feature of a TFDS example."""
    for part in path.split("/"):
        example = example[part]
    return example


def _nested(path: str, leaf) -> dict:
    """{'a': {'b': leaf}} for the path 'a/b'."""
    out = leaf
    for part in reversed(path.split("/")):
        out = {part: out}
    return out


def _tfds_examples(config: ml_collections.ConfigDict, seed: int, process_index: int, process_count: int,
                   epochs: int | None) -> tf.data.Dataset:
    """Any TFDS dataset with an image feature and caption features (e.g. `coco_captions`:
    image_key='image', text_key='captions/text'); images stay encoded until the pipeline decodes them.

    Each process reads an even, disjoint slice of the split (`tfds.split_for_jax_process`).
    """
    import tensorflow_datasets as tfds  # noqa: PLC0415 (only this source needs it)

    image_key, text_keys = config.image_key, split_keys(config.text_key)
    builder = tfds.builder(config.tfds_name, data_dir=config.tfds_data_dir or None)
    split = tfds.split_for_jax_process(config.tfds_split, process_index=process_index, process_count=process_count)
    dataset = builder.as_dataset(
        split=split,
        shuffle_files=True,
        decoders=_nested(image_key, tfds.decode.SkipDecoding()),
        read_config=tfds.ReadConfig(shuffle_seed=seed, interleave_cycle_length=config.interleave),
    )

    def convert(example: dict) -> dict[str, tf.Tensor]:
        captions = tf.concat([tf.reshape(_feature(example, k), [-1]) for k in text_keys], 0)
        return dict(image=_feature(example, image_key), captions=captions, status=tf.constant(OK, tf.int32))

    return dataset.repeat(epochs).map(convert)


def examples(config: ml_collections.ConfigDict, seed: int, process_index: int = 0, process_count: int = 1,
             epochs: int | None = None) -> tf.data.Dataset:
    """The validated stream of encoded examples of one process (see the module docstring); endless
    unless `epochs` is given."""
    if config.source in FILE_SOURCES:
        stream = _shard_examples(config, seed, process_index, process_count, epochs)
    elif config.source == "tfds":
        stream = _tfds_examples(config, seed, process_index, process_count, epochs)
    else:
        raise ValueError(f"Unknown config.data.source={config.source!r}; choose from {(*FILE_SOURCES, 'tfds')}.")
    return stream.map(validate)
