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
