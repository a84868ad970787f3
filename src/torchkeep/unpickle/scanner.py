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
#: (CPython's unpicklers take a later protocol's opcodes without PROTO too; scan reads
#: the start of every file it does not recognise as a pickle anyway.)
_FIRST_OPCODES = frozenset(b"(]})NcIiLFSVPKJMGUTX")
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
    malformed (findings up to that point are kept).

    Opcodes are decoded by ``pickletools``, which is stricter than CPython's unpicklers;
    where it refuses a text argument that they would take (a GLOBAL line cut off by the
    end of the input, a STRING that is not ASCII, an INT in hex), the argument is read the
    way they read it and the walk goes on, so no global they would import goes unseen."""
    walk = _Walk(data, location, nesting)
    stream: Any = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
    resume = start
    try:
        while True:
            stream.seek(resume)
            at = resume  # where the next opcode starts
            try:
                for opcode, arg, pos in pickletools.genops(stream):
                    at = stream.tell()
                    if walk.step(opcode.name, arg, pos or 0, opcode):
                        return walk.findings, stream.tell(), walk.error
                walk.error = "the stream ends without STOP"
                break
            except ValueError as e:
                lenient = _lenient(data, at)
                if lenient is None:
                    walk.error = f"malformed pickle ({e})"
                    break
                name, arg, resume = lenient
                walk.step(name, arg, at, None)
                if resume >= len(data):
                    walk.error = f"truncated: the {name} at offset {at} runs to the end"
                    break
    except (KeyError, IndexError, TypeError, OverflowError) as e:
        walk.error = f"malformed pickle ({e})"
    except RecursionError:
        walk.error = "malformed pickle (nested too deeply)"
    return walk.findings, stream.tell(), walk.error


#: opcodes whose argument is text up to a newline: (lines, name)
_TEXT_OPS = {ord("c"): (2, "GLOBAL"), ord("i"): (2, "INST"), ord("S"): (1, "STRING"),
             ord("V"): (1, "UNICODE"), ord("I"): (1, "INT"), ord("L"): (1, "LONG"),
             ord("F"): (1, "FLOAT"), ord("P"): (1, "PERSID"), ord("p"): (1, "PUT"),
             ord("g"): (1, "GET")}


def _lenient(data: Any, pos: int) -> tuple[str, Any, int] | None:
    """A text opcode at ``pos`` read as CPython's unpicklers read it: each line up to and
    including a newline, or the rest of the input, minus its last character. Returns
    (name, argument, where the next opcode starts), or None for other opcodes."""
    found = _TEXT_OPS.get(data[pos]) if pos < len(data) else None
    if found is None:
        return None
    count, name = found
    lines, cursor = [], pos + 1
    for _ in range(count):
        newline = data.find(b"\n", cursor)
        end = len(data) if newline < 0 else newline + 1
        lines.append(bytes(data[cursor:end])[:-1])
        cursor = end
    if name in ("GLOBAL", "INST"):
        arg: Any = " ".join(line.decode("utf-8", "replace") for line in lines)
    elif name in ("STRING", "UNICODE"):
        text = lines[0]
        if name == "STRING" and len(text) >= 2 and text[:1] == text[-1:] and text[:1] in b"'\"":
            text = text[1:-1]
        arg = text.decode("latin-1")
    else:
        arg = None
    return name, arg, cursor


class _Walk:
    """The symbolic stack and memo of one stream, and what it found."""

    def __init__(self, data: Any, location: str, nesting: int) -> None:
        self.data = data
        self.location = location
        self.nesting = nesting
        self.findings: list[Finding] = []
        self.stack: list[Any] = []
        self.memo: dict[Any, Any] = {}
        self.error: str | None = None
        self.frame_end = -1  # where the current FRAME ends, -1 outside frames
        self.previous = (0, "")  # the last opcode's offset and name: it ends where this starts

    def found(self, offset: int, opcode: str, name: str, verdict: str, detail: str = "") -> None:
        self.findings.append(Finding(self.location, offset, opcode, name, verdict, detail))

    def step(self, name: str, arg: Any, offset: int, opcode: Any) -> bool:
        """Apply one opcode; True at STOP. ``opcode`` is pickletools' description (None for
        an opcode read leniently: its stack effect is a push)."""
        stack = self.stack
        if self.frame_end >= 0:
            if self.previous[0] < self.frame_end < offset:  # the previous opcode crossed it
                self.found(self.previous[0], self.previous[1], "<FRAME violation>", "unsafe",
                           _FRAME_VIOLATION)
            if offset >= self.frame_end:
                self.frame_end = -1  # the frame is used up
        if name == "FRAME":
            if self.frame_end >= 0 and offset + 9 != self.frame_end:
                self.found(offset, name, "<FRAME violation>", "unsafe", _FRAME_VIOLATION)
            self.frame_end = offset + 9 + arg
            if self.frame_end > len(self.data):
                self.error = f"truncated: the FRAME at offset {offset} runs past the stream"
        self.previous = (offset, name)
        if name == "STOP":
            return True
        if name in _STRING_OPS:
            stack.append(arg if isinstance(arg, str) else _decode(arg))
        elif name in _BYTES_OPS:
            self.bytes_constant(bytes(arg), offset, name)
        elif name in ("GLOBAL", "INST"):
            module, _, attr = str(arg).partition(" ")
            qualname = f"{module}.{attr}"
            self.found(offset, name, qualname, verdict_of(qualname))
            if name == "INST":
                _pop_mark(stack)
            stack.append(_UNKNOWN)
        elif name == "STACK_GLOBAL":
            top = stack.pop() if stack else _UNKNOWN
            below = stack.pop() if stack else _UNKNOWN
            if isinstance(below, str) and isinstance(top, str):
                qualname = f"{below}.{top}"
                self.found(offset, name, qualname, verdict_of(qualname))
            else:
                self.found(offset, name, "?", "unknown", "module or name is not a constant string")
            stack.append(_UNKNOWN)
        elif name in ("EXT1", "EXT2", "EXT4"):
            self.found(offset, name, f"<extension {arg}>", "unsafe",
                       "copyreg extension registry code")
            stack.append(_UNKNOWN)
        elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
            self.memo[arg] = stack[-1] if stack else _UNKNOWN
        elif name == "MEMOIZE":
            self.memo[len(self.memo)] = stack[-1] if stack else _UNKNOWN
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            stack.append(self.memo.get(arg, _UNKNOWN))
        elif opcode is None:
            stack.append(_UNKNOWN)
        else:
            _generic(opcode, stack)
        return False

    def bytes_constant(self, raw: bytes, offset: int, name: str) -> None:
        """A bytes value; when it holds a pickle, that pickle is scanned too."""
        self.stack.append(raw)
        if self.nesting < _MAX_NESTING and len(raw) > 2 and is_pickle_head(raw[:HEAD_BYTES]):
            nested, _, nested_error = scan_pickle_bytes(
                raw, f"{self.location}@{offset}(nested pickle)", nesting=self.nesting + 1)
            if raw[0] == 0x80 or nested_error is None:  # text bytes may look like protocol
                self.findings.extend(nested)           # 0 by chance
            if nested and nested_error is None:
                self.found(offset, name, "<nested pickle>", "unknown",
                           "a pickle stored inside a pickle")


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
