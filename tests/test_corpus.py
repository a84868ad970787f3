"""The third-party hostile corpus (``shared/corpus/hostile-thirdparty``), in a sandbox.

About 180 files other projects published to break pickle loaders and scanners (picklescan,
fickling, modelscan, safetensors' attacks/, pickle_injector, Malicious-Models), with their
payloads swapped for marker writers. ``build.py`` copies them and generates the big DoS
samples into a temporary folder; ``corpus_pass.py`` runs torchkeep over every file in a
subprocess with memory and CPU limits. Then:

* no payload ran (no marker file), torchkeep raised only its own errors, nothing crashed;
* every load ended as the manifest accepts, and what loaded equals the recorded content;
* ``scan`` calls every file marked dangerous dangerous, and no file marked clean;
* ``scan`` and ``load`` name the same format;
* ``scan`` says dangerous wherever CPython's own unpicklers would import a global outside
  the allowlist (``pickle_oracle.py``, also sandboxed).

The corpus lives beside the repository (``../shared``), or where
``TORCHKEEP_HOSTILE_CORPUS`` points; without it these tests are skipped, saying so.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pickle_oracle import recorded_imports_of
from torchkeep.unpickle.scanner import verdict_of

HERE = Path(__file__).resolve().parent


def _corpus_source() -> Path | None:
    candidates = [os.environ.get("TORCHKEEP_HOSTILE_CORPUS", ""),
                  HERE.parent.parent / "shared" / "corpus" / "hostile-thirdparty",
                  HERE.parent / "shared" / "corpus" / "hostile-thirdparty"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "build.py").is_file():
            return Path(candidate)
    return None


SOURCE = _corpus_source()
pytestmark = pytest.mark.skipif(
    SOURCE is None, reason="the hostile corpus (../shared/corpus/hostile-thirdparty, or "
                           "$TORCHKEEP_HOSTILE_CORPUS) is not on this machine")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The built corpus, torchkeep's pass over it, and the marker folder."""
    assert SOURCE is not None
    built = tmp_path_factory.mktemp("corpus")
    subprocess.run([sys.executable, str(SOURCE / "build.py"), str(built)], check=True,
                   capture_output=True, timeout=600)
    markers = tmp_path_factory.mktemp("markers")
    env = dict(os.environ, HOLDOUT_MARKER_DIR=str(markers), PYTHONWARNINGS="ignore")
    done = subprocess.run([sys.executable, str(HERE / "corpus_pass.py"), str(built)],
                          capture_output=True, text=True, timeout=900, env=env, check=False)
    results = {r["name"]: r for r in map(json.loads, done.stdout.splitlines())}
    manifest = json.loads((built / "manifest.json").read_text())
    return {"dir": built, "markers": markers, "results": results, "returncode": done.returncode,
            "stderr": done.stderr[-2000:], "entries": manifest["files"]}


def _failures(corpus: dict[str, Any], check: Any) -> list[str]:
    out = []
    for entry in corpus["entries"]:
        result = corpus["results"].get(entry["name"])
        problem = check(entry, result)
        if problem:
            out.append(f"{entry['name']}: {problem}")
    return out


def test_no_payload_runs_and_nothing_crashes(corpus: dict[str, Any]) -> None:
    assert corpus["returncode"] == 0, corpus["stderr"]
    assert len(corpus["results"]) == len(corpus["entries"]) >= 180
    assert sorted(os.listdir(corpus["markers"])) == []

    def foreign(entry: dict[str, Any], result: dict[str, Any]) -> str | None:
        if result["load"] == "foreign":
            return f"load raised {result['error']}"
        if result["scan"] == "foreign":
            return f"scan raised {result['scan_error']}"
        return None

    assert _failures(corpus, foreign) == []


def test_every_load_ends_as_the_manifest_accepts(corpus: dict[str, Any]) -> None:
    def check(entry: dict[str, Any], result: dict[str, Any]) -> str | None:
        if result["load"] not in entry["accept"]:
            return f"{result['load']} ({result.get('error')}), accepted: {entry['accept']}"
        if result["load"] == "load" and entry["content_mode"] == "exact":
            want, got = entry["content"], result["content"]
            if (want["leaves"], want["nodes"]) != (got["leaves"], got["nodes"]):
                return f"loaded {got} instead of {want}"
        return None

    assert _failures(corpus, check) == []
    loaded = [r for r in corpus["results"].values() if r["load"] == "load"]
    assert len(loaded) >= 10  # the benign files really load


def test_scan_flags_every_dangerous_file_and_no_clean_one(corpus: dict[str, Any]) -> None:
    def check(entry: dict[str, Any], result: dict[str, Any]) -> str | None:
        if entry["scan_expect"] == "dangerous" and result["scan"] != "dangerous":
            return f"scan says {result['scan']}"
        if entry["scan_expect"] == "clean" and result["scan"] == "dangerous":
            return f"scan flags {result['flagged']}"
        return None

    assert _failures(corpus, check) == []


def test_scan_and_load_name_the_same_format(corpus: dict[str, Any]) -> None:
    def check(entry: dict[str, Any], result: dict[str, Any]) -> str | None:
        if result.get("load_format") and result["load_format"] != result["scan_format"]:
            return f"load: {result['load_format']}, scan: {result['scan_format']}"
        return None

    assert _failures(corpus, check) == []


def test_scan_is_dangerous_wherever_cpython_would_import_outside_the_allowlist(
        corpus: dict[str, Any]) -> None:
    paths = [corpus["dir"] / e["name"] for e in corpus["entries"]]
    env_marker = os.environ.get("HOLDOUT_MARKER_DIR")
    os.environ["HOLDOUT_MARKER_DIR"] = str(corpus["markers"])
    try:
        found = recorded_imports_of(paths)
    finally:
        if env_marker is None:
            del os.environ["HOLDOUT_MARKER_DIR"]
        else:
            os.environ["HOLDOUT_MARKER_DIR"] = env_marker
    oracle = {Path(path).name: report for path, report in found.items()}

    def check(entry: dict[str, Any], result: dict[str, Any]) -> str | None:
        found = oracle[entry["name"]]
        outside = [g for g in found.get("imports", []) if verdict_of(g) != "safe"]
        if outside and result["scan"] != "dangerous":
            return f"CPython imports {outside}, scan says {result['scan']}"
        return None

    assert _failures(corpus, check) == []
    assert sorted(os.listdir(corpus["markers"])) == []
    imported = sum(1 for found in oracle.values() if found.get("imports"))
    assert imported >= 100  # the oracle really sees the payloads' imports
