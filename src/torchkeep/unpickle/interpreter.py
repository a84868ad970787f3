"""A pickle opcode interpreter that builds data, never imports, and calls only allowlisted code.

It reads every opcode of protocols 0-5, but what an opcode may *do* is restricted:
GLOBAL / STACK_GLOBAL / INST resolve names through an ``Allowlist`` (which never imports);
REDUCE / NEWOBJ / OBJ call only allowlist entries; BUILD, SETITEM(S), APPEND(S) and
ADDITEMS act only on the container types they are meant for; EXT codes and out-of-band
buffers are refused. Storages arrive through ``persistent_load`` as placeholders.
"""

from __future__ import annotations

import codecs
import collections
import math
import re
import struct
from collections.abc import Callable
from typing import Any

from torchkeep.errors import (
    CorruptCheckpointError,
    LimitExceededError,
    TorchkeepError,
    UnsafeCheckpointError,
)
from torchkeep.limits import DEFAULT_LIMITS, Limits
from torchkeep.unpickle.allowlist import Allowlist, build
from torchkeep.unpickle.entries import Entry, Pending

__all__ = ["PickleResult", "unpickle"]

_unpack_i = struct.Struct("<i").unpack_from
_unpack_I = struct.Struct("<I").unpack_from
_unpack_H = struct.Struct("<H").unpack_from
_unpack_Q = struct.Struct("<Q").unpack_from
_unpack_d = struct.Struct(">d").unpack_from

_HASHABLE_LEAVES = (int, float, str, bytes, bool, type(None), complex)
_MAX_KEY_NODES = 100_000  # one key, as a tree: hashing it visits every node
_MAX_KEY_WORK = 10_000_000  # all keys of a stream together


class _Mark:
    __slots__ = ()


class PickleResult:
    """What one pickle stream produced, and where it ended in the input."""

    __slots__ = ("end", "value")

    def __init__(self, value: Any, end: int) -> None:
        self.value = value
        self.end = end


