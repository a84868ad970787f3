"""Generators of hostile checkpoints for test_hostile.py.

Every byte string here is assembled at test time: pickles from opcodes (``Pickle``), zip
archives from struct-packed headers (``zip_bytes``), legacy streams and safetensors files
from their parts. Nothing binary is committed. Payloads that could run code only ever
try to create a marker file the caller names (a path under pytest's tmp_path); the
tests assert that torchkeep refuses them and that the marker never appears.
"""

from __future__ import annotations

import io
import json
import pickle
import pickletools
import shlex
import struct
import zipfile
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# -- the pickle assembler ----------------------------------------------------------------------


class Raw:
    """Bytes pushed verbatim by ``Pickle.push`` (a fragment of opcodes)."""

    def __init__(self, ops: bytes | Pickle) -> None:
        self.ops = ops.ops() if isinstance(ops, Pickle) else bytes(ops)


class Pickle:
    """A tiny pickle assembler: every method appends opcodes and returns self."""

    def __init__(self, protocol: int | None = 2) -> None:
        self._b = bytearray()
        if protocol is not None:
            self._b += b"\x80" + bytes([protocol])

    # plumbing
    def ops(self) -> bytes:
        return bytes(self._b)

    def op(self, raw: bytes) -> Pickle:
        self._b += raw
        return self

    def finish(self) -> bytes:
        """The stream with STOP appended."""
        return bytes(self._b) + b"."

    # structure
    def mark(self) -> Pickle:
        return self.op(b"(")

    def tuple(self) -> Pickle:
        return self.op(b"t")

    def tuple1(self) -> Pickle:
        return self.op(b"\x85")

    def tuple2(self) -> Pickle:
        return self.op(b"\x86")

    def empty_tuple(self) -> Pickle:
        return self.op(b")")

    def empty_list(self) -> Pickle:
        return self.op(b"]")

    def empty_dict(self) -> Pickle:
        return self.op(b"}")

    def list(self) -> Pickle:
        return self.op(b"l")

    def append(self) -> Pickle:
        return self.op(b"a")

    def appends(self) -> Pickle:
        return self.op(b"e")

    def setitem(self) -> Pickle:
        return self.op(b"s")

    def setitems(self) -> Pickle:
        return self.op(b"u")

    def additems(self) -> Pickle:
        return self.op(b"\x90")

    def pop(self) -> Pickle:
        return self.op(b"0")

    # calls and objects
    def reduce(self) -> Pickle:
        return self.op(b"R")

    def build(self) -> Pickle:
        return self.op(b"b")

    def newobj(self) -> Pickle:
        return self.op(b"\x81")

    def newobj_ex(self) -> Pickle:
        return self.op(b"\x92")

    def obj(self) -> Pickle:
        return self.op(b"o")

    def persid(self) -> Pickle:
        return self.op(b"Q")

    def glob(self, module: str, name: str) -> Pickle:
        return self.op(b"c" + module.encode() + b"\n" + name.encode() + b"\n")

    def inst(self, module: str, name: str) -> Pickle:
        return self.op(b"i" + module.encode() + b"\n" + name.encode() + b"\n")

    def stack_global(self, module: str, name: str, *, memoize: bool = True) -> Pickle:
        self.short_str(module)
        if memoize:
            self.memoize()
        self.short_str(name)
        if memoize:
            self.memoize()
        return self.op(b"\x93")

    def ext(self, code: int) -> Pickle:
        if code < 0x100:
            return self.op(b"\x82" + bytes([code]))
        if code < 0x10000:
            return self.op(b"\x83" + struct.pack("<H", code))
        return self.op(b"\x84" + struct.pack("<i", code))

    def frame(self, size: int) -> Pickle:
        return self.op(b"\x95" + struct.pack("<Q", size))

    # memo
    def put(self, index: int) -> Pickle:
        if index < 0x100:
            return self.op(b"q" + bytes([index]))
        return self.op(b"r" + struct.pack("<I", index))

    def get(self, index: int) -> Pickle:
        if index < 0x100:
            return self.op(b"h" + bytes([index]))
        return self.op(b"j" + struct.pack("<I", index))

    def memoize(self) -> Pickle:
        return self.op(b"\x94")

    # scalars
    def none(self) -> Pickle:
        return self.op(b"N")

    def bool(self, value: bool) -> Pickle:
        return self.op(b"\x88" if value else b"\x89")

    def int(self, value: int) -> Pickle:
        if 0 <= value < 0x100:
            return self.op(b"K" + bytes([value]))
        if -(2**31) <= value < 2**31:
            return self.op(b"J" + struct.pack("<i", value))
        raw = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
        if len(raw) < 0x100:
            return self.op(b"\x8a" + bytes([len(raw)]) + raw)
        return self.op(b"\x8b" + struct.pack("<i", len(raw)) + raw)

    def float(self, value: float) -> Pickle:
        return self.op(b"G" + struct.pack(">d", value))

    def str(self, value: str) -> Pickle:
        raw = value.encode("utf-8", "surrogatepass")
        return self.op(b"X" + struct.pack("<I", len(raw)) + raw)

    def short_str(self, value: str) -> Pickle:
        raw = value.encode("utf-8")
        return self.op(b"\x8c" + bytes([len(raw)]) + raw)

    def bytes(self, value: bytes) -> Pickle:
        """BINBYTES (a protocol 3 opcode; torchkeep reads every protocol)."""
        return self.op(b"B" + struct.pack("<I", len(value)) + value)

    # composite helpers
    def push(self, value: Any) -> Pickle:
        """Push a plain value (None, bool, int, float, str, bytes, tuple, list, dict, Raw)."""
        if isinstance(value, Raw):
            return self.op(value.ops)
        if isinstance(value, Pickle):
            return self.op(value.ops())
        if value is None:
            return self.none()
        if isinstance(value, bool):
            return self.bool(value)
        if isinstance(value, int):
            return self.int(value)
        if isinstance(value, float):
            return self.float(value)
        if isinstance(value, str):
            return self.str(value)
        if isinstance(value, bytes):
            return self.bytes(value)
        if isinstance(value, tuple):
            if not value:
                return self.empty_tuple()
            self.mark()
            for item in value:
                self.push(item)
            return self.tuple()
        if isinstance(value, list):
            self.empty_list()
            if value:
                self.mark()
                for item in value:
                    self.push(item)
                self.appends()
            return self
        if isinstance(value, dict):
            self.empty_dict()
            if value:
                self.mark()
                for key, item in value.items():
                    self.push(key)
                    self.push(item)
                self.setitems()
            return self
        raise TypeError(f"cannot push {type(value).__name__}")

    def call(self, module: str, name: str, *args: Any) -> Pickle:
        """GLOBAL module.name, then REDUCE with ``args``."""
        self.glob(module, name)
        self.push(tuple(args))
        return self.reduce()


