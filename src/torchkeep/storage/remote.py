"""Checkpoints at fsspec URLs (``s3://``, ``gs://``, ``az://``, ``https://``, ``memory://``).

Reading is by ranged requests: a ``RemoteSource`` fetches only the byte ranges a parser
or loader asks for; small reads fetch a window (headers that follow one another cost
one request), neighbouring ranges are coalesced, big ones are split into parts fetched
concurrently (``RemoteOptions``). Writing goes to the object itself, in parts as it is
produced, and the object appears only when complete: object stores (S3, GCS, Azure)
make an upload visible only when it is completed, so an interrupted or failed upload is
aborted and leaves nothing (and an existing object stays until a complete new one
replaces it). Other backends get a temporary name and a move.

fsspec and the protocol packages (s3fs, gcsfs, adlfs, aiohttp) are optional extras.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from torchkeep.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    MissingDependencyError,
    StorageError,
    TorchkeepError,
)
from torchkeep.storage.atomic import TMP_MARKER
from torchkeep.storage.source import Source

__all__ = [
    "RemoteOptions", "RemoteSource", "is_url", "open_remote", "remote_errors", "remote_options",
    "storage_options", "url_filesystem", "write_remote",
]

#: The extra that installs each protocol's package (``pip install 'torchkeep[s3]'``).
EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs", "az": "azure", "abfs": "azure",
          "abfss": "azure", "adl": "azure", "http": "http", "https": "http"}
#: Backends whose uploads become visible only when complete, replacing atomically.
ATOMIC_PUT = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss"})
#: Read-only protocols.
READ_ONLY = frozenset({"http", "https"})

StorageOptions = dict[str, Any]
T = TypeVar("T")


@dataclass(frozen=True, kw_only=True)
class RemoteOptions:
    """How remote objects are read and written.

    ``part_bytes``: big reads are split in ranged requests of this size, and uploads are
    sent in parts of this size (S3's minimum part is 5 MiB). ``concurrency``: ranged
    requests in flight at once for one read. ``window``: a small read fetches this many
    bytes (the headers after it come free). ``coalesce_gap``: ranges closer than this are
    fetched in one request. ``retries``/``backoff``: a ranged read that fails with a
    transient error (5xx, throttling, a reset connection) is retried this many times,
    waiting ``backoff`` seconds, then 4x as long each time, and never once
    ``retry_seconds`` have passed (the client library's own retries come first: s3fs and
    botocore retry throttling and 5xx several times before torchkeep sees a failure).
    ``streams``: a read of most
    of an S3 object (a full ``load``) is this many GETs of contiguous ranges, each body
    streamed into the tensors' buffers; 1 is what a plain download does, more helps on
    real S3 (each connection is limited to roughly 100 MB/s there).
    """

    part_bytes: int = 8 << 20
    concurrency: int = 8
    window: int = 64 << 10
    coalesce_gap: int = 64 << 10
    retries: int = 4
    backoff: float = 0.1
    retry_seconds: float = 120.0
    streams: int = 1

    def __post_init__(self) -> None:
        if self.part_bytes < 5 << 20:
            raise ValueError("part_bytes must be at least 5 MiB (S3's smallest part)")
        if self.concurrency < 1 or self.retries < 0 or self.window < 1 or self.streams < 1:
            raise ValueError("concurrency and window must be positive, retries non-negative")


DEFAULT_REMOTE = RemoteOptions()
_CURRENT = [DEFAULT_REMOTE]


@contextlib.contextmanager
def remote_options(options: RemoteOptions) -> Iterator[None]:
    """Within the block, remote reads and uploads use ``options`` (part size,
    concurrency, retries, streams), e.g. ``with torchkeep.remote_options(
    RemoteOptions(streams=8)): torchkeep.load("s3://...")``."""
    _CURRENT.append(options)
    try:
        yield
    finally:
        _CURRENT.pop()


def current_options(options: RemoteOptions | None = None) -> RemoteOptions:
    """``options``, else those of the innermost ``remote_options`` block."""
    return options if options is not None else _CURRENT[-1]


def is_url(f: Any) -> bool:
    """True when ``f`` is a string naming an fsspec URL other than ``file://``."""
    if not isinstance(f, (str, os.PathLike)):
        return False
    text = os.fspath(f)
    return isinstance(text, str) and "://" in text and not text.startswith("file://")


def protocol_of(url: str) -> str:
    """``s3`` for ``s3://bucket/key``."""
    return url.split("://", 1)[0].lower()


_DEFAULT_OPTIONS: StorageOptions = {}


@contextlib.contextmanager
def storage_options(options: StorageOptions) -> Iterator[None]:
    """Within the block, every URL torchkeep opens without explicit ``storage_options``
    gets these (the CLI's ``--storage-option``; inspect, scan, verify, diff, convert).
    Explicit options of a call are merged over them."""
    saved = dict(_DEFAULT_OPTIONS)
    _DEFAULT_OPTIONS.update(options)
    try:
        yield
    finally:
        _DEFAULT_OPTIONS.clear()
        _DEFAULT_OPTIONS.update(saved)


def url_filesystem(url: str, storage_options: StorageOptions | None = None) -> tuple[Any, str]:
    """The fsspec file system and the path inside it for ``url`` (``storage_options``
    merged over those of an enclosing ``storage_options()`` block)."""
    protocol = protocol_of(url)
    extra = EXTRAS.get(protocol)
    hint = f"pip install 'torchkeep[{extra}]'" if extra else "pip install 'torchkeep[remote]'"
    try:
        import fsspec
    except ImportError as e:
        raise MissingDependencyError(f"{url} needs fsspec ({hint})") from e
    try:
        fs, path = fsspec.core.url_to_fs(url, **{**_DEFAULT_OPTIONS, **(storage_options or {})})
    except ImportError as e:
        raise MissingDependencyError(f"{url} needs the {protocol}:// package ({hint}): {e}"
                                     ) from e
    except ValueError as e:  # an unknown protocol
        raise StorageError(f"cannot open: {e}", source=url) from e
    return fs, path


# -- errors and retries -------------------------------------------------------------------

_TRANSIENT_NAMES = frozenset({
    "ServerDisconnectedError", "ClientConnectorError", "ClientOSError", "ClientPayloadError",
    "EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError",
    "ConnectTimeoutError", "ResponseStreamingError", "IncompleteRead", "ProtocolError",
})
_TRANSIENT_WORDS = ("503", "500", "502", "504", "SlowDown", "Throttl", "ServiceUnavailable",
                    "InternalError", "RequestTimeout", "Connection reset", "reset by peer",
                    "TooManyRequests", "429")
_TRANSIENT_ERRNOS = frozenset({errno.EBUSY, errno.EAGAIN, errno.ETIMEDOUT, errno.ECONNRESET,
                               errno.ECONNABORTED, errno.ECONNREFUSED, errno.EPIPE})
_CREDENTIAL_NAMES = frozenset({"NoCredentialsError", "PartialCredentialsError",
                               "CredentialRetrievalError", "NoAuthTokenError",
                               "DefaultCredentialsError", "ClientAuthenticationError"})


def _chain(e: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    node: BaseException | None = e
    while node is not None and id(node) not in seen:
        seen.add(id(node))
        yield node
        node = node.__cause__ or node.__context__


def is_transient(e: BaseException) -> bool:
    """True for failures worth retrying: 5xx, throttling, reset or timed-out connections."""
    for node in _chain(e):
        if isinstance(node, TorchkeepError):
            return False
        if isinstance(node, (ConnectionError, TimeoutError)):
            return True
        if isinstance(node, OSError) and node.errno in _TRANSIENT_ERRNOS:
            return True  # s3fs turns SlowDown into EBUSY, 5xx into EAGAIN/EIO-like codes
        if type(node).__name__ in _TRANSIENT_NAMES:
            return True
        status = getattr(node, "status", None)
        if isinstance(status, int) and (status >= 500 or status == 429):
            return True
        text = str(node)
        if any(word in text for word in _TRANSIENT_WORDS):
            return True
    return False


def _translate(e: BaseException, url: str, what: str, note: str = "") -> TorchkeepError:
    names = {type(n).__name__ for n in _chain(e)}
    if names & _CREDENTIAL_NAMES:
        return StorageError(
            f"{what}: no credentials found for {protocol_of(url)}:// (set them in the "
            "environment, a config file or profile, or pass storage_options / "
            "--storage-option)", source=url)
    if isinstance(e, FileNotFoundError):
        return CheckpointNotFoundError(f"{what}: no such object or bucket", source=url)
    if isinstance(e, PermissionError):
        return StorageError(f"{what}: access denied ({e})", source=url)
    detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return StorageError(f"{what} failed: {type(e).__name__}: {detail}{note}", source=url)


@contextlib.contextmanager
def remote_errors(url: str, what: str) -> Iterator[None]:
    """Re-raise a foreign failure inside the block as one torchkeep error naming ``url``."""
    try:
        yield
    except TorchkeepError:
        raise
    except Exception as e:
        raise _translate(e, url, what) from e


def retried(call: Callable[[], T], url: str, what: str,
            options: RemoteOptions | None = None) -> T:
    """``call()``, retried on transient failures; a lasting failure is a StorageError."""
    options = current_options(options)
    delay = options.backoff
    deadline = time.monotonic() + options.retry_seconds
    for attempt in range(options.retries + 1):
        try:
            return call()
        except TorchkeepError:
            raise
        except Exception as e:
            if (attempt == options.retries or not is_transient(e)
                    or time.monotonic() + delay > deadline):
                note = f" (after {attempt + 1} attempts)" if attempt else ""
                raise _translate(e, url, what, note) from e
            time.sleep(delay)
            delay *= 4
    raise AssertionError("unreachable")


# -- reading --------------------------------------------------------------------------------


class RemoteSource(Source):
    """An object read by ranged requests; ``name`` is its URL."""

    def __init__(self, fs: Any, path: str, *, url: str, size: int,
                 options: RemoteOptions | None = None) -> None:
        super().__init__(name=url, size=size)
        self.fs = fs
        self.remote_path = path
        self.options = current_options(options)
        self._spans: list[tuple[int, bytes]] = []  # fetched windows, newest last
        #: data offset -> (its header's offset, the check of the header's bytes)
        self._expected: dict[int, tuple[int, Callable[[bytes], None]]] = {}
        #: bytes received from the server (tests and the bench read it)
        self.fetched = 0

    @property
    def parallel_reads(self) -> bool:
        return True

    @property
    def remote(self) -> bool:
        return True

    def _fetch(self, offset: int, n: int) -> bytes:
        def call() -> bytes:
            return bytes(self.fs.cat_file(self.remote_path, start=offset, end=offset + n))

        data = retried(call, self.name, f"reading bytes {offset}..{offset + n}", self.options)
        self.fetched += len(data)
        if len(data) != n:
            raise CorruptCheckpointError(
                f"truncated: asked for bytes {offset}..{offset + n}, the server sent "
                f"{len(data)} (the object changed or is shorter than listed)", source=self.name)
        return data

    def _fetch_many(self, ranges: list[tuple[int, int]]) -> list[bytes]:
        """The bytes of each (offset, n), ``concurrency`` requests in flight at once."""
        if len(ranges) <= 1 or not getattr(self.fs, "async_impl", False):
            return [self._fetch(o, n) for o, n in ranges]
        out: list[bytes] = []
        step = self.options.concurrency
        for i in range(0, len(ranges), step):
            batch = ranges[i : i + step]
            with remote_errors(self.name, "reading"):
                got = self.fs.cat_ranges([self.remote_path] * len(batch),
                                         [o for o, _ in batch], [o + n for o, n in batch],
                                         batch_size=step, on_error="return")
            for (o, n), data in zip(batch, got, strict=True):
                if isinstance(data, BaseException) or len(data) != n:
                    data = self._fetch(o, n)  # retried (and reported) one by one
                else:
                    self.fetched += len(data)
                out.append(bytes(data))
        return out

    def _cached(self, offset: int, n: int) -> bytes | None:
        for start, data in reversed(self._spans):
            if start <= offset and offset + n <= start + len(data):
                return data[offset - start : offset - start + n]
        return None

    def read(self, offset: int, n: int) -> bytes:
        self._check(offset, n)
        hit = self._cached(offset, n)
        if hit is not None:
            return hit
        if n > self.options.part_bytes:
            buf = bytearray(n)
            self.readinto(offset, memoryview(buf))
            return bytes(buf)
        # kept: a zip's end records, directory and small records are read piecemeal
        length = min(max(n, self.options.window), self.size - offset)
        data = self._fetch(offset, length)
        self._spans = [*self._spans[-15:], (offset, data)]
        return data[:n]

    def prefetch(self, ranges: list[tuple[int, int]]) -> None:
        """Fetch many small ranges at once (coalesced, concurrently) for later ``read``s."""
        wanted = sorted((o, min(n, self.size - o)) for o, n in ranges
                        if 0 <= o < self.size and self._cached(o, min(n, self.size - o)) is None)
        spans = _coalesce(wanted, self.options.coalesce_gap, self.options.part_bytes)
        for (start, _), data in zip(spans, self._fetch_many(spans), strict=True):
            self._spans.append((start, data))

    def readinto(self, offset: int, out: memoryview) -> None:
        out = out.cast("B")
        self.readinto_many([(offset, out)])

    def expect(self, data_offset: int, header_offset: int,
               check: Callable[[bytes], None]) -> None:
        self._expected[data_offset] = (header_offset, check)

    def readinto_many(self, jobs: list[tuple[int, memoryview]]) -> None:
        """Fill every (offset, buffer): neighbours are fetched in one request, big buffers
        in parts, ``concurrency`` requests at a time; at most ``concurrency`` parts are
        held in memory at once. A buffer starting where ``expect`` said gets its header
        fetched with it (one request), checked before this returns."""
        pieces: list[tuple[int, memoryview]] = []
        headers: list[tuple[int, bytearray, Callable[[bytes], None]]] = []
        part = self.options.part_bytes
        for offset, view in jobs:
            view = view.cast("B")
            self._check(offset, view.nbytes)
            expected = self._expected.get(offset)
            if expected is not None:
                header = bytearray(offset - expected[0])
                headers.append((offset, header, expected[1]))
                pieces.append((expected[0], memoryview(header)))
            for start in range(0, view.nbytes, part):
                pieces.append((offset + start, view[start : start + part]))
        pieces.sort(key=lambda p: p[0])
        self._fill(pieces)
        for offset, header, check in headers:
            check(bytes(header))
            self._expected.pop(offset, None)

    def _fill(self, pieces: list[tuple[int, memoryview]]) -> None:
        part = self.options.part_bytes
        total = sum(v.nbytes for _, v in pieces)
        if total * 2 >= self.size and total > part and _streams(self.fs):
            self._stream_into(pieces)
            return
        # a part may grow by the gap, so that a record's header rides with its first part
        spans = _coalesce([(o, v.nbytes) for o, v in pieces], self.options.coalesce_gap,
                          part + self.options.coalesce_gap)
        step = self.options.concurrency
        k = 0
        for i in range(0, len(spans), step):
            batch = spans[i : i + step]
            for (start, length), data in zip(batch, self._fetch_many(batch), strict=True):
                end = start + length
                while k < len(pieces) and pieces[k][0] + pieces[k][1].nbytes <= end:
                    o, view = pieces[k]
                    view[:] = data[o - start : o - start + view.nbytes]
                    k += 1

    def _stream_into(self, pieces: list[tuple[int, memoryview]]) -> None:
        """Most of the object is wanted (a full load): ``options.streams`` GETs of
        contiguous ranges, each body read in chunks straight into the pieces it covers
        (what a plain download does, without holding the object in memory)."""
        import asyncio

        from fsspec.asyn import sync

        start, end = pieces[0][0], max(o + v.nbytes for o, v in pieces)
        bounds = _split(start, end, self.options.streams, pieces)

        def sink(pos: int, data: bytes, lo: int, hi: int) -> None:
            # pieces[lo:hi] are the ones this stream covers, sorted by offset
            stop = pos + len(data)
            for k in range(lo, hi):
                o, view = pieces[k]
                a, b = max(o, pos), min(o + view.nbytes, stop)
                if a < b:
                    view[a - o : b - o] = data[a - pos : b - pos]

        async def one(a: int, b: int, lo: int, hi: int) -> None:
            pos, attempt, delay = a, 0, self.options.backoff
            while pos < b:
                try:
                    pos = await _s3_stream(self.fs, self.remote_path, pos, b,
                                           lambda p, d: sink(p, d, lo, hi))
                except Exception as e:
                    if attempt >= self.options.retries or not is_transient(e):
                        raise
                    attempt += 1
                    await asyncio.sleep(delay)
                    delay *= 4
                    continue
                if pos < b:  # the body ended early: the object is shorter than listed
                    raise CorruptCheckpointError(
                        f"truncated: the object ended at byte {pos}, {b - pos} bytes early",
                        source=self.name)

        async def run() -> None:
            await asyncio.gather(*(one(*bound) for bound in bounds))

        with remote_errors(self.name, "reading"):
            sync(self.fs.loop, run)
        self.fetched += end - start


def _streams(fs: Any) -> bool:
    """True when ``fs`` can stream one GET's body (s3fs); others read in ranged parts."""
    return type(fs).__name__ == "S3FileSystem" and hasattr(fs, "_call_s3")


async def _s3_stream(fs: Any, path: str, start: int, end: int,
                     sink: Callable[[int, bytes], None], chunk: int = 1 << 20) -> int:
    """One ranged GET of bytes start..end, its body handed to ``sink`` as it arrives;
    returns where it stopped."""
    bucket, key, version = fs.split_path(path)
    extra = {"VersionId": version} if version else {}
    response = await fs._call_s3("get_object", Bucket=bucket, Key=key,
                                 Range=f"bytes={start}-{end - 1}", **extra)
    body = response["Body"]
    pos = start
    try:
        while pos < end:
            data = await body.read(min(chunk, end - pos))
            if not data:
                break
            sink(pos, data)
            pos += len(data)
    finally:
        body.close()
    return pos


def _split(start: int, end: int, streams: int,
           pieces: list[tuple[int, memoryview]]) -> list[tuple[int, int, int, int]]:
    """``streams`` contiguous ranges of start..end (at piece boundaries), each with the
    index range of the pieces it covers."""
    target = max(1, (end - start) // max(1, streams))
    bounds: list[tuple[int, int, int, int]] = []
    lo = 0
    a = start
    for k, (o, view) in enumerate(pieces):
        stop = o + view.nbytes
        if stop - a >= target or k == len(pieces) - 1:
            bounds.append((a, stop, lo, k + 1))
            a, lo = stop, k + 1
    return bounds


def _coalesce(ranges: list[tuple[int, int]], gap: int, limit: int) -> list[tuple[int, int]]:
    """Sorted (offset, n) merged where the gap between them is at most ``gap`` and the
    merged span stays within ``limit`` bytes (a range bigger than ``limit`` stays alone)."""
    spans: list[tuple[int, int]] = []
    for offset, n in ranges:
        if spans:
            start, length = spans[-1]
            end = start + length
            if offset - end <= gap and max(end, offset + n) - start <= limit:
                spans[-1] = (start, max(end, offset + n) - start)
                continue
        spans.append((offset, n))
    return spans


def open_remote(url: str, *, storage_options: StorageOptions | None = None,
                options: RemoteOptions | None = None, fs: Any = None,
                path: str | None = None) -> RemoteSource:
    """``url`` opened for ranged reading (one metadata request for its size); ``fs`` and
    ``path`` when the caller already has the file system."""
    options = current_options(options)
    if fs is None or path is None:
        fs, path = url_filesystem(url, storage_options)
    info = retried(lambda: fs.info(path), url, "opening", options)
    if info.get("type") == "directory":
        raise CheckpointNotFoundError("is a directory", source=url)
    size = info.get("size")
    if not isinstance(size, int):
        raise StorageError("the server does not say how large the object is (no "
                           "Content-Length): ranged reading is not possible", source=url)
    return RemoteSource(fs, path, url=url, size=size, options=options)


# -- writing --------------------------------------------------------------------------------


def write_remote(url: str, produce: Callable[[Callable[[Any], None]], None], *,
                 storage_options: StorageOptions | None = None, fs: Any = None,
                 path: str | None = None, options: RemoteOptions | None = None) -> None:
    """Create or replace the object at ``url`` with what ``produce(write)`` writes.

    The bytes are uploaded in parts of ``options.part_bytes`` while they are produced;
    the object becomes visible only when the upload completes. On any failure (including
    KeyboardInterrupt) the upload is aborted: nothing appears, an existing object stays.
    """
    options = current_options(options)
    protocol = protocol_of(url)
    if protocol in READ_ONLY:
        raise StorageError(f"{protocol}:// is read-only", source=url)
    if fs is None or path is None:
        fs, path = url_filesystem(url, storage_options)
    atomic = protocol in ATOMIC_PUT
    target = path if atomic else f"{path}{TMP_MARKER}{secrets.token_hex(4)}"
    with remote_errors(url, "starting the upload"):
        f = fs.open(target, "wb", block_size=options.part_bytes)
    try:
        with remote_errors(url, "uploading"):
            produce(_parts_writer(f.write, options.part_bytes))
            f.close()  # completes the upload: the object appears now, whole
        if not atomic:
            with remote_errors(url, "moving the upload into place"):
                fs.mv(target, path)
    except BaseException:
        _abandon(f)
        if not atomic:
            with contextlib.suppress(Exception):
                fs.rm(target)
        raise


def _parts_writer(write: Callable[[Any], Any], part: int) -> Callable[[Any], None]:
    """A ``write`` that hands big buffers on in pieces, so the upload buffer never holds
    more than about one part (a 1 GiB tensor is not copied whole into it)."""

    def parts(data: Any) -> None:
        view = memoryview(data).cast("B")
        for start in range(0, view.nbytes, part):
            write(view[start : start + part])

    return parts


def _abandon(f: Any) -> None:
    """Abort an unfinished upload and make sure nothing commits it later (fsspec files
    complete their upload when closed, even from ``__del__``)."""
    if getattr(f, "closed", True):
        return
    try:
        discard = getattr(f, "discard", None)
        if discard is not None:
            discard()  # s3fs: aborts the multipart upload (a dead server: it cannot)
    except Exception:
        pass
    finally:
        with contextlib.suppress(Exception):
            f.closed = True
