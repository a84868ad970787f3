"""``torchkeep.open``: a lazy view of a checkpoint, one tensor at a time."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from torchkeep.api import Backend, materializer, parse
from torchkeep.limits import DEFAULT_LIMITS, Limits
from torchkeep.tree import TensorInfo, iter_tensors
from torchkeep.unpickle import AllowSpec

__all__ = ["CheckpointHandle", "open_checkpoint"]


class CheckpointHandle:
    """An open checkpoint: its tree of placeholders, tensor metadata, tensors on demand.

    Use as a context manager. ``tree`` holds TensorRef placeholders (dtype, shape, stride,
    byte size) in place of tensors; ``tensors`` lists them by their ``/``-joined path;
    ``tensor(name)`` reads one. Nothing but the file's metadata is read until then.
    """

    def __init__(self, f: Any, *, allow: Iterable[AllowSpec] = (),
                 limits: Limits = DEFAULT_LIMITS,
                 storage_options: dict[str, Any] | None = None) -> None:
        self._parsed = parse(f, allow=allow, limits=limits, storage_options=storage_options)
        self._limits = limits
        self._materializers: dict[tuple[str, Any, Any], Any] = {}
        infos: dict[str, TensorInfo] = {}
        for path, leaf in iter_tensors(self._parsed.tree, limits=limits):
            info = TensorInfo.of(path, leaf)
            if info is not None:
                infos.setdefault(info.name, info)
        self._tensors = infos

    # -- metadata -------------------------------------------------------------------------

    @property
    def format(self) -> str:
        """``torch``, ``torch-legacy``, ``safetensors``, ``pickle``, ``torchkeep`` or ``dcp``."""
        return self._parsed.format

    @property
    def info(self) -> dict[str, Any]:
        """What the file records about its writer (version, byte order, metadata...)."""
        return dict(self._parsed.info, byteorder=self._parsed.byteorder)

    @property
    def tree(self) -> Any:
        """The object tree with placeholders in place of tensors."""
        return self._parsed.tree

    @property
    def tensors(self) -> dict[str, TensorInfo]:
        """Every tensor by its ``/``-joined path, in tree order."""
        return dict(self._tensors)

    def keys(self) -> list[str]:
        """Tensor names, in tree order."""
        return list(self._tensors)

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def __contains__(self, name: object) -> bool:
        return name in self._tensors

    # -- data -------------------------------------------------------------------------------

    def _materializer(self, backend: Backend, map_location: Any, mmap: bool | None) -> Any:
        key = (backend, repr(map_location), mmap)
        found = self._materializers.get(key)
        if found is None:
            found = materializer(self._parsed, backend=backend, map_location=map_location,
                                 mmap=mmap)
            self._materializers[key] = found
        return found

    def tensor(self, name: str, *, backend: Backend = "torch", map_location: Any = None,
               mmap: bool | None = None) -> Any:
        """Read one tensor (a torch tensor, or a numpy array with ``backend="numpy"``)."""
        try:
            info = self._tensors[name]
        except KeyError:
            raise KeyError(f"no tensor named {name!r} in {self._parsed.source.name}") from None
        return self._materializer(backend, map_location, mmap).convert(info.ref)

    def __getitem__(self, name: str) -> Any:
        return self.tensor(name)

    def load(self, *, backend: Backend = "torch", map_location: Any = None,
             mmap: bool | None = None) -> Any:
        """The whole object, as ``torchkeep.load`` would return it."""
        return self._materializer(backend, map_location, mmap).tree(limits=self._limits)

    # -- lifetime ---------------------------------------------------------------------------

    def close(self) -> None:
        """Release the file (tensors already read stay valid)."""
        self._parsed.close()

    def __enter__(self) -> CheckpointHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"<CheckpointHandle {self._parsed.source.name} format={self.format} "
                f"tensors={len(self._tensors)}>")


def open_checkpoint(f: Any, *, allow: Iterable[AllowSpec] = (),
                    limits: Limits = DEFAULT_LIMITS,
                    storage_options: dict[str, Any] | None = None) -> CheckpointHandle:
    """Open ``f`` lazily: tree and tensor metadata now, tensor bytes on demand. At an
    fsspec URL only the header or pickle is fetched now, each tensor's byte range (in
    concurrent parts) when it is read."""
    return CheckpointHandle(f, allow=allow, limits=limits, storage_options=storage_options)
