"""Static analysis of pickle-based files: every global a pickle would import, never executed.

The walk simulates the pickle stack symbolically (string constants, the memo, marks), so
a ``STACK_GLOBAL`` whose module and name come from memoized strings is still named; one
whose operands cannot be known statically is reported as unknown. Verdicts:

* ``safe``: on torchkeep's default allowlist (what ``torchkeep.load`` accepts);
* ``unsafe``: from a module that runs code or reaches the system (``os``, ``builtins.eval``,
  ``subprocess``, ``torch.hub`` ...), an extension-registry code, or TorchScript code;
* ``unknown``: anything else (it would need ``allow=`` to load, so it is a finding).

Pickles are looked for everywhere a loader might read one: every zip record that is
not a tensor storage, each pickle of the legacy stream, concatenated pickles in a plain
pickle file, pickles nested as bytes constants inside other pickles, and bytes hidden
outside a zip's records (gaps, the archive comment) or before it.
"""

from __future__ import annotations

import io
import pickletools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from torchkeep.errors import TorchkeepError
from torchkeep.formats.detect import is_pickle_head, is_zip_head, looks_like_safetensors
from torchkeep.formats.torch_legacy import is_legacy, stream_bytes
from torchkeep.formats.ziparchive import ZipArchive
from torchkeep.limits import DEFAULT_LIMITS, Limits
from torchkeep.storage.source import Source, open_source
from torchkeep.unpickle.allowlist import Allowlist, canonical, dangerous

__all__ = ["Finding", "ScanReport", "scan", "scan_pickle_bytes"]

_SAFE_NAMES = Allowlist().names
_STRING_OPS = {"BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8", "UNICODE", "STRING",
               "BINSTRING", "SHORT_BINSTRING"}
_BYTES_OPS = {"BINBYTES", "SHORT_BINBYTES", "BINBYTES8", "BYTEARRAY8"}
_MAX_NESTING = 8


@dataclass(frozen=True, slots=True)
class Finding:
    """One global (or other code reference) a pickle names, with its verdict."""

    location: str
    offset: int
    opcode: str
    name: str
    verdict: str
    detail: str = ""


@dataclass(slots=True)
class ScanReport:
    """What a scan of one input found."""

    path: str
    format: str
    findings: list[Finding] = field(default_factory=list)
    pickles: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        """True when every global is safe and the whole input could be scanned."""
        return not self.errors and all(f.verdict == "safe" for f in self.findings)

    @property
    def flagged(self) -> list[Finding]:
        """Findings that are not safe."""
        return [f for f in self.findings if f.verdict != "safe"]


def verdict_of(qualname: str) -> str:
    """``safe``, ``unsafe`` or ``unknown`` for a ``module.name`` global."""
    module, _, name = qualname.rpartition(".")
    qualname = f"{canonical(module)}.{name}"
    if qualname in _SAFE_NAMES:
        return "safe"
    return "unsafe" if dangerous(qualname) else "unknown"


class _Unknown:
    __slots__ = ()


_UNKNOWN = _Unknown()
_MARK = object()


