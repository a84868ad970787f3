"""``torch.load`` for code you do not control: torch's arguments, torchkeep's loader.

Libraries load weights with ``torch.load`` internally (bundled ``.pth`` files, hub
downloads, ``from_pretrained`` fallbacks). :func:`patch_torch_load` replaces
``torch.load`` (and ``torch.serialization.load``, the same function) with a function that
takes the same arguments, gives them torch's meanings, and reads the file with the
restricted interpreter: nothing in the file runs, whatever the caller asked for.
"""

from __future__ import annotations

import functools
import os
import pathlib
import pickle
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Any, Literal

from torchkeep.errors import UnsafeCheckpointError
from torchkeep.limits import DEFAULT_LIMITS, Limits
from torchkeep.unpickle import AllowSpec

__all__ = ["TorchLoadPatch", "patch_torch_load", "unpatch_torch_load"]

#: What a patch does with ``torch.load(..., weights_only=False)`` (or a custom
#: ``pickle_module``): refuse it, or serve it with the restricted loader like any other call.
WeightsOnlyFalse = Literal["refuse", "restricted"]

#: Keyword arguments torch.load hands to its unpickler, accepted for compatibility:
#: torchkeep decodes Python 2 ``str`` as UTF-8 (bytes where that fails), torch's default.
_UNPICKLER_ARGS = frozenset({"encoding", "errors", "fix_imports"})

_ACTIVE: list[TorchLoadPatch] = []  # newest last; each restores what the one before left


def _described(f: Any) -> str:
    if isinstance(f, (str, os.PathLike)):
        return os.fsdecode(f)
    name = getattr(f, "name", None)
    return name if isinstance(name, str) else f"<{type(f).__name__}>"


