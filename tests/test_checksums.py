"""The fast CRC-32 and the adaptive read-ahead of local sources."""

from __future__ import annotations

import os
import zlib

import pytest
import torch

import torchkeep
from torchkeep.storage import checksums
from torchkeep.storage.source import open_source


@pytest.mark.parametrize("size", [0, 1, 63, 4096, checksums.INLINE_BYTES + 17, 3 << 20])
def test_crc32_matches_zlib(size: int) -> None:
    data = os.urandom(size)
    assert checksums.crc32(data) == zlib.crc32(data)
    assert checksums.crc32(data, 0x1234ABCD) == zlib.crc32(data, 0x1234ABCD)
    with checksums.crc32_overlapped(memoryview(data)) as overlapped:
        pass
    assert overlapped.result() == zlib.crc32(data)


def test_isal_is_used_where_installed() -> None:
    try:
        import isal.isal_zlib
    except ImportError:
        assert checksums.CRC32_IMPLEMENTATION == "zlib"
        assert checksums.crc32 is zlib.crc32
    else:
        assert checksums.CRC32_IMPLEMENTATION == "isal"
        assert checksums.crc32 is isal.isal_zlib.crc32


def test_saved_crcs_are_zlibs_and_verify_finds_a_flipped_byte(tmp_path) -> None:
    import zipfile

    path = tmp_path / "a.pt"
    tensors = {f"t{i}": torch.arange(i * 70_000, dtype=torch.float32) for i in range(1, 5)}
    torchkeep.save(tensors, path)
    with zipfile.ZipFile(path) as z:
        for info in z.infolist():  # zipfile checks every CRC-32 against zlib's
            assert zlib.crc32(z.read(info)) == info.CRC
    assert torchkeep.verify(path).intact
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        info = z.getinfo(next(n for n in z.namelist() if n.endswith("data/3")))
    raw[info.header_offset + 200] ^= 0xFF  # inside the record's data
    path.write_bytes(raw)
    result = torchkeep.verify(path)
    assert not result.intact
    assert "CRC-32" in str(result.problem)


def _reads_and_bytes(source, offsets: list[int], n: int) -> tuple[int, int]:
    calls = [0, 0]
    real = source.readinto

    def counting(offset: int, out: memoryview) -> None:
        calls[0] += 1
        calls[1] += out.nbytes
        real(offset, out)

    source.readinto = counting
    for offset in offsets:
        source.read(offset, n)
    return calls[0], calls[1]


def test_read_ahead_shrinks_for_scattered_headers_and_serves_clustered_ones(tmp_path) -> None:
    path = tmp_path / "blob"
    data = os.urandom(64 << 20)
    path.write_bytes(data)
    with open_source(str(path)) as source:
        scattered = [i << 20 for i in range(60)]  # one small read per MiB, as big records
        calls, nbytes = _reads_and_bytes(source, scattered, 30)
        assert calls == 60
        assert nbytes < 60 * 4096 + 3 * (256 << 10)  # not 256 KiB a read
        assert all(source.read(o, 30) == data[o : o + 30] for o in scattered)
    with open_source(str(path)) as source:
        clustered = list(range(0, 200_000, 100))  # 2000 reads 100 bytes apart
        calls, _ = _reads_and_bytes(source, clustered, 30)
        assert calls <= 10
        assert all(source.read(o, 30) == data[o : o + 30] for o in clustered)
