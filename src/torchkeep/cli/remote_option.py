"""``--storage-option KEY=VALUE`` (repeatable) for every command that takes paths."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from typing import Any

import click

__all__ = ["parse_storage_options", "with_storage_options"]


def parse_storage_options(pairs: tuple[str, ...]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs as fsspec storage options. A VALUE that is JSON (``true``,
    ``3``, ``{"a": 1}``) is decoded, anything else is a string; a dotted KEY nests
    (``client_kwargs.region_name=eu-west-1``)."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{pair!r} is not KEY=VALUE",
                                     param_hint="--storage-option")
        try:
            value: Any = json.loads(text)
        except ValueError:
            value = text
        node = options
        *parents, leaf = key.split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise click.BadParameter(f"{key!r} sets inside a non-dict value",
                                         param_hint="--storage-option")
            node = child
        node[leaf] = value
    return options


def with_storage_options(command: click.Command) -> click.Command:
    """Add ``--storage-option`` to ``command``: its options reach every URL it opens."""
    from torchkeep.storage.remote import storage_options

    callback: Callable[..., Any] | None = command.callback
    assert callback is not None

    @functools.wraps(callback)
    def run(*args: Any, storage_option: tuple[str, ...] = (), **kwargs: Any) -> Any:
        with storage_options(parse_storage_options(storage_option)):
            return callback(*args, **kwargs)

    command.callback = run
    command.params.append(click.Option(
        ["--storage-option", "storage_option"], multiple=True, metavar="KEY=VALUE",
        help="An fsspec storage option for URLs (s3://...), repeatable; e.g. "
             "endpoint_url=http://127.0.0.1:9000 or anon=true."))
    return command
