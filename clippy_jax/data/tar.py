"""Reads the regular-file members of a tar archive inside tf.data, checkpointably.

Python-side tar readers (`tarfile` in `from_generator`) cannot be saved in a tf.data iterator
checkpoint, so the archive is parsed in-graph: the file is read in chunks of whole 512-byte blocks
(`FixedLengthRecordDataset`, with the trailing partial block of a truncated file left out as a
footer) and a `scan` parses them: each step reads every block of its buffer as a header at once
(vectorised) and follows the sizes from header to header. Its state is the unparsed tail of the
stream (less than one member plus one chunk), so a checkpoint stays small.

Supported: ustar/GNU/PAX archives as written by `tarfile`, GNU tar and webdataset's `TarWriter`,
including GNU long names and PAX `path` records. A header with a bad checksum or a member that
runs past the end of the file stops the parse of that archive; members before it are kept, and
the final element reports `intact=False`.
"""

import tensorflow as tf

BLOCK = 512
# Blocks per read (256 KiB): fewer, larger scan steps cost less, but the tail in the state grows.
CHUNK_BLOCKS = 512
# Header fields (POSIX ustar).
_NAME, _SIZE, _CHECKSUM, _TYPE, _MAGIC, _PREFIX = slice(0, 100), slice(124, 136), slice(148, 156), 156, \
    slice(257, 262), slice(345, 500)
_REGULAR_TYPES = (ord("0"), 0, ord("7"))
_GNU_LONG_NAME, _PAX_HEADER = ord("L"), ord("x")
_PAX_PATH = r"(?s)^(?:.*\n)?\d+ path=([^\n]*)\n.*$"


def _octal(fields: tf.Tensor) -> tf.Tensor:
    """uint8 [n, k] ASCII octal numbers, padded with spaces or NULs -> int64 [n]."""
    digits = tf.cast(fields, tf.int64) - ord("0")
    is_digit = (digits >= 0) & (digits <= 7)
    place = tf.cumsum(tf.cast(is_digit, tf.int32), axis=1, exclusive=True, reverse=True)
    powers = tf.gather(tf.constant([8**i for i in range(fields.shape[1])], tf.int64), place)
    return tf.reduce_sum(tf.where(is_digit, digits * powers, 0), axis=1)


def _blocks_as_headers(raw: tf.Tensor) -> dict[str, tf.Tensor]:
    """Every 512-byte block (uint8 [n, 512]) read as a header -> {zero, valid, size, type} [n]."""
    # The checksum is the byte sum with its own field counted as spaces.
    field_sum = tf.reduce_sum(tf.cast(raw[:, _CHECKSUM], tf.int32), axis=1)
    expected = tf.reduce_sum(tf.cast(raw, tf.int32), axis=1) - field_sum + ord(" ") * (_CHECKSUM.stop - _CHECKSUM.start)
    return dict(
        zero=tf.reduce_all(raw == 0, axis=1),
        valid=_octal(raw[:, _CHECKSUM]) == tf.cast(expected, tf.int64),
        size=_octal(raw[:, _SIZE]),
        type=tf.cast(raw[:, _TYPE], tf.int32),
    )


def _c_strings(buffer: tf.Tensor, raw: tf.Tensor, offsets: tf.Tensor, field: slice) -> tf.Tensor:
    """The NUL-terminated strings in `field` of the headers at byte `offsets` (`raw`: their bytes)."""
    lengths = tf.reduce_sum(tf.math.cumprod(tf.cast(raw[:, field] != 0, tf.int64), axis=1), axis=1)
    return tf.strings.substr(buffer, offsets + field.start, lengths)


def _padded(size: tf.Tensor) -> tf.Tensor:
    return (size + BLOCK - 1) // BLOCK * BLOCK