def frag() -> Pickle:
    """A fragment (no PROTO) to embed with ``Raw`` or ``Pickle.push``."""
    return Pickle(protocol=None)


def ordered_dict() -> Raw:
    """``collections.OrderedDict()`` as torch writes a tensor's backward hooks."""
    return Raw(frag().glob("collections", "OrderedDict").empty_tuple().reduce())


# -- what a payload tries to do ----------------------------------------------------------------


def shell_touch(marker: Path) -> str:
    """A shell command creating ``marker``."""
    return f"touch {shlex.quote(str(marker))}"


def python_touch(marker: Path) -> str:
    """Python source creating ``marker``."""
    return f"open({str(marker)!r}, 'w').write('pwned')"


class Evil:
    """An object whose pickle runs ``os.system(touch marker)`` under a full unpickler.

    Pickled at test time (``pickle.dumps``) to get the exact bytes real attack files have.
    """

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        import os

        return (os.system, (shell_touch(self.marker),))


def _tail_gadget(marker: Path) -> Raw:
    """os.system(touch marker) as a fragment, placed after a structural abuse."""
    return Raw(frag().call("os", "system", shell_touch(marker)))


# -- code-execution gadgets --------------------------------------------------------------------


@dataclass(frozen=True)
class Gadget:
    """A pickle payload and what torchkeep must say about it."""

    name: str
    make: Callable[[Path], bytes]
    #: the global an UnsafeCheckpointError must name; None for a structural refusal
    global_name: str | None
    #: True when a stock ``pickle.loads`` of the payload really creates the marker
    live: bool = True
    #: needs a copyreg extension (code) registered for global_name while it is loaded
    extension: int | None = None


def _reduce_gadget(module: str, name: str, *args: Any) -> Callable[[Path], bytes]:
    def make(marker: Path) -> bytes:
        values = (a(marker) if callable(a) else a for a in args)
        return Pickle().call(module, name, *values).finish()

    return make


def _getattr_chain(marker: Path) -> bytes:
    # builtins.getattr(builtins.__import__('os'), 'system')('touch marker')
    p = Pickle().glob("builtins", "getattr")
    p.mark().glob("builtins", "__import__").push(("os",)).reduce().str("system").tuple()
    p.reduce().push((shell_touch(marker),)).reduce()
    return p.finish()


def _stack_global(module: str, name: str, protocol: int = 4) -> Callable[[Path], bytes]:
    def make(marker: Path) -> bytes:
        body = frag().stack_global(module, name).short_str(shell_touch(marker)).memoize()
        body.tuple1().memoize().reduce().memoize()
        ops = body.ops() + b"."
        return b"\x80" + bytes([protocol]) + frag().frame(len(ops)).ops() + ops

    return make


def _stack_global_binunicode(marker: Path) -> bytes:
    # STACK_GLOBAL whose operands are BINUNICODE strings, no FRAME, no memo
    p = Pickle(4).str("os").str("system").op(b"\x93")
    return p.push((shell_touch(marker),)).reduce().finish()


def _inst(module: str, name: str, code: Callable[[Path], str]) -> Callable[[Path], bytes]:
    def make(marker: Path) -> bytes:
        return Pickle().mark().str(code(marker)).inst(module, name).finish()

    return make


def _obj(module: str, name: str, code: Callable[[Path], str]) -> Callable[[Path], bytes]:
    def make(marker: Path) -> bytes:
        return Pickle().mark().glob(module, name).str(code(marker)).obj().finish()

    return make


def _setstate_gadget(module: str, name: str, *, how: str = "reduce",
                     via: tuple[str, str] = ("builtins", "exec"),
                     code: Callable[[Path], str] = python_touch) -> Callable[[Path], bytes]:
    """Instance of module.name, BUILD (None, {'__setstate__': via}), BUILD code.

    Under a full unpickler the second BUILD calls ``inst.__setstate__(code)``.
    """

    def make(marker: Path) -> bytes:
        protocol = 4 if how == "newobj_ex" else 2
        p = Pickle(protocol).glob(module, name)
        if how == "reduce":
            p.empty_tuple().reduce()
        elif how == "newobj":
            p.empty_tuple().newobj()
        else:
            p.empty_tuple().empty_dict().newobj_ex()
        p.none().empty_dict().str("__setstate__").glob(*via).setitem().tuple2().build()
        p.str(code(marker)).build()
        return p.finish()

    return make


