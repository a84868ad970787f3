"""Static analysis of one pickle stream: every global it would import, never executed.

The walk simulates the pickle stack symbolically (string constants, the memo, marks), so
a ``STACK_GLOBAL`` whose module and name come from memoized strings is still named; one
whose operands cannot be known statically is reported as unknown. Verdicts:

* ``safe``: on torchkeep's default allowlist (what ``torchkeep.load`` accepts);
* ``unsafe``: from a module that runs code or reaches the system (``os``, ``builtins.eval``,
  ``subprocess``, ``torch.hub`` ...), an extension-registry code, TorchScript code, or a
  stream whose FRAMEs split an opcode (CPython's C unpickler reads those differently from
  every other reader: the way code is hidden from scanners);
* ``unknown``: anything else (it would need ``allow=`` to load, so it is a finding).

Which streams of a file to scan (zip records, the legacy stream's pickles, tar members,
numpy object arrays, hidden bytes) is decided a layer up, in ``torchkeep.scanning``.
"""

from __future__ import annotations

import io
import pickletools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from torchkeep.unpickle.allowlist import Allowlist, canonical, dangerous

__all__ = ["Finding", "is_pickle_head", "scan_pickle_bytes", "verdict_of"]

_SAFE_NAMES = Allowlist().names
_STRING_OPS = {"BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8", "UNICODE", "STRING",
               "BINSTRING", "SHORT_BINSTRING"}
_BYTES_OPS = {"BINBYTES", "SHORT_BINBYTES", "BINBYTES8", "BYTEARRAY8"}
_MAX_NESTING = 8
#: How much of a bytes constant or a file ``is_pickle_head`` needs.
HEAD_BYTES = 512
#: The opcodes a protocol 0 or 1 stream (no PROTO) can start with: pushes of a value or a
#: mark. Anything else (a memo or stack operation, STOP) cannot begin a valid pickle.
_FIRST_OPCODES = frozenset(b"(]})NcIiLFSVPKJMGUTX\x88\x89")
_FRAME_VIOLATION = ("an opcode crosses the end of its FRAME (or a FRAME opens inside "
                    "another): CPython's C unpickler reads such a stream differently from "
                    "other readers, which is how code is hidden from scanners")


@dataclass(frozen=True, slots=True)
class Finding:
    """One global (or other code reference) a pickle names, with its verdict."""

    location: str
    offset: int
    opcode: str
    name: str
    verdict: str
    detail: str = ""


def is_pickle_head(head: bytes) -> bool:
    """True when ``head`` (the first ``HEAD_BYTES`` of an input, or all of it) opens a
    pickle: PROTO 2-5, or a protocol 0/1 stream whose first opcode is well formed."""
    if len(head) > 1 and head[0] == 0x80:
        return head[1] <= 5
    if not head or head[0] not in _FIRST_OPCODES:
        return False
    try:
        opcode, _, _ = next(pickletools.genops(head))
    except ValueError as e:
        # a malformed first argument, or one that runs past the head read here
        cut = "no newline found" in str(e) or "but only" in str(e)
        return cut and len(head) >= HEAD_BYTES
    return bool(opcode.proto <= 1)


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
    frame_end = -1  # where the current FRAME ends, -1 outside frames
    previous = (start, "")  # the last opcode's offset and name: it ends where this one starts
    try:
        ops: Iterator[tuple[Any, Any, int | None]] = pickletools.genops(stream)
        for opcode, arg, pos in ops:
            offset = pos or 0
            name = opcode.name
            if frame_end >= 0:
                if previous[0] < frame_end < offset:  # the previous opcode crossed its end
                    findings.append(Finding(location, previous[0], previous[1],
                                            "<FRAME violation>", "unsafe", _FRAME_VIOLATION))
                if offset >= frame_end:
                    frame_end = -1  # the frame is used up
            if name == "FRAME":
                if frame_end >= 0 and offset + 9 != frame_end:
                    findings.append(Finding(location, offset, name, "<FRAME violation>",
                                            "unsafe", _FRAME_VIOLATION))
                frame_end = offset + 9 + arg
                if frame_end > len(data):
                    error = f"truncated: the FRAME at offset {offset} runs past the stream"
            previous = (offset, name)
            if name == "STOP":
                break
            if name in _STRING_OPS:
                stack.append(arg if isinstance(arg, str) else _decode(arg))
                continue
            if name in _BYTES_OPS:
                raw = bytes(arg)
                stack.append(raw)
                if nesting < _MAX_NESTING and len(raw) > 2 and is_pickle_head(raw[:HEAD_BYTES]):
                    nested, _, nested_error = scan_pickle_bytes(
                        raw, f"{location}@{offset}(nested pickle)", nesting=nesting + 1
                    )
                    if raw[0] == 0x80 or nested_error is None:  # text bytes may look like
                        findings.extend(nested)                 # protocol 0 by chance
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
    except RecursionError:
        error = "malformed pickle (nested too deeply)"
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
