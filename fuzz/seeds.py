"""Write the fuzzers' seed inputs: ``python fuzz/seeds.py OUT_DIR``.

Seeds come from the tests' generators (``tests/hostile.py``: every gadget and structural
abuse in every container, the small valid files of each format), from files torch,
safetensors and torchkeep write, from pickles of assorted values in protocols 0-5, and
from the third-party hostile corpus when it is on this machine
(``../shared/corpus/hostile-thirdparty``, or ``$TORCHKEEP_HOSTILE_CORPUS``). Inputs over
256 KiB are left out: the fuzzers mutate small files faster.
"""

from __future__ import annotations

import collections
import hashlib
import io
import json
import os
import pickle
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
MAX_SEED = 256 << 10


def _pickles() -> list[bytes]:
    values = [None, True, 0, -1, 255, 65536, 2**31, 2**70, -(2**70), 1.5, float("inf"),
              "", "text", "ünïcode", b"bytes", bytearray(b"ba"), (), (1,), (1, 2), (1, 2, 3),
              [], [1, [2, [3]]], {}, {"a": 1, 2: "b", (3, 4): [5]}, {1, 2}, frozenset({3}),
              collections.OrderedDict(a=1), complex(1, 2), ["x" * 300] * 3]
    cyclic: list[object] = []
    cyclic.append(cyclic)
    values.append(cyclic)
    return [pickle.dumps(v, protocol=p) for v in values for p in range(6)]


def _torch_files(tmp: Path) -> dict[str, list[bytes]]:
    import numpy as np
    import torch
    from safetensors.torch import save as st_save

    import torchkeep

    trees = [
        {"w": torch.arange(6.0).reshape(2, 3), "b": torch.zeros(3, dtype=torch.int64)},
        {"epoch": 3, "model": collections.OrderedDict(fc=torch.ones(2, 2)),
         "opt": {"state": {0: {"momentum_buffer": torch.ones(2)}},
                 "param_groups": [{"lr": 0.1, "params": [0]}]}, "loss": 0.25},
        {"view": torch.arange(10.0)[2:8:2], "half": torch.ones(3, dtype=torch.float16),
         "bf16": torch.ones(2, dtype=torch.bfloat16), "bool": torch.tensor([True, False]),
         "cplx": torch.ones(2, dtype=torch.complex64), "scalar": torch.tensor(1.5),
         "param": torch.nn.Parameter(torch.ones(2)), "np": np.arange(3)},
    ]
    out: dict[str, list[bytes]] = {"zip": [], "legacy": [], "safetensors": []}
    for i, tree in enumerate(trees):
        buffer = io.BytesIO()
        torch.save(tree, buffer)
        out["zip"].append(buffer.getvalue())
        buffer = io.BytesIO()
        torch.save(tree, buffer, _use_new_zipfile_serialization=False)
        out["legacy"].append(buffer.getvalue())
        tensors_only = {k: v for k, v in tree.items() if isinstance(v, torch.Tensor)}
        for fmt, key in (("torch", "zip"), ("torch-legacy", "legacy"),
                         ("safetensors", "safetensors")):
            path = tmp / f"{i}.{fmt}"
            try:
                torchkeep.save(tree if fmt != "safetensors" else tensors_only or tree, path,
                               format=fmt)
            except torchkeep.TorchkeepError:
                continue
            out[key].append(path.read_bytes())
        if tensors_only:
            out["safetensors"].append(st_save({k: v.contiguous() for k, v in
                                               tensors_only.items()}))
    return out