def _nested_pickle(module: str, name: str) -> Callable[[Path], bytes]:
    def make(marker: Path) -> bytes:
        inner = pickle.dumps(Evil(marker), protocol=2)
        return Pickle().glob(module, name).push((inner,)).reduce().finish()

    return make


def _nested_pickle_via_codecs(marker: Path) -> bytes:
    # pickle.loads(_codecs.encode(<inner as latin-1 text>, 'latin1')): the allowed bytes
    # constructor builds the inner pickle, the disallowed loads would run it
    inner = pickle.dumps(Evil(marker), protocol=2)
    p = Pickle().glob("pickle", "loads").mark()
    p.call("_codecs", "encode", inner.decode("latin-1"), "latin1")
    return p.tuple().reduce().finish()


def _torch_load(marker: Path) -> bytes:
    # torch.load(<evil file>, None, torch.serialization.pickle): an explicit pickle_module
    # turns weights_only off, and the evil file is a plain pickle that runs os.system.
    evil = marker.with_name(marker.name + ".evil.pkl")
    evil.write_bytes(pickle.dumps(Evil(marker), protocol=2))
    p = Pickle().glob("torch", "load").mark().str(str(evil)).none()
    p.glob("torch.serialization", "pickle").tuple().reduce()
    return p.finish()


def _torch_hub_load_local(marker: Path) -> bytes:
    # torch.hub._load_local(<folder>, 'entry') imports <folder>/hubconf.py
    folder = marker.with_name(marker.name + ".hub")
    folder.mkdir(exist_ok=True)
    (folder / "hubconf.py").write_text(
        python_touch(marker) + "\n\ndef entry():\n    return None\n"
    )
    return Pickle().call("torch.hub", "_load_local", str(folder), "entry").finish()


def _torch_jit_load(marker: Path) -> bytes:
    # torch.jit.load(<file>) of a pickle that would run code if anything fell back to it
    evil = marker.with_name(marker.name + ".evil.pkl")
    evil.write_bytes(pickle.dumps(Evil(marker), protocol=2))
    return Pickle().call("torch.jit", "load", str(evil)).finish()


def _pickled(protocol: int) -> Callable[[Path], bytes]:
    def make(marker: Path) -> bytes:
        return pickle.dumps(Evil(marker), protocol=protocol)

    return make


def _pickled_numpy_object_array(marker: Path) -> bytes:
    import numpy as np

    array = np.empty(1, dtype=object)
    array[0] = Evil(marker)
    return pickle.dumps(array, protocol=2)


def _pickled_numpy_structured(marker: Path) -> bytes:
    import numpy as np

    array = np.zeros(1, dtype=[("a", "<i4"), ("b", "O")])
    array[0]["b"] = Evil(marker)
    return pickle.dumps(array, protocol=2)


def _ext_gadget(code: int) -> Callable[[Path], bytes]:
    def make(marker: Path) -> bytes:
        return Pickle().ext(code).push((shell_touch(marker),)).reduce().finish()

    return make


def _torch_rebuild_non_storage(first: Any) -> Callable[[Path], bytes]:
    def make(marker: Path) -> bytes:
        p = Pickle().mark().glob("torch._utils", "_rebuild_tensor_v2")
        p.push((first, 0, (1,), (1,), False, ordered_dict())).reduce()
        return p.push(_tail_gadget(marker)).tuple().finish()

    return make


def _persistent(pid: Any) -> Callable[[Path], bytes]:
    def make(marker: Path) -> bytes:
        p = Pickle().mark().push(pid).persid()
        return p.push(_tail_gadget(marker)).tuple().finish()

    return make


def _numpy_dtype(spec: str) -> Callable[[Path], bytes]:
    def make(marker: Path) -> bytes:
        p = Pickle().mark().call("numpy", "dtype", spec, False, True)
        return p.push(_tail_gadget(marker)).tuple().finish()

    return make


def _structural(ops: Callable[[Pickle], Any]) -> Callable[[Path], bytes]:
    def make(marker: Path) -> bytes:
        p = Pickle().mark()
        ops(p)
        return p.push(_tail_gadget(marker)).tuple().finish()

    return make


STORAGE_CLASS = Raw(frag().glob("torch", "FloatStorage"))

