"""The manager's ``state`` dict as DCP state dicts, and back.

* Modules and the optimizers over their parameters go through
  ``torch.distributed.checkpoint.state_dict`` (FQN-keyed optimizer state; DTensor, FSDP2,
  DDP and TP parameters), so any world size can load them. An optimizer is paired with
  the module in ``state`` that holds all its parameters.
* ``RNGState``, ``ResumableSampler`` and ``PerRank(obj)`` are per-rank: each rank's value
  is saved under its own key (``__per_rank__/<rank>/<name>``), never deduplicated.
* Everything else is replicated (DCP keeps one copy): schedulers, scalers, plain values.
"""

from __future__ import annotations

import random
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from torchkeep.errors import UnsupportedTypeError
from torchkeep.manager.rng import RNGState
from torchkeep.manager.sampler import ResumableSampler

__all__ = ["PER_RANK", "ModelState", "PerRank", "Plan", "apply_state", "plan_state",
           "reshard_per_rank", "state_dict", "target"]

PER_RANK = "__per_rank__"


class PerRank:
    """Marks an object (or a value) in the manager's state as one rank's own: each rank
    saves its value and gets its own back. Restoring on another world size raises
    StateMismatchError for it (``RNGState`` is re-seeded instead, ``ResumableSampler``
    resharded)."""

    def __init__(self, obj: Any) -> None:
        self.obj = obj

    def state_dict(self) -> Any:
        """The wrapped object's state (or the value itself)."""
        method = getattr(self.obj, "state_dict", None)
        return method() if callable(method) else self.obj

    def load_state_dict(self, state: Any) -> None:
        """Give the wrapped object its state back (a plain value is replaced)."""
        method = getattr(self.obj, "load_state_dict", None)
        if callable(method):
            method(state)
        else:
            self.obj = state

    def __repr__(self) -> str:
        return f"PerRank({self.obj!r})"


class ModelState:
    """A module and the optimizers over its parameters, saved together through
    ``get_model_state_dict`` / ``get_optimizer_state_dict``: for when an optimizer's
    parameters span several modules of the state, so it cannot be paired automatically.
    ``state["train"] = ModelState(model, opt)`` saves ``{"model": ..., "optim": [...]}``."""

    def __init__(self, module: torch.nn.Module, *optimizers: torch.optim.Optimizer) -> None:
        if not isinstance(module, torch.nn.Module):
            raise TypeError("ModelState takes a module, then its optimizers")
        self.module = module
        self.optimizers = optimizers

    def __repr__(self) -> str:
        return f"ModelState({type(self.module).__name__}, {len(self.optimizers)} optimizers)"


def _per_rank(value: Any) -> bool:
    return isinstance(value, (PerRank, RNGState, ResumableSampler))


def _stateful(value: Any) -> bool:
    return callable(getattr(value, "state_dict", None)) and callable(
        getattr(value, "load_state_dict", None))


@dataclass
class Plan:
    """How ``state`` maps to one DCP state dict on this rank."""

    modules: dict[str, torch.nn.Module] = field(default_factory=dict)
    #: optimizer name -> the name of the module holding its parameters
    optimizers: dict[str, str] = field(default_factory=dict)
    per_rank: list[str] = field(default_factory=list)
    wrapped: list[str] = field(default_factory=list)  # ModelState entries
    stateful: list[str] = field(default_factory=list)
    plain: list[str] = field(default_factory=list)


def plan_state(state: dict[str, Any]) -> Plan:
    """Sort the entries of ``state``; pair each optimizer with its module."""
    if not isinstance(state, dict):
        raise TypeError("state must be a dict mapping names to objects or values")
    plan = Plan()
    optimizers = {}
    for name, value in state.items():
        if not isinstance(name, str) or "." in name or name == PER_RANK:
            raise TypeError(f"state names must be strings without '.', got {name!r}")
        if isinstance(value, torch.nn.Module):
            plan.modules[name] = value
        elif isinstance(value, torch.optim.Optimizer):
            optimizers[name] = value
        elif isinstance(value, ModelState):
            plan.wrapped.append(name)
        elif _per_rank(value):
            plan.per_rank.append(name)
        elif _stateful(value):
            plan.stateful.append(name)
        else:
            plan.plain.append(name)
    for name, opt in optimizers.items():
        params = {id(p) for group in opt.param_groups for p in group["params"]}
        owners = [m for m, module in plan.modules.items()
                  if params <= {id(p) for p in module.parameters()}]
        if not owners:
            raise UnsupportedTypeError(
                f"optimizer {name!r}: no module in the state holds all its parameters; "
                "put the model in the state next to it, or save both as "
                "torchkeep.ModelState(model, optimizer)")
        plan.optimizers[name] = owners[0]
    return plan


