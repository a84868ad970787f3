"""A strict reader of zip archives: central directory, zip64, stored and deflated records.

Written here rather than taken from ``zipfile`` because checkpoints need what zipfile
does not give: each record's data offset (for memory mapping), and refusal of the
tricks hostile archives play (overlapping or duplicate records, local headers that
disagree with the central directory, sizes that lie, data inside the directory).
"""

from __future__ import annotations

import functools
import itertools
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from torchkeep.errors import (
    CorruptCheckpointError,
    IntegrityError,
    TorchkeepError,
    UnsupportedFormatError,
)
from torchkeep.formats.zipstructs import (
    CENTRAL_HEADER,
    END_RECORD,
    LOCAL_HEADER,
    ZIP64_END_RECORD,
    ZIP64_LOCATOR,
)
from torchkeep.limits import DEFAULT_LIMITS, Limits
from torchkeep.storage.checksums import crc32
from torchkeep.storage.source import Source

__all__ = ["ZipArchive", "ZipMember"]


_MAX_DEFLATE_RATIO = 1032  # deflate cannot expand a byte into more than ~1032 bytes
#: With ``defer_headers`` on a remote source, stored records at least this large have their
#: local header checked when their data is first read (fetched in the same request),
#: instead of one request each at open.
DEFER_BYTES = 1 << 20
_ALIGNMENT = 64  # torch's writer (and torchkeep's) pad each record's data to 64 bytes


def aligned_data_offset(header_offset: int, name_length: int) -> int:
    """Where torch's zip writer puts a record's data: after the local header, the name and
    an extra field of at least 4 bytes that pads the data to 64 bytes."""
    start = header_offset + LOCAL_HEADER.size + name_length + 4
    return start + (-start) % _ALIGNMENT


@dataclass(slots=True)
class ZipMember:
    """One record: where its data lies and what the central directory says about it."""

    name: str
    method: int
    flags: int
    crc: int
    compressed_size: int
    size: int
    header_offset: int
    data_offset: int

    @property
    def stored(self) -> bool:
        """True when the data is stored uncompressed (so it can be memory-mapped)."""
        return self.method == 0


class _Central(NamedTuple):
    """What the central directory says of a record, which its local header must match."""

    raw_name: bytes
    flags: int
    method: int
    crc: int
    csize: int
    usize: int
    offset: int


