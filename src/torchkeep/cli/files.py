"""The file commands: inspect, diff, convert, scan, verify (none of them imports torch)."""

from __future__ import annotations

import os
from typing import Any

import click

from torchkeep.cli.render import echo_json, human_bytes, progress, shape_text

__all__ = ["convert_command", "diff_command", "inspect_command", "scan_command",
           "verify_command"]


def _size_of(path: str) -> int:
    if "://" in path:
        return 0  # a URL: progress without a total
    try:
        if os.path.isdir(path):
            return sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path))
        return os.path.getsize(path)
    except OSError:
        return 0


# -- inspect ---------------------------------------------------------------------------


@click.command("inspect")
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="Print the documented JSON shape.")
@click.option("--depth", type=click.IntRange(min=1), default=None,
              help="Summarise the tree below this depth.")
def inspect_command(path: str, as_json: bool, depth: int | None) -> None:
    """What a checkpoint holds, from its metadata alone: format, writer facts, every
    tensor's dtype, shape and size, every other value, totals by dtype."""
    from torchkeep.summary import inspect

    report = inspect(path)
    if as_json:
        echo_json(report.to_json())
        return
    writer = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in report.writer.items()
                       if k in _WRITER_FACTS and v not in (None, 0, ""))
    metadata = {k: v for k, v in report.writer.get("metadata", {}).items() if k != "torchkeep"}
    if metadata:
        writer += (", " if writer else "") + "metadata " + ", ".join(
            f"{k}={v[:40]}" for k, v in metadata.items())
    click.echo(f"{report.path}")
    click.echo(f"  format   {report.format}" + (f" ({writer})" if writer else ""))
    click.echo(f"  tensors  {len(report.tensors):,}, {report.parameters:,} elements, "
               f"{human_bytes(report.total_bytes)}")
    collapse: frozenset[str] = frozenset()
    if report.lightning is not None:
        click.echo(_lightning_line(report.lightning))
        if depth is None:  # Lightning's loop progress and callback states: one line each
            collapse = frozenset({"loops", "callbacks"})
    click.echo("")
    _print_tree(report, depth, collapse)
    click.echo("")
    click.echo("by dtype")
    for dtype, row in report.by_dtype().items():
        click.echo(f"  {dtype:<18} {row['tensors']:>6,} tensors {row['elements']:>16,} elements "
                   f"{human_bytes(row['bytes']):>12}")


_WRITER_FACTS = ("archive_name", "version", "format_version", "storage_alignment", "byteorder",
                 "compressed_records", "step", "created", "torch_version", "torchkeep_version",
                 "writer", "header_bytes", "shards", "shard_format", "kind")


def _lightning_line(facts: dict[str, Any]) -> str:
    parts = [f"epoch {facts['epoch']}, global step {facts['global_step']}",
             f"{facts['state_dict_tensors']} tensors in state_dict",
             f"{facts['optimizers']} optimizer(s), {facts['lr_schedulers']} lr scheduler(s)"]
    if facts["callbacks"]:
        parts.append("callbacks " + ", ".join(name.split("{")[0] for name in facts["callbacks"]))
    return f"  lightning {facts['version']}: " + "; ".join(parts)


def _print_tree(report: Any, depth: int | None,
                collapse: frozenset[str] = frozenset()) -> None:
    """The tree, one line a leaf; below ``depth`` (and below the top-level keys in
    ``collapse``) a sub-tree is one line of counts."""
    entries = report.entries

    def cut(path: tuple[Any, ...]) -> int | None:
        return 1 if path and path[0] in collapse else depth

    previous: tuple[Any, ...] = ()
    i = 0
    while i < len(entries):
        entry = entries[i]
        path = entry.path
        level = cut(path)
        if level is not None and len(path) > level:
            prefix = path[:level]
            tensors = nbytes = values = 0
            while i < len(entries) and len(entries[i].path) > level and \
                    entries[i].path[:level] == prefix:
                if hasattr(entries[i], "nbytes"):
                    tensors += 1
                    nbytes += entries[i].nbytes
                else:
                    values += 1
                i += 1
            _headers(previous, prefix[:-1])
            previous = prefix[:-1]
            label = f"{'  ' * (len(prefix) - 1)}{prefix[-1]}/"
            click.echo(f"{label:<48} ({tensors} tensors, {human_bytes(nbytes)}; {values} values)")
            continue
        _headers(previous, path[:-1])
        previous = path[:-1]
        label = f"{'  ' * max(len(path) - 1, 0)}{path[-1] if path else '(root)'}"
        if hasattr(entry, "nbytes"):
            flags = " requires_grad" if entry.requires_grad else ""
            click.echo(f"{label:<48} {entry.dtype:<14} {shape_text(entry.shape):<22} "
                       f"{human_bytes(entry.nbytes):>10}{flags}")
        else:
            click.echo(f"{label:<48} {entry.repr}")
        i += 1


