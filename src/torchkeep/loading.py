"""``torchkeep.load_into``: load weights into a slightly different model, and say what happened."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from torchkeep.api import load
from torchkeep.errors import TorchkeepError

__all__ = ["WRAPPER_PREFIXES", "LoadReport", "PartialLoadError", "load_into"]

#: Module-path segments added by wrappers (DataParallel/DDP, torch.compile, FSDP,
#: activation checkpointing); removed when they are the only difference.
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "_fsdp_wrapped_module.",
                    "_checkpoint_wrapped_module.")
_NESTED_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "network")


class PartialLoadError(TorchkeepError, ValueError):
    """``load_into`` refused a load that would leave the model mostly as it was."""

    exit_code = 1

    def __init__(self, message: str, report: LoadReport) -> None:
        self.report = report
        super().__init__(message)


@dataclass(slots=True)
class LoadReport:
    """What ``load_into`` did: loaded, missing, unexpected, mismatched and cast entries."""

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    shape_mismatch: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(
        default_factory=list)
    cast: list[tuple[str, str, str]] = field(default_factory=list)
    renamed: dict[str, str] = field(default_factory=dict)  # checkpoint key -> model key
    source_key: str | None = None
    loaded_fraction: float = 0.0

    @property
    def complete(self) -> bool:
        """True when every model entry was loaded and nothing was left over."""
        return not (self.missing or self.unexpected or self.shape_mismatch)

    def __str__(self) -> str:
        rows = [("loaded", f"{len(self.loaded)} tensors "
                 f"({self.loaded_fraction:.0%} of the model's elements)")]
        if self.source_key:
            rows.append(("state dict", f"taken from checkpoint[{self.source_key!r}]"))
        if self.renamed:
            sample = next(iter(self.renamed.items()))
            rows.append(("renamed", f"{len(self.renamed)} keys (wrapper prefixes), "
                                    f"e.g. {sample[0]} -> {sample[1]}"))
        rows += [("missing", name) for name in self.missing]
        rows += [("unexpected", name) for name in self.unexpected]
        rows += [("shape mismatch", f"{n}: checkpoint {list(a)} vs model {list(b)}")
                 for n, a, b in self.shape_mismatch]
        rows += [("dtype cast", f"{n}: {a} -> {b}") for n, a, b in self.cast]
        width = max(len(r[0]) for r in rows)
        return "\n".join(f"{label:<{width}}  {text}" for label, text in rows)


def _strip(key: str) -> str:
    parts = list(key.split("."))
    kept = [p for p in parts if f"{p}." not in WRAPPER_PREFIXES]
    return ".".join(kept)


def _find_state_dict(obj: Any) -> tuple[Mapping[str, Any], str | None]:
    if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj, None
    if isinstance(obj, Mapping):
        for key in _NESTED_KEYS:
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(
                    isinstance(v, torch.Tensor) for v in inner.values()):
                return inner, key
    raise TypeError("the source is not a state dict (a mapping of names to tensors), and "
                    f"holds none under {', '.join(_NESTED_KEYS)}")


def load_into(
    module: torch.nn.Module,
    source: str | os.PathLike[str] | Mapping[str, Any],
    *,
    strict: bool = True,
    allow_partial: bool = False,
    map_location: Any = "cpu",
) -> LoadReport:
    """Load ``source`` (a checkpoint path or a state dict) into ``module``.

    Wrapper prefixes (``module.``, ``_orig_mod.``, ``_fsdp_wrapped_module.``,
    ``_checkpoint_wrapped_module.``) are normalised when they are the only difference.
    Tensors of another dtype are cast; entries whose shapes differ are not loaded. With
    ``strict`` any missing, unexpected or mismatched entry raises ``PartialLoadError``
    (nothing is loaded). Without it, matching entries load, but a load that would leave
    most of the model's elements untouched still raises unless ``allow_partial``.
    The returned LoadReport prints as a table.
    """
    obj = source if isinstance(source, Mapping) else load(source, map_location=map_location)
    state, source_key = _find_state_dict(obj)
    target = module.state_dict()
    report = LoadReport(source_key=source_key)
    mapping = {k: k for k in state if k in target}
    matched = set(mapping)  # the model keys some source key already fills
    if len(mapping) < len(target):
        by_stripped = {_strip(k): k for k in target}
        for key in state:
            if key in mapping:
                continue
            model_key = by_stripped.get(_strip(key))
            if model_key is not None and model_key not in matched:
                mapping[key] = model_key
                matched.add(model_key)
                report.renamed[key] = model_key
    report.unexpected = [k for k in state if k not in mapping]
    report.missing = [k for k in target if k not in matched]
    to_load: dict[str, torch.Tensor] = {}
    for key, model_key in mapping.items():
        value, current = state[key], target[model_key]
        if tuple(value.shape) != tuple(current.shape):
            report.shape_mismatch.append((key, tuple(value.shape), tuple(current.shape)))
            report.missing.append(model_key)
            continue
        if value.dtype != current.dtype:
            report.cast.append((key, str(value.dtype).removeprefix("torch."),
                                str(current.dtype).removeprefix("torch.")))
        to_load[model_key] = value
    report.loaded = list(to_load)
    total = sum(t.numel() for t in target.values()) or 1
    report.loaded_fraction = sum(target[k].numel() for k in to_load) / total
    if strict and not report.complete:
        raise PartialLoadError(f"the checkpoint does not match the model:\n{report}", report)
    if report.loaded_fraction < 0.5 and not allow_partial:
        raise PartialLoadError(
            f"this load would leave {1 - report.loaded_fraction:.0%} of the model's elements "
            f"untouched (pass allow_partial=True if that is intended):\n{report}", report)
    result = module.load_state_dict(to_load, strict=False)
    leftover = list(result.unexpected_keys)
    if leftover:  # pragma: no cover - the keys come from module.state_dict() itself
        raise PartialLoadError(f"unexpected keys while loading: {leftover}", report)
    return report
