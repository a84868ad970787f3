"""Remote checkpoints: torchkeep.save / load to s3:// against a raw s3fs put / get of the
same bytes, on a local S3 server (moto's, tests/servers.py) in the same run.

Every operation runs in a fresh process. The state is 512 MiB (32 float32 tensors of
16 MiB and 64 small ones). Rows: save (a new key, and replacing an existing one) against
``put_file`` of a local file holding the bytes torchkeep writes; load against ``cat_file``
of the whole object into memory (what ``torch.load(fsspec.open(url))`` starts with);
bytes the server sent for ``inspect`` and for one 16 MiB tensor; peak RSS growth during
the save. The server copies a whole object for each ranged GET (moto keeps objects in a
spooled file and slices them), so ranged reads cost more here than on real S3.

    python bench/remote.py [--rounds N] [--mib 512]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

from bytecode import compile_torchkeep  # noqa: E402
from servers import KEY, S3Server, start_s3  # noqa: E402

TARGET = 1.2

_WORKER = textwrap.dedent("""
    import json, sys, time, torch, torchkeep
    op, endpoint, url, local, mib = sys.argv[1:6]
    opts = {"key": "testing", "secret": "testing", "endpoint_url": endpoint,
            "skip_instance_cache": True}
    import s3fs
    fs = s3fs.S3FileSystem(**opts)
    def state():
        g = torch.Generator().manual_seed(0)
        n = int(mib) // 16
        sd = {f"layer{i}.weight": torch.randn(4 << 20, generator=g) for i in range(n)}
        sd.update({f"layer{i}.bias": torch.randn(256, generator=g) for i in range(64)})
        return sd
    def rss(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    sd = state() if op == "save" else None
    fs.ls(url.split("://")[1].split("/")[0])  # the client is connected before the clock
    open("/proc/self/clear_refs", "w").write("5")
    before = rss("VmRSS")
    t = time.perf_counter()
    if op == "save":
        torchkeep.save(sd, url, storage_options=opts)
    elif op == "put":
        fs.put_file(local, url.split("://")[1])
    elif op == "load":
        out = torchkeep.load(url, storage_options=opts)
    elif op == "get":
        data = fs.cat_file(url.split("://")[1])
    seconds = time.perf_counter() - t
    print(json.dumps({"seconds": seconds, "peak_extra": rss("VmHWM") - before}))
""")


def run(op: str, server: S3Server, url: str, local: Path, mib: int) -> dict[str, Any]:
    r = subprocess.run([sys.executable, "-c", _WORKER, op, server.endpoint, url, str(local),
                        str(mib)], capture_output=True, text=True, check=False)
    if r.returncode:
        raise RuntimeError(f"{op}: {r.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(r.stdout.splitlines()[-1])
    return result


def transferred(server: S3Server, url: str) -> dict[str, int]:
    """Bytes the server sent for inspect, and for reading one 16 MiB tensor."""
    import torchkeep
    from torchkeep.storage.remote import storage_options
    from torchkeep.summary import inspect

    options = {"key": KEY, "secret": KEY, "endpoint_url": server.endpoint,
               "skip_instance_cache": True}
    server.control("reset")
    with storage_options(options):
        inspect(url)
    inspected = server.control("reset")["sent"]
    with torchkeep.open(url, storage_options=options) as ckpt:
        server.control("reset")
        ckpt["layer3.weight"]
        one = server.control("reset")["sent"]
    return {"inspect": inspected, "one_tensor": one}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--mib", type=int, default=512)
    args = parser.parse_args()
    compile_torchkeep()
    import s3fs
    import torch

    import torchkeep

    server = start_s3()
    times: dict[str, list[float]] = {k: [] for k in (
        "put", "save", "put_replace", "save_replace", "get", "load")}
    peaks: list[int] = []
    try:
        server.make_bucket("bench")
        with tempfile.TemporaryDirectory(prefix="torchkeep-bench-remote-") as tmp:
            local = Path(tmp) / "ckpt.pt"
            g = torch.Generator().manual_seed(0)
            n = args.mib // 16
            sd = {f"layer{i}.weight": torch.randn(4 << 20, generator=g) for i in range(n)}
            sd.update({f"layer{i}.bias": torch.randn(256, generator=g) for i in range(64)})
            torchkeep.save(sd, local)  # the same bytes the remote save produces
            del sd
            size = local.stat().st_size
            for i in range(args.rounds):
                for tool, op in (("raw", "put"), ("tk", "save")):
                    url = f"s3://bench/{tool}-{i}.pt"
                    result = run(op, server, url, local, args.mib)
                    times[op].append(result["seconds"])
                    if op == "save":
                        peaks.append(result["peak_extra"])
                    times[f"{op}_replace"].append(run(op, server, url, local,
                                                      args.mib)["seconds"])
                times["get"].append(run("get", server, f"s3://bench/raw-{i}.pt", local,
                                        args.mib)["seconds"])
                times["load"].append(run("load", server, f"s3://bench/tk-{i}.pt", local,
                                         args.mib)["seconds"])
                if i:  # keep the server's disk bounded: round 0's objects stay for below
                    fs = s3fs.S3FileSystem(key=KEY, secret=KEY, endpoint_url=server.endpoint)
                    fs.rm([f"bench/raw-{i}.pt", f"bench/tk-{i}.pt"])
            moved = transferred(server, "s3://bench/tk-0.pt")
    finally:
        server.stop()
    print(f"state: {size / (1 << 20):.0f} MiB, {args.rounds} rounds, fresh processes, "
          "local S3 server (moto)")
    print(f"{'operation':<14} {'fastest':>9} {'median':>9}   ratio (medians)")
    for ours, theirs in (("save", "put"), ("save_replace", "put_replace"), ("load", "get")):
        for op in (theirs, ours):
            v = times[op]
            ratio = ""
            if op == ours:
                r = statistics.median(v) / statistics.median(times[theirs])
                ratio = f"{r:.2f}x {'ok' if r <= TARGET else 'MISSED'} (<= {TARGET})"
            print(f"{op:<14} {min(v):>8.3f}s {statistics.median(v):>8.3f}s   {ratio}")
    print(f"inspect transferred {moved['inspect']:,} bytes (target < 1 MiB); one 16 MiB "
          f"tensor {moved['one_tensor']:,} bytes")
    print(f"peak extra RSS during save: median {statistics.median(peaks) / (1 << 20):.1f} MiB "
          f"for a {size / (1 << 20):.0f} MiB checkpoint")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
