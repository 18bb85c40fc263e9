"""Reads the regular-file members of a tar archive inside tf.data, checkpointably.

Python-side tar readers (`tarfile` in `from_generator`) cannot be saved in a tf.data iterator
checkpoint, so the archive is parsed in-graph: the file is read in chunks of whole 512-byte blocks
(`FixedLengthRecordDataset`, with the trailing partial block of a truncated file left out as a
footer) and a `scan` walks the headers. Its state is the unparsed tail of the stream (at most one
member plus one chunk), so a checkpoint stays small.

Supported: ustar/GNU/PAX archives as written by `tarfile`, GNU tar and webdataset's `TarWriter`,
including GNU long names and PAX `path` records. A header with a bad checksum or a member that
runs past the end of the file stops the parse of that archive; members before it are kept, and
the final element reports `intact=False`.
"""

import tensorflow as tf

BLOCK = 512
# Blocks per read; one scan step parses a chunk, so larger chunks mean fewer steps.
CHUNK_BLOCKS = 128
# Header fields (POSIX ustar).
_NAME, _SIZE, _CHECKSUM, _TYPE, _MAGIC, _PREFIX = slice(0, 100), slice(124, 136), slice(148, 156), 156, \
    slice(257, 262), slice(345, 500)
_REGULAR_TYPES = (ord("0"), 0, ord("7"))
_GNU_LONG_NAME, _PAX_HEADER = ord("L"), ord("x")
_PAX_PATH = r"(?s)^(?:.*\n)?\d+ path=([^\n]*)\n.*$"


def _octal(field: tf.Tensor) -> tf.Tensor:
    """uint8 [n] ASCII octal digits, padded with spaces or NULs -> int64."""
    digits = tf.cast(field, tf.int64) - ord("0")
    is_digit = (digits >= 0) & (digits <= 7)
    place = tf.cumsum(tf.cast(is_digit, tf.int64), exclusive=True, reverse=True)
    return tf.reduce_sum(tf.where(is_digit, digits * tf.pow(tf.constant(8, tf.int64), place), 0))


def _c_string(header: tf.Tensor, raw: tf.Tensor, field: slice) -> tf.Tensor:
    """The NUL-terminated string in `field` of the header (`raw`: its bytes as uint8)."""
    length = tf.reduce_sum(tf.math.cumprod(tf.cast(raw[field] != 0, tf.int32)))
    return tf.strings.substr(header, field.start, length)


def _parse_header(header: tf.Tensor) -> dict[str, tf.Tensor]:
    """One 512-byte header block -> {zero, valid, size (int64), type (int32), name}."""
    raw = tf.io.decode_raw(header, tf.uint8)  # [512]
    # The checksum is the byte sum with its own field counted as spaces.
    field_sum = tf.reduce_sum(tf.cast(raw[_CHECKSUM], tf.int64))
    expected = tf.reduce_sum(tf.cast(raw, tf.int64)) - field_sum + ord(" ") * (_CHECKSUM.stop - _CHECKSUM.start)
    name, prefix = _c_string(header, raw, _NAME), _c_string(header, raw, _PREFIX)
    ustar = tf.strings.substr(header, _MAGIC.start, _MAGIC.stop - _MAGIC.start) == b"ustar"
    return dict(
        zero=tf.reduce_all(raw == 0),
        valid=_octal(raw[_CHECKSUM]) == expected,
        size=_octal(raw[_SIZE]),
        type=tf.cast(raw[_TYPE], tf.int32),
        name=tf.where(ustar & (tf.strings.length(prefix) > 0), prefix + "/" + name, name),
    )


def _padded(size: tf.Tensor) -> tf.Tensor:
    return (size + BLOCK - 1) // BLOCK * BLOCK


def _long_name(header: dict[str, tf.Tensor], payload: tf.Tensor, current: tf.Tensor) -> tf.Tensor:
    """The name that a GNU long-name or PAX header sets for the next member ('' to clear it)."""
    gnu = tf.strings.split(payload, "\0", maxsplit=1)[0]
    pax_has_path = tf.strings.regex_full_match(payload, _PAX_PATH)
    pax = tf.where(pax_has_path, tf.strings.regex_replace(payload, _PAX_PATH, r"\1"), current)
    return tf.where(header["type"] == _GNU_LONG_NAME, gnu, tf.where(header["type"] == _PAX_HEADER, pax, ""))


