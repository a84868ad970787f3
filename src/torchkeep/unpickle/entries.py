"""What an allowed global is to the interpreter, and the argument checks every entry
shares: the vocabulary of the three global tables (torch_globals, stdlib_globals,
numpy_globals) and of the allowlist that joins them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torchkeep.tree import plain_attribute_name

if TYPE_CHECKING:
    from torchkeep.unpickle.interpreter import _Machine as Machine
else:
    Machine = Any

__all__ = [
    "Call", "Entry", "Machine", "Pending", "attribute_state", "bool_arg", "int_arg",
    "ints_arg", "marker", "object_state",
]

#: What REDUCE / NEWOBJ run for an allowed global: ``call(machine, args)``.
Call = Callable[[Machine, tuple[Any, ...]], Any]


@dataclass(frozen=True, eq=False, slots=True)
class Entry:
    """An allowed global as the stream sees it: callable through REDUCE and/or NEWOBJ."""

    qualname: str
    call: Call | None = None
    new: Call | None = None
    #: for allowed user classes: the class itself (BUILD and item ops consult it)
    cls: type | None = None

    def __repr__(self) -> str:
        return f"<global {self.qualname}>"


class Pending:
    """An object that BUILD will finish (numpy's ndarray and dtype pickle that way)."""

    __slots__ = ()


def marker(qualname: str) -> Entry:
    """An allowed global that is only ever an argument (a class handed to a rebuild)."""
    return Entry(qualname)


def int_arg(m: Machine, value: Any, what: str) -> int:
    """``value`` when it is an int, else the stream's error."""
    if type(value) is not int:
        raise m.fail(f"{what} must be an int, got {type(value).__name__}")
    return value


def ints_arg(m: Machine, value: Any, what: str) -> tuple[int, ...]:
    """``value`` as a tuple of ints (a shape or stride), within the dimension limit."""
    if not isinstance(value, (tuple, list)):
        raise m.fail(f"{what} must be a tuple of ints, got {type(value).__name__}")
    if len(value) > m.limits.max_tensor_dims:
        m.limits.check("max_tensor_dims", len(value), f"{m.what}: {what} dimensions")
    for v in value:
        if type(v) is not int:
            raise m.fail(f"{what} must hold ints, found {type(v).__name__}")
    return tuple(value)


def bool_arg(m: Machine, value: Any, what: str) -> bool:
    """``value`` when it is a bool, else the stream's error."""
    if type(value) is not bool:
        raise m.fail(f"{what} must be a bool, got {type(value).__name__}")
    return value


def object_state(m: Machine, state: Any) -> dict[str, Any] | None:
    """Python attribute state: a dict, or the (dict, slots) pair of ``__getstate__``."""
    if state is None:
        return None
    if isinstance(state, tuple) and len(state) == 2:
        merged: dict[str, Any] = {}
        for part in state:
            if part is not None:
                merged.update(object_state(m, part) or {})
        return merged or None
    if not isinstance(state, dict) or not all(type(k) is str for k in state):
        raise m.fail("object state must be a dict with str keys")
    return dict(state) or None


def attribute_state(m: Machine, state: Any, what: str) -> dict[str, Any]:
    """Object state whose keys can only ever be plain attribute names."""
    attrs = object_state(m, state) or {}
    for name in attrs:
        if not plain_attribute_name(name):
            raise m.fail(f"{what} attribute {name!r} is not a plain attribute name")
    return attrs
