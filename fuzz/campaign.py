"""Run the fuzz targets (``make fuzz``: each for a set time; the long campaign: a set
number of executions each) and report what they did.

    python fuzz/campaign.py [--seconds S | --runs N] [--targets a,b] [--jobs J]

Each target starts from its saved corpus (``fuzz/corpus/<target>/``, committed) and fresh
seeds (``fuzz/seeds.py``), under ``fuzz/run.py`` with libFuzzer's ``-timeout=1`` (an input
running over a second is a hang; 3 s for ``scan``, see TIMEOUTS) and a 3 GiB RSS limit.
An input that makes a target fail
is written to ``tests/fuzz_regressions/<target>/``, which the tests replay. New coverage
is merged back into the saved corpus (``--save``). Per-target results (executions,
coverage, findings) go to ``fuzz/results/<target>.json`` and a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from seeds import write_seeds  # noqa: E402
from targets import TARGETS  # noqa: E402

FLAGS = ["-rss_limit_mb=3072", "-max_len=65536", "-print_final_stats=1"]
#: an input running longer than this many seconds is a hang. scan walks every opcode of
#: every pickle it finds in any bytes, linear in the input (0.033 / 0.093 / 0.379 s for
#: 42 / 167 / 669 KB uninstrumented, measured); under atheris' coverage instrumentation a
#: 42 KB input took 0.41 s on a quiet machine and over 1 s on a loaded one
TIMEOUTS = {"scan": 3}


def _stats(log: str) -> dict[str, object]:
    found = dict(re.findall(r"stat::(\w+):\s+(\d+)", log))
    progress = re.findall(r"#\d+\s+\w+\s+cov: (\d+) ft: (\d+) corp: (\d+)", log)
    cov, features, corpus = progress[-1] if progress else ("0", "0", "0")
    finding = re.search(r"(==\d+== ERROR: libFuzzer: [^\n]+|^Finding: [^\n]+|"
                        r"^\w+Error: [^\n]+)", log, re.M)
    return {"executions": int(found.get("number_of_executed_units", 0)),
            "exec_per_s": int(found.get("average_exec_per_sec", 0)),
            "peak_rss_mb": int(found.get("peak_rss_mb", 0)),
            "coverage_edges": int(cov), "features": int(features), "corpus": int(corpus),
            "finding": finding.group(0) if finding else None}


#: libFuzzer dictionaries: tokens the mutator splices in (deep JSON, pickle opcodes)
DICTS = {"safetensors": "json.dict", "manifest": "json.dict", "pickle": "pickle.dict",
         "differential": "pickle.dict", "zip": "pickle.dict", "legacy": "pickle.dict",
         "scan": "pickle.dict", "load": "pickle.dict"}


def run_target(name: str, seeds: Path, work: Path, limit: list[str], save: bool) -> dict:
    corpus = work / "corpus" / name
    corpus.mkdir(parents=True, exist_ok=True)
    saved = HERE / "corpus" / name
    if saved.is_dir():
        for path in saved.iterdir():
            shutil.copy(path, corpus / path.name)
    artifacts = ROOT / "tests" / "fuzz_regressions" / name
    artifacts.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, str(HERE / "run.py"), name, f"-timeout={TIMEOUTS.get(name, 1)}",
         *FLAGS, *limit,
         f"-dict={HERE / 'dicts' / DICTS[name]}", f"-artifact_prefix={artifacts}/",
         str(corpus), str(seeds / name)],
        capture_output=True, text=True, check=False)
    log = done.stdout + done.stderr
    (work / f"{name}.log").write_text(log)
    result = {"target": name, "seconds": round(time.monotonic() - started, 1),
              "returncode": done.returncode, **_stats(log)}
    if save and done.returncode == 0:
        merged = work / "merged" / name
        merged.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, str(HERE / "run.py"), name, "-merge=1", *FLAGS,
                        str(merged), str(saved) if saved.is_dir() else str(merged),
                        str(corpus)], capture_output=True, check=False)
        if any(merged.iterdir()):
            shutil.rmtree(saved, ignore_errors=True)
            shutil.copytree(merged, saved)
        result["saved_corpus"] = len(list(saved.iterdir())) if saved.is_dir() else 0
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=1))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    limit = parser.add_mutually_exclusive_group()
    limit.add_argument("--seconds", type=int, default=60, help="time per target")
    limit.add_argument("--runs", type=int, help="executions per target (the campaign)")
    parser.add_argument("--targets", default=",".join(TARGETS))
    parser.add_argument("--jobs", type=int, default=1, help="targets run at once")
    parser.add_argument("--save", action="store_true",
                        help="merge new coverage into fuzz/corpus/")
    args = parser.parse_args()
    names = [n for n in args.targets.split(",") if n]
    unknown = set(names) - set(TARGETS)
    if unknown:
        parser.error(f"unknown targets: {', '.join(sorted(unknown))}")
    flags = [f"-runs={args.runs}"] if args.runs else [f"-max_total_time={args.seconds}"]
    with tempfile.TemporaryDirectory(prefix="torchkeep-fuzz-") as tmp:
        work = Path(tmp)
        write_seeds(work / "seeds")
        with ThreadPoolExecutor(args.jobs) as pool:
            results = list(pool.map(
                lambda n: run_target(n, work / "seeds", work, flags, args.save), names))
        for result in results:
            if result["returncode"] != 0:
                log = (work / f"{result['target']}.log").read_text()
                print(f"--- {result['target']} (exit {result['returncode']}) ---\n"
                      f"{log[-3000:]}", file=sys.stderr)
    print(f"{'target':<13} {'executions':>12} {'exec/s':>8} {'edges':>6} {'seconds':>8}  "
          "finding")
    for r in results:
        print(f"{r['target']:<13} {r['executions']:>12,} {r['exec_per_s']:>8,} "
              f"{r['coverage_edges']:>6} {r['seconds']:>8}  {r['finding'] or '-'}")
    if any(r["returncode"] != 0 for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
