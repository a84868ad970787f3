"""Checkpoints on object storage and HTTP, against real servers on 127.0.0.1.

The S3 server is moto's server in its own process (tests/servers.py), spoken to by s3fs
over the socket; the HTTP server is the standard library's, with Range support. Both
count the bytes they send, so "reads only what it needs" is measured, not assumed.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import torchkeep
from torchkeep.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    MissingDependencyError,
    StorageError,
    UnsupportedTypeError,
)
from torchkeep.storage.remote import RemoteOptions, _coalesce, _split, url_filesystem

pytest.importorskip("s3fs", reason="the remote tests need s3fs and moto (pip install '.[dev]')")

sys.path.insert(0, str(Path(__file__).parent))
import servers

MiB = 1 << 20


@pytest.fixture(scope="module")
def s3() -> Iterator[servers.S3Server]:
    server = servers.start_s3()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def bucket(s3: servers.S3Server, request: pytest.FixtureRequest) -> str:
    name = "b-" + request.node.name.lower().replace("_", "-")[:50].strip("-")
    name = "".join(c for c in name if c.isalnum() or c == "-")
    s3.make_bucket(name)
    s3.control("reset")
    return name


def state(n: int = 4, size: int = 256) -> dict[str, Any]:
    g = torch.Generator().manual_seed(n)
    return {"model": {f"w{i}": torch.randn(size, size, generator=g) for i in range(n)},
            "bias": torch.arange(7, dtype=torch.bfloat16), "epoch": 3, "name": "run"}


def same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return bool(a == b)


def raw(s3: servers.S3Server) -> Any:
    import s3fs

    return s3fs.S3FileSystem(**s3.options)


# -- files -----------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_save_load_roundtrip_bytes_equal_local(s3: servers.S3Server, bucket: str,
                                              tmp_path: Path, suffix: str) -> None:
    sd = state() if suffix == ".pt" else state()["model"]
    url = f"s3://{bucket}/exp/ckpt{suffix}"
    torchkeep.save(sd, url, storage_options=s3.options)
    local = tmp_path / f"ckpt{suffix}"
    torchkeep.save(sd, local)
    uploaded = raw(s3).cat_file(f"{bucket}/exp/ckpt{suffix}")
    # the same bytes as a local save, byte for byte (the zip records a name from the path)
    assert len(uploaded) == local.stat().st_size
    assert same(torchkeep.load(url, storage_options=s3.options), sd)
    if suffix == ".pt":
        assert same(torch.load(io.BytesIO(uploaded), weights_only=True), sd)
    else:
        from safetensors.torch import load as st_load

        assert same(st_load(uploaded), sd)
        assert uploaded == local.read_bytes()


def test_torch_save_file_uploaded_loads(s3: servers.S3Server, bucket: str) -> None:
    sd = state()
    buf = io.BytesIO()
    torch.save(sd, buf)
    raw(s3).pipe_file(f"{bucket}/theirs.pt", buf.getvalue())
    assert same(torchkeep.load(f"s3://{bucket}/theirs.pt", storage_options=s3.options), sd)


def test_replace_existing_object(s3: servers.S3Server, bucket: str) -> None:
    url = f"s3://{bucket}/a.pt"
    torchkeep.save({"v": torch.zeros(3)}, url, storage_options=s3.options)
    torchkeep.save({"v": torch.ones(3)}, url, storage_options=s3.options)
    assert torch.equal(torchkeep.load(url, storage_options=s3.options)["v"], torch.ones(3))


def test_full_load_streams_the_object_once(s3: servers.S3Server, bucket: str) -> None:
    sd = state(8, 512)  # 8 MiB of tensors
    url = f"s3://{bucket}/big.pt"
    torchkeep.save(sd, url, storage_options=s3.options)
    size = raw(s3).size(f"{bucket}/big.pt")
    s3.control("reset")
    assert same(torchkeep.load(url, storage_options=s3.options), sd)
    sent = s3.stats()["sent"]
    # the parse reads a few headers; the data comes once, not once per tensor or part
    assert size <= sent < size + 1 * MiB


def test_open_fetches_headers_then_one_tensor(s3: servers.S3Server, bucket: str) -> None:
    sd = {f"layer{i}": torch.randn(1024, 640) for i in range(24)}  # 24 x 2.5 MiB = 60 MiB
    sd["tiny"] = [torch.randn(4) for _ in range(40)]
    url = f"s3://{bucket}/lazy.pt"
    torchkeep.save(sd, url, storage_options=s3.options)
    s3.control("reset")
    with torchkeep.open(url, storage_options=s3.options) as ckpt:
        opened = s3.control("reset")
        w = ckpt["layer7"]
        one = s3.control("reset")
    assert torch.equal(w, sd["layer7"])
    assert opened["sent"] < 1 * MiB, opened
    assert 2.5 * MiB <= one["sent"] < 2.5 * MiB + 64 * 1024, one


def test_inspect_of_1gib_over_http_reads_under_1mib(tmp_path: Path) -> None:
    # 1 GiB on disk: 103 tensors of 10 MiB and 103 small ones, served over HTTP
    sd = {f"block{i}.weight": torch.zeros(2560, 1024) for i in range(103)}
    sd.update({f"block{i}.bias": torch.full((1024,), float(i)) for i in range(103)})
    sd["block42.weight"] = torch.arange(2560 * 1024, dtype=torch.float32).reshape(2560, 1024)
    path = tmp_path / "big.pt"
    torchkeep.save(sd, path, options=torchkeep.SaveOptions(durable=False))
    del sd
    assert path.stat().st_size > 1 << 30
    server = servers.HTTPFiles(tmp_path)
    try:
        url = f"{server.url}/big.pt"
        from torchkeep.summary import inspect

        report = inspect(url)
        assert len(report.tensors) == 206
        inspected = server.sent
        assert inspected < 1 * MiB, inspected
        server.sent = 0
        with torchkeep.open(url) as ckpt:
            server.sent = 0
            t = ckpt["block42.weight"]
        assert t[-1, -1].item() == 2560 * 1024 - 1
        assert 10 * MiB <= server.sent < 11 * MiB, server.sent
    finally:
        server.stop()


def test_http_is_read_only_and_loads(tmp_path: Path) -> None:
    sd = state()["model"]
    torchkeep.save(sd, tmp_path / "m.safetensors")
    server = servers.HTTPFiles(tmp_path)
    try:
        assert same(torchkeep.load(f"{server.url}/m.safetensors"), sd)
        with pytest.raises(StorageError, match="read-only"):
            torchkeep.save(sd, f"{server.url}/new.safetensors")
        with pytest.raises(CheckpointNotFoundError):
            torchkeep.load(f"{server.url}/missing.pt")
    finally:
        server.stop()


# -- failures ---------------------------------------------------------------------------------


def _listing(s3: servers.S3Server, bucket: str) -> list[str]:
    return sorted(raw(s3).find(bucket))


def _uploads(s3: servers.S3Server, bucket: str) -> list[Any]:
    import boto3

    client = boto3.client("s3", endpoint_url=s3.endpoint, aws_access_key_id="testing",
                          aws_secret_access_key="testing", region_name="us-east-1")
    return list(client.list_multipart_uploads(Bucket=bucket).get("Uploads", []))


def test_failed_save_leaves_nothing_and_keeps_the_old_object(s3: servers.S3Server,
                                                             bucket: str) -> None:
    url = f"s3://{bucket}/keep.pt"
    torchkeep.save({"v": torch.ones(4)}, url, storage_options=s3.options)
    before = raw(s3).cat_file(f"{bucket}/keep.pt")

    class Unsaveable:
        pass

    big = {"a": torch.randn(4 * MiB), "b": Unsaveable()}  # 16 MiB, then a failure
    with pytest.raises(UnsupportedTypeError):
        torchkeep.save(big, url, storage_options=s3.options)
    with pytest.raises(UnsupportedTypeError):
        torchkeep.save(big, f"s3://{bucket}/new.pt", storage_options=s3.options)
    assert raw(s3).cat_file(f"{bucket}/keep.pt") == before
    assert _listing(s3, bucket) == [f"{bucket}/keep.pt"]
    assert _uploads(s3, bucket) == []  # the multipart upload was aborted


def test_persistent_server_errors_fail_the_save_cleanly(s3: servers.S3Server,
                                                        bucket: str) -> None:
    s3.control("fail", status=500, count=10_000, method="PUT")
    url = f"s3://{bucket}/x.pt"
    try:
        started = time.monotonic()
        # botocore's own retries (5 attempts with backoff) are turned down to keep the
        # test short; what is tested is that the failure ends the save cleanly
        options = {**s3.options, "config_kwargs": {"retries": {"max_attempts": 2}}}
        with pytest.raises(StorageError) as info:
            torchkeep.save({"a": torch.randn(3 * MiB)}, url, storage_options=options)
        assert time.monotonic() - started < 120
    finally:
        s3.control("reset")
    assert url in str(info.value)
    assert _listing(s3, bucket) == []


def test_transient_503s_are_retried(s3: servers.S3Server, bucket: str) -> None:
    sd = state(8, 512)
    url = f"s3://{bucket}/flaky.pt"
    torchkeep.save(sd, url, storage_options=s3.options)
    s3.control("reset")
    for _ in range(3):
        s3.control("fail", status=503, count=1, method="GET")
    with torchkeep.open(url, storage_options=s3.options) as ckpt:
        assert torch.equal(ckpt["model/w3"], sd["model"]["w3"])
    for _ in range(3):
        s3.control("fail", status=503, count=1, method="GET")
    assert same(torchkeep.load(url, storage_options=s3.options), sd)


def test_ranged_reads_retry_then_give_up(s3: servers.S3Server, bucket: str) -> None:
    url = f"s3://{bucket}/r.pt"
    torchkeep.save({"a": torch.randn(1000)}, url, storage_options=s3.options)
    import s3fs

    from torchkeep.storage.remote import RemoteSource

    # a client that does not retry by itself, so torchkeep's own retries are what is seen
    fs = s3fs.S3FileSystem(**s3.options, config_kwargs={"retries": {"max_attempts": 1}})
    fs.retries = 1
    size = fs.size(f"{bucket}/r.pt")

    def source() -> RemoteSource:
        return RemoteSource(fs, f"{bucket}/r.pt", url=url, size=size,
                            options=RemoteOptions(retries=2, backoff=0.01))

    s3.control("reset")
    s3.control("fail", status=503, count=2, method="GET")
    assert source().read(0, 4) == b"PK\x03\x04"  # two failures, then the third attempt
    assert s3.stats()["requests"] == 3
    s3.control("fail", status=503, count=100, method="GET")
    try:
        with pytest.raises(StorageError, match="after 3 attempts"):
            source().read(100, 4)
    finally:
        s3.control("reset")


def test_truncated_object_is_corrupt(s3: servers.S3Server, bucket: str) -> None:
    buf = io.BytesIO()
    torch.save(state(), buf)
    raw(s3).pipe_file(f"{bucket}/cut.pt", buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(CorruptCheckpointError):
        torchkeep.load(f"s3://{bucket}/cut.pt", storage_options=s3.options)


def test_missing_bucket_and_object(s3: servers.S3Server, bucket: str) -> None:
    with pytest.raises(CheckpointNotFoundError):
        torchkeep.load(f"s3://{bucket}/nothing.pt", storage_options=s3.options)
    with pytest.raises(CheckpointNotFoundError):
        torchkeep.load("s3://no-such-bucket-here/a.pt", storage_options=s3.options)
    with pytest.raises((StorageError, CheckpointNotFoundError)) as info:
        torchkeep.save({"a": torch.ones(2)}, "s3://no-such-bucket-here/a.pt",
                       storage_options=s3.options)
    assert "no-such-bucket-here" in str(info.value)


def _cli_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_SHARED_CREDENTIALS_FILE=os.devnull, AWS_CONFIG_FILE=os.devnull,
               AWS_EC2_METADATA_DISABLED="true", PYTHONWARNINGS="ignore")
    return env


def test_missing_credentials_is_one_line(s3: servers.S3Server, bucket: str) -> None:
    torchkeep.save({"a": torch.ones(2)}, f"s3://{bucket}/a.pt", storage_options=s3.options)
    r = subprocess.run([sys.executable, "-m", "torchkeep", "inspect", f"s3://{bucket}/a.pt",
                        "--storage-option", f"endpoint_url={s3.endpoint}"],
                       capture_output=True, text=True, env=_cli_env(), timeout=120,
                       check=False)
    assert r.returncode == StorageError.exit_code, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "no credentials" in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_cli_with_storage_options(s3: servers.S3Server, bucket: str, tmp_path: Path) -> None:
    sd = state()
    url = f"s3://{bucket}/c.pt"
    torchkeep.save(sd, url, storage_options=s3.options)
    flags = ["--storage-option", "key=testing", "--storage-option", "secret=testing",
             "--storage-option", f"endpoint_url={s3.endpoint}"]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "torchkeep", *args, *flags],
                              capture_output=True, text=True, env=_cli_env(), timeout=120,
                              check=False)

    r = run("inspect", url, "--json")
    assert r.returncode == 0, r.stderr
    assert '"model/w0"' in r.stdout or "model" in r.stdout
    assert run("verify", url).returncode == 0
    assert run("scan", url).returncode == 0
    out = tmp_path / "local.safetensors"
    r = run("convert", url, str(out))
    assert r.returncode == 0, r.stderr
    assert same(torchkeep.load(out), sd)
    r = run("convert", str(out), f"s3://{bucket}/back.safetensors")
    assert r.returncode == 0, r.stderr
    assert same(torchkeep.load(f"s3://{bucket}/back.safetensors", storage_options=s3.options),
                sd)


def test_missing_protocol_package_names_the_extra() -> None:
    try:
        import gcsfs  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("gcsfs is installed here: the missing-package path cannot be reached")
    with pytest.raises(MissingDependencyError, match=r"torchkeep\[gcs\]"):
        url_filesystem("gs://bucket/a.pt")


# -- the manager --------------------------------------------------------------------------------


def test_manager_on_s3(s3: servers.S3Server, bucket: str) -> None:
    url = f"s3://{bucket}/runs/exp1"
    with torchkeep.CheckpointManager(url, keep_last=2, async_save=True,
                                     storage_options=s3.options) as mgr:
        for step in range(5):
            mgr.save(step, {"w": torch.full((1000,), float(step)), "step": step},
                     metrics={"loss": 1.0 / (step + 1)})
        mgr.wait()
        assert mgr.all_steps() == [3, 4]
        target = {"w": torch.zeros(1000), "step": -1}
        mgr.restore(target)
        assert target["step"] == 4 and torch.equal(target["w"], torch.full((1000,), 4.0))
    names = {p.rsplit("/", 2)[-2] for p in _listing(s3, bucket)}
    assert names == {"step-000000000003", "step-000000000004"}
    # the step directory is one checkpoint for load, open, verify, inspect
    step_url = f"{url}/step-000000000004"
    assert torchkeep.load(step_url, storage_options=s3.options)["step"] == 4
    with torchkeep.storage_options(s3.options):
        assert torchkeep.scan(step_url).verdict == "clean"
        assert torchkeep.verify(step_url).intact
        assert torchkeep.inspect(step_url).format == "torchkeep"


def test_manager_on_s3_ignores_and_removes_uncommitted_steps(s3: servers.S3Server,
                                                             bucket: str) -> None:
    url = f"s3://{bucket}/runs/r"
    with torchkeep.CheckpointManager(url, storage_options=s3.options) as mgr:
        mgr.save(1, {"w": torch.ones(10)})
    fs = raw(s3)
    # what a save killed before its marker leaves: data and manifest, no COMMITTED
    for name in ("data-00000.bin", "manifest.json"):
        fs.copy(f"{bucket}/runs/r/step-000000000001/{name}",
                f"{bucket}/runs/r/step-000000000002/{name}")
    with pytest.warns(UserWarning, match="leftovers"):
        mgr = torchkeep.CheckpointManager(url, storage_options=s3.options)
    with mgr:
        assert mgr.all_steps() == [1]
        assert mgr.cleaned == ["step-000000000002"]
    assert not fs.exists(f"{bucket}/runs/r/step-000000000002/manifest.json")


_KILLED = textwrap.dedent("""
    import sys, torch, torchkeep
    url, endpoint = sys.argv[1], sys.argv[2]
    opts = {"key": "testing", "secret": "testing", "endpoint_url": endpoint}
    with torchkeep.CheckpointManager(url, keep_last=2, storage_options=opts) as mgr:
        latest = mgr.latest_step()
        for step in range(0 if latest is None else latest + 1, 1000):
            g = torch.Generator().manual_seed(step)
            mgr.save(step, {"w": torch.randn(1 << 20, generator=g), "step": step})
            print(step, flush=True)
