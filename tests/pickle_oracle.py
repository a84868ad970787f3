"""CPython's own unpicklers as an oracle: which globals would ``pickle.load`` import?

Run as a script in a sandboxed subprocess (``recorded_imports``): every pickle stream a
loader could feed to ``pickle.load`` in a file (a plain pickle and the pickles after it,
a torch zip's pickle records, the legacy stream's pickles, a numpy ``.npy`` object array,
each member of an ``.npz``) goes through both ``pickle.Unpickler`` (the C one torch uses)
and ``pickle._Unpickler`` (the pure-Python one) with a ``find_class`` that records the
name and returns an inert stub. Nothing is imported and nothing named by the file runs;
the subprocess also runs under CPU-time and address-space limits.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys
import zipfile
from typing import Any

_MAX_STREAMS = 64


class _Stub:
    """Whatever a recorded global stands for: callable, buildable, fillable, inert."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __call__(self, *args: Any, **kwargs: Any) -> _Stub:
        return _Stub()

    def __setstate__(self, state: Any) -> None:
        pass

    def append(self, item: Any) -> None:
        pass

    def extend(self, items: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def add(self, item: Any) -> None:
        pass


def _unpickler(kind: type, stream: Any, found: list[str]) -> Any:
    class Recording(kind):  # type: ignore[misc, valid-type]
        def find_class(self, module: str, name: str) -> Any:
            found.append(f"{module}.{name}")
            return type(name if name.isidentifier() else "stub", (_Stub,), {})

        def persistent_load(self, pid: Any) -> Any:
            return _Stub()

    return Recording(stream, encoding="latin1")


def _streams_of(data: bytes) -> list[tuple[str, bytes, bool]]:
    """(label, bytes, read a sequence of pickles) for every place a loader unpickles."""
    if data[:4] == b"PK\x03\x04":
        out = []
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                for info in archive.infolist():
                    try:
                        member = archive.read(info)
                    except Exception:
                        continue
                    if info.filename.endswith(".npy"):
                        out += [(f"{info.filename}:{label}", raw, seq)
                                for label, raw, seq in _streams_of(member)]
                    elif info.filename.endswith(".pkl") or member[:1] == b"\x80":
                        out.append((info.filename, member, False))
        except (zipfile.BadZipFile, ValueError, NotImplementedError, RuntimeError, OSError):
            pass
        return out
    if data[:6] == b"\x93NUMPY":
        try:
            major = data[6]
            size_bytes = 2 if major == 1 else 4
            header = int.from_bytes(data[8:8 + size_bytes], "little")
            return [("npy", data[8 + size_bytes + header:], False)]
        except IndexError:
            return []
    return [("file", data, True)]


def _run(kind: type, raw: bytes, sequence: bool, found: list[str]) -> str | None:
    stream = io.BytesIO(raw)
    for _ in range(_MAX_STREAMS):
        try:
            _unpickler(kind, stream, found).load()
        except Exception as e:
            return f"{type(e).__name__}: {str(e)[:200]}"
        if not sequence or stream.tell() >= len(raw):
            return None
    return None


def _report(path: str) -> dict[str, Any]:
    with open(path, "rb") as f:
        data = f.read()
    report: dict[str, Any] = {"imports": [], "errors": []}
    for label, raw, sequence in _streams_of(data):
        for kind in (pickle.Unpickler, pickle._Unpickler):  # type: ignore[attr-defined]
            found: list[str] = []
            error = _run(kind, raw, sequence, found)
            report["imports"] += [name for name in found if name not in report["imports"]]
            if error:
                report["errors"].append(f"{label} ({kind.__module__}): {error}")
    return report


def main(paths: list[str]) -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
    resource.setrlimit(resource.RLIMIT_CPU, (20 + len(paths), 20 + len(paths)))
    sys.setrecursionlimit(10_000)
    for path in paths:
        print(json.dumps({"path": path, **_report(path)}), flush=True)


def _sandboxed(paths: list[str], timeout_s: float) -> tuple[list[dict[str, Any]], str | None]:
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOLDOUT_MARKER_DIR")}
    try:
        done = subprocess.run([sys.executable, __file__, *paths], capture_output=True,
                              text=True, timeout=timeout_s, env=env, check=False)
        out, failure = done.stdout, (None if done.returncode == 0 else
                                     f"exit {done.returncode}: {done.stderr[-300:]}")
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        failure = "timeout"
    return [json.loads(line) for line in out.splitlines() if line.strip()], failure


def recorded_imports(path: str | os.PathLike[str], timeout_s: float = 60) -> dict[str, Any]:
    """What CPython's unpicklers would import from ``path`` (run in a sandboxed subprocess).

    Returns ``{"imports": [...], "errors": [...]}``, or ``{"crashed": detail}`` when the
    sandbox died (the limits stopped a bomb, say)."""
    return recorded_imports_of([path], timeout_s)[os.fspath(path)]


def recorded_imports_of(paths: list[str | os.PathLike[str]],
                        timeout_s: float = 60) -> dict[str, dict[str, Any]]:
    """``recorded_imports`` for many files, in as few subprocesses as possible (a file that
    kills the sandbox is run again on its own)."""
    todo = [os.fspath(p) for p in paths]
    results: dict[str, dict[str, Any]] = {}
    while todo:
        batch, todo = todo[:200], todo[200:]
        reports, failure = _sandboxed(batch, timeout_s * len(batch))
        for report in reports:
            results[report.pop("path")] = report
        rest = [p for p in batch if p not in results]
        if failure is not None and rest:
            first, *others = rest
            alone, failed_alone = _sandboxed([first], timeout_s)
            results[first] = alone[0] if alone and failed_alone is None else {
                "crashed": failed_alone or "no output"}
            todo = others + todo
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
