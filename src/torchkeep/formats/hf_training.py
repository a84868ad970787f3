"""A transformers ``Trainer`` ``checkpoint-N/`` folder, or an Accelerate ``save_state``
folder, read as one tree.

::

    checkpoint-500/                 Trainer(..., save_steps=500)
        model.safetensors           (or sharded, with its index)   -> "model"
        optimizer.pt                torch.save of the optimizer     -> "optimizer"
        scheduler.pt                                                -> "scheduler"
        rng_state.pth               (rng_state_N.pth per process)  -> "rng_state"
        training_args.bin           torch.save of TrainingArguments -> "training_args"
        trainer_state.json                                          -> "trainer_state"

    state/                          accelerator.save_state("state")
        model.safetensors, model_1.safetensors ...                  -> "model", "model_1"
        optimizer.bin, scheduler.bin, sampler.bin ...               -> by file name
        random_states_0.pkl ...                                     -> "random_states_0"

Every pickled part goes through the restricted interpreter. ``training_args.bin`` pickles
transformers' ``TrainingArguments`` and the enums and Accelerate objects it holds: those
names (:data:`TRANSFORMERS_RECORDS`) are admitted as inert ``PickledObject`` records
(their fields readable, nothing imported or called); any other global is refused with
UnsafeCheckpointError naming it and the file.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any

from torchkeep.errors import CorruptCheckpointError
from torchkeep.formats.hf_folder import (
    INDEX_SUFFIX,
    closed_on_failure,
    read_hf_index,
    rekeyed,
    shard_names,
    weights_name,
)
from torchkeep.formats.parsed import Parsed, Record
from torchkeep.limits import DEFAULT_LIMITS, Limits
from torchkeep.storage.filesystem import FileSystem
from torchkeep.storage.source import Source
from torchkeep.unpickle import Allowlist

__all__ = ["TRANSFORMERS_RECORDS", "is_training_folder", "read_training_folder",
           "training_files"]

#: What ``training_args.bin`` names, admitted as inert records (transformers 4.x-5.x,
#: Accelerate 1.x).
TRANSFORMERS_RECORDS: tuple[str, ...] = (
    "transformers.training_args.TrainingArguments",
    "transformers.training_args.OptimizerNames",
    "transformers.training_args_seq2seq.Seq2SeqTrainingArguments",
    "transformers.trainer_utils.SchedulerType",
    "transformers.trainer_utils.IntervalStrategy",
    "transformers.trainer_utils.SaveStrategy",
    "transformers.trainer_utils.HubStrategy",
    "transformers.trainer_utils.FSDPOption",
    "transformers.trainer_pt_utils.AcceleratorConfig",
    "transformers.debug_utils.DebugOption",
    "accelerate.state.PartialState",
    "accelerate.utils.dataclasses.DistributedType",
)

_PARTS = re.compile(r"(.+)\.(pt|pth|bin|pkl|safetensors)\Z")
_ACCELERATE = re.compile(r"(random_states_\d+\.pkl|optimizer(_\d+)?\.bin)\Z")
_TRAINER_STATE = "trainer_state.json"


def is_training_folder(names: Iterable[str]) -> bool:
    """True for the file names of a Trainer checkpoint or an Accelerate state folder."""
    return any(n == _TRAINER_STATE or _ACCELERATE.match(n) for n in names)


def training_files(fs: FileSystem, directory: str,
                   names: list[str] | None = None) -> dict[str, list[str]]:
    """Part name -> the files that hold it (a sharded model: its index, then its shards);
    ``names`` is the folder's listing when the caller has it."""
    if names is None:
        names = fs.listdir(directory)
    parts: dict[str, list[str]] = {}
    used: set[str] = set()
    model = weights_name(names)
    if model is not None:
        weights = fs.join(directory, model)
        files = [weights]
        if weights.endswith(INDEX_SUFFIX):
            files += [fs.join(directory, shard) for shard in shard_names(fs, weights)]
        parts["model"] = files
        used.update(f.rsplit("/", 1)[-1] for f in files)
    for name in names:
        match = _PARTS.match(name)
        if match is None or name in used or name.endswith(INDEX_SUFFIX):
            continue
        part = match.group(1)
        if part in parts:
            raise CorruptCheckpointError(f"two files hold {part!r}: {name} and another")
        parts[part] = [fs.join(directory, name)]
    if _TRAINER_STATE in names:
        parts["trainer_state"] = [fs.join(directory, _TRAINER_STATE)]
    return parts


def read_training_folder(fs: FileSystem, directory: str, *,
                         allowlist: Allowlist | None = None,
                         limits: Limits = DEFAULT_LIMITS,
                         names: list[str] | None = None) -> Parsed:
    """Parse a Trainer or Accelerate folder into one tree (no tensor bytes read);
    ``names`` is its listing when the caller has it."""
    from torchkeep.api import parse_source

    allowlist = (allowlist or Allowlist()).extended(TRANSFORMERS_RECORDS)
    tree: dict[str, Any] = {}
    records: dict[str, Record] = {}
    sources: list[Source] = []
    parsed_parts: list[Parsed] = []
    with closed_on_failure(sources, directory):
        for part, files in training_files(fs, directory, names).items():
            first = files[0]
            if part == "trainer_state":
                try:
                    tree[part] = json.loads(fs.read_bytes(first))
                except (ValueError, UnicodeDecodeError) as e:
                    raise CorruptCheckpointError(f"{_TRAINER_STATE} is not JSON: {e}") \
                        from None
                continue
            if first.endswith(INDEX_SUFFIX):
                parsed = read_hf_index(fs, first, allowlist=allowlist, limits=limits)
                sources.append(parsed.source)
            else:
                sources.append(fs.source(first))
                parsed = parse_source(sources[-1], allowlist=allowlist, limits=limits)
            parsed_parts.append(parsed)
            sources += parsed.extra_sources
            tree[part], part_records = rekeyed(parsed, f"{part}:", limits)
            records.update(part_records)
        if "model" not in tree and not any(k.startswith("model_") for k in tree):
            raise CorruptCheckpointError("the folder holds no model weights")
        orders = {p.byteorder for p in parsed_parts}
        if len(orders) > 1:
            raise CorruptCheckpointError("the files store their bytes in different byte "
                                         "orders")
        # the folder itself, as the name errors and reports give; every record has its own
        folder = Source(name=fs.describe(directory), size=0, buffer=memoryview(b""))
        kind = "transformers Trainer" if "trainer_state" in tree else "Accelerate"
        return Parsed("hf-training", tree, folder, records,
                      byteorder=orders.pop() if orders else "little",
                      info={"kind": kind, "parts": ", ".join(tree)},
                      extra_sources=sources)
