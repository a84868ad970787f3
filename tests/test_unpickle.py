"""The restricted interpreter decodes plain data exactly as pickle.loads does, protocols 0-5."""

from __future__ import annotations

import argparse
import collections
import datetime
import pathlib
import pickle

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from torchkeep.errors import CorruptCheckpointError, LimitExceededError, UnsafeCheckpointError
from torchkeep.limits import Limits
from torchkeep.tree import PickledObject
from torchkeep.unpickle import Allowlist, unpickle

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
    st.text(max_size=20), st.binary(max_size=20),
)
keys = st.one_of(st.integers(), st.text(max_size=8), st.tuples(st.integers(), st.text(max_size=4)))
data = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=6),
        st.tuples(children, children),
        st.dictionaries(keys, children, max_size=6),
    ),
    max_leaves=30,
)


def decode(raw: bytes, allow: tuple = ()) -> object:
    return unpickle(raw, allowlist=Allowlist(allow)).value


@settings(max_examples=150, deadline=None)
@given(value=data, protocol=st.integers(min_value=0, max_value=5))
def test_plain_data_matches_pickle_loads(value: object, protocol: int) -> None:
    raw = pickle.dumps(value, protocol=protocol)
    assert decode(raw) == pickle.loads(raw)


@pytest.mark.parametrize("protocol", range(6))
def test_containers_and_builtins(protocol: int) -> None:
    value = {
        "od": collections.OrderedDict([("a", 1), ("b", [2, 3])]),
        "counter": collections.Counter({"x": 2}),
        "set": {1, 2, 3},
        "frozen": frozenset({"a"}),
        "complex": 1 + 2j,
        "bytearray": bytearray(b"\x00\xff"),
        "big": 2**200,
        "neg": -(2**70),
        "slice": slice(1, 5, 2),
    }
    assert decode(pickle.dumps(value, protocol=protocol)) == value


def test_shared_objects_stay_shared() -> None:
    shared = [1, 2]
    out = decode(pickle.dumps({"a": shared, "b": shared}, protocol=2))
    assert out["a"] is out["b"]


def test_default_stdlib_pure_data_types() -> None:
    value = {
        "ns": argparse.Namespace(lr=0.1, name="x"),
        "path": pathlib.PurePosixPath("/a/b"),
        "when": datetime.datetime(2026, 11, 29, 12, 30, tzinfo=datetime.timezone.utc),
        "delta": datetime.timedelta(days=2, seconds=5),
        "day": datetime.date(2026, 1, 2),
    }
    for protocol in (2, 4):
        assert decode(pickle.dumps(value, protocol=protocol)) == value


def test_numpy_arrays_and_scalars() -> None:
    value = {
        "a": np.arange(6, dtype=np.float32).reshape(2, 3),
        "f": np.asfortranarray(np.arange(6).reshape(2, 3)),
        "be": np.arange(3, dtype=">i4"),
        "s": np.float64(2.5),
        "state": np.random.RandomState(0).get_state(),
    }
    out = decode(pickle.dumps(value, protocol=2))
    np.testing.assert_array_equal(out["a"], value["a"])
    np.testing.assert_array_equal(out["f"], value["f"])
    assert out["f"].flags.f_contiguous
    np.testing.assert_array_equal(out["be"], value["be"])
    assert out["be"].dtype == np.dtype(">i4")
    assert out["s"] == 2.5 and isinstance(out["s"], np.float64)
    np.testing.assert_array_equal(out["state"][1], value["state"][1])
    assert out["a"].flags.writeable


class Config:
    """A user class, allowed explicitly in the tests below."""

    def __init__(self, depth: int = 1) -> None:
        self.depth = depth

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Config) and other.__dict__ == self.__dict__

    __hash__ = None  # type: ignore[assignment]


def test_unknown_global_is_refused_with_advice() -> None:
    raw = pickle.dumps(Config(3), protocol=2)
    with pytest.raises(UnsafeCheckpointError) as info:
        decode(raw)
    message = str(info.value)
    assert "tests.test_unpickle.Config" in message or "test_unpickle.Config" in message
    assert "allow=" in message
    assert info.value.global_name.endswith("Config")


def test_allowed_class_builds_real_instances() -> None:
    raw = pickle.dumps({"c": Config(3)}, protocol=2)
    out = decode(raw, allow=((Config, f"{Config.__module__}.Config"),))
    assert out["c"] == Config(3)


def test_allowed_by_name_builds_inert_records() -> None:
    raw = pickle.dumps(Config(4), protocol=2)
    out = decode(raw, allow=(f"{Config.__module__}.Config",))
    assert isinstance(out, PickledObject)
    assert out.name == "Config" and out.state == {"depth": 4}


@pytest.mark.parametrize("name", ["os.system", "posix.system", "builtins.eval", "subprocess.Popen"])
def test_dangerous_modules_can_never_be_allowed(name: str) -> None:
    with pytest.raises(ValueError, match="never allows"):
        Allowlist([name])