GADGETS: list[Gadget] = [
    Gadget("GLOBAL os.system", _reduce_gadget("os", "system", shell_touch), "os.system"),
    Gadget("GLOBAL posix.system", _reduce_gadget("posix", "system", shell_touch), "posix.system"),
    Gadget("GLOBAL builtins.eval", _reduce_gadget("builtins", "eval", python_touch),
           "builtins.eval"),
    Gadget("GLOBAL builtins.exec", _reduce_gadget("builtins", "exec", python_touch),
           "builtins.exec"),
    Gadget("GLOBAL __builtin__.eval", _reduce_gadget("__builtin__", "eval", python_touch),
           "builtins.eval"),
    Gadget("GLOBAL subprocess.Popen",
           _reduce_gadget("subprocess", "Popen", lambda m: ["touch", str(m)]),
           "subprocess.Popen"),
    Gadget("GLOBAL subprocess.check_call",
           _reduce_gadget("subprocess", "check_call", lambda m: ["touch", str(m)]),
           "subprocess.check_call"),
    Gadget("builtins.getattr chain", _getattr_chain, "builtins.getattr"),
    Gadget("STACK_GLOBAL os.system (protocol 4, FRAME)", _stack_global("os", "system"),
           "os.system"),
    Gadget("STACK_GLOBAL os.system (protocol 5)", _stack_global("os", "system", 5), "os.system"),
    Gadget("STACK_GLOBAL os.system (BINUNICODE operands)", _stack_global_binunicode,
           "os.system"),
    Gadget("STACK_GLOBAL pathlib.os.system (dotted, allowed module)",
           _stack_global("pathlib", "os.system"), "pathlib.os.system"),
    Gadget("STACK_GLOBAL torch.os.system (dotted)", _stack_global("torch", "os.system"),
           "torch.os.system"),
    Gadget("STACK_GLOBAL torch._utils.os.system (dotted)",
           _stack_global("torch._utils", "os.system"), "torch._utils.os.system"),
    Gadget("STACK_GLOBAL torch.hub.os.system (dotted)",
           _stack_global("torch.hub", "os.system"), "torch.hub.os.system"),
    Gadget("STACK_GLOBAL torch.jit.torch.os.system (dotted)",
           _stack_global("torch.jit", "torch.os.system"), "torch.jit.torch.os.system"),
    Gadget("INST os.system", _inst("os", "system", shell_touch), "os.system"),
    Gadget("INST builtins.exec", _inst("builtins", "exec", python_touch), "builtins.exec"),
    Gadget("OBJ os.system", _obj("os", "system", shell_touch), "os.system"),
    Gadget("OBJ builtins.eval", _obj("builtins", "eval", python_touch), "builtins.eval"),
    Gadget("NEWOBJ types.SimpleNamespace + BUILD __setstate__",
           _setstate_gadget("types", "SimpleNamespace", how="newobj"), "types.SimpleNamespace"),
    Gadget("NEWOBJ_EX types.SimpleNamespace + BUILD __setstate__",
           _setstate_gadget("types", "SimpleNamespace", how="newobj_ex"),
           "types.SimpleNamespace"),
    Gadget("BUILD __setstate__=exec on argparse.Namespace",
           _setstate_gadget("argparse", "Namespace"), "builtins.exec"),
    Gadget("BUILD __setstate__=exec on collections.OrderedDict",
           _setstate_gadget("collections", "OrderedDict"), "builtins.exec"),
    Gadget("BUILD __setstate__=os.system on argparse.Namespace (NEWOBJ)",
           _setstate_gadget("argparse", "Namespace", how="newobj", via=("os", "system"),
                            code=shell_touch), "os.system"),
    *(Gadget(f"EXT{size} -> posix.system", _ext_gadget(code), f"<extension {code}>",
             extension=code)
      for size, code in ((1, 0xF1), (2, 0xF1F2), (4, 0x0F1F2F3F))),
    Gadget("nested pickle.loads", _nested_pickle("pickle", "loads"), "pickle.loads"),
    Gadget("nested _pickle.loads", _nested_pickle("_pickle", "loads"), "_pickle.loads"),
    Gadget("nested pickle.loads of _codecs.encode bytes", _nested_pickle_via_codecs,
           "pickle.loads"),
    Gadget("torch.load with pickle_module", _torch_load, "torch.load"),
    Gadget("torch.hub._load_local", _torch_hub_load_local, "torch.hub._load_local"),
    Gadget("torch.jit.load", _torch_jit_load, "torch.jit.load", live=False),
    Gadget("pickle.dumps protocol 0", _pickled(0), "posix.system"),
    Gadget("pickle.dumps protocol 1", _pickled(1), "posix.system"),
    Gadget("pickle.dumps protocol 2", _pickled(2), "posix.system"),
    Gadget("pickle.dumps protocol 3", _pickled(3), "posix.system"),
    Gadget("pickle.dumps protocol 4", _pickled(4), "posix.system"),
    Gadget("pickle.dumps protocol 5", _pickled(5), "posix.system"),
]

