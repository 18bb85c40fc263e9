"""The in-graph tar reader against Python's `tarfile`: formats, long names, large members, faults."""

import io
import os
import tarfile

import numpy as np
import pytest

from clippy_jax.data import tar


def _write(path: str, tar_format: int) -> list[tuple[str, bytes]]:
    """Members of varied sizes (some larger than a read chunk), long names, a directory and a link."""
    rng = np.random.default_rng(tar_format)
    members = []
    with tarfile.open(path, "w", format=tar_format) as archive:
        directory = tarfile.TarInfo("images")
        directory.type = tarfile.DIRTYPE
        archive.addfile(directory)
        for i in range(12):
            prefix = "images/" + ("x" * 120 + "/" if i % 4 == 1 else "")
            for extension in ("jpg", "txt"):
                data = rng.bytes(int(rng.integers(0, 400_000)) if extension == "jpg" else 20)
                info = tarfile.TarInfo(f"{prefix}{i:04d}.{extension}")
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
                members.append((info.name, data))
        link = tarfile.TarInfo("images/link.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "images/0000.jpg"
        archive.addfile(link)
    return members


def _read(path: str, size: int) -> tuple[list[tuple[str, bytes]], bool]:
    elements = list(tar.read_members(path, size).as_numpy_iterator())
    assert elements[-1]["end"] and not any(e["end"] for e in elements[:-1])
    return [(e["name"].decode(), e["data"]) for e in elements[:-1]], bool(elements[-1]["intact"])


@pytest.mark.parametrize("tar_format", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_members_equal_tarfile_and_faults_keep_what_precedes_them(tmp_path, tar_format):
    path = str(tmp_path / "shard.tar")
    members = _write(path, tar_format)
    size = os.path.getsize(path)
    assert _read(path, size) == (members, True)

    with open(path, "rb") as f:
        data = f.read()
    with tarfile.open(path) as archive:
        offsets = {m.name: m.offset_data for m in archive}
    cut_member = next(i for i, (_, d) in enumerate(members) if i >= 8 and len(d) > 2 * tar.BLOCK)
    cut = offsets[members[cut_member][0]] + len(members[cut_member][1]) // 2
    truncated = str(tmp_path / "truncated.tar")
    with open(truncated, "wb") as f:
        f.write(data[:cut])
    assert _read(truncated, cut) == (members[:cut_member], False)

    corrupt = bytearray(data)
    corrupt[offsets[members[5][0]] - 512 + 3] ^= 0xFF  # the 6th member's header checksum fails
    broken = str(tmp_path / "corrupt.tar")
    with open(broken, "wb") as f:
        f.write(bytes(corrupt))
    got, intact = _read(broken, size)
    assert got == members[: len(got)] and len(got) <= 5 and not intact


def test_unreadable_files_are_reported_not_raised(tmp_path):
    garbage = str(tmp_path / "garbage.tar")
    with open(garbage, "wb") as f:
        f.write(np.random.default_rng(0).bytes(5000))
    assert _read(garbage, 5000) == ([], False)
    assert _read(str(tmp_path / "gone.tar"), 5000) == ([], False)  # deleted since start-up
    assert _read(garbage, -1) == ([], False)  # could not be stat-ed at start-up
