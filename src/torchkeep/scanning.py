"""``torchkeep.scan``: every global the pickles of a file would import, never executed.

The file is classified once, by ``formats.detect`` (the classification ``load`` uses), and
pickles are looked for everywhere a loader might read one: every zip record that is not a
tensor storage, each pickle of the legacy stream, the members of a tar archive (torch's
pre-0.1.10 layout), a numpy object array, concatenated pickles in a plain pickle file,
pickles nested as bytes constants inside other pickles, and bytes hidden outside a zip's
records (gaps, the archive comment) or before it.

A report's ``verdict`` is ``dangerous`` when a global is not on the default allowlist (or
the stream hides code some other way), ``incomplete`` when part of the input could not be
scanned or its format is not one torchkeep recognises (a scanner never vouches for bytes
it did not understand), and ``clean`` otherwise.
"""

from __future__ import annotations

import ast
import dataclasses
from dataclasses import dataclass, field
from typing import Any

from torchkeep.errors import FormatError, TorchkeepError, shown
from torchkeep.formats.detect import archive_format, sniff, tar_format
from torchkeep.formats.tar import tar_members
from torchkeep.formats.torch_legacy import stream_bytes
from torchkeep.formats.ziparchive import ZipArchive
from torchkeep.limits import DEFAULT_LIMITS, Limits
from torchkeep.storage.source import Source, open_source
from torchkeep.unpickle.scanner import Finding, scan_pickle_bytes

__all__ = ["ScanReport", "scan"]

_MAX_NESTING = 4  # archives inside archives


@dataclass(slots=True)
class ScanReport:
    """What a scan of one input found."""

    path: str
    format: str
    findings: list[Finding] = field(default_factory=list)
    pickles: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def flagged(self) -> list[Finding]:
        """Findings that are not safe."""
        return [f for f in self.findings if f.verdict != "safe"]

    @property
    def complete(self) -> bool:
        """True when the format is one torchkeep knows and every part of it was scanned."""
        return not self.errors and self.format not in ("unrecognised", "empty")

    @property
    def verdict(self) -> str:
        """``dangerous``, ``incomplete`` or ``clean`` (see the module docstring)."""
        if self.flagged:
            return "dangerous"
        return "clean" if self.complete else "incomplete"

    @property
    def clean(self) -> bool:
        """True when every global is safe and the whole input could be scanned."""
        return self.verdict == "clean"


def scan(f: Any, *, limits: Limits = DEFAULT_LIMITS) -> ScanReport:
    """Statically scan ``f`` (a path, file object or bytes); nothing in it is executed."""
    from torchkeep.api import step_directory

    hf = _scan_hf(f, limits)
    if hf is not None:
        return hf
    directory = step_directory(f)  # a local folder, or one at an fsspec URL
    if directory is not None:
        from torchkeep.formats.dcp import is_dcp_dir
        from torchkeep.storage.filesystem import open_filesystem

        fs, path = open_filesystem(directory)
        if is_dcp_dir(fs, path):
            return _scan_dcp_directory(fs, path, directory, limits)
        return _scan_step_directory(directory, limits)
    source = open_source(f)
    try:
        report = ScanReport(source.name, "unrecognised")
        _scan_source(source, report, limits, "", 0)
        return report
    finally:
        source.close()