def scan_pickle_bytes(
    data: Any,
    location: str,
    *,
    start: int = 0,
    nesting: int = 0,
) -> tuple[list[Finding], int, str | None]:
    """Scan one pickle stream of ``data`` (bytes, or a seekable object such as an mmap)
    starting at ``start``: its findings, where it ended, and an error message when it is
    malformed (findings up to that point are kept)."""
    findings: list[Finding] = []
    stack: list[Any] = []
    memo: dict[Any, Any] = {}
    stream: Any = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
    stream.seek(start)
    error: str | None = None
    try:
        ops: Iterator[tuple[Any, Any, int | None]] = pickletools.genops(stream)
        for opcode, arg, pos in ops:
            offset = pos or 0
            name = opcode.name
            if name == "STOP":
                break
            if name in _STRING_OPS:
                stack.append(arg if isinstance(arg, str) else _decode(arg))
                continue
            if name in _BYTES_OPS:
                raw = bytes(arg)
                stack.append(raw)
                if raw[:1] == b"\x80" and len(raw) > 2 and nesting < _MAX_NESTING:
                    nested, _, nested_error = scan_pickle_bytes(
                        raw, f"{location}@{offset}(nested pickle)", nesting=nesting + 1
                    )
                    findings.extend(nested)
                    if nested and nested_error is None:
                        findings.append(Finding(location, offset, name, "<nested pickle>",
                                                "unknown", "a pickle stored inside a pickle"))
                continue
            if name in ("GLOBAL", "INST"):
                module, _, attr = str(arg).partition(" ")
                qualname = f"{module}.{attr}"
                findings.append(Finding(location, offset, name, qualname, verdict_of(qualname)))
                if name == "INST":
                    _pop_mark(stack)
                stack.append(_UNKNOWN)
                continue
            if name == "STACK_GLOBAL":
                top = stack.pop() if stack else _UNKNOWN
                below = stack.pop() if stack else _UNKNOWN
                if isinstance(below, str) and isinstance(top, str):
                    qualname = f"{below}.{top}"
                    findings.append(Finding(location, offset, name, qualname,
                                            verdict_of(qualname)))
                else:
                    findings.append(Finding(location, offset, name, "?", "unknown",
                                            "module or name is not a constant string"))
                stack.append(_UNKNOWN)
                continue
            if name in ("EXT1", "EXT2", "EXT4"):
                findings.append(Finding(location, offset, name, f"<extension {arg}>", "unsafe",
                                        "copyreg extension registry code"))
                stack.append(_UNKNOWN)
                continue
            if name in ("PUT", "BINPUT", "LONG_BINPUT"):
                memo[arg] = stack[-1] if stack else _UNKNOWN
                continue
            if name == "MEMOIZE":
                memo[len(memo)] = stack[-1] if stack else _UNKNOWN
                continue
            if name in ("GET", "BINGET", "LONG_BINGET"):
                stack.append(memo.get(arg, _UNKNOWN))
                continue
            _generic(opcode, stack)
        else:
            error = "the stream ends without STOP"
    except (ValueError, KeyError, IndexError, TypeError, OverflowError) as e:
        error = f"malformed pickle ({e})"
    return findings, stream.tell(), error


def _decode(arg: Any) -> Any:
    if isinstance(arg, bytes):
        try:
            return arg.decode("utf-8")
        except UnicodeDecodeError:
            return _UNKNOWN
    return arg


def _pop_mark(stack: list[Any]) -> None:
    while stack:
        if stack.pop() is _MARK:
            return


def _generic(opcode: Any, stack: list[Any]) -> None:
    """Apply an opcode's documented stack effect with unknown values."""
    before = opcode.stack_before
    after = opcode.stack_after
    if pickletools.markobject in before:
        _pop_mark(stack)
        count = len([b for b in before if b is not pickletools.markobject
                     and b is not pickletools.stackslice])
        for _ in range(count):
            if stack:
                stack.pop()
    else:
        for _ in before:
            if stack:
                stack.pop()
    for item in after:
        stack.append(_MARK if item is pickletools.markobject else _UNKNOWN)


def _pickles_in(data: bytes, location: str, report: ScanReport, *,
                sequence: bool, sweep: bool = False) -> None:
    """Scan the pickle(s) in ``data``: one, a sequence (until the bytes end), or every
    position that starts like a pickle (``sweep``: hidden data)."""
    if sweep:
        pos = data.find(b"\x80")
        while pos >= 0:
            if pos + 1 < len(data) and 2 <= data[pos + 1] <= 5:
                findings, end, error = scan_pickle_bytes(data, f"{location}@{pos}", start=pos)
                if findings and error is None:
                    report.pickles += 1
                    report.findings.extend(findings)
                    report.findings.append(Finding(location, pos, "PROTO", "<hidden pickle>",
                                                   "unknown", "a pickle outside any record"))
                    pos = data.find(b"\x80", end)
                    continue
            pos = data.find(b"\x80", pos + 1)
        return
    pos = 0
    index = 0
    while pos < len(data):
        findings, end, error = scan_pickle_bytes(
            data, location if index == 0 else f"{location}#{index + 1}", start=pos
        )
        report.pickles += 1
        report.findings.extend(findings)
        if error is not None:
            report.errors.append(f"{location}: {error}")
            return
        if not sequence:
            return
        pos = end
        index += 1