def _walk(headers: dict[str, tf.Tensor], blocks: tf.Tensor, remaining: tf.Tensor):
    """Follows the headers from block 0: (member header block indices [m], blocks parsed, bytes
    needed from there for the next member, broken)."""

    def cond(block, heads, need, broken):
        return ~broken & (need == BLOCK) & (block < blocks)

    def body(block, heads, need, broken):
        zero, size = headers["zero"][block], BLOCK + _padded(headers["size"][block])
        bad = ~zero & (~headers["valid"][block] | (block * BLOCK + size > remaining))
        fits = block + size // BLOCK <= blocks
        member = ~zero & ~bad & fits
        heads = tf.concat([heads, tf.boolean_mask(block[None], member[None])], 0)
        step = tf.where(zero, tf.constant(1, tf.int64), tf.where(member, size // BLOCK, 0))
        need = tf.where(zero | bad | fits, tf.constant(BLOCK, tf.int64), size)
        return block + step, heads, need, broken | bad

    block, heads, need, broken = tf.while_loop(
        cond, body, (tf.constant(0, tf.int64), tf.zeros([0], tf.int64), tf.constant(BLOCK, tf.int64),
                     tf.constant(False)),
        shape_invariants=(tf.TensorShape([]), tf.TensorShape([None]), tf.TensorShape([]), tf.TensorShape([])),
    )
    return heads, block, need, broken


def _long_names(types: tf.Tensor, payloads: tf.Tensor) -> tf.Tensor:
    """The name each GNU long-name ('L') or PAX ('x', `path` record) header sets for the next member."""
    gnu = tf.strings.regex_replace(payloads, "(?s)\x00.*", "")
    pax = tf.where(tf.strings.regex_full_match(payloads, _PAX_PATH),
                   tf.strings.regex_replace(payloads, _PAX_PATH, r"\1"), "")
    return tf.where(types == _GNU_LONG_NAME, gnu, tf.where(types == _PAX_HEADER, pax, ""))


def _parse_buffer(buffer: tf.Tensor, remaining: tf.Tensor, long_name: tf.Tensor) -> dict[str, tf.Tensor]:
    """Parses the complete members at the start of `buffer`.

    Every block is read as a header at once (vectorised); a short loop then follows the sizes from
    header to header. `remaining` counts the bytes of the file from the start of `buffer` on: a
    member that needs more is truncated. Returns the regular files' `names` [n] and `payloads` [n],
    the bytes `parsed`, the bytes `need`ed from there before the next member is complete, the
    pending `long_name` and whether the archive is `broken` (bad checksum or truncated member).
    """
    blocks = tf.cast(tf.strings.length(buffer), tf.int64) // BLOCK
    raw = tf.reshape(tf.io.decode_raw(tf.strings.substr(buffer, tf.constant(0, tf.int64), blocks * BLOCK), tf.uint8),
                     [-1, BLOCK])
    headers = _blocks_as_headers(raw)
    heads, parsed_blocks, need, broken = _walk(headers, blocks, remaining)
    offsets, raw = heads * BLOCK, tf.gather(raw, heads)
    types, sizes = tf.gather(headers["type"], heads), tf.gather(headers["size"], heads)
    names = _c_strings(buffer, raw, offsets, _NAME)
    prefixes = _c_strings(buffer, raw, offsets, _PREFIX)
    magic_length = tf.fill(tf.shape(offsets), tf.constant(_MAGIC.stop - _MAGIC.start, tf.int64))
    ustar = tf.strings.substr(buffer, offsets + _MAGIC.start, magic_length) == b"ustar"
    names = tf.where(ustar & (tf.strings.length(prefixes) > 0), prefixes + "/" + names, names)
    payloads = tf.strings.substr(buffer, offsets + BLOCK, sizes)
    # A long-name header names the member after it, possibly in the next buffer.
    set_names = _long_names(types, payloads)
    overrides = tf.concat([long_name[None], set_names[:-1]], 0)
    names = tf.where(tf.strings.length(overrides) > 0, overrides, names)
    long_name = tf.concat([long_name[None], set_names], 0)[-1]
    regular = tf.reduce_any(types[:, None] == tf.constant(_REGULAR_TYPES), axis=1)
    return dict(names=tf.boolean_mask(names, regular), payloads=tf.boolean_mask(payloads, regular),
                parsed=parsed_blocks * BLOCK, need=need, long_name=long_name, broken=broken)


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
