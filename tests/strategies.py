"""Hypothesis strategies for the round-trip tests: random trees of tensor views.

A tree is drawn as plain data first: containers, Python scalars and ``LeafSpec``
placeholders (a view of one of a few base storages: shape, permutation, slices with
steps, storage offset, an expanded dim, conj/neg bits, Parameter-ness). ``build_tree``
then sizes each base storage for the views drawn on it, fills it with random bytes
(any bit pattern: NaNs, subnormals, every float8 code) and replaces each placeholder
by a real tensor. A placeholder drawn twice becomes one tensor object at two places
(tied weights); views of one base share one storage.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from hypothesis import strategies as st

# Every dtype torch 2.13 can save a tensor of (quantized tensors aside).
ALL_DTYPES: tuple[torch.dtype, ...] = (
    torch.float64, torch.float32, torch.float16, torch.bfloat16,
    torch.complex128, torch.complex64, torch.complex32,
    torch.bool, torch.int8, torch.int16, torch.int32, torch.int64,
    torch.uint8, torch.uint16, torch.uint32, torch.uint64,
    torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz,
    torch.float8_e8m0fnu, torch.float4_e2m1fn_x2,
    torch.bits8, torch.bits16, torch.bits1x8, torch.bits2x4, torch.bits4x2,
)
#: The dtypes with a legacy typed-storage class (pickled via _rebuild_tensor_v2).
LEGACY_DTYPES: tuple[torch.dtype, ...] = (
    torch.float64, torch.float32, torch.float16, torch.bfloat16,
    torch.complex128, torch.complex64, torch.bool,
    torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8,
)
#: Dtypes pickled via _rebuild_tensor_v3 (UntypedStorage + dtype GLOBAL).
V3_DTYPES: tuple[torch.dtype, ...] = tuple(d for d in ALL_DTYPES if d not in LEGACY_DTYPES)
REAL_FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
CONJ_DTYPES = (torch.complex64, torch.complex128)

MAX_SIZE = 5


def random_storage(dtype: torch.dtype, numel: int, seed: int) -> torch.Tensor:
    """A fresh 1-D tensor of ``numel`` elements of ``dtype`` holding random bits."""
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=numel * dtype.itemsize, dtype=np.uint8)
    if dtype == torch.bool:
        raw %= 2  # torch bools must be 0 or 1
    out = torch.empty(raw.size, dtype=torch.uint8)
    out.numpy()[:] = raw
    return out.view(dtype)


@dataclass(eq=False)
class LeafSpec:
    """A tensor to build: a view of base storage ``base``."""

    base: int
    shape: tuple[int, ...]
    perm: tuple[int, ...]
    slices: tuple[tuple[int, int], ...]  # (start, step) per dim of the permuted view
    offset: int
    expand: bool
    bit: str  # "", "conj", "neg" (complex bases only)
    wrap: str  # "", "param", "param_frozen", "requires_grad" (real float bases only)

    @property
    def needed(self) -> int:
        return self.offset + math.prod(self.shape)


@st.composite
def leaf_specs(draw: st.DrawFn, n_bases: int, *, bits: bool = True) -> LeafSpec:
    # hypothesis leans to the first choice of sampled_from: order the choices by weight
    ndim = draw(st.sampled_from([2, 1, 3, 0, 4]))
    shape = list(draw(st.lists(st.integers(1, MAX_SIZE), min_size=ndim, max_size=ndim)))
    if ndim and draw(st.sampled_from([False, False, False, True])):
        shape[draw(st.integers(0, ndim - 1))] = 0  # an empty tensor now and then
    shape = tuple(shape)
    perm = tuple(draw(st.permutations(range(ndim))))
    slices = tuple(
        (draw(st.sampled_from([0, 1, 2, 0])), draw(st.integers(1, 3))) for _ in range(ndim)
    )
    return LeafSpec(
        base=draw(st.integers(0, n_bases - 1)),
        shape=shape,
        perm=perm,
        slices=slices,
        offset=draw(st.integers(0, 3)),
        expand=draw(st.booleans()),
        bit=draw(st.sampled_from(["conj", "neg", ""])) if bits else "",
        wrap=draw(st.sampled_from(["param", "requires_grad", "param_frozen", "", ""])),
    )


def make_view(base: torch.Tensor, spec: LeafSpec) -> torch.Tensor:
    """The view ``spec`` describes, made with ordinary torch view ops."""
    numel = math.prod(spec.shape)
    t = base[spec.offset : spec.offset + numel].view(spec.shape)
    t = t.permute(spec.perm)
    index = tuple(
        slice(min(start, max(size - 1, 0)), None, step)  # keep non-empty dims non-empty
        for (start, step), size in zip(spec.slices, t.shape, strict=True)
    )
    if index:
        t = t[index]
    if spec.expand and t.dim() and 1 in t.shape:
        t = t.expand(tuple(3 if s == 1 else s for s in t.shape))
    if t.numel() == 0 and t.storage_offset() > base.numel():
        # slicing past the end of empty dims can leave the offset beyond the storage;
        # torchkeep refuses those views (test_empty_view_past_storage_end_* covers it)
        t = t.as_strided(t.shape, t.stride(), base.numel())
    if base.dtype in CONJ_DTYPES:
        if spec.bit == "conj":
            t = t.conj()
        elif spec.bit == "neg":
            t = t._neg_view()
    if base.dtype in REAL_FLOAT_DTYPES:
        if spec.wrap == "param":
            t = torch.nn.Parameter(t)
        elif spec.wrap == "param_frozen":
            t = torch.nn.Parameter(t, requires_grad=False)
        elif spec.wrap == "requires_grad":
            t = t.detach().requires_grad_()
    return t


def scalars(*, for_torch_load: bool) -> st.SearchStrategy[Any]:
    """Plain leaves. ``for_torch_load`` leaves out what stock weights_only refuses (b'')."""
    return st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**80), 2**80),
        st.integers(-300, 70000),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=6),
        st.binary(min_size=1 if for_torch_load else 0, max_size=6),
    )


_KEYS = st.one_of(st.text(alphabet="abxy_./0", min_size=1, max_size=4), st.integers(0, 9))


def _containers(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    def ordered(pairs: list[tuple[Any, Any]], meta: bool) -> collections.OrderedDict[Any, Any]:
        result: collections.OrderedDict[Any, Any] = collections.OrderedDict(pairs)
        if meta:
            result._metadata = collections.OrderedDict(  # type: ignore[attr-defined]
                [("", {"version": 1}), ("fc", {"version": 2})]
            )
        return result

    return st.one_of(
        st.lists(children, max_size=4),
        st.lists(children, max_size=3).map(tuple),
        st.dictionaries(_KEYS, children, max_size=4),
        st.builds(ordered, st.lists(st.tuples(st.text("wbr.", min_size=1, max_size=3),
                                              children), max_size=3), st.booleans()),
    )


@dataclass
class DrawnTree:
    """A tree spec and the dtypes of its bases (build it with ``build_tree``)."""

    spec: Any
    dtypes: list[torch.dtype]
    seed: int


@st.composite
def tree_specs(
    draw: st.DrawFn,
    *,
    dtypes: tuple[torch.dtype, ...] = ALL_DTYPES,
    bits: bool = True,
    for_torch_load: bool = True,
    max_leaves: int = 10,
) -> DrawnTree:
    """A random tree of tensor views (of 1-3 shared bases) and scalars."""
    n_bases = draw(st.integers(1, 3))
    complex_first = st.sampled_from([d for d in dtypes if d in CONJ_DTYPES] or dtypes)
    base_dtypes = [draw(st.one_of(st.sampled_from(dtypes), complex_first))
                   for _ in range(n_bases)]
    pool = [draw(leaf_specs(n_bases, bits=bits)) for _ in range(draw(st.integers(1, 4)))]
    leaf = st.one_of(st.sampled_from(pool), st.sampled_from(pool),
                     scalars(for_torch_load=for_torch_load))
    nested = draw(st.recursive(leaf, _containers, max_leaves=max_leaves))
    # every drawn view appears at least once, then again wherever the nesting puts it
    spec = {"views": list(pool), "tree": nested}
    return DrawnTree(spec, base_dtypes, draw(st.integers(0, 2**32 - 1)))


def iter_leaves(node: Any) -> Iterator[Any]:
    """Every non-container in a tree of dicts, lists and tuples: depth first, in order."""
    if isinstance(node, dict):
        for v in node.values():
            yield from iter_leaves(v)
    elif isinstance(node, (list, tuple)):
        for v in node:
            yield from iter_leaves(v)
    else:
        yield node


def build_tree(drawn: DrawnTree) -> Any:
    """Turn a drawn spec into real tensors (one tensor object per LeafSpec object)."""
    specs = [n for n in iter_leaves(drawn.spec) if isinstance(n, LeafSpec)]
    sizes = [0] * len(drawn.dtypes)
    extra = np.random.default_rng(drawn.seed).integers(0, 3, size=len(sizes))
    for s in specs:
        sizes[s.base] = max(sizes[s.base], s.needed)
    bases = [
        random_storage(dtype, size + int(more), drawn.seed + i)
        for i, (dtype, size, more) in enumerate(zip(drawn.dtypes, sizes, extra, strict=True))
    ]
    made: dict[int, torch.Tensor] = {}

    def build(node: Any) -> Any:
        if isinstance(node, LeafSpec):
            if id(node) not in made:
                made[id(node)] = make_view(bases[node.base], node)
            return made[id(node)]
        if isinstance(node, collections.OrderedDict):
            out: Any = collections.OrderedDict((k, build(v)) for k, v in node.items())
            if hasattr(node, "_metadata"):
                out._metadata = node._metadata
            return out
        if isinstance(node, dict):
            return {k: build(v) for k, v in node.items()}
        if isinstance(node, list):
            return [build(v) for v in node]
        if isinstance(node, tuple):
            return tuple(build(v) for v in node)
        return node

    return build(drawn.spec)