class ZipArchive:
    """The records of a zip archive, validated up front; data is read on demand."""

    def __init__(self, source: Source, *, limits: Limits = DEFAULT_LIMITS,
                 defer_headers: bool = False) -> None:
        self.source = source
        self.limits = limits
        #: remote sources only: large records' local headers are checked on first read
        self._defer = defer_headers and source.remote
        self._pending: dict[str, _Central] = {}
        self.members: dict[str, ZipMember] = {}
        self.order: list[str] = []
        #: byte ranges of the central directory and of the end records (with the comment)
        self.directory_span = (0, 0)
        self.end_span = (0, 0)
        self._parse()

    def _fail(self, message: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"zip: {message}", source=self.source.name)

    # -- directory -------------------------------------------------------------------------

    def _find_eocd(self) -> tuple[int, tuple[int, ...]]:
        size = self.source.size
        if size < END_RECORD.size:
            raise self._fail("file too small to be a zip archive")
        tail_len = min(size, END_RECORD.size + 0xFFFF)
        tail = self.source.read(size - tail_len, tail_len)
        pos = tail.rfind(b"PK\x05\x06")
        while pos >= 0:
            if pos + END_RECORD.size <= len(tail):
                fields = END_RECORD.unpack_from(tail, pos)
                if pos + END_RECORD.size + fields[7] == len(tail):
                    return size - tail_len + pos, fields
            pos = tail.rfind(b"PK\x05\x06", 0, pos)
        raise self._fail("no end-of-central-directory record (truncated or not a zip)")

    def _parse(self) -> None:
        eocd_pos, eocd = self._find_eocd()
        _, disk, cd_disk, n_disk, n_total, cd_size, cd_offset, _ = eocd
        dir_end = eocd_pos
        if eocd_pos >= ZIP64_LOCATOR.size:
            loc = self.source.read(eocd_pos - ZIP64_LOCATOR.size, ZIP64_LOCATOR.size)
            sig, loc_disk, z64_offset, disks = ZIP64_LOCATOR.unpack(loc)
            if sig == b"PK\x06\x07":
                if z64_offset + ZIP64_END_RECORD.size > eocd_pos - ZIP64_LOCATOR.size:
                    raise self._fail("zip64 end record offset points past its locator")
                (sig64, _rec_size, _made, _need, disk64, cd_disk64, n_disk64, n_total64,
                 cd_size64, cd_offset64) = ZIP64_END_RECORD.unpack(
                    self.source.read(z64_offset, ZIP64_END_RECORD.size)
                )
                if sig64 != b"PK\x06\x06":
                    raise self._fail("bad zip64 end-of-central-directory signature")
                for classic, wide, sentinel, what in (
                    (n_total, n_total64, 0xFFFF, "entry count"),
                    (cd_size, cd_size64, 0xFFFFFFFF, "directory size"),
                    (cd_offset, cd_offset64, 0xFFFFFFFF, "directory offset"),
                ):
                    if classic not in (sentinel, wide):
                        raise self._fail(f"zip64 and classic end records disagree on the {what}")
                disk, cd_disk, n_disk, n_total = disk64, cd_disk64, n_disk64, n_total64
                cd_size, cd_offset = cd_size64, cd_offset64
                dir_end = z64_offset
                if loc_disk != 0 or disks > 1:
                    raise UnsupportedFormatError(
                        "multi-disk zip archives are not supported", source=self.source.name
                    )
        if disk != 0 or cd_disk != 0 or n_disk != n_total:
            raise UnsupportedFormatError(
                "multi-disk zip archives are not supported", source=self.source.name
            )
        self.limits.check("max_zip_members", n_total, "zip records")
        if cd_offset + cd_size > dir_end:
            raise self._fail(
                f"central directory ({cd_offset}+{cd_size}) runs past its end record at {dir_end}"
            )
        if n_total * CENTRAL_HEADER.size > cd_size:
            raise self._fail(f"{n_total} records cannot fit a {cd_size}-byte central directory")
        directory = self.source.read(cd_offset, cd_size)
        self._parse_directory(directory, n_total, cd_offset)
        self.directory_span = (cd_offset, cd_offset + cd_size)
        self.end_span = (dir_end, eocd_pos + END_RECORD.size)

    def _parse_directory(self, directory: bytes, count: int, cd_offset: int) -> None:
        if self.source.remote:  # the local headers read now, in a few concurrent requests
            limit = DEFER_BYTES if self._defer else None
            self.source.prefetch(_local_header_hints(directory, count, limit))
        pos = 0
        members: list[ZipMember] = []
        eager_aligned = True
        for _ in range(count):
            if pos + CENTRAL_HEADER.size > len(directory):
                raise self._fail("central directory is truncated")
            (sig, _made, _need, flags, method, _time, _date, crc, csize, usize, nlen, xlen,
             clen, disk, _iattr, _eattr, offset) = CENTRAL_HEADER.unpack_from(directory, pos)
            if sig != b"PK\x01\x02":
                raise self._fail(f"bad central directory signature at entry {len(members)}")
            pos += CENTRAL_HEADER.size
            if pos + nlen + xlen + clen > len(directory):
                raise self._fail("central directory entry runs past the directory")
            raw_name = directory[pos : pos + nlen]
            extra = directory[pos + nlen : pos + nlen + xlen]
            pos += nlen + xlen + clen
            usize, csize, offset = self._zip64_fields(extra, usize, csize, offset, disk)
            try:
                name = raw_name.decode("utf-8" if flags & 0x800 else "cp437")
            except UnicodeDecodeError as e:
                raise self._fail(f"record name {raw_name!r} is not valid UTF-8") from e
            if flags & 0x1:
                raise UnsupportedFormatError(
                    f"record {name!r} is encrypted", source=self.source.name
                )
            if method not in (0, 8):
                raise UnsupportedFormatError(
                    f"record {name!r} uses compression method {method}; "
                    "only stored and deflated records are read",
                    source=self.source.name,
                )
            if method == 0 and csize != usize:
                raise self._fail(f"stored record {name!r} has different sizes ({csize}, {usize})")
            if method == 8 and usize > max(csize, 1) * _MAX_DEFLATE_RATIO:
                raise self._fail(f"deflated record {name!r} claims an impossible size {usize}")
            if name in self.members:
                raise self._fail(f"duplicate record {name!r}")
            if self._defer and method == 0 and DEFER_BYTES <= csize < 0xFFFFFFFF:
                # (a zip64 record's local header has a zip64 field: not predicted)
                member = ZipMember(name, method, flags, crc, csize, usize, offset,
                                   aligned_data_offset(offset, nlen))
                self._pending[name] = _Central(raw_name, flags, method, crc, csize, usize,
                                               offset)
            else:
                member = self._local(name, _Central(raw_name, flags, method, crc, csize,
                                                    usize, offset))
                eager_aligned &= member.data_offset == aligned_data_offset(offset, nlen)
            if member.data_offset + csize > cd_offset:
                raise self._fail(f"record {name!r} runs into the central directory")
            self.members[name] = member
            self.order.append(name)
            members.append(member)
        if pos != len(directory):
            raise self._fail("central directory has trailing bytes")
        if self._pending and (not eager_aligned or len(self._pending) == len(members)):
            # not laid out as torch writes: every local header is read now, as locally
            self.source.prefetch([(m.header_offset, LOCAL_HEADER.size + 4096)
                                  for m in members if m.name in self._pending])
            for i, m in enumerate(members):
                central = self._pending.pop(m.name, None)
                if central is not None:
                    members[i] = self.members[m.name] = self._local(m.name, central)
                    if members[i].data_offset + members[i].compressed_size > cd_offset:
                        raise self._fail(f"record {m.name!r} runs into the central directory")
        for name in self._pending:
            m = self.members[name]
            self.source.expect(m.data_offset, m.header_offset,
                               functools.partial(self._check_deferred, name))
        members.sort(key=lambda mem: mem.header_offset)
        for a, b in itertools.pairwise(members):
            if a.data_offset + a.compressed_size > b.header_offset:
                raise self._fail(f"records {a.name!r} and {b.name!r} overlap")

    def _zip64_fields(
        self, extra: bytes, usize: int, csize: int, offset: int, disk: int
    ) -> tuple[int, int, int]:
        pos = 0
        while pos + 4 <= len(extra):
            tag, length = struct.unpack_from("<HH", extra, pos)
            pos += 4
            if pos + length > len(extra):
                raise self._fail("extra field runs past its entry")
            if tag == 1:
                body = extra[pos : pos + length]
                fields: list[int] = []
                want = [usize == 0xFFFFFFFF, csize == 0xFFFFFFFF, offset == 0xFFFFFFFF]
                need = 8 * sum(want)
                if len(body) < need:
                    raise self._fail("zip64 extra field too short")
                fields = list(struct.unpack_from(f"<{sum(want)}Q", body)) if need else []
                it = iter(fields)
                if want[0]:
                    usize = next(it)
                if want[1]:
                    csize = next(it)
                if want[2]:
                    offset = next(it)
            pos += length
        self.limits.check("max_tensor_bytes", usize, "zip record size")
        return usize, csize, offset

    def _local(self, name: str, central: _Central) -> ZipMember:
        offset = central.offset
        if offset + LOCAL_HEADER.size > self.source.size:
            raise self._fail(f"record {name!r} has its local header past the end of the file")
        header = self.source.read(offset, LOCAL_HEADER.size)
        return self._check_local(name, central, header,
                                 lambda n: self.source.read(offset + LOCAL_HEADER.size, n))

    def _check_deferred(self, name: str, header: bytes) -> None:
        """Check a deferred record's local header (``header``: the bytes from it to the
        predicted data offset) as ``_local`` would have; the data must be where the
        prediction put it."""
        central = self._pending.get(name)
        if central is None:
            return
        member = self.members[name]
        if len(header) < LOCAL_HEADER.size:
            raise self._fail(f"record {name!r}: its local header is cut short")

        def name_bytes(n: int) -> bytes:
            if LOCAL_HEADER.size + n > len(header):
                raise self._fail(f"record {name!r}: local header names a different record")
            return header[LOCAL_HEADER.size : LOCAL_HEADER.size + n]

        checked = self._check_local(name, central, header[:LOCAL_HEADER.size], name_bytes)
        if checked.data_offset != member.data_offset:
            raise self._fail(f"record {name!r}: its local header puts the data at "
                             f"{checked.data_offset}, not at {member.data_offset} where the "
                             "archive's 64-byte alignment does (a file laid out unlike torch's)")
        self._pending.pop(name, None)

    def _verify_pending(self, member: ZipMember) -> None:
        if member.name in self._pending:
            length = member.data_offset - member.header_offset
            self._check_deferred(member.name, self.source.read(member.header_offset, length))

    def _check_local(self, name: str, central: _Central, header: bytes,
                     read_name: Callable[[int], bytes]) -> ZipMember:
        """A record's local header (its 30 fixed bytes, ``read_name`` for its name) checked
        against the central directory; the record with its data offset."""
        raw_name, flags, method, crc, csize, usize, offset = central
        (sig, _need, lflags, lmethod, _time, _date, lcrc, lcsize, lusize, lnlen,
         lxlen) = LOCAL_HEADER.unpack(header)
        if sig != b"PK\x03\x04":
            raise self._fail(f"record {name!r}: no local header at offset {offset}")
        if lmethod != method:
            raise self._fail(f"record {name!r}: local and central headers disagree on method")
        if (lflags ^ flags) & 0x0809:
            raise self._fail(f"record {name!r}: local and central headers disagree on flags")
        if read_name(lnlen) != raw_name:
            raise self._fail(f"record {name!r}: local header names a different record")
        if not lflags & 0x8:
            if lcrc != crc:
                raise self._fail(f"record {name!r}: local and central CRC-32 disagree")
            if lcsize != 0xFFFFFFFF and (lcsize != csize or lusize != usize):
                raise self._fail(f"record {name!r}: local and central sizes disagree")
        data_offset = offset + LOCAL_HEADER.size + lnlen + lxlen
        if data_offset + csize > self.source.size:
            raise self._fail(f"record {name!r} runs past the end of the file (truncated)")
        return ZipMember(name, method, flags, crc, csize, usize, offset, data_offset)

    # -- data ------------------------------------------------------------------------------

    def check_inflation(self, member: ZipMember) -> None:
        """LimitExceededError when a deflated record would inflate past the limit (from its
        sizes, before anything is allocated)."""
        if not member.stored and member.size > self.limits.max_inflated_bytes:
            try:
                self.limits.check("max_inflated_bytes", member.size,
                                  f"deflated record {member.name!r} "
                                  f"({member.compressed_size:,} bytes): its inflated size")
            except TorchkeepError as e:
                raise e.with_source(self.source.name) from None

    def read(self, name: str, *, verify: bool = True) -> bytes:
        """The uncompressed bytes of record ``name``; CRC-32 checked when ``verify``."""
        member = self.members[name]
        self.check_inflation(member)
        self._verify_pending(member)
        raw = self.source.read(member.data_offset, member.compressed_size)
        data = raw if member.stored else self._inflate(member, raw)
        if verify:
            self.check_crc(member, data)
        return data

    def check_crc(self, member: ZipMember, data: bytes | memoryview) -> None:
        """Raise IntegrityError when ``data`` does not match the record's CRC-32.

        A CRC of 0 on a non-empty record means the writer did not compute one
        (``torch.serialization.set_crc32_options(False)``) and is not checked.
        """
        if member.crc == 0 and member.size:
            return
        actual = crc32(data)
        if actual != member.crc:
            raise IntegrityError(
                f"record {member.name!r}: CRC-32 {actual:08x} does not match the "
                f"recorded {member.crc:08x}",
                source=self.source.name,
            )

    def _inflate(self, member: ZipMember, raw: bytes) -> bytes:
        inflater = zlib.decompressobj(-15)
        try:
            data = inflater.decompress(raw, member.size)
        except zlib.error as e:
            raise self._fail(f"record {member.name!r}: bad deflate data ({e})") from e
        if len(data) != member.size or inflater.unconsumed_tail or not inflater.eof:
            raise self._fail(f"record {member.name!r}: deflated size does not match its header")
        return data


def _local_header_hints(directory: bytes, count: int,
                        defer: int | None = None) -> list[tuple[int, int]]:
    """Where the local headers probably are (offset, size) by a lenient pass over the
    central directory (leaving out stored records of ``defer`` bytes or more, whose
    headers are read with their data); only a prefetch hint: the parse checks all."""
    hints = []
    pos = 0
    for _ in range(count):
        if pos + CENTRAL_HEADER.size > len(directory):
            break
        fields = CENTRAL_HEADER.unpack_from(directory, pos)
        nlen, xlen, clen, offset = fields[10], fields[11], fields[12], fields[16]
        deferred = defer is not None and fields[4] == 0 and fields[8] >= defer
        if offset != 0xFFFFFFFF and not deferred:  # zip64 offsets: in the extra field
            hints.append((offset, LOCAL_HEADER.size + nlen + 64))
        pos += CENTRAL_HEADER.size + nlen + xlen + clen
    return hints

