"""One pass of torchkeep over a built hostile corpus, in a sandboxed subprocess.

``python corpus_pass.py DIR`` reads ``DIR/manifest.json`` (what ``build.py`` of
``shared/corpus/hostile-thirdparty`` writes) and prints one JSON line per file, flushed
as it goes (a crash names the file it died on): how ``torchkeep.load`` ended (the value's
content in the manifest's notation, or the error class), what ``torchkeep.scan`` said,
and the format each of them named. It runs under an address-space and CPU-time limit,
with ``HOLDOUT_MARKER_DIR`` set by the caller so that a payload that ran would leave a
marker file.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from typing import Any

_MAX_NODES = 10_000


def content(value: Any) -> dict[str, Any]:
    """The manifest's notation of a loaded value: leaves by path (``/key``, ``/[i]``,
    ``/@attr``), shared or cyclic containers as refs to the first path that reached them."""
    import torch

    leaves: dict[str, Any] = {}
    seen: dict[int, str] = {}
    nodes = 0
    todo: list[tuple[str, Any]] = [("", value)]
    while todo and nodes < _MAX_NODES:
        path, node = todo.pop()
        nodes += 1
        if isinstance(node, torch.Tensor):
            data = node.detach().contiguous().cpu()
            raw = data.view(torch.uint8).numpy().tobytes() if data.numel() else b""
            leaves[path] = {
                "backward_hooks": 0, "dtype": str(data.dtype).removeprefix("torch."),
                "is_parameter": isinstance(node, torch.nn.Parameter), "kind": "tensor",
                "numel": data.numel(), "requires_grad": node.requires_grad,
                "sha256": hashlib.sha256(raw).hexdigest(), "shape": list(node.shape)}
            continue
        if isinstance(node, (dict, list, tuple)):
            if id(node) in seen:
                leaves[path] = {"kind": "ref", "to": seen[id(node)]}
                continue
            seen[id(node)] = path
            items = (list(node.items()) if isinstance(node, dict)
                     else [(f"[{i}]", v) for i, v in enumerate(node)])
            attrs = getattr(node, "__dict__", {}) or {}
            if not items and not attrs:
                leaves[path] = {"kind": "empty",
                                "type": "dict" if isinstance(node, dict) else "seq"}
            children = [(f"{path}/{k}", v) for k, v in items]
            children += [(f"{path}/@{k}", v) for k, v in attrs.items()]
            todo.extend(reversed(children))
            continue
        leaves[path] = {"kind": "scalar", "repr": repr(node), "type": type(node).__name__}
    return {"leaves": leaves, "nodes": nodes, "truncated": bool(todo)}


def _one(path: str) -> dict[str, Any]:
    import torchkeep

    out: dict[str, Any] = {}
    try:
        out["content"] = content(torchkeep.load(path))
        out["load"] = "load"
    except torchkeep.TorchkeepError as e:
        out["load"] = "reject"
        out["error"] = f"{type(e).__name__}: {str(e)[-300:]}"
        out["load_format"] = getattr(e, "format", "") or None
    except BaseException as e:  # a bug: anything outside the error tree
        out["load"] = "foreign"
        out["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    if out["load"] == "load":
        out["load_format"] = torchkeep.inspect(path).format
    try:
        report = torchkeep.scan(path)
        out["scan"] = report.verdict
        out["scan_format"] = report.format
        out["flagged"] = sorted({f.name for f in report.flagged})
    except torchkeep.TorchkeepError as e:
        out["scan"] = "error"
        out["scan_error"] = f"{type(e).__name__}: {e}"
    except BaseException as e:
        out["scan"] = "foreign"
        out["scan_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    return out


def main(directory: str, names: list[str]) -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (16 << 30, 16 << 30))
    with open(os.path.join(directory, "manifest.json")) as f:
        manifest = json.load(f)
    for entry in manifest["files"]:
        if names and entry["name"] not in names:
            continue
        result = _one(os.path.join(directory, entry["name"]))
        print(json.dumps({"name": entry["name"], **result}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
