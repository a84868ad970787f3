"""Why a resumed run diverged: rules over what the managers recorded and what differs.

Each save of a checked run records the digests of the global random generators, what
kind of object each state entry is, and (once per process) the data loaders and the
schedulers/optimizers alive outside the state (:mod:`torchkeep.manager.check_hooks`).
The rules below read those facts at the first step that differs, most specific first.
"""

from __future__ import annotations

import re
from typing import Any

from torchkeep.testing.compare import StepComparison
from torchkeep.testing.report import Cause
from torchkeep.testing.runner import Run

__all__ = ["diagnose", "nondeterministic"]

_LR = re.compile(r"(^|/)param_groups/\d+/(lr|initial_lr)$")


def nondeterministic(step: int, other: str, first: StepComparison) -> Cause:
    """The cause when two uninterrupted runs already differ."""
    entry = first.differences[0].describe() if first.differences else "the metrics"
    return Cause("nondeterministic", (
        f"{other} differs from run A at step {step} ({entry}) without any resume: the "
        "script is not deterministic, so its resume cannot be judged; turn on "
        "torch.use_deterministic_algorithms(True), seed every generator at the start, and "
        "keep time, process ids and thread scheduling out of training"))


def diagnose(first: StepComparison, *, a: Run, b: Run, twice: bool) -> list[Cause]:
    """The likely causes of ``first`` (a step after the resume), best first."""
    facts_a, facts_b = a.facts(first.step), b.facts(first.step)
    kinds = {name: entry.get("kind") for name, entry in facts_b.get("state", {}).items()}
    scan = b.first_facts() or a.first_facts()
    rng_a, rng_b = facts_a.get("rng", {}), facts_b.get("rng", {})
    rng_differs = [name for name in rng_a if name in rng_b and rng_a[name] != rng_b[name]]
    causes: list[Cause] = []

    lr_paths = [d for d in first.differences
                if _LR.search(d.path) or kinds.get(d.path.split("/", 1)[0]) == "scheduler"]
    outside = [o for o in scan.get("outside_state", []) if o.get("kind") == "scheduler"]
    if outside:
        names = ", ".join(sorted({o["class"].rsplit(".", 1)[-1] for o in outside}))
        causes.append(Cause("lr-schedule", (
            f"a {names} is alive but not in the state: after the resume its schedule starts "
            "over (create the scheduler before restore and put it in the state beside its "
            "optimizer)")))
    elif lr_paths:
        causes.append(Cause("lr-schedule", (
            f"the learning rate differs after the resume ({lr_paths[0].describe()}): the "
            "scheduler and its optimizer were restored out of order, or one was created "
            "after the restore and overwrote the other's learning rate; create both first, "
            "put both in the state and restore once")))

    optimizers = [o for o in scan.get("outside_state", []) if o.get("kind") == "optimizer"]
    if optimizers:
        names = ", ".join(sorted({o["class"].rsplit(".", 1)[-1] for o in optimizers}))
        causes.append(Cause("optimizer-missing", (
            f"a {names} optimizer is alive but not in the state: after the resume its "
            "moments and step counts start over; put it in the state")))

    if "rng" not in kinds.values() and rng_differs:
        causes.append(Cause("rng-missing", (
            "state saved without torchkeep.RNGState(); random draws (dropout, augmentation, "
            f"shuffling) differ after resume ({', '.join(rng_differs)} generator "
            f"{'state differs' if len(rng_differs) == 1 else 'states differ'} "
            f"at step {first.step})")))

    for loader in scan.get("loaders", []):
        cause = _loader_cause(loader)
        if cause is not None:
            causes.append(cause)
            break

    if "rng" in kinds.values() and rng_differs and not any(
            c.code in ("data-loader", "worker-seeds") for c in causes):
        causes.append(Cause("rng-drawn", (
            f"RNGState is restored, yet the {', '.join(rng_differs)} generator differs at "
            f"step {first.step}: something draws from it between the restore and the step "
            "differently than the uninterrupted run (a new DataLoader iterator without its "
            "own generator draws a seed; objects built after the restore draw their init)")))

    if not causes:
        hint = "" if twice else " (run with --twice to rule out nondeterminism)"
        entry = first.differences[0].describe() if first.differences else "a metric"
        causes.append(Cause("outside-state", (
            f"the random generators agree at step {first.step}, yet {entry} differs: a "
            "value that affects training is kept outside the state (a global, a module "
            "attribute that is not in state_dict, a counter, a list) and started over in "
            f"the new process; put it in the state{hint}")))
    return causes


def _loader_cause(loader: dict[str, Any]) -> Cause | None:
    workers = loader.get("num_workers", 0)
    name = f"DataLoader(num_workers={workers}) with {loader.get('sampler')}"
    resumable = loader.get("sampler_in_state") or loader.get("loader_in_state")
    if loader.get("shuffles") and not resumable:
        return Cause("data-loader", (
            f"{name} and no resumable sampler in the state: after the resume the epoch "
            "starts over, in a new order; use torchkeep.ResumableSampler (set_epoch, and "
            "set_consumed with workers) or torchdata's StatefulDataLoader, and put it in "
            "the state"))
    if workers and loader.get("sampler_in_state") and loader.get("consumed_recorded") is False:
        return Cause("data-loader", (
            f"{name}: the sampler's position was saved without set_consumed(), so it counts "
            "the batches the workers prefetched and the resumed run skips them"))
    if workers and not loader.get("loader_in_state"):
        return Cause("worker-seeds", (
            f"{name}: workers are seeded from a base seed drawn when an iterator starts, "
            "and the resumed run starts its iterator mid-epoch, so random augmentation "
            "inside workers differs; derive it from (seed, epoch, index) or checkpoint "
            "torchdata's StatefulDataLoader"))
    return None