def _headers(previous: tuple[Any, ...], current: tuple[Any, ...]) -> None:
    common = 0
    while common < min(len(previous), len(current)) and previous[common] == current[common]:
        common += 1
    for level in range(common, len(current)):
        click.echo(f"{'  ' * level}{current[level]}/")


# -- diff --------------------------------------------------------------------------------


@click.command("diff")
@click.argument("a")
@click.argument("b")
@click.option("--atol", type=float, default=0.0, show_default=True,
              help="Absolute tolerance for tensor values.")
@click.option("--rtol", type=float, default=0.0, show_default=True,
              help="Relative tolerance (times |B|).")
@click.option("--json", "as_json", is_flag=True, help="Print the documented JSON shape.")
def diff_command(a: str, b: str, atol: float, rtol: float, as_json: bool) -> None:
    """Compare two checkpoints of any formats; exit 0 when equal, 1 when different."""
    from torchkeep.comparison import compare

    with progress(_size_of(a) + _size_of(b), "diff") as advance:
        result = compare(a, b, atol=atol, rtol=rtol, progress=advance)
    if as_json:
        echo_json(result.to_json())
    else:
        _print_diff(result)
    if not result.equal:
        raise SystemExit(1)


def _print_diff(result: Any) -> None:
    if result.equal:
        click.echo(f"equal: {result.compared_tensors} tensors and {result.compared_values} "
                   "values match")
        return
    for name in result.only_in_a:
        click.echo(f"only in A   {name}")
    for name in result.only_in_b:
        click.echo(f"only in B   {name}")
    for change in result.changed:
        click.echo(f"{change['what']:<11} {change['name']}: {change['a']} -> {change['b']}")
    for t in result.tensors:
        amount = "bits differ" if t.max_abs_diff is None else f"max |a-b| {t.max_abs_diff:.6g}"
        click.echo(f"values      {t.name}: {amount}, {t.mismatched:,} elements differ")
    for v in result.values:
        click.echo(f"value       {v['name']}: {v['a']} -> {v['b']}")
    click.echo(f"different ({result.compared_tensors} tensors, {result.compared_values} values "
               "compared)")


# -- convert -----------------------------------------------------------------------------


@click.command("convert")
@click.argument("src")
@click.argument("dst")
@click.option("--to", "to", type=click.Choice(["torch", "torch-legacy", "safetensors", "dcp"]),
              default=None, help="Output format (default: from DST's suffix); dcp writes "
              "a torch.distributed.checkpoint directory (needs torch).")
@click.option("--select", "select_key", default=None,
              help="Keep only this sub-tree, e.g. model_state_dict (a/b for nested keys).")
@click.option("--dtype", default=None, help="Cast floating tensors, e.g. bfloat16.")
@click.option("--max-shard-size", default=None,
              help="Write Hugging Face style shards of at most this size (5GB, 500MiB).")
@click.option("--json", "as_json", is_flag=True, help="Print what was written as JSON.")
def convert_command(src: str, dst: str, to: str | None, select_key: str | None,
                    dtype: str | None, max_shard_size: str | None, as_json: bool) -> None:
    """Convert any readable checkpoint to torch, torch-legacy, safetensors or dcp."""
    from torchkeep.conversion import convert, parse_size

    if to == "dcp":
        if select_key or dtype or max_shard_size:
            raise click.UsageError("--to dcp takes no --select, --dtype or --max-shard-size")
        from torchkeep.distributed.export import export_dcp

        counts = export_dcp(src, dst)
        if as_json:
            echo_json({"directory": dst, **counts})
        else:
            click.echo(f"wrote {dst} (a DCP directory: {counts['tensors']} tensors, "
                       f"{counts['values']} values)")
        return

    try:
        shard_bytes = parse_size(max_shard_size) if max_shard_size else None
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--max-shard-size") from None
    try:
        with progress(_size_of(src), "convert") as advance:
            result = convert(src, dst, to=to, select_key=select_key, dtype=dtype,
                             max_shard_bytes=shard_bytes, progress=advance)
    except KeyError as e:
        raise click.BadParameter(str(e.args[0]), param_hint="--select") from None
    if as_json:
        echo_json({"files": result.files, "index": result.index, "tensors": result.tensors,
                   "bytes": result.bytes, "cast": result.cast})
        return
    for path in result.files:
        size = f" ({human_bytes(os.path.getsize(path))})" if "://" not in path else ""
        click.echo(f"wrote {path}{size}")
    if result.index:
        click.echo(f"wrote {result.index}")
    cast = f", {result.cast} cast to {dtype}" if result.cast else ""
    click.echo(f"{result.tensors} tensors{cast}")