class _Machine:
    """State of one run; handlers are plain functions indexed by opcode byte."""

    __slots__ = (
        "allowlist",
        "data",
        "end",
        "frame_end",
        "key_shapes",
        "key_work",
        "last_put",
        "limits",
        "memo",
        "metastack",
        "op_pos",
        "persistent_load",
        "pos",
        "stack",
        "what",
    )

    def __init__(
        self,
        data: bytes,
        start: int,
        end: int,
        allowlist: Allowlist,
        persistent_load: Callable[[Any], Any] | None,
        limits: Limits,
        what: str,
    ) -> None:
        self.data = data
        self.pos = start
        self.end = end  # where the current opcode must end: the stream's end or its FRAME's
        self.frame_end = -1  # the end of the FRAME being read, -1 outside frames
        self.op_pos = start
        self.allowlist = allowlist
        self.persistent_load = persistent_load
        self.limits = limits
        self.what = what
        self.stack: list[Any] = []
        self.metastack: list[list[Any]] = []
        self.memo: dict[int, Any] = {}
        self.last_put = -1
        self.key_shapes: dict[int, tuple[Any, int, int]] = {}
        self.key_work = 0

    # -- helpers -------------------------------------------------------------------------

    def fail(self, message: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"{self.what} offset {self.op_pos}: {message}")

    def fail_at(self, pos: int, message: str) -> CorruptCheckpointError:
        """``fail`` for an opcode the main loop runs inline (it does not keep ``op_pos``)."""
        self.op_pos = pos
        return self.fail(message)

    def short(self, pos: int, what: str) -> CorruptCheckpointError:
        """The error for an opcode whose argument runs past where it must end."""
        if self.frame_end >= 0:
            return self.fail_at(pos, f"the opcode crosses the end of its FRAME at offset "
                                     f"{self.frame_end} ({what} in the frame)")
        return self.fail_at(pos, f"truncated: {what}")

    def take(self, n: int) -> bytes:
        pos = self.pos
        if n < 0 or pos + n > self.end:
            raise self.short(self.op_pos, f"needs {n} bytes, {self.end - pos} left")
        self.pos = pos + n
        return self.data[pos : pos + n]

    def line(self) -> bytes:
        nl = self.data.find(b"\n", self.pos, self.end)
        if nl < 0:
            raise self.short(self.op_pos, "text argument without newline")
        text = self.data[self.pos : nl]
        self.pos = nl + 1
        return text

    def pop_mark(self) -> list[Any]:
        if not self.metastack:
            raise self.fail("MARK expected but the stack has none")
        items = self.stack
        self.stack = self.metastack.pop()
        return items

    def check_int_size(self, n: int) -> None:
        if n > self.limits.max_int_bytes:
            self.limits.check("max_int_bytes", n, f"{self.what}: integer literal bytes")

    def key(self, k: Any) -> Any:
        """Validate a dict key or set member: hashable, and cheap and shallow to hash.

        Hashing a tuple walks every path through it (tuples do not cache their hash), so
        a key built by DUPs as a DAG can cost exponentially more than its bytes: each key's
        size as a tree is bounded, and so is the sum over the stream."""
        if type(k) in _HASHABLE_LEAVES:
            return k
        if isinstance(k, (tuple, frozenset)):
            size, depth = self._key_shape(k)
            if depth > self.limits.max_depth:
                raise self.fail("dict key nested too deeply to hash safely")
            self.key_work += size
            if size > _MAX_KEY_NODES or self.key_work > _MAX_KEY_WORK:
                raise self.fail("dict key too large to hash safely (a tuple of "
                                f"{size:,} nodes)")
            return k
        if _identity_hashed(k):
            return k
        raise self.fail(f"unhashable dict key of type {type(k).__name__}")

    def _key_shape(self, k: tuple[Any, ...] | frozenset[Any]) -> tuple[int, int]:
        """(size as a tree, depth) of a key, each distinct tuple visited once."""
        shapes = self.key_shapes
        todo: list[tuple[Any, bool]] = [(k, False)]
        while todo:
            node, children_done = todo.pop()
            if id(node) in shapes:
                continue
            if not children_done:
                todo.append((node, True))
                for item in node:
                    if isinstance(item, (tuple, frozenset)):
                        if id(item) not in shapes:
                            todo.append((item, False))
                    elif not isinstance(item, _HASHABLE_LEAVES) and not _identity_hashed(item):
                        raise self.fail(f"unhashable dict key element {type(item).__name__}")
                continue
            size, depth = 1, 1
            for item in node:
                if isinstance(item, (tuple, frozenset)):
                    _, item_size, item_depth = shapes[id(item)]
                    size += item_size
                    depth = max(depth, item_depth + 1)
                else:
                    size += 1
            shapes[id(node)] = (node, size, depth)  # keeps node alive: its id stays its own
        _, size, depth = shapes[id(k)]
        return size, depth

    def put(self, index: int) -> None:
        if not self.stack:
            raise self.fail("memo PUT with an empty stack")
        self.memo[index] = self.stack[-1]
        self.last_put = index

    def get(self, index: int) -> None:
        try:
            self.stack.append(self.memo[index])
        except KeyError:
            raise self.fail(f"memo GET of undefined index {index}") from None

    def call(self, func: Any, args: Any, how: str) -> Any:
        if not isinstance(func, Entry):
            raise self.fail(f"{how} on a {type(func).__name__}, not an allowed callable")
        if type(args) is not tuple:
            raise self.fail(f"{how} arguments must be a tuple, got {type(args).__name__}")
        fn = func.new if how == "NEWOBJ" else func.call
        if fn is None:
            raise self.fail(f"{func.qualname} cannot be used with {how}")
        try:
            return fn(self, args)
        except TorchkeepError:
            raise
        except (TypeError, ValueError, OverflowError, IndexError, KeyError) as e:
            raise self.fail(f"bad arguments for {func.qualname}: {e}") from e


def _identity_hashed(obj: Any) -> bool:
    return getattr(type(obj), "__hash__", None) is object.__hash__ or isinstance(obj, Entry)


# -- opcode handlers ----------------------------------------------------------------------
# MARK, TUPLE, TUPLE1/2, EMPTY_TUPLE, NEWFALSE, BININT1, BINUNICODE, (LONG_)BINPUT,
# (LONG_)BINGET and FRAME have no handler: unpickle() runs them inline, on local variables.
# REDUCE and BINPERSID (a rebuild and a storage per tensor) run inline too.

Handler = Callable[[_Machine], Any]
_HANDLERS: list[Handler | None] = [None] * 256
_STOP = object()


def _op(code: bytes) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        _HANDLERS[code[0]] = fn
        return fn

    return register


