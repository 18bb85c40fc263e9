"""Training sources: encoded image-text examples from img2dataset TFRecords, WebDataset tars or TFDS.

`examples` yields an endless stream for one process, every element
`{"image": encoded bytes, "captions": string [N], "status": int32}`. Examples that cannot be used
are not dropped here but kept as small status elements (empty image and captions), so that the
pipeline can count them in order (see `pipeline.py`):

- `BAD_IMAGE`: no image bytes under any of the image keys (undecodable bytes are found when decoding);
- `EMPTY_CAPTION`: no caption that is non-empty after stripping whitespace (paper appendix C);
- `BAD_SHARD`: one per pass over a shard that could not be read to its end (missing, truncated or
  corrupt); the examples read before the fault are kept.

File sources list their shards with `tf.io.gfile` (local paths or `gs://`), give each process a
disjoint subset (`files[process_index::process_count]`), reshuffle the shard order every epoch
and interleave `data.interleave` shards at a time, all from the seed, so the stream is
deterministic and its iterator can be checkpointed. Shard sizes are read once at start-up: a
shard is complete when its records account for every byte. The start-up reads (sizes, the first
shard's keys and images) wait at most `data.max_input_wait_seconds`, then name the shards that did
not answer. A shard deleted since start-up reads
as empty; one that exists but cannot be opened is an error that tf.data's `ignore_errors` (used
for TFRecord read errors) would retry forever, so make shards readable before training.
"""

import collections
import json
import re
import tarfile

import ml_collections
import tensorflow as tf
from absl import logging

from clippy_jax.data import preprocess, tar
from clippy_jax.deadlines import DeadlineExceeded, call_with_deadline, map_with_deadline

AUTOTUNE = tf.data.AUTOTUNE
OK, BAD_IMAGE, EMPTY_CAPTION, BAD_SHARD = range(4)
# Counter names, indexed by status - 1.
REASONS = ("bad_image", "empty_caption", "bad_shard")
FILE_SOURCES = ("synthetic", "img2dataset_tfrecord", "webdataset")
# TFRecord framing around each record: length (8 bytes) and two CRCs (4 bytes each).
_TFRECORD_OVERHEAD = 16
# WebDataset's split of a member name into sample key and extension (webdataset.tariterators).
KEY_EXTENSION = r"^((?:.*/|)[^./]+)\.([^/]*)$"
# Parallel `stat` calls when listing shard sizes (they are network round trips on gs://).
_STAT_THREADS = 32


# Bad shards named in the log per reason at start-up.
_NAMED_BAD_SHARDS = 3
# Members (tar) or records (TFRecord) of the first readable shard listed when checking the keys, and
# examples whose images are decoded: if none decodes, the run stops at start-up.
_PROBE_MEMBERS = 64
_GZIP_MAGIC = b"\x1f\x8b"


class DataError(ValueError):
    """The training data cannot give a usable example; the message names the setting and what was found."""


def split_keys(spec: str) -> tuple[str, ...]:
    """A comma-separated config value ('jpg,png') -> ('jpg', 'png')."""
    return tuple(k.strip() for k in spec.split(",") if k.strip())


def parse_text_keys(spec: str) -> tuple[tuple[str, str], ...]:
    """`data.text_key` ('txt,json:caption') -> ((member or feature, JSON field or ''), ...)."""
    keys = []
    for key in split_keys(spec):
        name, _, field = key.partition(":")
        if not name or (_ and not field):
            raise DataError(f"config.data.text_key={spec!r}: {key!r} is not KEY or KEY:FIELD; pass e.g. "
                            "'txt' or 'json:caption' (the caption field of a JSON member).")
        keys.append((name, field))
    return tuple(keys)


def _unicode_escapes(value: tf.Tensor) -> tf.Tensor:
    """JSON `\\uXXXX` escapes -> UTF-8 characters, in a string tensor of any shape (the two halves of
    a surrogate pair each become U+FFFD)."""
    parts = tf.strings.split(tf.reshape(value, [-1]), "\\u")  # [n, pieces]: all but the first follow an escape

    def decode(pieces: tf.Tensor) -> tf.Tensor:
        hex_digits = tf.strings.unicode_decode(tf.strings.substr(pieces, 0, 4), "UTF-8").to_tensor(0, shape=[None, 4])
        digits = tf.where(hex_digits < 58, hex_digits - 48, tf.bitwise.bitwise_or(hex_digits, 32) - 87)
        char = tf.strings.unicode_encode(tf.reduce_sum(digits * [4096, 256, 16, 1], axis=1)[:, None], "UTF-8",
                                         errors="replace")
        valid = tf.strings.regex_full_match(pieces, "(?s)[0-9a-fA-F]{4}.*")
        return tf.where(valid, char + tf.strings.regex_replace(pieces, "^[0-9a-fA-F]{4}", ""), "\\u" + pieces)

    is_first = tf.ragged.range(parts.row_lengths()) == 0
    joined = tf.strings.reduce_join(tf.ragged.map_flat_values(tf.where, is_first, parts,
                                                              tf.ragged.map_flat_values(decode, parts)), axis=-1)
    return tf.reshape(joined, tf.shape(value))