class TorchLoadPatch:
    """``torch.load`` routed through torchkeep, from creation until :meth:`undo`.

    Use it as a context manager (the patch is undone when the block ends) or keep it for
    the whole process. ``loaded`` lists what each patched call read, in order.
    """

    def __init__(self, *, allow: Iterable[AllowSpec] = (),
                 weights_only_false: WeightsOnlyFalse = "refuse",
                 limits: Limits = DEFAULT_LIMITS) -> None:
        if weights_only_false not in ("refuse", "restricted"):
            raise ValueError("weights_only_false is 'refuse' or 'restricted', got "
                             f"{weights_only_false!r}")
        import torch.serialization

        from torchkeep.unpickle import Allowlist

        self.allow = tuple(allow)
        Allowlist(self.allow)  # a bad allow= entry fails here, not in the library's call
        self.weights_only_false: WeightsOnlyFalse = weights_only_false
        self.limits = limits
        self.loaded: list[str] = []
        self._saved: tuple[Any, Any] | None = (torch.load, torch.serialization.load)
        wrapper = self._wrapper(torch.serialization.load)
        torch.load = wrapper
        torch.serialization.load = wrapper
        _ACTIVE.append(self)

    @property
    def active(self) -> bool:
        """Whether this patch is still in place."""
        return self._saved is not None

    def undo(self) -> None:
        """Put back exactly the ``torch.load`` this patch replaced (a second call does
        nothing). Patches are undone newest first."""
        if self._saved is None:
            return
        if _ACTIVE[-1] is not self:
            raise RuntimeError("a newer torchkeep patch of torch.load is still in place: "
                               "undo patches in the reverse order they were made")
        import torch.serialization

        torch.load, torch.serialization.load = self._saved
        self._saved = None
        _ACTIVE.pop()

    def __enter__(self) -> TorchLoadPatch:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.undo()

    def _wrapper(self, original: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(original)  # keeps torch.load's name, docs and signature
        def load(f: Any, map_location: Any = None, pickle_module: Any = None, *,
                 weights_only: bool | None = None, mmap: bool | None = None,
                 **pickle_load_args: Any) -> Any:
            return self.load(f, map_location, pickle_module, weights_only=weights_only,
                             mmap=mmap, **pickle_load_args)

        load.__torchkeep_patch__ = self  # type: ignore[attr-defined]
        return load

    def load(self, f: Any, map_location: Any = None, pickle_module: Any = None, *,
             weights_only: bool | None = None, mmap: bool | None = None,
             **pickle_load_args: Any) -> Any:
        """What the patched ``torch.load`` does: the arguments mean what they mean to
        torch; the file is read by the restricted interpreter."""
        unknown = set(pickle_load_args) - _UNPICKLER_ARGS
        if unknown:
            raise TypeError(f"torch.load() got unexpected keyword arguments {sorted(unknown)}")
        custom_pickle = pickle_module is not None and pickle_module is not pickle
        if (weights_only is False or custom_pickle) and self.weights_only_false == "refuse":
            asked = ("weights_only=False" if weights_only is False else
                     f"pickle_module={getattr(pickle_module, '__name__', pickle_module)!r}")
            raise UnsafeCheckpointError(
                f"torch.load was called with {asked}, which would run any code the file "
                "holds; torchkeep.patch_torch_load refuses such calls. If the file is one you "
                "trust to hold only data, patch with weights_only_false='restricted' (the "
                "call is then served by the restricted loader, and allow= admits the "
                "classes it names)", source=_described(f))
        if custom_pickle:
            raise UnsafeCheckpointError(
                "torch.load was called with a custom pickle_module: torchkeep reads the file "
                "with its own interpreter and cannot honour another unpickler",
                source=_described(f))
        import torch.serialization

        from torchkeep.api import load as torchkeep_load

        if isinstance(f, str):
            # torch.load takes local paths only; a string is never a URL here
            f = pathlib.Path(f)
        # classes registered with torch.serialization.add_safe_globals are the user's own
        # opt-in for weights-only loading: honoured the same way
        allow = self.allow + tuple(_as_spec(g) for g in torch.serialization.get_safe_globals())
        result = torchkeep_load(f, map_location, mmap=bool(mmap), allow=allow,
                                limits=self.limits)
        self.loaded.append(_described(f))
        return result


def _as_spec(entry: Any) -> AllowSpec:
    """An ``add_safe_globals`` entry (a class, a function, or ``(obj, "module.Name")``) as
    an ``allow=`` entry."""
    if isinstance(entry, (type, tuple)):
        return entry
    return (entry, f"{entry.__module__}.{entry.__qualname__}")


def patch_torch_load(*, allow: Iterable[AllowSpec] = (),
                     weights_only_false: WeightsOnlyFalse = "refuse",
                     limits: Limits = DEFAULT_LIMITS) -> TorchLoadPatch:
    """Route every ``torch.load`` call through torchkeep's restricted loader.

    The patch is in place when this returns: process-wide, until ``undo()`` or
    :func:`unpatch_torch_load`; ``with torchkeep.patch_torch_load():`` undoes it when the
    block ends. The patched function takes torch.load's arguments with their meanings:
    ``map_location`` (str, device, dict, callable), ``mmap=True`` maps the file, file
    objects and paths. ``weights_only=True`` or unset loads with torchkeep's allowlist,
    plus ``allow`` and the classes registered with ``torch.serialization.add_safe_globals``.
    ``weights_only=False`` (or a custom ``pickle_module``) asks to run the file's code: it
    raises UnsafeCheckpointError unless ``weights_only_false="restricted"``, which serves
    it with the same restricted loader. Nothing is ever unpickled without restriction.

    Code that took ``torch.load`` into a name of its own before the patch
    (``from torch import load``) keeps calling the original.
    """
    return TorchLoadPatch(allow=allow, weights_only_false=weights_only_false, limits=limits)


def unpatch_torch_load() -> int:
    """Undo every torchkeep patch of ``torch.load``, newest first, restoring the original
    function object; returns how many were undone."""
    count = 0
    while _ACTIVE:
        _ACTIVE[-1].undo()
        count += 1
    return count