#: Payloads whose abuse is structural: a FormatError, before the os.system that follows.
STRUCTURAL: list[Gadget] = [
    Gadget("_rebuild_tensor_v2 of a str", _torch_rebuild_non_storage("storage"), None, False),
    Gadget("_rebuild_tensor_v2 of a list", _torch_rebuild_non_storage([1, 2, 3, 4]), None, False),
    Gadget("_rebuild_tensor_v2 of None", _torch_rebuild_non_storage(None), None, False),
    Gadget("_rebuild_tensor_v2 of a storage class", _torch_rebuild_non_storage(STORAGE_CLASS),
           None, False),
    Gadget("persistent id str", _persistent("storage"), None, False),
    Gadget("persistent id ('module', ...)",
           _persistent(("module", STORAGE_CLASS, "evil.py", "import os")), None, False),
    Gadget("persistent id 4-tuple", _persistent(("storage", STORAGE_CLASS, "0", "cpu")),
           None, False),
    Gadget("persistent id 7-tuple",
           _persistent(("storage", STORAGE_CLASS, "0", "cpu", 4, None, None)), None, False),
    Gadget("persistent id class as str",
           _persistent(("storage", "FloatStorage", "0", "cpu", 4)), None, False),
    Gadget("persistent id int key", _persistent(("storage", STORAGE_CLASS, 0, "cpu", 4)),
           None, False),
    Gadget("persistent id negative numel", _persistent(("storage", STORAGE_CLASS, "0", "cpu", -4)),
           None, False),
    Gadget("persistent id list", _persistent(["storage", STORAGE_CLASS, "0", "cpu", 4]),
           None, False),
    Gadget("numpy object array (pickle.dumps)", _pickled_numpy_object_array, None),
    Gadget("numpy structured array with object field (pickle.dumps)", _pickled_numpy_structured,
           None),
    Gadget("numpy.dtype('O8')", _numpy_dtype("O8"), None, False),
    Gadget("numpy.dtype('|O')", _numpy_dtype("|O"), None, False),
    Gadget("numpy.dtype('object')", _numpy_dtype("object"), None, False),
    Gadget("numpy.dtype('i4,O')", _numpy_dtype("i4,O"), None, False),
    Gadget("numpy.dtype('i4,i4') (structured)", _numpy_dtype("i4,i4"), None, False),
    Gadget("__builtin__.set with unhashable items",
           _structural(lambda p: p.glob("__builtin__", "set").push(([[1], {}],)).reduce()),
           None, False),
    Gadget("__builtin__.frozenset with unhashable items",
           _structural(lambda p: p.glob("__builtin__", "frozenset").push(([[1]],)).reduce()),
           None, False),
    Gadget("dict with a list key",
           _structural(lambda p: p.empty_dict().empty_list().int(1).setitem()), None, False),
    Gadget("BUILD on a list", _structural(lambda p: p.empty_list().push({"a": 1}).build()),
           None, False),
    Gadget("BUILD on a dict", _structural(lambda p: p.empty_dict().push({"a": 1}).build()),
           None, False),
    Gadget("BUILD on torch.Size",
           _structural(lambda p: p.call("torch", "Size", (1, 2)).push({"a": 1}).build()),
           None, False),
    Gadget("SETITEM on a list", _structural(lambda p: p.empty_list().int(0).int(1).setitem()),
           None, False),
    Gadget("SETITEMS on a tuple",
           _structural(lambda p: p.empty_tuple().mark().int(0).int(1).setitems()), None, False),
    Gadget("APPEND on a dict", _structural(lambda p: p.empty_dict().int(1).append()), None, False),
    Gadget("APPENDS on a str",
           _structural(lambda p: p.str("x").mark().int(1).appends()), None, False),
    Gadget("ADDITEMS on a list",
           _structural(lambda p: p.empty_list().mark().int(1).additems()), None, False),
    Gadget("NEWOBJ of _rebuild_tensor_v2 (not a class)",
           _structural(lambda p: p.glob("torch._utils", "_rebuild_tensor_v2")
                       .push(("x",)).newobj()), None, False),
    Gadget("REDUCE on a storage class",
           _structural(lambda p: p.glob("torch", "FloatStorage").push((4,)).reduce()),
           None, False),
    Gadget("OBJ of torch.Tensor marker",
           _structural(lambda p: p.mark().glob("torch", "Tensor").int(4).obj()), None, False),
    Gadget("REDUCE on a str", _structural(lambda p: p.str("os.system").push(("x",)).reduce()),
           None, False),
    Gadget("NEXT_BUFFER", _structural(lambda p: p.op(b"\x97")), None, False),
    Gadget("unknown opcode 0xff", _structural(lambda p: p.op(b"\xff")), None, False),
    Gadget("copyreg._reconstructor of builtins.object",
           _structural(lambda p: p.glob("copy_reg", "_reconstructor").mark()
                       .glob("__builtin__", "object").glob("__builtin__", "object")
                       .none().tuple().reduce()), None, False),
]


# -- zip archives ------------------------------------------------------------------------------

_EOCD = struct.Struct("<4sHHHHIIH")
_ZIP64_EOCD = struct.Struct("<4sQHHIIQQQQ")
_ZIP64_LOCATOR = struct.Struct("<4sIQI")
_CENTRAL = struct.Struct("<4sHHHHHHIIIHHHHHII")
_LOCAL = struct.Struct("<4sHHHHHIIIHH")


@dataclass
class ZipEntry:
    """One record; every field after ``data`` can lie."""

    name: str
    data: bytes
    method: int = 0
    flags: int = 0x800
    crc: int | None = None  # default: CRC-32 of data
    payload: bytes | None = None  # default: data (stored) or raw deflate of data
    csize: int | None = None  # claimed sizes (central and local)
    usize: int | None = None
    local_name: str | None = None
    local_flags: int | None = None
    local_method: int | None = None
    local_crc: int | None = None
    header_offset: int | None = None  # central directory's pointer to the local header
    central_extra: bytes | None = None  # default: a zip64 block when a size needs one
    local_extra: bytes = b""
    central_only: bool = False  # no local header or data of its own (see header_offset)