def _scan_hf(f: Any, limits: Limits) -> ScanReport | None:
    """A Hugging Face folder or index, a Trainer or Accelerate folder: JSON files are
    checked, not executable; every other file is scanned as the file it is (a ``.bin``
    shard, ``optimizer.pt`` ... are torch.save pickles). In a Trainer folder the
    transformers names torchkeep admits as inert records count as safe."""
    from torchkeep.formats.hf_folder import hf_files
    from torchkeep.formats.hf_training import TRANSFORMERS_RECORDS

    try:
        found = hf_files(f)
    except TorchkeepError as e:
        report = ScanReport(str(f), "hf-index")
        report.errors.append(e.reason)
        return report
    if found is None:
        return None
    fs = found.fs
    if found.kind == "single":
        return scan(fs.describe(found.root), limits=limits)
    training = found.kind == "training"
    report = ScanReport(fs.describe(found.root), "hf-training" if training else "hf-index")
    for path in found.files:
        name = path.rsplit("/", 1)[-1]
        if not fs.exists(path):
            report.errors.append(f"{name} named by the index is missing")
            continue
        part = scan(fs.describe(path), limits=limits)
        report.pickles += part.pickles
        for finding in part.findings:
            finding = dataclasses.replace(finding, location=_at(name, finding.location))
            if training and finding.name in TRANSFORMERS_RECORDS and \
                    finding.verdict == "unknown":
                finding = dataclasses.replace(
                    finding, verdict="safe", detail="read as an inert record")
            report.findings.append(finding)
        report.errors += [f"{name}: {e}" for e in part.errors]
    return report


def _scan_step_directory(directory: str, limits: Limits) -> ScanReport:
    """A step directory holds a JSON manifest and raw tensor bytes: nothing executable,
    once the manifest is known to be well formed."""
    from torchkeep.formats.manifest import read_step_dir

    report = ScanReport(str(directory), "torchkeep")
    try:
        read_step_dir(str(directory), limits=limits).close()
    except TorchkeepError as e:
        report.errors.append(e.reason)
    return report


def _scan_dcp_directory(fs: Any, path: str, shown_as: str, limits: Limits) -> ScanReport:
    """A torch.distributed.checkpoint directory: its ``.metadata`` pickle (DCP's own
    metadata classes are safe there, and only there) and every item its metadata points
    to (each a torch.save archive; a value item's pickle can name anything)."""
    import dataclasses

    from torchkeep.formats.dcp import (
        METADATA_GLOBALS,
        METADATA_NAME,
        SliceSource,
        read_dcp_metadata,
    )

    report = ScanReport(shown_as, "dcp")
    try:
        data = fs.read_bytes(fs.join(path, METADATA_NAME))
    except TorchkeepError as e:
        report.errors.append(e.reason)
        return report
    limits.check("max_pickle_bytes", len(data), "pickle size")
    findings, _, error = scan_pickle_bytes(data, METADATA_NAME)
    report.pickles += 1
    report.findings.extend(
        dataclasses.replace(f, verdict="safe", detail="a DCP metadata record")
        if f.name in METADATA_GLOBALS and f.verdict != "unsafe" else f for f in findings)
    if error:
        report.errors.append(f"{METADATA_NAME}: {error}")
    if report.flagged or error:
        report.errors.append("the items were not scanned: .metadata is not plain DCP metadata")
        return report
    try:
        metadata = read_dcp_metadata(data, limits=limits)
    except TorchkeepError as e:
        report.errors.append(f"{METADATA_NAME}: {e.reason}")
        return report
    sources: dict[str, Source] = {}
    try:
        for info in metadata.storage_data.values():
            name = getattr(info, "relative_path", None)
            if not isinstance(name, str) or "/" in name or name.startswith("."):
                report.errors.append(f"an item in {shown(name)} is outside the directory")
                continue
            if name not in sources:
                sources[name] = fs.source(fs.join(path, name))
            source = sources[name]
            if info.offset < 0 or info.offset + info.length > source.size:
                report.errors.append(f"{name}: an item runs past the end of the file")
                continue
            item = SliceSource(source, info.offset, info.length, f"{name}@{info.offset}")
            _scan_source(item, report, limits, f"{name}@{info.offset}", 1)
    except TorchkeepError as e:
        report.errors.append(e.reason)
    finally:
        for source in sources.values():
            source.close()
    return report


def _at(location: str, name: str) -> str:
    return f"{location}/{name}" if location else name