# -- scan --------------------------------------------------------------------------------


@click.command("scan")
@click.argument("paths", nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True, help="Print one report per file as JSON.")
def scan_command(paths: tuple[str, ...], as_json: bool) -> None:
    """List every global the pickles in PATHS would import, without running anything.

    Exit 0 when every file is clean, 1 when something is unsafe or unknown, 3 when a file
    could not be read, is in no format torchkeep recognises, or could not be scanned
    completely (nothing is ever called clean that was not understood).
    """
    from torchkeep.errors import TorchkeepError
    from torchkeep.scanning import ScanReport, scan

    reports: list[ScanReport] = []
    unreadable: list[tuple[str, str]] = []
    for path in paths:
        try:
            reports.append(scan(path))
        except TorchkeepError as e:
            unreadable.append((path, str(e)))
    if as_json:
        echo_json([
            *({"path": r.path, "format": r.format, "verdict": r.verdict, "clean": r.clean,
               "pickles": r.pickles, "errors": r.errors,
               "globals": [{"name": f.name, "verdict": f.verdict, "opcode": f.opcode,
                            "location": f.location, "offset": f.offset, "detail": f.detail}
                           for f in r.findings]}
              for r in reports),
            *({"path": p, "error": message} for p, message in unreadable),
        ])
    else:
        for r in reports:
            _print_scan(r)
        for _, message in unreadable:
            click.echo(f"torchkeep: error: {message}", err=True)
    if any(r.verdict == "dangerous" for r in reports):
        raise SystemExit(1)
    if unreadable or any(r.verdict != "clean" for r in reports):
        raise SystemExit(3)


def _print_scan(r: Any) -> None:
    pickles = _plural(r.pickles, "pickle")
    if r.clean:
        names = {f.name for f in r.findings}
        click.echo(f"{r.path}: clean ({r.format}, {pickles}, "
                   f"{_plural(len(names), 'distinct global')}, all allowed)")
        return
    if r.flagged:
        click.echo(f"{r.path}: {_plural(len(r.flagged), 'finding')} ({r.format}, {pickles})")
    elif r.format in ("unrecognised", "empty"):
        what = "the file is empty" if r.format == "empty" else "in no format torchkeep knows"
        click.echo(f"{r.path}: not vouched for: {what} ({pickles} found by a sweep of its "
                   "bytes)")
    else:
        click.echo(f"{r.path}: incomplete ({r.format}, {pickles}): not every part could be "
                   "scanned; nothing flagged in what could")
    groups: dict[tuple[str, str], list[Any]] = {}
    for f in r.flagged:
        groups.setdefault((f.verdict, f.name), []).append(f)
    for (verdict, name), found in groups.items():
        f = found[0]
        more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
        detail = f"  {f.detail}" if f.detail else ""
        click.echo(f"  {verdict:<8} {name:<44} {f.opcode} at {f.location} "
                   f"offset {f.offset}{more}{detail}")
    for error in r.errors:
        click.echo(f"  incomplete: {error}")


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


# -- verify ------------------------------------------------------------------------------


@click.command("verify")
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def verify_command(path: str, as_json: bool) -> None:
    """Check every checksum a checkpoint carries (zip CRC-32s, manifest checksums) and its
    structure; exit 0 when intact, 1 when corrupt (naming the first bad record or tensor).
    """
    from torchkeep.verification import verify

    with progress(_size_of(path), "verify") as advance:
        result = verify(path, progress=advance)
    if as_json:
        echo_json({"path": result.path, "format": result.format, "intact": result.intact,
                   "problem": result.problem, "checked": result.checked,
                   "checked_bytes": result.checked_bytes, "unchecked": result.unchecked,
                   "notes": result.notes})
    elif result.intact:
        what = (f"{result.checked} checksums over {human_bytes(result.checked_bytes)} match"
                if result.checked else "structure sound")
        click.echo(f"{result.path}: intact ({result.format}; {what})")
        for note in result.notes:
            click.echo(f"  note: {note}")
    else:
        click.echo(f"{result.path}: CORRUPT: {result.problem}")
    if not result.intact:
        raise SystemExit(1)