def scan(f: Any, *, limits: Limits = DEFAULT_LIMITS) -> ScanReport:
    """Statically scan ``f`` (a path, file object or bytes); nothing in it is executed."""
    source = open_source(f)
    try:
        return _scan_source(source, limits)
    finally:
        source.close()


def _scan_source(source: Source, limits: Limits) -> ScanReport:
    head = source.read(0, min(source.size, 512))
    report = ScanReport(source.name, "unknown")
    if is_zip_head(head):
        report.format = "zip"
        _scan_zip(source, report, limits)
    elif is_legacy(head):
        report.format = "torch-legacy"
        _scan_legacy(source, report, limits)
    elif is_pickle_head(head):
        report.format = "pickle"
        limits.check("max_pickle_bytes", source.size, "pickle size")
        _pickles_in(source.read(0, source.size), "pickle", report, sequence=True)
    elif looks_like_safetensors(head, source.size):
        report.format = "safetensors"  # JSON and raw bytes: nothing executable
    else:
        limits.check("max_pickle_bytes", source.size, "file size")
        data = source.read(0, source.size)
        zip_at = data.find(b"PK\x03\x04")
        report.format = "unrecognised"
        _pickles_in(data, "file", report, sequence=False, sweep=True)
        if zip_at > 0:
            report.errors.append(f"a zip archive starts at byte {zip_at}, after other data")
    return report


def _scan_zip(source: Source, report: ScanReport, limits: Limits) -> None:
    try:
        archive = ZipArchive(source, limits=limits)
    except TorchkeepError as e:
        report.errors.append(f"zip: {e.reason}; swept the raw bytes for pickles instead")
        limits.check("max_pickle_bytes", source.size, "file size")
        _pickles_in(source.read(0, source.size), "zip", report, sequence=False, sweep=True)
        return
    covered = []
    names = archive.order
    if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
        report.format = "torchscript"
        code = [n for n in names if "/code/" in n and n.endswith(".py")]
        report.findings.append(Finding(
            names[0].split("/")[0], 0, "ARCHIVE", "<TorchScript code>", "unsafe",
            f"{len(code)} code files that torch.jit.load compiles and runs",
        ))
    for name in names:
        member = archive.members[name]
        covered.append((member.header_offset, member.data_offset + member.compressed_size))
        record = name.split("/", 1)[-1]
        if record.startswith("data/") and report.format != "torchscript":
            continue  # raw tensor storage
        if member.size > limits.max_pickle_bytes:
            continue
        try:
            data = archive.read(name, verify=False)
        except TorchkeepError as e:
            report.errors.append(f"{name}: {e.reason}")
            continue
        if name.endswith(".pkl") or data[:1] == b"\x80":
            _pickles_in(data, name, report, sequence=False)
    covered += [archive.directory_span, archive.end_span]
    _scan_gaps(source, sorted(covered), report, limits)


def _scan_gaps(source: Source, covered: list[tuple[int, int]], report: ScanReport,
               limits: Limits) -> None:
    """Bytes no record or directory structure accounts for (before and between records,
    the comment) may hide pickles."""
    gaps = []
    cursor = 0
    for begin, end in covered:
        if begin > cursor:
            gaps.append((cursor, begin))
        cursor = max(cursor, end)
    if source.size > cursor:
        gaps.append((cursor, source.size))
    for begin, end in gaps:
        if end - begin > 16 and end - begin <= limits.max_pickle_bytes:
            chunk = source.read(begin, end - begin)
            _pickles_in(chunk, f"bytes {begin}..{end} outside the zip records", report,
                        sequence=False, sweep=True)


def _scan_legacy(source: Source, report: ScanReport, limits: Limits) -> None:
    data = stream_bytes(source)
    pos = 0
    for label in ("magic number", "protocol version", "sys_info", "object", "storage keys"):
        findings, pos, error = scan_pickle_bytes(data, label, start=pos)
        report.pickles += 1
        report.findings.extend(findings)
        if error is not None:
            report.errors.append(f"{label}: {error}")
            return