def test_dangerous_global_message_says_never() -> None:
    raw = b"\x80\x02cos\nsystem\nX\x04\x00\x00\x00trueq\x00\x85R."
    with pytest.raises(UnsafeCheckpointError, match="never allowed"):
        decode(raw)


@pytest.mark.parametrize(
    "raw",
    [
        b"",  # no STOP
        b"\x80\x02",  # truncated
        b"\x80\x02h\x05.",  # GET of an undefined memo index
        b"\x80\x02(.",  # STOP with only a MARK
        b"\x80\x02X\xff\xff\xff\x7fabc.",  # length past the end
        b"\x80\x02\xff.",  # unknown opcode
        b"\x80\x02]K\x01s.",  # SETITEM on a list
        b"\x80\x02}K\x01a.",  # APPEND on a dict
        b"\x80\x02]]s.",  # unhashable key
    ],
)
def test_malformed_streams_are_corrupt(raw: bytes) -> None:
    with pytest.raises(CorruptCheckpointError):
        decode(raw)


@pytest.mark.parametrize(
    ("raw", "offset"),
    [
        (b"\x80\x02N\x86.", 3),  # TUPLE2 (run inline) with one item on the stack
        (b"\x80\x02N\x85\x85\x86.", 5),  # the same after two inline TUPLE1s
        (b"\x80\x02h\x05.", 2),  # inline BINGET of an undefined memo index
        (b"\x80\x02]\x81.", 3),  # NEWOBJ (a handler) on a one-item stack
    ],
)
def test_corruption_names_the_failing_opcode_offset(raw: bytes, offset: int) -> None:
    with pytest.raises(CorruptCheckpointError, match=f"offset {offset}:"):
        decode(raw)


def test_nesting_bomb_hits_the_depth_limit() -> None:
    raw = b"\x80\x02" + b"(" * 100_000 + b"."
    with pytest.raises(LimitExceededError):
        decode(raw)


def test_deep_tuple_key_cannot_crash_hashing() -> None:
    raw = b"\x80\x02}K\x01" + b"\x85" * 5000 + b"K\x01s."  # {(((1,),),...): 1}
    with pytest.raises(CorruptCheckpointError, match="nested too deeply"):
        decode(raw)


def test_limits_are_named_and_raisable() -> None:
    raw = pickle.dumps(2**20000, protocol=2)
    with pytest.raises(LimitExceededError, match="max_int_bytes"):
        decode(raw)
    assert unpickle(raw, allowlist=Allowlist(), limits=Limits(max_int_bytes=4096)).value == 2**20000


# -- FRAME boundaries: an opcode may not cross its frame's end, frames may not nest --------

_FRAMED_VALUE = [7, 300, 70000, 2**40, 1.5, "s", "long text", b"by", None, True,
                 ("t", "u"), {"k": "v"}, collections.OrderedDict(a=1)]


def _opcodes(raw: bytes) -> list[bytes]:
    """The opcodes of a CPython pickle (without PROTO, FRAME and STOP), each with its
    argument bytes."""
    import itertools
    import pickletools

    spans = [*(pos for _, _, pos in pickletools.genops(raw)), len(raw)]
    ops = [raw[a:b] for a, b in itertools.pairwise(spans)]
    return [op for op in ops if op[:1] not in (b"\x80", b"\x95", b".")]


def _framed(ops: list[bytes], frame_bytes: int) -> bytes:
    """PROTO 4, a FRAME of ``frame_bytes`` over the opcodes, the rest unframed, STOP."""
    body = b"".join(ops)
    return (b"\x80\x04\x95" + frame_bytes.to_bytes(8, "little") + body + b".")


_OPS = [
    *_opcodes(pickle.dumps(_FRAMED_VALUE, protocol=4)),
    b"\x8a\x02\x00\x01", b"0",  # LONG1, popped
    b"cbuiltins\nset\n", b"0",  # a GLOBAL's two text lines
    b"Vtext\n", b"0", b"S'py2'\n", b"0",
]
#: opcode byte -> bytes of its length field, for opcodes whose payload is a second read
_COUNTED = {0x58: 4, 0x42: 4, 0x43: 1, 0x8C: 1, 0x8D: 8, 0x8E: 8, 0x55: 1, 0x54: 4, 0x8A: 1}


def _splits() -> list[tuple[int, bool]]:
    """(frame end, whether it falls between two of the opcode's reads) for every frame
    end inside an opcode; an opcode is read as its byte, then a length field, a payload
    or text lines."""
    cases, offset = [], 0
    for op in _OPS:
        between = {1}
        if op[0] in _COUNTED:
            between.add(1 + _COUNTED[op[0]])
        between |= {i + 1 for i, byte in enumerate(op) if byte == 0x0A}
        cases += [(offset + k, k in between) for k in range(1, len(op))]
        offset += len(op)
    return cases


@pytest.mark.parametrize("frame_bytes", [end for end, _ in _splits()])
def test_an_opcode_crossing_its_frames_end_is_refused(frame_bytes: int) -> None:
    with pytest.raises(CorruptCheckpointError, match="crosses the end of its FRAME"):
        decode(_framed(_OPS, frame_bytes))