def _scan_source(source: Source, report: ScanReport, limits: Limits, location: str,
                 depth: int) -> None:
    """Scan ``source`` (the file, or a member of an archive at ``location``)."""
    fmt = sniff(source)
    if depth == 0:
        report.format = fmt
    if fmt == "torch":
        _scan_zip(source, report, limits, location, depth)
    elif fmt == "tar":
        _scan_tar(source, report, limits, location, depth)
    elif fmt == "torch-legacy":
        _scan_legacy(source, report, location)
    elif fmt == "pickle":
        # a file may hold several pickles one after the other (pickle.load reads on); a
        # loader reads one from an archive's record, the rest of it is hidden bytes
        limits.check("max_pickle_bytes", source.size, "pickle size")
        _pickles_in(stream_bytes(source), location or "pickle", report, sequence=depth == 0)
    elif fmt == "numpy":
        _scan_npy(source, report, limits, location)
    elif fmt == "safetensors":
        _scan_safetensors(source, report, limits, location)
    elif fmt == "empty":
        if depth == 0:
            report.errors.append("the file is empty")
    elif depth == 0:
        limits.check("max_pickle_bytes", source.size, "file size")
        data = source.read(0, source.size)
        # what pickle.load(f) would read anyway (its first opcode need not look like one),
        # then pickles hidden further in
        findings, _, _ = scan_pickle_bytes(data, "file")
        report.findings.extend(findings)
        _pickles_in(data, "file", report, sweep=True)
        zip_at = data.find(b"PK\x03\x04")
        if zip_at > 0:
            report.errors.append(f"a zip archive starts at byte {zip_at}, after other data")
    # a member of an archive in no format torchkeep knows is data no loader unpickles


def _nested(data: bytes, report: ScanReport, limits: Limits, location: str,
            depth: int) -> None:
    if depth >= _MAX_NESTING:
        report.errors.append(f"{location}: archives nested too deeply to scan")
        return
    with open_source(data) as member:
        _scan_source(member, report, limits, location, depth + 1)


def _scan_zip(source: Source, report: ScanReport, limits: Limits, location: str,
              depth: int) -> None:
    try:
        archive = ZipArchive(source, limits=limits)
    except TorchkeepError as e:
        report.errors.append(f"{_at(location, 'zip')}: {e.reason}; swept the raw bytes for "
                             "pickles instead")
        if depth == 0:
            report.format = "zip"
        limits.check("max_pickle_bytes", source.size, "file size")
        _pickles_in(source.read(0, source.size), _at(location, "zip"), report, sweep=True)
        return
    names = archive.order
    kind = archive_format(names)
    if depth == 0:
        report.format = kind
    if kind == "torchscript":
        code = [n for n in names if "/code/" in n and n.endswith(".py")]
        report.findings.append(Finding(
            _at(location, names[0].split("/")[0]), 0, "ARCHIVE", "<TorchScript code>", "unsafe",
            f"{len(code)} code files that torch.jit.load compiles and runs",
        ))
    covered = []
    for name in names:
        member = archive.members[name]
        covered.append((member.header_offset, member.data_offset + member.compressed_size))
        record = name.split("/", 1)[-1]
        if kind == "torch" and record.startswith("data/"):
            continue  # raw tensor storage: no loader unpickles it
        if member.size > limits.max_pickle_bytes:
            report.errors.append(f"{_at(location, name)}: {member.size:,} bytes, above the "
                                 "limit max_pickle_bytes: not scanned")
            continue
        try:
            data = archive.read(name, verify=False)
        except TorchkeepError as e:
            report.errors.append(f"{_at(location, name)}: {e.reason}")
            continue
        _nested(data, report, limits, _at(location, name), depth)
    covered += [archive.directory_span, archive.end_span]
    _scan_gaps(source, sorted(covered), report, limits, location)


def _scan_gaps(source: Source, covered: list[tuple[int, int]], report: ScanReport,
               limits: Limits, location: str) -> None:
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
            _pickles_in(chunk, _at(location, f"bytes {begin}..{end} outside the zip records"),
                        report, sweep=True)


