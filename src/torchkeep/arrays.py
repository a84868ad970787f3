"""The numpy backend: a parsed tree's placeholders become numpy arrays, with no torch at all."""

from __future__ import annotations

from typing import Any

import numpy as np

from torchkeep.errors import FormatError
from torchkeep.formats.loader import StorageLoader
from torchkeep.formats.parsed import Parsed
from torchkeep.limits import DEFAULT_LIMITS, Limits
from torchkeep.tree import SparseRef, StorageView, TensorRef, map_tree

__all__ = ["NumpyMaterializer", "QuantizedArray", "SparseArray", "tensor_to_numpy"]


class QuantizedArray:
    """A quantized tensor under the numpy backend: its integer values and quantizer."""

    __slots__ = ("axis", "dtype", "int_repr", "qscheme", "scale", "zero_point")

    def __init__(self, int_repr: np.ndarray[Any, Any], dtype: str, quantizer: tuple[Any, ...],
                 convert: Any) -> None:
        self.int_repr = int_repr
        self.dtype = dtype
        self.qscheme = quantizer[0]
        if self.qscheme == "per_tensor_affine":
            self.scale, self.zero_point, self.axis = quantizer[1], quantizer[2], None
        else:
            self.scale = convert(quantizer[1])
            self.zero_point = convert(quantizer[2])
            self.axis = quantizer[3]

    def dequantize(self) -> np.ndarray[Any, Any]:
        """The float values: (int_repr - zero_point) * scale."""
        values = self.int_repr.astype(np.float32)
        if self.axis is None:
            return (values - self.zero_point) * self.scale  # type: ignore[no-any-return]
        shape = [1] * values.ndim
        shape[self.axis] = -1
        zp = np.asarray(self.zero_point).reshape(shape)
        scale = np.asarray(self.scale).reshape(shape)
        return (values - zp) * scale  # type: ignore[no-any-return]

    def __repr__(self) -> str:
        return f"QuantizedArray({self.dtype}, {self.qscheme}, shape={self.int_repr.shape})"


class SparseArray:
    """A sparse tensor under the numpy backend: its layout, component arrays and size."""

    __slots__ = ("layout", "parts", "shape")

    def __init__(self, layout: str, parts: tuple[np.ndarray[Any, Any], ...],
                 shape: tuple[int, ...]) -> None:
        self.layout = layout
        self.parts = parts
        self.shape = shape

    def __repr__(self) -> str:
        return f"SparseArray({self.layout}, shape={self.shape})"


def tensor_to_numpy(loader: StorageLoader, ref: TensorRef) -> np.ndarray[Any, Any]:
    """One TensorRef as a numpy view of its storage bytes (conj/neg bits applied)."""
    dtype = ref.dtype
    np_dtype = dtype.numpy
    if ref.storage is None:
        raise FormatError(
            f"a {ref.location} tensor has no data; the numpy backend cannot represent it"
        )
    data = loader.view_bytes(ref.storage, dtype.swap_unit)
    itemsize = dtype.itemsize
    if ref.numel == 0:  # may start past the storage's end, which numpy refuses
        return np.empty(ref.shape, dtype=np_dtype)
    array: np.ndarray[Any, Any] = np.ndarray(
        ref.shape,
        dtype=np_dtype,
        buffer=data,
        offset=ref.offset * itemsize,
        strides=tuple(s * itemsize for s in ref.stride),
    )
    if ref.neg:
        array = np.asarray(np.negative(array))  # asarray: 0-d results stay arrays
    if ref.conj:
        array = np.asarray(np.conj(array))
    return array


class NumpyMaterializer:
    """Turns a parsed file's placeholders into numpy values, one leaf or the whole tree.

    torch-only values stay torch-free placeholders (``torchkeep.Size``,
    ``torchkeep.dtype``, ``torchkeep.device``); requires_grad and Parameter-ness are not
    represented.
    """

    def __init__(self, parsed: Parsed, *, mmap: bool | None = None) -> None:
        self.parsed = parsed
        self.loader = StorageLoader(parsed, mmap=mmap)

    def convert(self, leaf: Any) -> Any:
        """The numpy value of one placeholder (other values come back unchanged)."""
        loader = self.loader
        if isinstance(leaf, TensorRef):
            array = tensor_to_numpy(loader, leaf)
            if leaf.quantizer is not None:
                return QuantizedArray(array, leaf.dtype.name, leaf.quantizer,
                                      lambda r: tensor_to_numpy(loader, r))
            return array
        if isinstance(leaf, SparseRef):
            parts = tuple(tensor_to_numpy(loader, p) for p in leaf.parts)
            return SparseArray(leaf.layout, parts, leaf.size)
        if isinstance(leaf, StorageView):
            data = loader.view_bytes(leaf.storage, leaf.dtype.swap_unit)
            return data.view(leaf.dtype.numpy) if leaf.dtype.itemsize > 1 else data
        return leaf

    def tree(self, *, limits: Limits = DEFAULT_LIMITS) -> Any:
        """The whole tree with numpy values in place of placeholders."""
        self.loader.prefetch()
        return map_tree(self.parsed.tree, self.convert, limits=limits)