def deflate(data: bytes) -> bytes:
    """Raw deflate (zip method 8)."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    return c.compress(data) + c.flush()


@dataclass
class ZipLayout:
    """What ``zip_bytes`` wrote: the bytes and where each part landed."""

    data: bytes
    header_offsets: list[int]
    data_offsets: list[int]
    cd_offset: int
    cd_size: int
    zip64_offset: int | None
    eocd_offset: int


def zip_layout(
    entries: Iterable[ZipEntry],
    *,
    prefix: bytes = b"",
    comment: bytes = b"",
    count: int | None = None,
    count64: int | None = None,
    zip64: bool = True,
    zip64_offset: int | None = None,
    extra_central: bytes = b"",
) -> ZipLayout:
    """Assemble a zip archive (torch writes a zip64 end record even for small files)."""
    entries = list(entries)
    out = bytearray(prefix)
    headers, datas, centrals = [], [], []
    for e in entries:
        payload = e.payload
        if payload is None:
            payload = deflate(e.data) if e.method == 8 else e.data
        crc = zlib.crc32(e.data) if e.crc is None else e.crc
        csize = len(payload) if e.csize is None else e.csize
        usize = len(e.data) if e.usize is None else e.usize
        name = e.name.encode("utf-8")
        local_name = name if e.local_name is None else e.local_name.encode("utf-8")
        offset = len(out)
        headers.append(offset)
        if not e.central_only:
            out += _LOCAL.pack(
                b"PK\x03\x04", 20,
                e.flags if e.local_flags is None else e.local_flags,
                e.method if e.local_method is None else e.local_method,
                0, 0, crc if e.local_crc is None else e.local_crc,
                min(csize, 0xFFFFFFFF), min(usize, 0xFFFFFFFF),
                len(local_name), len(e.local_extra),
            )
            out += local_name + e.local_extra
        datas.append(len(out))
        if not e.central_only:
            out += payload
        pointer = offset if e.header_offset is None else e.header_offset
        extra = e.central_extra
        if extra is None:
            wide = [v for v in (usize, csize, pointer) if v >= 0xFFFFFFFF]
            extra = struct.pack(f"<HH{len(wide)}Q", 1, 8 * len(wide), *wide) if wide else b""
        centrals.append(
            _CENTRAL.pack(
                b"PK\x01\x02", 20, 20, e.flags, e.method, 0, 0, crc,
                min(csize, 0xFFFFFFFF), min(usize, 0xFFFFFFFF), len(name),
                len(extra), 0, 0, 0, 0, min(pointer, 0xFFFFFFFF),
            ) + name + extra
        )
    cd_offset = len(out)
    for c in centrals:
        out += c
    out += extra_central
    cd_size = len(out) - cd_offset
    n = len(entries) if count is None else count
    n64 = n if count64 is None else count64
    z64 = None
    if zip64:
        z64 = len(out)
        out += _ZIP64_EOCD.pack(b"PK\x06\x06", 44, 0x031E, 45, 0, 0, n64, n64, cd_size, cd_offset)
        out += _ZIP64_LOCATOR.pack(b"PK\x06\x07", 0, z64 if zip64_offset is None else zip64_offset,
                                   1)
    eocd = len(out)
    out += _EOCD.pack(b"PK\x05\x06", 0, 0, min(n, 0xFFFF), min(n, 0xFFFF), cd_size, cd_offset,
                      len(comment)) + comment
    return ZipLayout(bytes(out), headers, datas, cd_offset, cd_size, z64, eocd)


def zip_bytes(entries: Iterable[ZipEntry], **kw: Any) -> bytes:
    """The bytes of ``zip_layout``."""
    return zip_layout(entries, **kw).data


def read_zip(data: bytes) -> list[tuple[str, bytes]]:
    """(name, bytes) of every record, via the standard library."""
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        return [(i.filename, z.read(i)) for i in z.infolist()]


def torch_save_bytes(obj: Any, **kw: Any) -> bytes:
    """``torch.save(obj)`` into memory."""
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf, **kw)
    return buf.getvalue()


def tk_save_bytes(obj: Any, **kw: Any) -> bytes:
    """``torchkeep.save(obj)`` into memory."""
    import torchkeep

    buf = io.BytesIO()
    torchkeep.save(obj, buf, **kw)
    return buf.getvalue()


def small_state() -> dict[str, Any]:
    """A tiny checkpoint: two tensors and a scalar."""
    import torch

    return {"w": torch.arange(4, dtype=torch.float32), "b": torch.tensor([7], dtype=torch.int64),
            "step": 3}


def replace_records(data: bytes, replacements: dict[str, bytes], *,
                    drop: Iterable[str] = (), add: Iterable[tuple[str, bytes]] = ()) -> bytes:
    """Re-assemble a torch zip with some records replaced (suffix match), correct CRCs."""
    dropped = set(drop)
    entries = []
    for name, content in read_zip(data):
        record = name.split("/", 1)[1]
        if record in dropped:
            continue
        entries.append(ZipEntry(name, replacements.get(record, content)))
    prefix = entries[0].name.split("/", 1)[0]
    entries += [ZipEntry(f"{prefix}/{record}", content) for record, content in add]
    return zip_bytes(entries)


def in_torch_zip(data_pkl: bytes) -> bytes:
    """A real torch.save checkpoint whose data.pkl is ``data_pkl``."""
    return replace_records(torch_save_bytes(small_state()), {"data.pkl": data_pkl})


def torch_entries(data_pkl: bytes, storages: dict[str, bytes] | None = None, *,
                  prefix: str = "archive", version: bytes | None = b"3\n") -> list[ZipEntry]:
    """The records of a torch-layout zip: data.pkl, format records, data/<key>, version."""
    entries = [
        ZipEntry(f"{prefix}/data.pkl", data_pkl),
        ZipEntry(f"{prefix}/.format_version", b"1"),
        ZipEntry(f"{prefix}/.storage_alignment", b"64"),
        ZipEntry(f"{prefix}/byteorder", b"little"),
    ]
    for key, content in (storages or {}).items():
        entries.append(ZipEntry(f"{prefix}/data/{key}", content))
    if version is not None:
        entries.append(ZipEntry(f"{prefix}/version", version))
    return entries


def torch_zip(data_pkl: bytes, storages: dict[str, bytes] | None = None, **kw: Any) -> bytes:
    """``torch_entries`` as a zip archive."""
    return zip_bytes(torch_entries(data_pkl, storages, **kw))


def simple_entries() -> list[ZipEntry]:
    """A valid one-tensor checkpoint ({'w': arange(4.)}) as zip records."""
    return torch_entries(tensor_pickle(), {"0": FLOATS4})


def overlapping_zip() -> bytes:
    """A valid checkpoint plus a record 'archive/extra' whose local header (and data) lie
    inside the data of 'archive/data/0': one byte range read as two records."""
    name = b"archive/extra"
    inner = b"hi"
    hidden = _LOCAL.pack(b"PK\x03\x04", 20, 0x800, 0, 0, 0, zlib.crc32(inner), len(inner),
                         len(inner), len(name), 0) + name + inner
    entries = simple_entries()
    index = next(i for i, e in enumerate(entries) if e.name.endswith("data/0"))
    entries[index].data = FLOATS4 + hidden
    start = zip_layout(entries).data_offsets[index] + len(FLOATS4)
    entries.append(ZipEntry(name.decode(), inner, header_offset=start, central_only=True))
    return zip_bytes(entries)


def deflated_zeros(megabytes: int) -> bytes:
    """Raw deflate of ``megabytes`` MiB of zeros, made without holding them (a bomb)."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    chunk = bytes(1 << 20)
    return b"".join(c.compress(chunk) for _ in range(megabytes)) + c.flush()