@_op(b"\x80")  # PROTO
def _proto(m: _Machine) -> None:
    version = m.take(1)[0]
    if version > 5:
        raise m.fail(f"unsupported pickle protocol {version}")


@_op(b".")  # STOP
def _stop(m: _Machine) -> object:
    return _STOP


@_op(b"0")  # POP
def _pop(m: _Machine) -> None:
    if m.stack:
        m.stack.pop()
    else:
        m.pop_mark()


@_op(b"1")  # POP_MARK
def _pop_mark(m: _Machine) -> None:
    m.pop_mark()


@_op(b"2")  # DUP
def _dup(m: _Machine) -> None:
    m.stack.append(m.stack[-1])


# -- scalars --


@_op(b"N")
def _none(m: _Machine) -> None:
    m.stack.append(None)


@_op(b"\x88")
def _true(m: _Machine) -> None:
    m.stack.append(True)


@_op(b"M")  # BININT2
def _binint2(m: _Machine) -> None:
    m.stack.append(_unpack_H(m.take(2))[0])


@_op(b"J")  # BININT
def _binint(m: _Machine) -> None:
    m.stack.append(_unpack_i(m.take(4))[0])


@_op(b"\x8a")  # LONG1
def _long1(m: _Machine) -> None:
    n = m.take(1)[0]
    m.stack.append(int.from_bytes(m.take(n), "little", signed=True))


@_op(b"\x8b")  # LONG4
def _long4(m: _Machine) -> None:
    (n,) = _unpack_i(m.take(4))
    if n < 0:
        raise m.fail("LONG4 with a negative length")
    m.check_int_size(n)
    m.stack.append(int.from_bytes(m.take(n), "little", signed=True))


# C strtol(s, &end, 0): optional space and sign, then hex, octal or decimal digits
_STRTOL = re.compile(rb"[ \t\n\v\f\r]*([+-]?)(?:0[xX]([0-9a-fA-F]+)|(0[0-7]*)|([1-9][0-9]*))")
_LONG_MIN, _LONG_MAX = -(1 << 63), (1 << 63) - 1


def _text_int(text: bytes) -> int:
    """An INT argument as CPython's C unpickler (what torch.load runs) reads it: C's
    strtol with base 0 (so ``010`` is 8), a two-character 0 or 1 is a bool (``00``,
    ``-0``, ``+1``), and what strtol cannot take whole goes to int(text, 0)."""
    found = _STRTOL.match(text)
    if found is not None and found.end() == len(text):
        sign, hexa, octal, decimal = found.groups()
        value = int(hexa, 16) if hexa else int(octal, 8) if octal else int(decimal)
        value = -value if sign == b"-" else value
        if _LONG_MIN <= value <= _LONG_MAX:
            return bool(value) if len(text) == 2 and value in (0, 1) else value
    return int(text, 0)