def state_dict(state: dict[str, Any], plan: Plan, rank: int) -> dict[str, Any]:
    """This rank's DCP state dict of ``state`` (tensors shared with the live objects)."""
    sd: dict[str, Any] = {}
    options = StateDictOptions()
    for name, module in plan.modules.items():
        sd[name] = get_model_state_dict(module, options=options)
    for name, owner in plan.optimizers.items():
        sd[name] = get_optimizer_state_dict(plan.modules[owner], state[name], options=options)
    for name in plan.wrapped:
        wrapped = state[name]
        sd[name] = {"model": get_model_state_dict(wrapped.module, options=options),
                    "optim": [get_optimizer_state_dict(wrapped.module, o, options=options)
                              for o in wrapped.optimizers]}
    for name in plan.stateful:
        sd[name] = state[name].state_dict()
    for name in plan.plain:
        sd[name] = state[name]
    mine = {name: _rng_plain(state[name].state_dict()) if isinstance(state[name], RNGState)
            else state[name].state_dict() for name in plan.per_rank}
    if mine:
        sd[PER_RANK] = {str(rank): mine}
    return sd


def _rng_plain(rng: dict[str, Any]) -> dict[str, Any]:
    """RNGState's state with the numpy state as a dict of plain parts (DCP flattens dicts,
    and its array goes into the JSON value)."""
    kind, keys, pos, has_gauss, cached = rng["numpy"]
    return {**rng, "numpy": {"kind": kind, "keys": np.asarray(keys, dtype=np.uint32),
                             "pos": int(pos), "has_gauss": int(has_gauss),
                             "cached": float(cached)}}


def _rng_back(rng: dict[str, Any]) -> dict[str, Any]:
    n = rng["numpy"]
    if isinstance(n, dict):
        rng = {**rng, "numpy": (n["kind"], n["keys"], n["pos"], n["has_gauss"], n["cached"])}
    return rng


def apply_state(state: dict[str, Any], plan: Plan, loaded: dict[str, Any], rank: int,
                saved_world: int | None, world: int, step: int,
                per_rank_saved: dict[str, dict[str, Any]] | None) -> None:
    """Put what ``dcp.load`` filled into ``loaded`` back into the live objects.

    ``per_rank_saved`` holds this rank's saved per-rank state (rank -> name -> state) at
    the saved world size, or every saved rank's when the world size changed; then it is
    resharded (samplers) or re-derived (RNG).
    """
    options = StateDictOptions()
    for name, module in plan.modules.items():
        set_model_state_dict(module, loaded[name], options=options)
    for name, owner in plan.optimizers.items():
        set_optimizer_state_dict(plan.modules[owner], state[name], loaded[name],
                                 options=options)
    for name in plan.wrapped:
        wrapped = state[name]
        set_model_state_dict(wrapped.module, loaded[name]["model"], options=options)
        for opt, osd in zip(wrapped.optimizers, loaded[name]["optim"], strict=True):
            set_optimizer_state_dict(wrapped.module, opt, osd, options=options)
    for name in plan.stateful:
        state[name].load_state_dict(loaded[name])
    for name in plan.plain:
        state[name] = loaded[name]
    if not plan.per_rank:
        return
    if saved_world == world:
        mine = (per_rank_saved or {})[str(rank)]
        for name in plan.per_rank:
            value = mine[name]
            state[name].load_state_dict(_rng_back(value) if isinstance(state[name], RNGState)
                                        else value)
        return
    for name, resharded in reshard_per_rank(state, plan, rank, saved_world, world,
                                            per_rank_saved).items():
        state[name].load_state_dict(resharded)
    for name in plan.per_rank:
        if isinstance(state[name], RNGState):
            seed = (step * 1_000_003 + rank) % 2**63
            random.seed(seed)
            np.random.seed(seed % 2**32)
            torch.manual_seed(seed)
            warnings.warn(f"{name!r}: saved on {saved_world} ranks, restored on {world}: "
                          f"the random streams are re-seeded from (step, rank), not resumed",
                          stacklevel=3)


def reshard_per_rank(state: dict[str, Any], plan: Plan, rank: int, saved_world: int | None,
                     world: int, saved: dict[str, dict[str, Any]] | None) -> dict[str, Any]:
    """The resharded sampler states for this rank when the world size changed; raises
    StateMismatchError (before anything is loaded) for per-rank state that cannot move."""
    from torchkeep.manager.manager import StateMismatchError

    result = {}
    for name in plan.per_rank:
        obj = state[name]
        if isinstance(obj, ResumableSampler):
            ranks = [v[name] for _, v in sorted((saved or {}).items(), key=lambda kv: int(kv[0]))
                     if name in v]
            try:
                result[name] = ResumableSampler.reshard(ranks, obj.rank, obj.world_size)
            except (ValueError, KeyError, TypeError) as e:
                raise StateMismatchError(f"sampler {name!r}: {e}") from None
        elif not isinstance(obj, RNGState):
            raise StateMismatchError(
                f"{name!r} is per-rank state saved on {saved_world} ranks; it cannot be "
                f"restored on {world} ranks")
    return result


def target(state: dict[str, Any], plan: Plan, rank: int) -> dict[str, Any]:
    """The state dict ``dcp.load`` fills: this rank's current state without the per-rank
    entries (each rank reads its own from the step directly)."""
    sd = state_dict(state, plan, rank)
    sd.pop(PER_RANK, None)
    return sd