def json_string_field(text: tf.Tensor, field: str) -> tf.Tensor:
    """The string value of the first `"field": "..."` in JSON text ('' if absent), unescaped."""
    pattern = r'(?s)^.*?"' + re.escape(field) + r'"\s*:\s*"((?:[^"\\]|\\.)*)".*$'
    value = tf.where(tf.strings.regex_full_match(text, pattern), tf.strings.regex_replace(text, pattern, r"\1"), "")
    value = tf.strings.regex_replace(value, r"\\\\", "\x00")  # escaped backslashes, restored last
    value = _unicode_escapes(value)
    for escaped, plain in ((r'\\"', '"'), (r"\\/", "/"), (r"\\n", "\n"), (r"\\t", "\t"), (r"\\r", "\r")):
        value = tf.strings.regex_replace(value, escaped, plain)
    return tf.strings.regex_replace(value, r"\x00", r"\\")


def _caption(text: tf.Tensor, field: str) -> tf.Tensor:
    return json_string_field(text, field) if field else text


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


def _shard_fault(path: str, tar_format: bool) -> tuple[int, str]:
    """(byte size, '' or why the shard cannot be read): one `stat` and a read of its first bytes."""
    try:
        if tf.io.gfile.isdir(path):
            return -1, "a directory"
        size = tf.io.gfile.stat(path).length
        with tf.io.gfile.GFile(path, "rb") as f:
            head = f.read(tarfile.BLOCKSIZE)
    except tf.errors.OpError as error:
        return -1, f"unreadable ({error.message})"
    if size == 0:
        return size, "empty (0 bytes)"
    if head.startswith(_GZIP_MAGIC):
        return size, "gzip-compressed (decompress the shards: only uncompressed files are read)"
    if tar_format:
        try:
            tarfile.TarInfo.frombuf(head, "utf-8", "surrogateescape")
        except tarfile.HeaderError:
            return size, "not a tar archive (no valid tar header at its start)"
    elif len(head) < 12 or int.from_bytes(head[:8], "little") + _TFRECORD_OVERHEAD > size:
        return size, "not a TFRecord file (its first record length does not fit the file)"
    return size, ""