""")


def test_sigkill_during_saves_latest_step_restores_exactly(s3: servers.S3Server,
                                                           bucket: str) -> None:
    url = f"s3://{bucket}/runs/killed"
    for delay in (0.3, 0.9, 1.7):
        proc = subprocess.Popen([sys.executable, "-c", _KILLED, url, s3.endpoint],
                                stdout=subprocess.PIPE, text=True, env=_cli_env())
        assert proc.stdout is not None
        assert proc.stdout.readline().strip().isdigit()  # one step committed
        time.sleep(delay)  # then killed at some point of a later save
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        with torchkeep.CheckpointManager(url, storage_options=s3.options) as mgr:
            latest = mgr.latest_step()
            assert latest is not None
            got = mgr.load()
            g = torch.Generator().manual_seed(latest)
            assert got["step"] == latest
            assert torch.equal(got["w"], torch.randn(1 << 20, generator=g))


def test_incremental_manager_on_s3_uploads_only_changed_chunks(s3: servers.S3Server,
                                                               bucket: str) -> None:
    url = f"s3://{bucket}/runs/inc"
    frozen = torch.randn(1024, 256)  # 1 MiB, never changed
    options = torchkeep.ManagerOptions(incremental=True, keep_last=2, async_save=True,
                                       chunk_bytes=64 * 1024)
    uploaded = []
    with torchkeep.CheckpointManager(url, options=options, storage_options=s3.options) as mgr:
        for step in range(4):
            before = s3.stats()["received"]
            mgr.save(step, {"frozen": frozen, "head": torch.full((64, 64), float(step)),
                            "step": step})
            mgr.wait()
            uploaded.append(s3.stats()["received"] - before)
        from torchkeep.storage.background import drain

        drain()
        assert mgr.all_steps() == [2, 3]
        for step in (2, 3):
            got = mgr.load(step)
            assert torch.equal(got["frozen"], frozen) and got["step"] == step
            assert torch.equal(got["head"], torch.full((64, 64), float(step)))
    # the first step uploads the frozen MiB; later ones the 16 KiB head and a manifest
    assert uploaded[0] > MiB and all(n < 100 * 1024 for n in uploaded[1:]), uploaded
    names = {p.rsplit("/", 1)[-1] for p in _listing(s3, bucket) if "/chunks/" in p}
    assert {n.split("-")[1] for n in names} == {"000000000000", "000000000002",
                                                "000000000003"}  # 1's file was freed
    with torchkeep.storage_options(s3.options):
        assert torchkeep.verify(f"{url}/step-000000000003").intact


def test_manager_refuses_to_overwrite_a_committed_step(s3: servers.S3Server,
                                                       bucket: str) -> None:
    with torchkeep.CheckpointManager(f"s3://{bucket}/r", storage_options=s3.options) as mgr:
        mgr.save(1, {"w": torch.ones(3)})
        with pytest.raises(ValueError, match="already committed"):
            mgr.save(1, {"w": torch.zeros(3)})
        assert torch.equal(mgr.load(1)["w"], torch.ones(3))


# -- memory and planning --------------------------------------------------------------------------


def test_remote_save_peak_memory(s3: servers.S3Server, bucket: str) -> None:
    code = textwrap.dedent("""
        import sys, torch, torchkeep
        endpoint, url = sys.argv[1], sys.argv[2]
        opts = {"key": "testing", "secret": "testing", "endpoint_url": endpoint}
        sd = {f"w{i}": torch.randn(8 << 20) for i in range(8)}  # 256 MiB
        torchkeep.save({"warm": torch.ones(1)}, url + ".warm", storage_options=opts)
        def status(key):
            for line in open("/proc/self/status"):
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
        open("/proc/self/clear_refs", "w").write("5")
        before = status("VmRSS")
        torchkeep.save(sd, url, storage_options=opts)
        print(status("VmHWM") - before)
    """)
    r = subprocess.run([sys.executable, "-c", code, s3.endpoint, f"s3://{bucket}/big.pt"],
                       capture_output=True, text=True, env=_cli_env(), timeout=300,
                       check=False)
    assert r.returncode == 0, r.stderr
    extra = int(r.stdout.split()[-1])
    assert extra < 64 * MiB, f"peak extra RSS {extra / MiB:.1f} MiB for a 256 MiB save"


def test_coalesce_and_split() -> None:
    assert _coalesce([(0, 10), (15, 10), (100_000, 5)], 10, 1000) == [(0, 25), (100_000, 5)]
    assert _coalesce([(0, 600), (600, 600)], 10, 1000) == [(0, 600), (600, 600)]
    views = [(0, memoryview(bytearray(10))), (20, memoryview(bytearray(10))),
             (40, memoryview(bytearray(10)))]
    assert _split(0, 50, 1, views) == [(0, 50, 0, 3)]
    assert _split(0, 50, 3, views) == [(0, 30, 0, 2), (30, 50, 2, 3)]  # >= 16 bytes each


def test_storage_option_parsing() -> None:
    from torchkeep.cli.remote_option import parse_storage_options

    assert parse_storage_options(("anon=true", "endpoint_url=http://h:9000",
                                  "client_kwargs.region_name=eu-west-1", "n=3")) == {
        "anon": True, "endpoint_url": "http://h:9000",
        "client_kwargs": {"region_name": "eu-west-1"}, "n": 3}
    import click

    with pytest.raises(click.BadParameter):
        parse_storage_options(("novalue",))


def test_memory_url_save_is_atomic() -> None:
    import fsspec

    url = "memory://tk-atomic/a.pt"
    torchkeep.save({"v": torch.ones(2)}, url)

    class Unsaveable:
        pass

    with pytest.raises(UnsupportedTypeError):
        torchkeep.save({"v": torch.zeros(2), "x": Unsaveable()}, url)
    assert torch.equal(torchkeep.load(url)["v"], torch.ones(2))
    assert fsspec.filesystem("memory").ls("/tk-atomic", detail=False) == ["/tk-atomic/a.pt"]


def test_server_dies_during_a_multipart_upload() -> None:
    server = servers.start_s3()
    try:
        server.make_bucket("dying")
        options = {**server.options, "config_kwargs": {"retries": {"max_attempts": 2},
                                                       "connect_timeout": 2}}
        server.control("die", after_bytes=12 * MiB)  # inside the second 8 MiB part
        started = time.monotonic()
        with pytest.raises(StorageError) as info:
            torchkeep.save({"a": torch.randn(8 * MiB)}, "s3://dying/a.pt",
                           storage_options=options)
        assert time.monotonic() - started < 120
        assert "s3://dying/a.pt" in str(info.value)
        assert server.process.wait(10) == 17  # it did die mid-upload
    finally:
        server.stop()


def test_server_dies_during_an_async_manager_save() -> None:
    server = servers.start_s3()
    try:
        server.make_bucket("dying")
        options = {**server.options, "config_kwargs": {"retries": {"max_attempts": 2},
                                                       "connect_timeout": 2}}
        mgr = torchkeep.CheckpointManager("s3://dying/run", async_save=True,
                                          storage_options=options)
        mgr.save(0, {"w": torch.ones(10)})
        mgr.wait()
        server.control("die", after_bytes=4 * MiB)
        mgr.save(1, {"w": torch.randn(4 * MiB)})
        with pytest.raises(torchkeep.AsyncSaveError) as info:
            mgr.wait()
        assert isinstance(info.value.__cause__, StorageError)
        with pytest.raises(StorageError, match="listing failed"):  # the server is gone
            mgr.all_steps()
    finally:
        with contextlib.suppress(Exception):
            mgr.close()
        server.stop()


def test_sharded_save_to_an_object_store_is_refused_clearly() -> None:
    import torchkeep.distributed as tkd

    with pytest.raises(StorageError, match="atomic renames"):
        tkd.save({"w": torch.ones(2)}, "memory://tk-sharded/step")


def test_remote_options_and_storage_options_blocks(s3: servers.S3Server, bucket: str) -> None:
    sd = state(8, 512)
    url = f"s3://{bucket}/streams.pt"
    with torchkeep.storage_options(s3.options):  # what the CLI's --storage-option does
        torchkeep.save(sd, url)
        s3.control("reset")
        assert same(torchkeep.load(url), sd)
        one = s3.control("reset")["requests"]
        with torchkeep.remote_options(RemoteOptions(streams=3)):
            assert same(torchkeep.load(url), sd)
        assert s3.control("reset")["requests"] == one + 2  # three GETs for the data, not one
        with torchkeep.remote_options(RemoteOptions(part_bytes=5 * MiB, concurrency=2)), \
                torchkeep.open(url) as ckpt:
            assert torch.equal(ckpt["model/w6"], sd["model"]["w6"])


# -- local headers checked on first read (remote zips) -----------------------------------------


def _served(tmp_path: Path, name: str, data: bytes) -> tuple[servers.HTTPFiles, str]:
    (tmp_path / name).write_bytes(data)
    server = servers.HTTPFiles(tmp_path)
    return server, f"{server.url}/{name}"


def _torch_bytes(sd: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    torch.save(sd, buf)
    return buf.getvalue()


def test_a_bad_local_header_of_a_large_record_fails_when_read(tmp_path: Path) -> None:
    import zipfile

    sd = {"big": torch.randn(1 << 19), "other": torch.randn(1 << 19), "small": torch.ones(3)}
    data = bytearray(_torch_bytes(sd))
    with zipfile.ZipFile(io.BytesIO(bytes(data))) as z:
        info = next(i for i in z.infolist() if i.file_size == 1 << 21 and
                    torch.equal(torch.frombuffer(bytearray(z.read(i)), dtype=torch.float32),
                                sd["big"]))
    data[info.header_offset + 30] ^= 0x01  # the record's name in its local header
    local = tmp_path / "local.pt"
    local.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match="names a different record"):
        torchkeep.open(local)  # locally every header is checked at open
    server, url = _served(tmp_path, "bad.pt", bytes(data))
    try:
        with torchkeep.open(url) as ckpt:  # remotely it is checked with the record's data
            assert torch.equal(ckpt["other"], sd["other"])
            with pytest.raises(CorruptCheckpointError, match="names a different record"):
                ckpt["big"]
        with pytest.raises(CorruptCheckpointError, match="names a different record"):
            torchkeep.load(url)
    finally:
        server.stop()


def test_a_zip_not_laid_out_like_torch_is_checked_up_front(tmp_path: Path) -> None:
    import zipfile

    sd = {"big": torch.randn(1 << 19), "b": torch.arange(5.0)}
    original = _torch_bytes(sd)
    repacked = io.BytesIO()  # the same records, rewritten unaligned by Python's zipfile
    with zipfile.ZipFile(io.BytesIO(original)) as src, \
            zipfile.ZipFile(repacked, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
    server, url = _served(tmp_path, "repacked.pt", repacked.getvalue())
    try:
        assert same(torchkeep.load(url), sd)
        with torchkeep.open(url) as ckpt:
            assert torch.equal(ckpt["big"], sd["big"])
    finally:
        server.stop()


def test_open_of_a_remote_torch_file_needs_few_requests(tmp_path: Path) -> None:
    sd = {f"layer{i}": torch.randn(1 << 19) for i in range(30)}  # 30 x 2 MiB
    server, url = _served(tmp_path, "m.pt", _torch_bytes(sd))
    try:
        server.requests = 0
        with torchkeep.open(url) as ckpt:
            opened = server.requests
            server.requests = server.sent = 0
            t = ckpt["layer17"]
            assert server.requests == 1  # the record's header and data in one request
            assert server.sent < (1 << 21) + 4096
        assert torch.equal(t, sd["layer17"])
        # its size, the first 64 KiB (magic, data.pkl and the small records after it), the
        # last 64 KiB (end records, directory)
        assert opened == 3, opened
    finally:
        server.stop()