def repeated_deflate_zeros(megabytes: int) -> bytes:
    """Raw deflate of ``megabytes`` MiB of zeros: one 1 MiB block compressed with a full
    flush (no back-references across it), repeated; gigabytes in milliseconds."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = c.compress(bytes(1 << 20)) + c.flush(zlib.Z_FULL_FLUSH)
    return block * megabytes + c.flush(zlib.Z_FINISH)


def storage_pid(numel: int, *, key: str = "0", cls: str = "FloatStorage",
                location: str = "cpu", legacy_view: Any = ...) -> Raw:
    """BINPERSID of ('storage', torch.<cls>, key, location, numel[, view])."""
    p = frag().mark().str("storage").glob("torch", cls).str(key).str(location).int(numel)
    if legacy_view is not ...:
        p.push(legacy_view)
    return Raw(p.tuple().persid())


def tensor_v2(storage: Any, offset: Any = 0, size: Any = (4,), stride: Any = (1,)) -> Raw:
    """``_rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())``."""
    p = frag().glob("torch._utils", "_rebuild_tensor_v2")
    p.push((storage, offset, size, stride, False, ordered_dict())).reduce()
    return Raw(p)


def tensor_pickle(offset: Any = 0, size: Any = (4,), stride: Any = (1,), *, numel: int = 4,
                  cls: str = "FloatStorage", legacy_view: Any = ..., key: str = "0") -> bytes:
    """``{'w': tensor}``: one tensor over storage ``key``."""
    storage = storage_pid(numel, key=key, cls=cls, legacy_view=legacy_view)
    return Pickle().push({"w": tensor_v2(storage, offset, size, stride)}).finish()


FLOATS4 = struct.pack("<4f", 0.0, 1.0, 2.0, 3.0)


# -- the legacy magic-number stream ------------------------------------------------------------

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
SYS_INFO = {"protocol_version": 1001, "little_endian": True,
            "type_sizes": {"short": 2, "int": 4, "long": 4}}


def legacy_stream(main: bytes, keys: Any = ("0",), storages: Iterable[tuple[int, bytes]] = (
        (4, FLOATS4),), *, magic: Any = MAGIC_NUMBER, version: Any = 1001,
                  sys_info: Any = None, sys_info_pickle: bytes | None = None,
                  keys_pickle: bytes | None = None) -> bytes:
    """magic | version | sys_info | main | keys | (int64 count + bytes) per storage."""
    out = pickle.dumps(magic, protocol=2) + pickle.dumps(version, protocol=2)
    if sys_info_pickle is None:
        sys_info_pickle = pickle.dumps(SYS_INFO if sys_info is None else sys_info, protocol=2)
    out += sys_info_pickle
    out += main
    out += pickle.dumps(list(keys), protocol=2) if keys_pickle is None else keys_pickle
    for count, content in storages:
        out += struct.pack("<q", count) + content
    return out


def split_pickles(data: bytes, count: int) -> tuple[list[bytes], bytes]:
    """The first ``count`` pickle streams of ``data`` and the bytes after them."""
    parts, pos = [], 0
    for _ in range(count):
        end = pos
        for op, _arg, at in pickletools.genops(io.BytesIO(data[pos:])):
            if op.name == "STOP":
                end = pos + at + 1
                break
        parts.append(data[pos:end])
        pos = end
    return parts, data[pos:]


def in_legacy(main: bytes) -> bytes:
    """A real torch.save(_use_new_zipfile_serialization=False) file whose object pickle is
    ``main`` (the storage key list is kept, so a benign main would still disagree)."""
    real = torch_save_bytes(small_state(), _use_new_zipfile_serialization=False)
    parts, tail = split_pickles(real, 5)
    return b"".join(parts[:3]) + main + parts[4] + tail


# -- safetensors -------------------------------------------------------------------------------


def safetensors_bytes(header: Any, data: bytes = b"", *, length: int | None = None,
                      pad: bool = True) -> bytes:
    """u64 header length | JSON header (space padded to 8) | data."""
    if isinstance(header, bytes):
        raw = header
    elif isinstance(header, str):
        raw = header.encode("utf-8")
    else:
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    if pad:
        raw += b" " * (-len(raw) % 8)
    n = len(raw) if length is None else length
    return struct.pack("<Q", n) + raw + data


def st_entry(dtype: str, shape: list[Any], begin: int, end: int) -> dict[str, Any]:
    """One tensor entry of a safetensors header."""
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def torchkeep_tree(tree: Any) -> dict[str, str]:
    """A ``__metadata__`` holding a torchkeep tree document."""
    return {"format": "pt", "torchkeep": json.dumps({"version": 1, "tree": tree})}


def forged_safetensors(tree: Any, *, tensors: dict[str, dict[str, Any]] | None = None,
                       data: bytes = FLOATS4) -> bytes:
    """A safetensors file with one F32[4] tensor 'w' and a forged torchkeep tree."""
    header: dict[str, Any] = {"__metadata__": torchkeep_tree(tree)}
    header.update(tensors if tensors is not None else {"w": st_entry("F32", [4], 0, 16)})
    return safetensors_bytes(header, data)


# -- nesting and memo bombs --------------------------------------------------------------------


def nested_marks(depth: int) -> bytes:
    """``depth`` MARKs, each closed by LIST (a MARK-nesting bomb)."""
    return Pickle().op(b"(" * depth).op(b"l" * depth).finish()


def nested_lists(depth: int) -> bytes:
    """A list nested ``depth`` deep, built with EMPTY_LIST / APPEND (no MARK)."""
    return Pickle().op(b"]" * (depth + 1)).op(b"a" * depth).finish()


def nested_tuples(depth: int) -> bytes:
    """A tuple nested ``depth`` deep, built with TUPLE1 (no MARK)."""
    return Pickle().empty_tuple().op(b"\x85" * depth).finish()


def nested_dicts(depth: int) -> bytes:
    """A dict nested ``depth`` deep: {'k': {'k': ...}} built with SETITEM, no MARK."""
    p = Pickle()
    for _ in range(depth):
        p.empty_dict().short_str("k")
    p.empty_dict()
    p.op(b"s" * depth)
    return p.finish()


def memo_bomb(levels: int, *, tuples: bool = False) -> bytes:
    """Level i is [level i-1, level i-1] via BINGET: 2**levels leaves, linear bytes."""
    p = Pickle().empty_list().put(0)
    for i in range(1, levels + 1):
        if tuples:
            p.get(i - 1).get(i - 1).tuple2().put(i)
        else:
            p.empty_list().get(i - 1).append().get(i - 1).append().put(i)
        p.pop()
    return p.get(levels).finish()


def tensor_memo_bomb(levels: int) -> bytes:
    """A memo bomb whose leaves are one tensor (so tree walks meet it 2**levels times)."""
    storage = storage_pid(4)
    p = Pickle().push(tensor_v2(storage)).put(0).pop()
    for i in range(1, levels + 1):
        p.empty_list().get(i - 1).append().get(i - 1).append().put(i).pop()
    return p.get(levels).finish()


# -- mutations for the fuzz test ---------------------------------------------------------------


@dataclass(frozen=True)
class Mutation:
    """flip: xor ``value`` into byte ``at``; insert: put ``value`` before ``at``; delete."""

    kind: str
    at: int
    value: int = 0


#: Tokens the "token" mutation corrupts (a fuzzing dictionary: the strings that steer the
#: parsers, which byte-level mutations rarely hit).
TOKENS = [b"cpu", b"storage", b"FloatStorage", b"LongStorage", b"_rebuild_tensor_v2",
          b"OrderedDict", b"little", b"data_offsets", b"F32", b"I64", b"$tensor", b"$dict",
          b"shape", b"dtype", b"version"]


def mutate(data: bytes, mutations: Iterable[Mutation]) -> bytes:
    """Apply mutations in order; positions wrap modulo the current length.

    ``token`` corrupts one byte of the first occurrence of ``TOKENS[at % len(TOKENS)]``
    (which byte and how: from ``value``); a no-op when the token is absent.
    """
    out = bytearray(data)
    for m in mutations:
        if not out:
            break
        at = m.at % len(out)
        if m.kind == "token":
            token = TOKENS[m.at % len(TOKENS)]
            pos = out.find(token)
            if pos >= 0:
                out[pos + m.value % len(token)] ^= 1 + (m.value >> 1) % 0x7F
        elif m.kind == "flip":
            out[at] ^= m.value or 0xFF
        elif m.kind == "insert":
            out.insert(at, m.value)
        elif m.kind == "delete":
            del out[at]
        elif m.kind == "set":
            out[at] = m.value
    return bytes(out)


@dataclass
class Files:
    """Small valid checkpoints of every format, made once per test session."""

    torch_zip: bytes = b""
    torchkeep_zip: bytes = b""
    legacy: bytes = b""
    safetensors: bytes = b""
    extras: dict[str, bytes] = field(default_factory=dict)


def small_files() -> Files:
    """torch.save / torchkeep.save outputs of ``small_state`` in each format."""
    state = small_state()
    return Files(
        safetensors=tk_save_bytes(state, format="safetensors"),
        torchkeep_zip=tk_save_bytes(state),
        torch_zip=torch_save_bytes(state),
        legacy=torch_save_bytes(state, _use_new_zipfile_serialization=False),
    )