def _parse_buffer(buffer: tf.Tensor, remaining: tf.Tensor, long_name: tf.Tensor) -> dict[str, tf.Tensor]:
    """Parses the complete members at the start of `buffer`.

    `remaining` counts the bytes of the file from the start of `buffer` on: a member that needs
    more is truncated. Returns the regular files' `names` [n] and `payloads` [n], the bytes
    `parsed`, the bytes `need`ed from there before the next member is complete, the pending
    `long_name` and whether the archive is `broken` (bad checksum or truncated member).
    """
    length = tf.cast(tf.strings.length(buffer), tf.int64)
    no_strings = tf.zeros([0], tf.string)

    def cond(position, names, payloads, pending, broken, need, done):
        return ~done & (position + BLOCK <= length)

    def body(position, names, payloads, pending, broken, need, done):
        header = _parse_header(tf.strings.substr(buffer, position, BLOCK))
        member = BLOCK + _padded(header["size"])
        bad = ~header["zero"] & (~header["valid"] | (position + member > remaining))
        fits = position + member <= length
        advance = header["zero"] | (~bad & fits)
        is_member = ~header["zero"] & ~bad & fits
        payload = tf.strings.substr(buffer, position + BLOCK, header["size"] * tf.cast(is_member, tf.int64))
        keep = (is_member & tf.reduce_any(tf.equal(header["type"], _REGULAR_TYPES)))[None]
        name = tf.where(tf.strings.length(pending) > 0, pending, header["name"])
        names = tf.concat([names, tf.boolean_mask(name[None], keep)], 0)
        payloads = tf.concat([payloads, tf.boolean_mask(payload[None], keep)], 0)
        pending = tf.where(is_member, _long_name(header, payload, pending), pending)
        block = tf.constant(BLOCK, tf.int64)
        position += tf.where(header["zero"], block, member) * tf.cast(advance, tf.int64)
        need = tf.where(advance | bad, block, member)
        return position, names, payloads, pending, broken | bad, need, bad | ~advance

    position, names, payloads, long_name, broken, need, _ = tf.while_loop(
        cond, body, (tf.constant(0, tf.int64), no_strings, no_strings, long_name, tf.constant(False),
                     tf.constant(BLOCK, tf.int64), tf.constant(False)),
        shape_invariants=(tf.TensorShape([]), tf.TensorShape([None]), tf.TensorShape([None]), tf.TensorShape([]),
                          tf.TensorShape([]), tf.TensorShape([]), tf.TensorShape([])),
    )
    return dict(names=names, payloads=payloads, parsed=position, need=need, long_name=long_name, broken=broken)


def _chunks(path: tf.Tensor, size: tf.Tensor) -> tf.data.Dataset:
    """The file's complete blocks as strings of up to `CHUNK_BLOCKS` blocks.

    A file that has gone since start-up (or whose `size` is unknown, < 0) reads as empty.
    """
    files = tf.io.matching_files(path)[: tf.cast(size >= 0, tf.int32)]
    size = tf.maximum(size, 0)
    chunk = BLOCK * CHUNK_BLOCKS
    body = tf.data.FixedLengthRecordDataset(files, chunk, footer_bytes=size % chunk)
    tail = tf.data.FixedLengthRecordDataset(files, BLOCK, header_bytes=size - size % chunk,
                                            footer_bytes=size % BLOCK)
    return body.concatenate(tail.batch(CHUNK_BLOCKS).map(tf.strings.reduce_join))


def read_members(path: tf.Tensor, size: tf.Tensor) -> tf.data.Dataset:
    """The regular files of the archive at `path` ({name, data}, with end=False, intact=True),
    then one end element {name: "", data: "", end: True, intact}.

    `size` is the file's size in bytes when the pipeline was built: `intact` is False when fewer
    bytes could be parsed (a truncated or corrupt archive, or a file that can no longer be read).
    """
    size = tf.cast(size, tf.int64)
    no_strings = tf.zeros([0], tf.string)
    initial = dict(pieces=no_strings, have=tf.constant(0, tf.int64), need=tf.constant(BLOCK, tf.int64),
                   offset=tf.constant(0, tf.int64), long_name=tf.constant(""), broken=tf.constant(False))

    def step(state, element):
        chunk, last = element
        chunk = tf.where(state["broken"], "", chunk)
        pieces = tf.concat([state["pieces"], chunk[None]], 0)
        have = state["have"] + tf.cast(tf.strings.length(chunk), tf.int64)

        def parse():
            buffer = tf.strings.reduce_join(pieces)
            out = _parse_buffer(buffer, size - state["offset"], state["long_name"])
            rest = tf.strings.substr(buffer, out["parsed"], have - out["parsed"])[None]
            new_state = dict(pieces=rest, have=have - out["parsed"], need=out["need"],
                             offset=state["offset"] + out["parsed"], long_name=out["long_name"],
                             broken=state["broken"] | out["broken"])
            return new_state, out["names"], out["payloads"]

        def wait():
            return dict(state, pieces=pieces, have=have), no_strings, no_strings

        ready = ~state["broken"] & ((have >= state["need"]) | last)
        state, names, payloads = tf.cond(ready, parse, wait)
        count = tf.size(names)
        end = tf.cast(last, tf.int32)
        intact = ~state["broken"] & (state["offset"] == size)
        out = dict(
            name=tf.concat([names, tf.fill([end], "")], 0),
            data=tf.concat([payloads, tf.fill([end], "")], 0),
            end=tf.concat([tf.zeros([count], tf.bool), tf.fill([end], True)], 0),
            intact=tf.concat([tf.ones([count], tf.bool), tf.fill([end], intact)], 0),
        )
        return state, out

    chunks = _chunks(path, size).map(lambda chunk: (chunk, False))
    chunks = chunks.concatenate(tf.data.Dataset.from_tensors((tf.constant(""), True)))
    return chunks.scan(initial, step).unbatch()
