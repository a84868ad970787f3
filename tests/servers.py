"""Real servers for the remote-storage tests and the bench, on 127.0.0.1.

* An S3 server: moto's server (a pip package) in its own process, run by this module
  (``python tests/servers.py s3``), wrapped in a small WSGI layer that counts the bytes
  it sends and receives and injects faults when told to (a control path the S3 client
  never uses). s3fs talks to it over the socket; nothing in the client is mocked.
* An HTTP file server with single-range ``Range`` support (standard library only), in a
  thread of the test process, counting the bytes it sends.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONTROL = "/__torchkeep_test__"
KEY = "testing"  # moto accepts any credentials


# -- the S3 server process ----------------------------------------------------------------


class _Faults:
    """What the control path asked for: counters, and failures to inject."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        self.sent = 0  # response bytes (status line, headers, body)
        self.received = 0  # request bodies
        self.requests = 0
        self.fail: list[dict[str, Any]] = []  # {"status", "count", "method", "after_bytes"}
        self.die_after_received: int | None = None

    def match(self, method: str) -> int | None:
        with self.lock:
            for rule in self.fail:
                if rule["count"] > 0 and rule.get("method") in (None, method) and (
                        self.received >= rule.get("after_bytes", 0)):
                    rule["count"] -= 1
                    return int(rule["status"])
        return None


def _wrap(app: Any, faults: _Faults) -> Any:
    def middleware(environ: dict[str, Any], start_response: Any) -> Any:
        path = environ.get("PATH_INFO", "")
        if path.startswith(CONTROL):
            return _control(environ, start_response, faults)
        method = environ["REQUEST_METHOD"]
        body = environ.get("wsgi.input")
        if body is not None:
            environ["wsgi.input"] = _CountingInput(body, faults)
        with faults.lock:
            faults.requests += 1
        status = faults.match(method)
        if status is not None:
            payload = (b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>SlowDown</Code>"
                       b"<Message>injected</Message></Error>")
            headers = [("Content-Type", "application/xml"),
                       ("Content-Length", str(len(payload)))]
            _count_head(faults, f"{status} Injected", headers)
            start_response(f"{status} Injected", headers)
            with faults.lock:
                faults.sent += len(payload)
            return [payload]

        def counting_start(status_line: str, headers: list[tuple[str, str]], *a: Any) -> Any:
            _count_head(faults, status_line, headers)
            return start_response(status_line, headers, *a)

        result = app(environ, counting_start)
        return _CountingOutput(result, faults)

    return middleware


def _count_head(faults: _Faults, status: str, headers: list[tuple[str, str]]) -> None:
    size = len("HTTP/1.1 ") + len(status) + 2 + sum(len(k) + len(v) + 4 for k, v in headers) + 2
    with faults.lock:
        faults.sent += size


class _CountingInput:
    def __init__(self, stream: Any, faults: _Faults) -> None:
        self._stream = stream
        self._faults = faults

    def _count(self, n: int) -> None:
        with self._faults.lock:
            self._faults.received += n
            limit = self._faults.die_after_received
            dead = limit is not None and self._faults.received >= limit
        if dead:
            os._exit(17)  # the server dies in the middle of an upload

    def _note(self, data: bytes) -> bytes:
        self._count(len(data))
        return data

    def read(self, *a: Any) -> bytes:
        return self._note(self._stream.read(*a))

    def readinto(self, buffer: Any) -> int:
        n = int(self._stream.readinto(buffer))
        self._count(n)
        return n

    def readline(self, *a: Any) -> bytes:
        return self._note(self._stream.readline(*a))

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._stream:
            yield self._note(chunk)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


class _CountingOutput:
    def __init__(self, result: Any, faults: _Faults) -> None:
        self._result = result
        self._faults = faults

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._result:
            with self._faults.lock:
                self._faults.sent += len(chunk)
            yield chunk

    def close(self) -> None:
        close = getattr(self._result, "close", None)
        if close is not None:
            close()


def _control(environ: dict[str, Any], start_response: Any, faults: _Faults) -> list[bytes]:
    action = environ["PATH_INFO"][len(CONTROL):].strip("/")
    length = int(environ.get("CONTENT_LENGTH") or 0)
    body = json.loads(environ["wsgi.input"].read(length) or b"{}") if length else {}
    with faults.lock:
        stats = {"sent": faults.sent, "received": faults.received,
                 "requests": faults.requests}
        if action == "reset":
            faults.reset()
        elif action == "fail":
            faults.fail.append({"count": 1, **body})
        elif action == "die":
            faults.die_after_received = faults.received + int(body["after_bytes"])
    payload = json.dumps(stats).encode()
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(payload)))])
    return [payload]


