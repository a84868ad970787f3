"""The fixed-size records of the zip format (PKWARE APPNOTE 6.3), shared by the reader
and the writer; the comments give each record's size in bytes."""

from __future__ import annotations

import struct

__all__ = [
    "CENTRAL_HEADER",
    "DESCRIPTOR",
    "DESCRIPTOR64",
    "END_RECORD",
    "LOCAL_HEADER",
    "ZIP64_END_RECORD",
    "ZIP64_LOCATOR",
]

LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")  # 30
CENTRAL_HEADER = struct.Struct("<4sHHHHHHIIIHHHHHII")  # 46
DESCRIPTOR = struct.Struct("<4sIII")  # 16: data descriptor after a record's data
DESCRIPTOR64 = struct.Struct("<4sIQQ")  # 24: the same with zip64 sizes
END_RECORD = struct.Struct("<4sHHHHIIH")  # 22
ZIP64_LOCATOR = struct.Struct("<4sIQI")  # 20
ZIP64_END_RECORD = struct.Struct("<4sQHHIIQQQQ")  # 56