def test_pickle_py_refuses_every_split_inside_one_read() -> None:
    # pickle.py's _Unframer refuses a read that crosses the frame's end, and lets through
    # a frame that ends between two reads of one opcode (the rest is read unframed).
    # torchkeep refuses those as well: the opcode as a whole crosses the frame, which no
    # pickler writes (CPython's commits a frame before an opcode, never inside one).
    for end, between_reads in _splits():
        try:
            pickle._loads(_framed(_OPS, end))  # type: ignore[attr-defined]
            refused = False
        except pickle.UnpicklingError:
            refused = True
        assert refused != between_reads, end


@pytest.mark.parametrize("protocol", [4, 5])
def test_frames_ending_on_opcode_boundaries_load_as_pickle_loads(protocol: int) -> None:
    expected = pickle._loads(_framed(_OPS, 0))  # type: ignore[attr-defined]
    offset = 0
    for op in _OPS:
        offset += len(op)
        raw = _framed(_OPS, offset)
        assert decode(raw) == expected == pickle.loads(raw)
    for value in ([b"x" * (1 << 20), "y" * 70_000, list(range(20_000))], _FRAMED_VALUE):
        raw = pickle.dumps(value, protocol=protocol)  # CPython's framer: big args unframed
        assert decode(raw) == value


def test_a_frame_opened_inside_another_is_refused() -> None:
    inner = b"\x95" + (2).to_bytes(8, "little") + b"NN"
    raw = b"\x80\x04\x95" + (1 + len(inner) + 1).to_bytes(8, "little") + b"N" + inner + b"0.0."
    with pytest.raises(CorruptCheckpointError, match="FRAME opened inside"):
        decode(raw)
    with pytest.raises(pickle.UnpicklingError, match="new frame before end of current"):
        pickle._loads(raw)  # type: ignore[attr-defined]
    # a FRAME that starts exactly where the previous one ends is fine
    raw = b"\x80\x04\x95" + (1 + 9).to_bytes(8, "little") + b"N" + inner + b"0."
    assert decode(raw) is None


def test_a_frame_longer_than_the_stream_is_truncated() -> None:
    raw = b"\x80\x04\x95" + (100).to_bytes(8, "little") + b"N."
    with pytest.raises(CorruptCheckpointError, match="truncated: FRAME of 100 bytes"):
        decode(raw)


def test_the_frame_divergence_gadget_is_refused() -> None:
    # pickle.load on a file reads past a 2-byte frame into a BINBYTES that hides
    # GLOBAL os.system + REDUCE (CPython issue 154848); a reader that ignores frames sees
    # only bytes. torchkeep refuses the stream before reading either way.
    hidden = b"cos\nsystem\n(S'true'\ntR."
    raw = (b"\x80\x05N0(\x95" + (2).to_bytes(8, "little") + b"B"
           + len(hidden).to_bytes(4, "little") + hidden + b"1N.")
    with pytest.raises(CorruptCheckpointError, match="crosses the end of its FRAME"):
        decode(raw)


# -- text numbers, memo indices and call arities as CPython's C unpickler reads them --------

_C_READINGS = [
    *(b"I" + t + b"\n." for t in (b"00", b"01", b"-0", b"+1", b" 1", b"0", b"010", b"0x10",
                                  b"0o10", b"1_000", b"", b" 12 ", b"007", b"0x", b"0b1",
                                  b"9223372036854775808", b"-0x8000000000000001",
                                  b"01000000000000000000000000")),
    *(b"L" + t + b"L\n." for t in (b"00", b"01", b"010", b"0x10", b"-5", b"1_0")),
    *(b"F" + t + b"\n." for t in (b"1.5", b"1_0", b" 1", b"1 ", b"inf", b"-nan", b"1e500",
                                  b"Infinity", b"-1e-400")),
    b"Np5555555555555555555555555555\n.", b"Np-1\n.", b"Np3\n0g3\n.", b"Ng-1\n.",
    b"c__builtin__\nset\n((I1\nI2\nlI3\ntR.", b"c__builtin__\nset\n((I1\nI2\nltR.",
    b"c__builtin__\nfrozenset\n((lI3\ntR.",
    b"\x80\x02c__builtin__\nbytes\nC\x01xX\x01\x00\x00\x00a\x86R.",
]


@pytest.mark.parametrize("raw", _C_READINGS)
def test_text_numbers_memo_and_arities_read_as_cpython_does(raw: bytes) -> None:
    try:
        expected = pickle.loads(raw)
    except Exception:
        with pytest.raises(CorruptCheckpointError):
            decode(raw)
        return
    value = decode(raw)
    assert type(value) is type(expected)
    assert repr(value) == repr(expected)


def test_newobj_of_an_ordered_dict_ignores_its_arguments_as_cpython_does() -> None:
    raw = b"\x80\x02ccollections\nOrderedDict\n]](K\x01K\x02ea\x85\x81."
    assert pickle.loads(raw) == collections.OrderedDict() == decode(raw)