def _first_members(path: str, tar_format: bool) -> list[str]:
    """Member extensions (tar) or feature names (TFRecord) of the first records of a readable shard."""
    names = collections.Counter()
    try:
        if tar_format:
            with tf.io.gfile.GFile(path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as archive:
                for _, member in zip(range(_PROBE_MEMBERS), archive):
                    match = re.match(KEY_EXTENSION, member.name)
                    names[match.group(2) if match and member.isfile() else member.name] += 1
        else:
            for record in tf.data.TFRecordDataset(path).take(_PROBE_MEMBERS):
                names.update(tf.train.Example.FromString(record.numpy()).features.feature.keys())
    except (tarfile.TarError, tf.errors.OpError, ValueError) as error:
        logging.warning("Could not list the records of %s: %s", path, error)
    return sorted(names)


def _json_fields(path: str, extension: str) -> set[str]:
    """The top-level fields of the first `extension` JSON member of a tar shard."""
    with tf.io.gfile.GFile(path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as archive:
        for member in archive:
            if member.isfile() and member.name.lower().endswith(f".{extension}"):
                try:
                    return set(json.loads(archive.extractfile(member).read()))
                except (ValueError, TypeError):
                    return set()
    return set()


def _waited(read, seconds: float | None, path: str):
    """read() of the shard `path` under the start-up deadline; DataError naming the shard if it does not answer."""
    try:
        return call_with_deadline(read, seconds, path)
    except DeadlineExceeded:
        raise DataError(f"The shard {path} did not answer within data.max_input_wait_seconds={seconds:g} s (a stalled "
                        "network mount, or a pipe): make it readable, or leave it out of config.data.train_pattern."
                        ) from None


def _undecodable(config: ml_collections.ConfigDict, path: str, size: int, image_keys: tuple[str, ...],
                 text_keys: tuple[tuple[str, str], ...]) -> tuple[int, int, str]:
    """(images tried, images that do not decode, the first decoding error) over the first examples of a shard."""
    read = _webdataset_shard if config.source == "webdataset" else _tfrecord_shard
    tried, failed, first_error = 0, 0, ""
    for example in read(tf.constant(path), tf.constant(size, tf.int64), image_keys, text_keys).take(_PROBE_MEMBERS):
        if int(example["status"]) != OK or not example["image"].numpy():
            continue
        tried += 1
        try:
            preprocess.decode_rgb(example["image"])
        except tf.errors.InvalidArgumentError as error:
            failed += 1
            first_error = first_error or re.sub(r"\{\{.*?\}\}\s*|\s*\[Op:.*$", "", error.message.strip())
    return tried, failed, first_error


def check_shards(config: ml_collections.ConfigDict, files: list[str], image_keys: tuple[str, ...],
                 text_keys: tuple[tuple[str, str], ...]) -> list[int]:
    """The byte sizes of `files` (-1: cannot be read, counted as a bad shard), after naming the bad
    shards in the log and checking that the first readable shard holds the configured keys and
    images that decode.

    Raises DataError, naming the pattern and what the files hold, when no shard is readable, the
    first readable shard has none of the image keys or none of the caption keys, none of its first
    images decodes, or a shard does not answer within `data.max_input_wait_seconds`.
    """
    tar_format = config.source == "webdataset"
    wait = config.get("max_input_wait_seconds")
    logging.info("Checking the %d shards of %r (a shard that does not answer within %s s is named).", len(files),
                 config.train_pattern, wait)
    try:
        checked = map_with_deadline(lambda path: _shard_fault(path, tar_format), files, wait, _STAT_THREADS)
    except DeadlineExceeded as error:
        raise DataError(f"Shards of config.data.train_pattern={config.train_pattern!r} did not answer "
                        f"(data.max_input_wait_seconds): {error}; make them readable (a stalled network mount, or "
                        "a pipe?) or leave them out of the pattern.") from None
    faults = collections.defaultdict(list)
    for path, (_, fault) in zip(files, checked):
        if fault:
            faults[fault].append(path)
    for fault, paths in faults.items():
        logging.warning("%d of %d shards of %r are %s and will be counted as bad shards: %s%s", len(paths),
                        len(files), config.train_pattern, fault, ", ".join(paths[:_NAMED_BAD_SHARDS]),
                        ", ..." if len(paths) > _NAMED_BAD_SHARDS else "")
    readable = [(path, size) for path, (size, fault) in zip(files, checked) if not fault]
    kind = "uncompressed WebDataset tars" if tar_format else "TFRecord files"
    if not readable:
        found = "; ".join(f"{len(paths)} {fault} (e.g. {paths[0]})" for fault, paths in faults.items())
        raise DataError(f"None of the {len(files)} files of config.data.train_pattern={config.train_pattern!r} is "
                        f"readable as {kind} (config.data.source={config.source!r}): {found}.")
    first, first_size = readable[0]
    held = _waited(lambda: _first_members(first, tar_format), wait, first)
    what = "member extensions" if tar_format else "features"
    present = {name.lower() for name in held} if tar_format else set(held)

    def key_of(key: str) -> str:
        return key.lower() if tar_format else key

    if held and not any(key_of(k) in present for k in image_keys):
        raise DataError(f"config.data.image_key={config.image_key!r} matches none of the {what} {held} of "
                        f"{first} (the first readable shard of {config.train_pattern!r}); name the image "
                        f"{what[:-1]}, e.g. --config.data.image_key={_guess(held, _IMAGE_EXTENSIONS)}.")
    if held and not any(key_of(k) in present for k, _ in text_keys):
        raise DataError(f"config.data.text_key={config.text_key!r} matches none of the {what} {held} of "
                        f"{first} (the first readable shard of {config.train_pattern!r}); name the caption "
                        f"{what[:-1]}, e.g. --config.data.text_key={_guess(held, _TEXT_EXTENSIONS)}.")
    for key, field in text_keys:
        if tar_format and field and key.lower() in present:
            fields = _waited(lambda: _json_fields(first, key.lower()), wait, first)  # noqa: B023 (called at once)
            if fields and field not in fields:
                raise DataError(f"config.data.text_key={config.text_key!r}: the {key!r} members of {first} "
                                f"have no field {field!r}; their fields are {sorted(fields)}.")
    tried, failed, first_error = _waited(lambda: _undecodable(config, first, first_size, image_keys, text_keys),
                                         wait, first)
    if tried and failed == tried:
        raise DataError(f"None of the first {tried} images of {first} (the first readable shard of "
                        f"{config.train_pattern!r}) decodes (bad_image={failed}; the first error: {first_error}); "
                        f"check that config.data.image_key={config.image_key!r} names the image {what[:-1]}, or "
                        "rewrite the shards.")
    return [size if not fault else -1 for size, fault in checked]


_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "image")
_TEXT_EXTENSIONS = ("txt", "caption", "text", "json:caption")


def _guess(held: list[str], candidates: tuple[str, ...]) -> str:
    lowered = {name.lower(): name for name in held}
    found = [lowered[c.split(":")[0]] + c[len(c.split(":")[0]):] for c in candidates if c.split(":")[0] in lowered]
    return ",".join(found) or "KEY"


def describe(config: ml_collections.ConfigDict) -> str:
    """What the training data is and holds, for errors: source, pattern, keys, the first shard's contents."""
    keys = f"image_key={config.image_key!r}, text_key={config.text_key!r}"
    if config.source not in FILE_SOURCES:
        return f"config.data.source={config.source!r} (tfds_name={config.tfds_name!r}), {keys}."
    files = sorted(tf.io.gfile.glob(config.train_pattern))
    tar_format, wait = config.source == "webdataset", config.get("max_input_wait_seconds")
    what = "member extensions" if tar_format else "features"
    try:
        faults = map_with_deadline(lambda path: _shard_fault(path, tar_format), files[:_PROBE_MEMBERS], wait,
                                   _STAT_THREADS)
        readable = [path for path, (_, fault) in zip(files, faults) if not fault]
        held = "none of its first shards is readable"
        if readable:
            members = call_with_deadline(lambda: _first_members(readable[0], tar_format), wait, readable[0])
            held = f"its first readable shard {readable[0]} holds the {what} {members}"
    except DeadlineExceeded as error:
        held = f"its shards do not answer ({error})"
    return (f"config.data.source={config.source!r}, train_pattern={config.train_pattern!r} ({len(files)} files), "
            f"{keys}; {held}.")


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
                    text_keys: tuple[tuple[str, str], ...]) -> tf.data.Dataset:
    """Examples of one img2dataset TFRecord shard, then a BAD_SHARD element if it was not read whole.

    Read or parse errors end (record errors) or skip (parse errors) through `ignore_errors`; the
    shard is complete when the records read account for all of its bytes.
    """
    features = {k: tf.io.FixedLenFeature([], tf.string, default_value="") for k in image_keys}
    features.update({k: tf.io.VarLenFeature(tf.string) for k, _ in text_keys})

    def parse(record: tf.Tensor) -> tuple[dict[str, tf.Tensor], tf.Tensor]:
        parsed = tf.io.parse_single_example(record, features)
        images = tf.stack([parsed[k] for k in image_keys])
        present = tf.strings.length(images) > 0
        image = tf.where(tf.reduce_any(present), images[tf.argmax(tf.cast(present, tf.int32))], "")
        captions = tf.concat([_caption(parsed[k].values, field) for k, field in text_keys], 0)
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
    kept = checked.filter(lambda example, keep: keep)
    return kept.map(lambda example, _: example)  # one lambda a line: AutoGraph tells them apart by source line