def serve_s3() -> None:
    """Run moto's S3 server on a free port of 127.0.0.1 and print the port."""
    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
    )
    from werkzeug.serving import make_server

    faults = _Faults()
    app = _wrap(DomainDispatcherApplication(create_backend_app), faults)
    server = make_server("127.0.0.1", 0, app, threaded=True, request_handler=MotoRequestHandler)
    print(server.server_address[1], flush=True)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    server.serve_forever()


@dataclass
class S3Server:
    """A running S3 server process; ``options`` are the storage_options that reach it."""

    process: subprocess.Popen[str]
    port: int

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def options(self) -> dict[str, Any]:
        return {"key": KEY, "secret": KEY, "endpoint_url": self.endpoint,
                "client_kwargs": {"region_name": "us-east-1"},
                # a fresh client per test: fsspec would otherwise reuse one across servers
                "skip_instance_cache": True}

    def control(self, action: str, **body: Any) -> dict[str, int]:
        data = json.dumps(body).encode() if body else None
        request = urllib.request.Request(f"{self.endpoint}{CONTROL}/{action}", data=data,
                                         method="POST")
        with urllib.request.urlopen(request, timeout=30) as response:
            result: dict[str, int] = json.loads(response.read())
            return result

    def make_bucket(self, name: str) -> None:
        import boto3

        client = boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=KEY,
                              aws_secret_access_key=KEY, region_name="us-east-1")
        client.create_bucket(Bucket=name)

    def stats(self) -> dict[str, int]:
        return self.control("stats")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(30)


def start_s3() -> S3Server:
    """Start the S3 server process; returns when it accepts connections."""
    env = {**os.environ, "MOTO_ALLOW_NONEXISTENT_REGION": "true"}
    process = subprocess.Popen([sys.executable, __file__, "s3"], stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True, env=env)
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line.strip().isdigit():
        process.kill()
        raise RuntimeError("the S3 server did not start")
    server = S3Server(process, int(line))
    deadline = time.monotonic() + 30
    while True:
        try:
            server.stats()
            return server
        except OSError:
            if time.monotonic() > deadline:
                server.stop()
                raise
            time.sleep(0.05)


# -- the HTTP file server -------------------------------------------------------------------

_RANGE = re.compile(r"bytes=(\d+)-(\d*)$")


class HTTPFiles:
    """Files of ``root`` over HTTP with Range support, in a thread; counts bytes sent."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.sent = 0
        self.requests = 0
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def setup(self) -> None:
                super().setup()
                raw = self.wfile

                class Counting:
                    def write(self, data: bytes) -> int:
                        owner.sent += len(data)
                        return int(raw.write(data))

                    def __getattr__(self, name: str) -> Any:
                        return getattr(raw, name)

                self.wfile = Counting()  # type: ignore[assignment]

            def _file(self) -> Path | None:
                path = (owner.root / self.path.lstrip("/").split("?")[0]).resolve()
                return path if path.is_file() and owner.root in path.parents else None

            def do_HEAD(self) -> None:
                self._serve(body=False)

            def do_GET(self) -> None:
                self._serve(body=True)

            def _serve(self, *, body: bool) -> None:
                owner.requests += 1
                path = self._file()
                if path is None:
                    self._reply(404, [], b"")
                    return
                size = path.stat().st_size
                start, end = 0, size
                status = 200
                match = _RANGE.match(self.headers.get("Range", ""))
                if match:
                    start = int(match.group(1))
                    end = min(size, int(match.group(2)) + 1) if match.group(2) else size
                    status = 206
                headers = [("Content-Length", str(max(0, end - start))),
                           ("Accept-Ranges", "bytes")]
                if status == 206:
                    headers.append(("Content-Range", f"bytes {start}-{end - 1}/{size}"))
                data = b""
                if body:
                    with open(path, "rb") as f:
                        f.seek(start)
                        data = f.read(max(0, end - start))
                self._reply(status, headers, data)

            def _reply(self, status: int, headers: list[tuple[str, str]], data: bytes) -> None:
                self.send_response(status)
                for k, v in headers:
                    self.send_header(k, v)
                if not headers:
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def free_port() -> int:
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


if __name__ == "__main__":
    if sys.argv[1:] == ["s3"]:
        serve_s3()