@_op(b"I")  # INT (text)
def _int(m: _Machine) -> None:
    text = m.line()
    m.check_int_size(len(text) // 2)
    try:
        m.stack.append(_text_int(text))
    except ValueError:
        raise m.fail("INT with a malformed number") from None


@_op(b"L")  # LONG (text)
def _long(m: _Machine) -> None:
    text = m.line()
    m.check_int_size(len(text) // 2)
    try:
        m.stack.append(int(text.removesuffix(b"L"), 0))  # base 0, as CPython's C unpickler
    except ValueError:
        raise m.fail("LONG with a malformed number") from None


@_op(b"G")  # BINFLOAT
def _binfloat(m: _Machine) -> None:
    m.stack.append(_unpack_d(m.take(8))[0])


@_op(b"F")  # FLOAT (text)
def _float(m: _Machine) -> None:
    # CPython's C unpickler parses with PyOS_string_to_double: no spaces or underscores
    # (which float() takes), and an overflow ("1e500") is an error, not inf
    text = m.line()
    try:
        if b"_" in text or text != text.strip():
            raise ValueError(text)
        value = float(text)
        if math.isinf(value) and b"inf" not in text.lower():
            raise ValueError(text)
    except ValueError:
        raise m.fail("FLOAT with a malformed number") from None
    m.stack.append(value)


# -- strings and bytes --


def _push_text(m: _Machine, raw: bytes) -> None:
    try:
        m.stack.append(raw.decode("utf-8", "surrogatepass"))
    except UnicodeDecodeError:
        raise m.fail("string is not valid UTF-8") from None


@_op(b"\x8c")  # SHORT_BINUNICODE
def _short_binunicode(m: _Machine) -> None:
    _push_text(m, m.take(m.take(1)[0]))


@_op(b"\x8d")  # BINUNICODE8
def _binunicode8(m: _Machine) -> None:
    (n,) = _unpack_Q(m.take(8))
    _push_text(m, m.take(n))


@_op(b"V")  # UNICODE (raw-unicode-escape text)
def _unicode(m: _Machine) -> None:
    try:
        m.stack.append(m.line().decode("raw-unicode-escape"))
    except UnicodeDecodeError:
        raise m.fail("malformed UNICODE string") from None


def _push_py2_string(m: _Machine, raw: bytes) -> None:
    # Python 2 ``str``: text when it decodes as UTF-8 (torch's default encoding), else bytes.
    try:
        m.stack.append(raw.decode("utf-8"))
    except UnicodeDecodeError:
        m.stack.append(raw)


@_op(b"U")  # SHORT_BINSTRING
def _short_binstring(m: _Machine) -> None:
    _push_py2_string(m, m.take(m.take(1)[0]))


@_op(b"T")  # BINSTRING
def _binstring(m: _Machine) -> None:
    (n,) = _unpack_i(m.take(4))
    if n < 0:
        raise m.fail("BINSTRING with a negative length")
    _push_py2_string(m, m.take(n))


@_op(b"S")  # STRING (quoted repr)
def _string(m: _Machine) -> None:
    text = m.line()
    if len(text) < 2 or text[0] != text[-1] or text[:1] not in (b'"', b"'"):
        raise m.fail("STRING argument is not quoted")
    try:
        raw = codecs.escape_decode(text[1:-1])[0]
    except ValueError:
        raise m.fail("malformed STRING escape") from None
    _push_py2_string(m, raw)


@_op(b"C")  # SHORT_BINBYTES
def _short_binbytes(m: _Machine) -> None:
    m.stack.append(m.take(m.take(1)[0]))


@_op(b"B")  # BINBYTES
def _binbytes(m: _Machine) -> None:
    (n,) = _unpack_I(m.take(4))
    m.stack.append(m.take(n))


@_op(b"\x8e")  # BINBYTES8
def _binbytes8(m: _Machine) -> None:
    (n,) = _unpack_Q(m.take(8))
    m.stack.append(m.take(n))


@_op(b"\x96")  # BYTEARRAY8
def _bytearray8(m: _Machine) -> None:
    (n,) = _unpack_Q(m.take(8))
    m.stack.append(bytearray(m.take(n)))


@_op(b"\x97")  # NEXT_BUFFER
def _next_buffer(m: _Machine) -> None:
    raise m.fail("out-of-band buffers (NEXT_BUFFER) are not part of any checkpoint format")


@_op(b"\x98")  # READONLY_BUFFER
def _readonly_buffer(m: _Machine) -> None:
    raise m.fail("out-of-band buffers (READONLY_BUFFER) are not part of any checkpoint format")


# -- containers --


@_op(b"\x87")
def _tuple3(m: _Machine) -> None:
    stack = m.stack
    c = stack.pop()
    b = stack.pop()
    stack[-1] = (stack[-1], b, c)


@_op(b"]")
def _empty_list(m: _Machine) -> None:
    m.stack.append([])


@_op(b"l")  # LIST
def _list(m: _Machine) -> None:
    items = m.pop_mark()
    m.stack.append(items)


@_op(b"}")
def _empty_dict(m: _Machine) -> None:
    m.stack.append({})


@_op(b"d")  # DICT
def _dict(m: _Machine) -> None:
    items = m.pop_mark()
    if len(items) % 2:
        raise m.fail("DICT with an odd number of items")
    result = {m.key(items[i]): items[i + 1] for i in range(0, len(items), 2)}
    m.stack.append(result)


@_op(b"\x8f")
def _empty_set(m: _Machine) -> None:
    m.stack.append(set())


@_op(b"\x91")  # FROZENSET
def _frozenset(m: _Machine) -> None:
    items = m.pop_mark()
    result = frozenset(m.key(k) for k in items)
    m.stack.append(result)


def _append_target(m: _Machine, target: Any, items: list[Any]) -> None:
    if type(target) is list:
        target.extend(items)
    else:
        m.allowlist.extend_items(m, target, items)


@_op(b"a")  # APPEND
def _append(m: _Machine) -> None:
    value = m.stack.pop()
    _append_target(m, m.stack[-1], [value])


@_op(b"e")  # APPENDS
def _appends(m: _Machine) -> None:
    items = m.pop_mark()
    _append_target(m, m.stack[-1], items)


def _setitems(m: _Machine, target: Any, items: list[Any]) -> None:
    if len(items) % 2:
        raise m.fail("SETITEMS with an odd number of items")
    kind = type(target)
    if kind is dict or kind is collections.OrderedDict or kind is collections.Counter:
        key = m.key
        for i in range(0, len(items), 2):
            target[key(items[i])] = items[i + 1]
    else:
        m.allowlist.set_items(m, target, items)


@_op(b"s")  # SETITEM
def _setitem(m: _Machine) -> None:
    stack = m.stack
    value = stack.pop()
    key = stack.pop()
    target = stack[-1]
    if type(target) is dict:
        target[m.key(key)] = value
    else:
        _setitems(m, target, [key, value])


@_op(b"u")  # SETITEMS
def _setitems_op(m: _Machine) -> None:
    items = m.pop_mark()
    _setitems(m, m.stack[-1], items)


@_op(b"\x90")  # ADDITEMS
def _additems(m: _Machine) -> None:
    items = m.pop_mark()
    target = m.stack[-1]
    if type(target) is not set:
        raise m.fail(f"ADDITEMS on a {type(target).__name__}, not a set")
    for item in items:
        target.add(m.key(item))


# -- memo --


def _text_index(m: _Machine, what: str) -> int:
    # CPython takes the index as a C ssize_t and refuses a negative one
    try:
        index = int(m.line())
    except ValueError:
        raise m.fail(f"{what} with a malformed index") from None
    if not 0 <= index <= _LONG_MAX:
        raise m.fail(f"{what} index {index} is out of range")
    return index


@_op(b"p")  # PUT
def _put(m: _Machine) -> None:
    m.put(_text_index(m, "PUT"))


@_op(b"\x94")  # MEMOIZE
def _memoize(m: _Machine) -> None:
    m.put(len(m.memo))


@_op(b"g")  # GET
def _get(m: _Machine) -> None:
    m.get(_text_index(m, "GET"))


# -- globals, calls, objects --


def _text_global(m: _Machine) -> tuple[str, str]:
    try:
        module = m.line().decode("utf-8")
        name = m.line().decode("utf-8")
    except UnicodeDecodeError:
        raise m.fail("GLOBAL name is not valid UTF-8") from None
    return module, name


@_op(b"c")  # GLOBAL
def _global(m: _Machine) -> None:
    module, name = _text_global(m)
    m.stack.append(m.allowlist.resolve(m, module, name))


@_op(b"\x93")  # STACK_GLOBAL
def _stack_global(m: _Machine) -> None:
    name = m.stack.pop()
    module = m.stack.pop()
    if type(module) is not str or type(name) is not str:
        raise m.fail("STACK_GLOBAL operands must be strings")
    m.stack.append(m.allowlist.resolve(m, module, name))


@_op(b"\x81")  # NEWOBJ
def _newobj(m: _Machine) -> None:
    stack = m.stack
    args = stack.pop()
    stack[-1] = m.call(stack[-1], args, "NEWOBJ")


@_op(b"\x92")  # NEWOBJ_EX
def _newobj_ex(m: _Machine) -> None:
    stack = m.stack
    kwargs = stack.pop()
    args = stack.pop()
    if kwargs:
        raise m.fail("NEWOBJ_EX with keyword arguments is not supported")
    stack[-1] = m.call(stack[-1], args, "NEWOBJ")


@_op(b"i")  # INST: GLOBAL + call with the marked items
def _inst(m: _Machine) -> None:
    module, name = _text_global(m)
    args = tuple(m.pop_mark())
    result = m.call(m.allowlist.resolve(m, module, name), args, "REDUCE")
    m.stack.append(result)


@_op(b"o")  # OBJ: call the first marked item with the rest
def _obj(m: _Machine) -> None:
    items = m.pop_mark()
    if not items:
        raise m.fail("OBJ without a class")
    result = m.call(items[0], tuple(items[1:]), "REDUCE")
    m.stack.append(result)


@_op(b"b")  # BUILD
def _build(m: _Machine) -> None:
    state = m.stack.pop()
    target = m.stack[-1]
    result = build(m, target, state)
    if result is not target:
        # A pending object (numpy array / dtype) was finished: replace it everywhere
        # the stream could already refer to it (the stack top and its memo slot).
        m.stack[-1] = result
        memo = m.memo
        if memo.get(m.last_put) is target:
            memo[m.last_put] = result
        else:
            for index, value in memo.items():
                if value is target:
                    memo[index] = result


@_op(b"P")  # PERSID (text)
def _persid(m: _Machine) -> None:
    try:
        pid = m.line().decode("ascii")
    except UnicodeDecodeError:
        raise m.fail("PERSID is not ASCII") from None
    m.stack.append(_persistent(m, pid))


def _persistent(m: _Machine, pid: Any) -> Any:
    if m.persistent_load is None:
        raise m.fail("persistent id in a stream that has no storages")
    try:
        return m.persistent_load(pid)
    except UnsafeCheckpointError as e:
        raise UnsafeCheckpointError(f"{m.what} offset {m.op_pos}: {e.reason}",
                                    global_name=e.global_name) from e
    except LimitExceededError as e:
        raise LimitExceededError(f"{m.what} offset {m.op_pos}: {e.reason}") from e
    except TorchkeepError as e:
        raise m.fail(e.reason) from e


def _ext(m: _Machine, size: int) -> None:
    code = int.from_bytes(m.take(size), "little")
    raise UnsafeCheckpointError(
        f"{m.what} offset {m.op_pos}: EXT{size} extension code {code} names a global "
        "through the copyreg extension registry; torchkeep never resolves those",
        global_name=f"<extension {code}>",
    )


_HANDLERS[0x82] = lambda m: _ext(m, 1)  # EXT1
_HANDLERS[0x83] = lambda m: _ext(m, 2)  # EXT2
_HANDLERS[0x84] = lambda m: _ext(m, 4)  # EXT4


def unpickle(
    data: bytes,
    *,
    allowlist: Allowlist,
    persistent_load: Callable[[Any], Any] | None = None,
    start: int = 0,
    end: int | None = None,
    limits: Limits = DEFAULT_LIMITS,
    what: str = "pickle",
) -> PickleResult:
    """Interpret one pickle stream of ``data[start:end]`` and return its value and end offset.

    Raises CorruptCheckpointError for malformed streams, UnsafeCheckpointError for globals
    outside ``allowlist`` and LimitExceededError when a limit is hit; never executes code
    named by the stream.
    """
    end = len(data) if end is None else end
    limits.check("max_pickle_bytes", end - start, f"{what} size")
    m = _Machine(data, start, end, allowlist, persistent_load, limits, what)
    handlers = _HANDLERS
    # The opcodes a checkpoint's pickle is mostly made of run inline, on local variables:
    # a handler call per opcode made the interpreter 2x slower on many-tensor files.
    memo = m.memo
    stack = m.stack
    # ``end`` is where the current opcode must end: the stream's end, or inside a FRAME the
    # frame's end. An opcode may not cross a frame's end and a frame may not open inside
    # another (as in pickle.py's _Unframer): a stream whose frames split opcodes reads
    # differently in CPython's C unpickler and is how scanners are fooled.
    stream_end = end
    last = end - 1  # the last position a one-byte argument may sit at
    pos = start
    try:
        while True:
            if pos >= end:
                if end == stream_end:
                    raise m.fail_at(pos, "truncated: the stream ends without STOP")
                end = m.end = stream_end  # the frame is used up
                last = end - 1
                m.frame_end = -1
                continue
            op = data[pos]
            if op == 0x71:  # BINPUT
                if pos >= last:
                    raise m.short(pos, "BINPUT needs 1 byte")
                index = data[pos + 1]
                memo[index] = stack[-1]
                m.last_put = index
                pos += 2
            elif op == 0x68:  # BINGET
                if pos >= last:
                    raise m.short(pos, "BINGET needs 1 byte")
                try:
                    stack.append(memo[data[pos + 1]])
                except KeyError:
                    raise m.fail_at(pos, f"memo GET of undefined index {data[pos + 1]}") from None
                pos += 2
            elif op == 0x4B:  # BININT1
                if pos >= last:
                    raise m.short(pos, "BININT1 needs 1 byte")
                stack.append(data[pos + 1])
                pos += 2
            elif op == 0x72:  # LONG_BINPUT
                if pos + 4 >= end:
                    raise m.short(pos, "LONG_BINPUT needs 4 bytes")
                index = int.from_bytes(data[pos + 1 : pos + 5], "little")
                memo[index] = stack[-1]
                m.last_put = index
                pos += 5
            elif op == 0x6A:  # LONG_BINGET
                if pos + 4 >= end:
                    raise m.short(pos, "LONG_BINGET needs 4 bytes")
                index = int.from_bytes(data[pos + 1 : pos + 5], "little")
                try:
                    stack.append(memo[index])
                except KeyError:
                    raise m.fail_at(pos, f"memo GET of undefined index {index}") from None
                pos += 5
            elif op == 0x58:  # BINUNICODE
                if pos + 4 >= end:
                    raise m.short(pos, "BINUNICODE needs 4 bytes")
                size = int.from_bytes(data[pos + 1 : pos + 5], "little")
                stop = pos + 5 + size
                if stop > end:
                    raise m.short(pos, f"BINUNICODE needs {size} bytes, {end - pos - 5} left")
                try:
                    stack.append(str(data[pos + 5 : stop], "utf-8", "surrogatepass"))
                except UnicodeDecodeError:
                    raise m.fail_at(pos, "string is not valid UTF-8") from None
                pos = stop
            elif op == 0x28:  # MARK
                m.metastack.append(stack)
                stack = []
                if len(m.metastack) > limits.max_depth:
                    limits.check("max_depth", len(m.metastack), f"{what}: MARK nesting")
                pos += 1
            elif op == 0x74:  # TUPLE
                if not m.metastack:
                    raise m.fail_at(pos, "MARK expected but the stack has none")
                items = tuple(stack)
                stack = m.metastack.pop()
                stack.append(items)
                pos += 1
            elif op == 0x85:  # TUPLE1
                stack[-1] = (stack[-1],)
                pos += 1
            elif op == 0x86:  # TUPLE2
                second = stack.pop()
                stack[-1] = (stack[-1], second)
                pos += 1
            elif op == 0x89:  # NEWFALSE
                stack.append(False)
                pos += 1
            elif op == 0x29:  # EMPTY_TUPLE
                stack.append(())
                pos += 1
            elif op == 0x52:  # REDUCE: a rebuild per tensor, a dict per OrderedDict()
                m.op_pos = pos
                m.stack = stack
                args = stack.pop()
                stack[-1] = m.call(stack[-1], args, "REDUCE")
                pos += 1
            elif op == 0x51:  # BINPERSID
                m.op_pos = pos
                stack.append(_persistent(m, stack.pop()))
                pos += 1
            elif op == 0x95:  # FRAME
                if pos + 8 >= end:
                    raise m.short(pos, "FRAME needs 8 bytes")
                if m.frame_end >= 0 and pos + 9 != end:
                    raise m.fail_at(pos, f"FRAME opened inside the FRAME that ends at offset "
                                         f"{m.frame_end}")
                size = int.from_bytes(data[pos + 1 : pos + 9], "little")
                if size > stream_end - pos - 9:
                    raise m.fail_at(pos, f"truncated: FRAME of {size} bytes, "
                                         f"{stream_end - pos - 9} left")
                pos += 9
                end = m.end = m.frame_end = pos + size
                last = end - 1
            else:
                m.op_pos = pos
                m.pos = pos + 1
                m.stack = stack
                handler = handlers[op]
                if handler is None:
                    raise m.fail(f"unknown opcode 0x{op:02x}")
                done = handler(m) is _STOP
                pos = m.pos
                stack = m.stack
                if done:
                    break
    except TorchkeepError:
        raise
    # ``pos`` is still the failing opcode's offset here, whether it ran inline or in a handler.
    except RecursionError as e:
        raise m.fail_at(pos, "structure nested too deeply") from e
    except (IndexError, KeyError, TypeError, AttributeError, ValueError, OverflowError) as e:
        # stack underflow, unhashable keys, values numpy or datetime reject: corruption
        raise m.fail_at(pos, f"malformed stream ({type(e).__name__}: {e})") from e
    except MemoryError as e:
        raise m.fail_at(pos, "ran out of memory building the stream's objects") from e
    finally:
        m.pos = pos
    if not m.stack:
        raise m.fail("STOP with an empty stack")
    value = m.stack.pop()
    if isinstance(value, Pending):
        raise m.fail("the stream's result is an unfinished object")
    return PickleResult(value, m.pos)
