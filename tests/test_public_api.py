"""The public surface is a tested artefact: one sorted __all__, everything in it exists."""

from __future__ import annotations

import dataclasses
import inspect
import pathlib

import torchkeep
import torchkeep.errors as errors
from torchkeep.limits import Limits


def test_all_is_sorted_and_complete() -> None:
    names = torchkeep.__all__
    assert names == sorted(names)
    for name in names:
        assert hasattr(torchkeep, name), name
    public = {
        n for n, v in vars(torchkeep).items()
        if not n.startswith("_") and not inspect.ismodule(v)
        and n not in ("annotations", "TYPE_CHECKING")
    }
    assert public - set(names) == set()
    assert set(errors.__all__) <= set(names)  # every error can be caught as torchkeep.X


def test_every_error_subclasses_a_builtin_and_the_base() -> None:
    for name in errors.__all__:
        cls = getattr(errors, name)
        assert issubclass(cls, errors.TorchkeepError)
        if cls is not errors.TorchkeepError:
            builtin_bases = [b for b in cls.__mro__ if b.__module__ == "builtins"
                             and b not in (object, BaseException, Exception)]
            assert builtin_bases, f"{name} subclasses no builtin"
        assert isinstance(cls.exit_code, int)


def test_error_tree_is_documented_in_one_place() -> None:
    doc = errors.__doc__ or ""
    for name in errors.__all__:
        assert name in doc, f"{name} missing from the tree in errors.py's docstring"


def test_public_callables_have_docstrings() -> None:
    for name in torchkeep.__all__:
        obj = getattr(torchkeep, name)
        if callable(obj):
            assert inspect.getdoc(obj), name


def test_every_limit_is_checked_somewhere() -> None:
    """A field of Limits that no parser checks would promise a bound it does not keep."""
    root = pathlib.Path(torchkeep.__file__).parent
    code = "\n".join(p.read_text() for p in root.rglob("*.py") if p.name != "limits.py")
    for field in dataclasses.fields(Limits):
        assert f'"{field.name}"' in code, f"Limits.{field.name} is never checked"
