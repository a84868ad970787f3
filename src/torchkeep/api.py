"""The public entry points: save, load, open; format dispatch and backend choice."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

from torchkeep.errors import (
    CheckpointNotFoundError,
    MissingDependencyError,
    StorageError,
    TorchkeepError,
    UnsupportedTypeError,
)
from torchkeep.formats.detect import detect, format_for_suffix
from torchkeep.formats.parsed import Parsed
from torchkeep.limits import DEFAULT_LIMITS, Limits
from torchkeep.storage.atomic import write_atomically
from torchkeep.storage.gcpause import gc_paused
from torchkeep.storage.remote import READ_ONLY, is_url, protocol_of, write_remote
from torchkeep.storage.source import Source, open_source
from torchkeep.tree import StorageRef
from torchkeep.unpickle import Allowlist, AllowSpec

__all__ = [
    "Describer", "SaveOptions", "load", "parse", "resolve_format", "save", "step_directory",
    "write_tree",
]

Backend = Literal["torch", "numpy"]
WRITABLE_FORMATS = ("torch", "torch-legacy", "safetensors")


@dataclass(frozen=True, kw_only=True)
class SaveOptions:
    """How ``save`` writes.

    ``durable``: fsync the file and its folder after the atomic rename (a crash or
    power loss right after ``save`` returns cannot lose the file). ``checksum``: compute
    CRC-32s for the torch zip format (torch.save does; its loader never checks them,
    torchkeep's ``verify`` does). ``alignment``: byte alignment of torch zip records.
    """

    durable: bool = True
    checksum: bool = True
    alignment: int = 64

    def __post_init__(self) -> None:
        if self.alignment < 1 or self.alignment & (self.alignment - 1) or self.alignment > 65536:
            raise ValueError("alignment must be a power of two between 1 and 65536")


DEFAULT_SAVE = SaveOptions()


# -- saving -----------------------------------------------------------------------------


class Describer:
    """Describes foreign objects (torch, via tensors.py) and serves storage bytes."""

    def __init__(self) -> None:
        self._torch: Any = None
        if "torch" in sys.modules and sys.modules["torch"] is not None:
            from torchkeep.tensors import TorchDescriber

            self._torch = TorchDescriber()
        self._sources: dict[int, Callable[[StorageRef], Any]] = {}
        #: called with the size of each storage handed to a writer (progress bars)
        self.on_bytes: Callable[[int], None] | None = None

    @property
    def has_torch(self) -> bool:
        """True when torch is loaded (the tree may hold torch objects)."""
        return self._torch is not None

    def __call__(self, obj: Any) -> Any:
        if self._torch is not None:
            return self._torch(obj)
        return None

    def register(self, ref: StorageRef, provider: Callable[[StorageRef], Any]) -> None:
        """Serve ``ref``'s bytes from ``provider`` (placeholders taken from a parsed file)."""
        self._sources[id(ref)] = provider

    def storage_bytes(self, ref: StorageRef) -> Any:
        """The bytes of ``ref`` for a writer (from its file, or from torch)."""
        provider = self._sources.get(id(ref))
        if provider is not None:
            data = provider(ref)
        elif self._torch is None:
            raise UnsupportedTypeError(
                f"storage {ref.key!r} has no bytes to save (a placeholder without its file)"
            )
        else:
            data = self._torch.storage_bytes(ref)
        if self.on_bytes is not None:
            self.on_bytes(ref.nbytes)
        return data


def _torch_pickle(obj: Any) -> tuple[bytes, list[tuple[int, Callable[[], Any]]]] | None:
    """data.pkl and storage getters from the C pickler (None: use the tree pickler)."""
    from torchkeep.tensors import cpu_bytes
    from torchkeep.torch_pickler import NeedsTreePickler, pickle_torch_tree

    try:
        pickle_bytes, entries = pickle_torch_tree(obj)
    except NeedsTreePickler:
        return None
    storages: list[tuple[int, Callable[[], Any]]] = [
        (e.storage.nbytes(), functools.partial(cpu_bytes, e.storage)) for e in entries
    ]
    return pickle_bytes, storages


def resolve_format(f: Any, format: str | None) -> str:
    """The format to write: ``format`` when given, else from the path's suffix."""
    if format is not None:
        if format not in WRITABLE_FORMATS:
            raise ValueError(f"format must be one of {', '.join(WRITABLE_FORMATS)}, got {format!r}")
        return format
    if isinstance(f, (str, os.PathLike)):
        return format_for_suffix(str(os.fspath(f))) or "torch"
    return "torch"


def save(
    obj: Any,
    f: str | os.PathLike[str] | Any,
    *,
    format: str | None = None,
    options: SaveOptions = DEFAULT_SAVE,
    storage_options: dict[str, Any] | None = None,
) -> None:
    """Save ``obj`` (a tree of tensors, containers and plain values) to ``f``.

    ``f`` is a path, an fsspec URL (``s3://bucket/ckpt.pt``; ``storage_options`` go to
    fsspec) or a writable binary file object. The format comes from ``format``
    (``torch``, ``torch-legacy``, ``safetensors``) or the path's suffix (``.safetensors``;
    anything else is the torch zip format, as for file objects). ``torch`` output is read
    by stock ``torch.load(weights_only=True)``; ``safetensors`` output by the safetensors
    library (with the rest of the tree kept in its metadata).

    Saving to a path is atomic: nothing at ``f`` changes unless the whole file was
    written (and, with ``options.durable``, fsynced). Saving to an object store uploads
    in parts while the file is produced and the object appears only when complete.
    Unsupported objects raise UnsupportedTypeError naming where they sit
    (``obj['model']['fc1']: ...``).
    """
    fmt = resolve_format(f, format)
    with gc_paused():
        write_tree(obj, f, fmt, Describer(), options, storage_options=storage_options)


def write_tree(obj: Any, f: Any, fmt: str, describer: Describer, options: SaveOptions, *,
               storage_options: dict[str, Any] | None = None) -> None:
    """Write ``obj`` to ``f`` in ``fmt`` with ``describer`` (atomic for paths and URLs)."""
    from torchkeep.formats.safetensors import write_safetensors
    from torchkeep.formats.torch_legacy import write_torch_legacy
    from torchkeep.formats.torch_zip import (
        archive_name_for,
        write_torch_zip,
        write_torch_zip_records,
    )

    fast = _torch_pickle(obj) if fmt == "torch" and describer.has_torch else None

    def produce(write: Callable[[Any], Any]) -> None:
        if fast is not None:
            pickle_bytes, storages = fast
            write_torch_zip_records(write, pickle_bytes, storages,
                                    archive_name=archive_name_for(f),
                                    alignment=options.alignment, checksum=options.checksum)
        elif fmt == "torch":
            write_torch_zip(obj, write, describe=describer, storage_bytes=describer.storage_bytes,
                            archive_name=archive_name_for(f), alignment=options.alignment,
                            checksum=options.checksum)
        elif fmt == "torch-legacy":
            write_torch_legacy(obj, write, describe=describer,
                               storage_bytes=describer.storage_bytes)
        else:
            write_safetensors(obj, write, describe=describer,
                              storage_bytes=describer.storage_bytes)

    if is_url(f):
        write_remote(os.fspath(f), produce, storage_options=storage_options)
        return
    if isinstance(f, (str, os.PathLike)):
        write_atomically(str(os.fspath(f)).removeprefix("file://"), produce,
                         fsync=options.durable)
        return
    if not hasattr(f, "write"):
        raise TypeError(f"save() needs a path or a writable binary file, got {type(f).__name__}")
    try:
        produce(f.write)
        if hasattr(f, "flush"):
            f.flush()
    except OSError as e:
        raise StorageError(f"writing failed: {e}") from e


# -- loading ----------------------------------------------------------------------------


def step_directory(f: Any, storage_options: dict[str, Any] | None = None) -> str | None:
    """``f`` as a directory (a local folder or a folder at an fsspec URL), else None."""
    if isinstance(f, (str, os.PathLike)):
        text = str(os.fspath(f))
        if is_url(text):
            from torchkeep.storage.remote import remote_errors, url_filesystem

            fs, path = url_filesystem(text, storage_options)
            with remote_errors(text, "looking up"):
                return text if protocol_of(text) not in READ_ONLY and fs.isdir(path) else None
        if os.path.isdir(text.removeprefix("file://")):
            return text
    return None


def parse(
    f: Any,
    *,
    allow: Iterable[AllowSpec] = (),
    limits: Limits = DEFAULT_LIMITS,
    storage_options: dict[str, Any] | None = None,
) -> Parsed:
    """Parse ``f`` into placeholders (no tensor bytes read). The caller closes the result."""
    directory = step_directory(f, storage_options)
    if directory is not None:
        return parse_directory(directory, allowlist=Allowlist(allow), limits=limits,
                               storage_options=storage_options)
    from torchkeep.formats.hf_folder import INDEX_SUFFIX

    if isinstance(f, (str, os.PathLike)) and str(os.fspath(f)).endswith(INDEX_SUFFIX):
        from torchkeep.formats.hf_folder import read_hf_index
        from torchkeep.storage.filesystem import open_filesystem

        fs, path = open_filesystem(f, storage_options=storage_options)
        if not fs.exists(path):
            raise CheckpointNotFoundError("no such file", source=os.fspath(f))
        return read_hf_index(fs, path, allowlist=Allowlist(allow), limits=limits)
    source = open_source(f, storage_options=storage_options)
    try:
        return parse_source(source, allowlist=Allowlist(allow), limits=limits)
    except BaseException:
        source.close()
        raise


def parse_directory(directory: str, *, allowlist: Allowlist, limits: Limits,
                    storage_options: dict[str, Any] | None = None) -> Parsed:
    """Parse a directory: a DCP checkpoint, a Hugging Face model folder, else a torchkeep
    step directory."""
    from torchkeep.formats.detect import listing_format
    from torchkeep.storage.filesystem import open_filesystem

    fs, path = open_filesystem(directory, storage_options=storage_options)
    names = fs.listdir(path)
    kind = listing_format(names)
    if kind == "dcp":
        from torchkeep.formats.dcp import read_dcp_dir

        return read_dcp_dir(path, fs=fs, limits=limits, allowlist=allowlist)
    if kind == "hf-training":
        from torchkeep.formats.hf_training import read_training_folder

        return read_training_folder(fs, path, allowlist=allowlist, limits=limits, names=names)
    if kind == "hf":
        from torchkeep.formats.hf_folder import INDEX_SUFFIX, read_hf_index, weights_name

        name = weights_name(names)
        assert name is not None
        weights = fs.join(path, name)
        if weights.endswith(INDEX_SUFFIX):
            return read_hf_index(fs, weights, allowlist=allowlist, limits=limits)
        source = fs.source(weights)
        try:
            return parse_source(source, allowlist=allowlist, limits=limits)
        except BaseException:
            source.close()
            raise
    from torchkeep.formats.manifest import read_step_dir

    return read_step_dir(path, fs=fs, limits=limits)


def parse_source(source: Source, *, allowlist: Allowlist, limits: Limits) -> Parsed:
    """Parse an open Source; errors name the source."""
    try:
        fmt = detect(source)
        if fmt == "torch":
            from torchkeep.formats.torch_zip import read_torch_zip

            return read_torch_zip(source, allowlist=allowlist, limits=limits)
        if fmt == "torch-legacy":
            from torchkeep.formats.torch_legacy import read_torch_legacy

            return read_torch_legacy(source, allowlist=allowlist, limits=limits)
        if fmt == "safetensors":
            from torchkeep.formats.safetensors import read_safetensors

            return read_safetensors(source, limits=limits)
        from torchkeep.formats.plain_pickle import read_plain_pickle

        return read_plain_pickle(source, allowlist=allowlist, limits=limits)
    except TorchkeepError as e:
        e.with_source(source.name)
        raise


def materializer(
    parsed: Parsed, *, backend: Backend, map_location: Any = None, mmap: bool | None = None
) -> Any:
    """The object that turns ``parsed``'s placeholders into torch or numpy values."""
    if backend == "numpy":
        if map_location is not None:
            raise ValueError("map_location applies to backend='torch' only")
        from torchkeep.arrays import NumpyMaterializer

        return NumpyMaterializer(parsed, mmap=mmap)
    if backend != "torch":
        raise ValueError(f"backend must be 'torch' or 'numpy', got {backend!r}")
    try:
        from torchkeep.tensors import TorchMaterializer
    except ImportError as e:
        raise MissingDependencyError(
            "backend='torch' needs torch installed (pip install 'torchkeep[torch]'); "
            "backend='numpy' works without it"
        ) from e
    return TorchMaterializer(parsed, map_location=map_location, mmap=mmap)


def load(
    f: Any,
    map_location: Any = None,
    *,
    mmap: bool | None = None,
    backend: Backend = "torch",
    allow: Iterable[AllowSpec] = (),
    limits: Limits = DEFAULT_LIMITS,
    storage_options: dict[str, Any] | None = None,
) -> Any:
    """Load a checkpoint without ever running code from it.

    ``f``: a path, an fsspec URL (``s3://``, ``https://``...; ``storage_options`` go to
    fsspec; only the byte ranges needed are fetched, concurrently, straight into the
    tensors' buffers), a binary file object or bytes; the format is found from the content
    (torch zip, legacy torch, safetensors, a plain pickle, a torchkeep step directory, a
    torch.distributed.checkpoint directory).
    ``map_location`` has torch.load's meaning (str, torch.device, dict, callable).
    ``mmap``: None copies the tensor bytes (read in parallel), so a file another program
    rewrites in place (as torch.save does) cannot change or crash the tensors; it maps
    the data files of step directories, which are never rewritten in place. True maps a
    local file copy-on-write (zero-copy, read on first touch; like torch.load(mmap=True),
    touching a tensor of a file truncated in place kills the process with SIGBUS); False
    always copies. ``backend="numpy"`` returns
    numpy arrays and works without torch installed. ``allow`` admits extra globals
    (see UnsafeCheckpointError); ``limits`` raises parser limits for trusted files.
    """
    with gc_paused():
        parsed = parse(f, allow=allow, limits=limits, storage_options=storage_options)
    try:
        with gc_paused():
            return materializer(parsed, backend=backend, map_location=map_location,
                                mmap=mmap).tree(limits=limits)
    except TorchkeepError as e:
        e.with_source(parsed.source.name)
        raise
    finally:
        parsed.close()