def _scan_tar(source: Source, report: ScanReport, limits: Limits, location: str,
              depth: int) -> None:
    try:
        members = tar_members(source, limits=limits)
    except FormatError as e:
        report.errors.append(f"{_at(location, 'tar')}: {e.reason}")
        return
    if depth == 0:
        report.format = tar_format([member.name for member in members])
    for member in members:
        where = _at(location, member.name)
        if member.size > limits.max_pickle_bytes:
            report.errors.append(f"{where}: {member.size:,} bytes, above the limit "
                                 "max_pickle_bytes: not scanned")
            continue
        data = source.read(member.offset, member.size)
        if member.name in ("storages", "tensors"):
            # torch's 0.1 layout: pickled headers between raw storage bytes
            _pickles_in(data, where, report, sweep=True, hidden=False)
        else:
            _nested(data, report, limits, where, depth)


def _scan_legacy(source: Source, report: ScanReport, location: str) -> None:
    data = stream_bytes(source)
    pos = 0
    for label in ("magic number", "protocol version", "sys_info", "object", "storage keys"):
        findings, pos, error = scan_pickle_bytes(data, _at(location, label), start=pos)
        report.pickles += 1
        report.findings.extend(findings)
        if error is not None:
            report.errors.append(f"{_at(location, label)}: {error}")
            return


_NPY_HEADER_LIMIT = 1 << 16  # numpy itself refuses headers above 10,000 bytes by default


def _scan_npy(source: Source, report: ScanReport, limits: Limits, location: str) -> None:
    """A ``.npy`` file pickles its array (after the header) only for object dtypes."""
    where = _at(location, "npy")
    head = source.read(0, min(source.size, 12))
    try:
        major = head[6]
        size_bytes = 2 if major == 1 else 4
        header_len = int.from_bytes(head[8 : 8 + size_bytes], "little")
        if header_len > _NPY_HEADER_LIMIT or 8 + size_bytes + header_len > source.size:
            raise ValueError("header length out of bounds")
        start = 8 + size_bytes + header_len
        header = ast.literal_eval(source.read(8 + size_bytes, header_len).decode("latin-1"))
        descr = header["descr"] if isinstance(header, dict) else None
    except (IndexError, ValueError, SyntaxError, KeyError, TypeError, MemoryError,
            RecursionError) as e:
        report.errors.append(f"{where}: malformed numpy header ({type(e).__name__}); swept "
                             "the raw bytes for pickles instead")
        limits.check("max_pickle_bytes", source.size, "file size")
        _pickles_in(source.read(0, source.size), where, report, sweep=True)
        return
    if "O" not in str(descr):
        return  # plain dtypes: raw element bytes, nothing numpy.load would unpickle
    limits.check("max_pickle_bytes", source.size - start, "pickle size")
    _pickles_in(source.read(start, source.size - start), where, report, sequence=False)


def _scan_safetensors(source: Source, report: ScanReport, limits: Limits,
                      location: str) -> None:
    """A JSON header and raw bytes: nothing executable, once the header parses (read by
    the loader's own header reader)."""
    from torchkeep.formats.safetensors import read_header

    try:
        read_header(source, limits)
    except FormatError as e:
        report.errors.append(f"{_at(location, 'safetensors header')}: {e.reason}")


def _pickles_in(data: Any, location: str, report: ScanReport, *, sequence: bool = False,
                sweep: bool = False, hidden: bool = True) -> None:
    """Scan the pickle(s) in ``data``: one, a sequence (until the bytes end), or every
    position that starts like a protocol 2-5 pickle (``sweep``: bytes no loader reads as
    a pickle, where one is a finding in itself when ``hidden``)."""
    if sweep:
        pos = data.find(b"\x80")
        while pos >= 0:
            if pos + 1 < len(data) and 2 <= data[pos + 1] <= 5:
                findings, end, error = scan_pickle_bytes(data, f"{location}@{pos}", start=pos)
                if findings and error is None:
                    report.pickles += 1
                    report.findings.extend(findings)
                    if hidden:
                        report.findings.append(Finding(location, pos, "PROTO",
                                                       "<hidden pickle>", "unknown",
                                                       "a pickle outside any record"))
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
            if end < len(data):
                _pickles_in(data[end:], f"{location} after its pickle", report, sweep=True)
            return
        pos = end
        index += 1