def _manifests() -> list[bytes]:
    """Step manifests whose chunks point into the data file ``fuzz_manifest`` provides."""
    sys.path.insert(0, str(ROOT / "fuzz"))
    from targets import _DATA_FILE
    from torchkeep.formats.manifest import checksum

    def entry(dtype: str, shape: list[int], offset: int, nbytes: int) -> dict[str, object]:
        return {"dtype": dtype, "shape": shape, "chunks": [{
            "offsets": [0] * len(shape), "shape": shape, "file": "data-00000.bin",
            "offset": offset, "nbytes": nbytes,
            "xxh3": checksum(_DATA_FILE[offset:offset + nbytes])}]}

    manifests = []
    for tensors, tree in [
        ({"w": entry("float32", [4], 0, 16), "b": entry("int64", [2], 64, 16)},
         {"$dict": {"w": {"$tensor": "w"}, "b": {"$tensor": "b"}, "epoch": 3,
                    "cfg": {"$dict": {"lr": 0.1, "names": ["a", "b"]}}}}),
        ({"x": entry("uint8", [2, 3], 128, 6), "e": entry("float16", [0], 256, 0)},
         {"$dict": {"x": {"$tensor": "x"}, "e": {"$tensor": "e"}, "t": {"$tuple": [1, 2]}}}),
    ]:
        manifests.append(json.dumps({
            "format": "torchkeep-step", "version": 1, "step": 3, "created": "now",
            "metrics": {"loss": 0.5}, "tree": tree, "tensors": tensors}).encode())
    return manifests


def _hostile() -> dict[str, list[bytes]]:
    import hostile as H

    marker = Path(tempfile.gettempdir()) / "torchkeep-fuzz-seed-marker"
    out: dict[str, list[bytes]] = {"pickle": [], "zip": [], "legacy": [], "safetensors": []}
    for gadget in [*H.GADGETS, *H.STRUCTURAL]:
        try:
            payload = gadget.make(marker)
        except Exception:
            continue
        out["pickle"].append(payload)
        out["zip"].append(H.in_torch_zip(payload))
        out["legacy"].append(H.in_legacy(payload))
    files = H.small_files()
    for name in dir(files):
        value = getattr(files, name)
        if isinstance(value, bytes):
            key = {"torch_zip": "zip", "legacy": "legacy", "safetensors": "safetensors"}.get(
                name, "zip")
            out[key].append(value)
    return out


def _third_party() -> dict[str, list[bytes]]:
    from torchkeep.formats.detect import sniff
    from torchkeep.storage.source import open_source

    source = os.environ.get("TORCHKEEP_HOSTILE_CORPUS") or str(
        ROOT.parent / "shared" / "corpus" / "hostile-thirdparty")
    files = Path(source) / "files"
    out: dict[str, list[bytes]] = collections.defaultdict(list)
    if not files.is_dir():
        return out
    for path in sorted(files.rglob("*")):
        if not path.is_file() or path.stat().st_size > MAX_SEED:
            continue
        data = path.read_bytes()
        fmt = sniff(open_source(data))
        key = {"torch": "zip", "torch-legacy": "legacy", "safetensors": "safetensors",
               "pickle": "pickle"}.get(fmt, "scan")
        out[key].append(data)
    return out


def write_seeds(out: Path) -> dict[str, int]:
    """Write every target's seeds under ``out/<target>/``; returns the counts."""
    groups: dict[str, list[bytes]] = collections.defaultdict(list)
    groups["pickle"] += _pickles()
    groups["manifest"] += _manifests()
    with tempfile.TemporaryDirectory() as tmp:
        for source in (_torch_files(Path(tmp)), _hostile(), _third_party()):
            for key, items in source.items():
                groups[key] += items
    groups["differential"] = list(groups["pickle"])
    every = [data for key in ("pickle", "zip", "legacy", "safetensors", "manifest", "scan")
             for data in groups[key]]
    groups["scan"] = every
    groups["load"] = every
    counts = {}
    for target, items in groups.items():
        folder = out / target
        folder.mkdir(parents=True, exist_ok=True)
        kept = {hashlib.sha1(d).hexdigest(): d for d in items if len(d) <= MAX_SEED}
        for digest, data in kept.items():
            (folder / digest).write_bytes(data)
        counts[target] = len(kept)
    return counts


if __name__ == "__main__":
    print(json.dumps(write_seeds(Path(sys.argv[1]))))