def _webdataset_shard(path: tf.Tensor, size: tf.Tensor, image_keys: tuple[str, ...],
                      text_keys: tuple[tuple[str, str], ...]) -> tf.data.Dataset:
    """Examples of one WebDataset tar: consecutive members with the same key form a sample.

    The image is the member whose extension comes first in `image_keys`; each extension in
    `text_keys` ('txt', or 'json' with a field) contributes a caption. Extensions match without
    regard to case. A truncated or corrupt tar yields the samples read before the fault, then a
    BAD_SHARD element.
    """
    image_keys = tuple(k.lower() for k in image_keys)
    text_keys = tuple((k.lower(), field) for k, field in text_keys)
    no_image_rank = len(image_keys)
    no_captions = tf.fill([len(text_keys)], "")
    initial = dict(key=tf.constant(""), image=tf.constant(""), rank=tf.constant(no_image_rank), captions=no_captions)

    def group(state, member):
        named = tf.strings.regex_full_match(member["name"], KEY_EXTENSION) & ~member["end"]
        key = tf.strings.regex_replace(member["name"], KEY_EXTENSION, r"\1")
        key = tf.where(member["end"], "", tf.where(named, key, state["key"]))  # unnamed members change nothing
        extension = tf.strings.lower(tf.strings.regex_replace(member["name"], KEY_EXTENSION, r"\2"))
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
        is_text = named & tf.equal(extension, tf.constant([k for k, _ in text_keys]))
        captions = tf.stack([_caption(member["data"], field) for _, field in text_keys])
        state["captions"] = tf.where(is_text, captions, state["captions"])
        return state, out

    return tar.read_members(path, size).scan(initial, group).unbatch()


def _shard_examples(config: ml_collections.ConfigDict, seed: int, process_index: int, process_count: int,
                    epochs: int | None) -> tf.data.Dataset:
    files = process_files(list_files(config.train_pattern), process_index, process_count)
    image_keys, text_keys = split_keys(config.image_key), parse_text_keys(config.text_key)
    sizes = check_shards(config, files, image_keys, text_keys)
    read = _webdataset_shard if config.source == "webdataset" else _tfrecord_shard
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
