"""The dtype vocabulary shared by every format: torch names, sizes, storage classes, codes."""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "DTYPES",
    "DType",
    "by_name",
    "by_safetensors",
    "by_storage_class",
    "from_numpy",
    "plain_numpy_dtype",
]


@dataclass(frozen=True, eq=False, slots=True)
class DType:
    """One torch dtype, described without torch.

    ``itemsize`` is bytes per element as torch counts them (float4_e2m1fn_x2 packs two
    4-bit values into one 1-byte element). ``storage_class`` is the legacy typed-storage
    class torch pickles for this dtype (``FloatStorage``), or None when torch writes an
    ``UntypedStorage`` and passes the dtype to ``_rebuild_tensor_v3``. ``kind`` is one of
    float, complex, int, uint, bool, quantized, bits, shell (a dtype torch names but
    cannot save a tensor of).
    """

    name: str
    itemsize: int
    kind: str
    storage_class: str | None = None
    safetensors: str | None = None
    _numpy: Any = field(default=None, repr=False)

    def __repr__(self) -> str:
        return f"torchkeep.dtype({self.name!r})"

    def __str__(self) -> str:
        return f"torch.{self.name}"

    def __reduce__(self) -> tuple[Any, ...]:
        return (by_name, (self.name,))

    @property
    def is_floating_point(self) -> bool:
        """True for real floating dtypes (what ``--dtype`` casts)."""
        return self.kind == "float"

    @property
    def swap_unit(self) -> int:
        """Bytes per byte-swapped unit: complex values swap each real/imag half on its own."""
        return self.itemsize // 2 if self.kind == "complex" else self.itemsize

    @property
    def has_tensors(self) -> bool:
        """False for shell dtypes (uint1..7, int1..7) that name no saveable tensor."""
        return self.kind != "shell"

    @property
    def numpy(self) -> np.dtype[Any]:
        """The numpy dtype that holds this dtype's bits (little-endian).

        bfloat16 and the float8 kinds come from ml_dtypes. Dtypes with no numpy
        counterpart get a one-field structured dtype named after the torch dtype
        (``[('float4_e2m1fn_x2', 'u1')]``; complex32 is ``[('real','<f2'),('imag','<f2')]``),
        so the bits survive and the name tells what they are.
        """
        if self._numpy is None:
            object.__setattr__(self, "_numpy", _numpy_dtype(self))
        return self._numpy  # type: ignore[no-any-return]


_ROWS: tuple[tuple[str, int, str, str | None, str | None, str], ...] = (
    # name, itemsize, kind, legacy storage class, safetensors code, numpy spec
    ("float64", 8, "float", "DoubleStorage", "F64", "<f8"),
    ("float32", 4, "float", "FloatStorage", "F32", "<f4"),
    ("float16", 2, "float", "HalfStorage", "F16", "<f2"),
    ("bfloat16", 2, "float", "BFloat16Storage", "BF16", "ml:bfloat16"),
    ("int64", 8, "int", "LongStorage", "I64", "<i8"),
    ("int32", 4, "int", "IntStorage", "I32", "<i4"),
    ("int16", 2, "int", "ShortStorage", "I16", "<i2"),
    ("int8", 1, "int", "CharStorage", "I8", "i1"),
    ("uint8", 1, "uint", "ByteStorage", "U8", "u1"),
    ("bool", 1, "bool", "BoolStorage", "BOOL", "?"),
    ("complex128", 16, "complex", "ComplexDoubleStorage", None, "<c16"),
    ("complex64", 8, "complex", "ComplexFloatStorage", "C64", "<c8"),
    ("complex32", 4, "complex", None, None, "struct:complex32"),
    ("uint16", 2, "uint", None, "U16", "<u2"),
    ("uint32", 4, "uint", None, "U32", "<u4"),
    ("uint64", 8, "uint", None, "U64", "<u8"),
    ("float8_e4m3fn", 1, "float", None, "F8_E4M3", "ml:float8_e4m3fn"),
    ("float8_e5m2", 1, "float", None, "F8_E5M2", "ml:float8_e5m2"),
    ("float8_e4m3fnuz", 1, "float", None, "F8_E4M3FNUZ", "ml:float8_e4m3fnuz"),
    ("float8_e5m2fnuz", 1, "float", None, "F8_E5M2FNUZ", "ml:float8_e5m2fnuz"),
    ("float8_e8m0fnu", 1, "float", None, "F8_E8M0", "ml:float8_e8m0fnu"),
    ("float4_e2m1fn_x2", 1, "float", None, "F4", "struct:u1"),
    ("qint8", 1, "quantized", "QInt8Storage", None, "i1"),
    ("quint8", 1, "quantized", "QUInt8Storage", None, "u1"),
    ("qint32", 4, "quantized", "QInt32Storage", None, "<i4"),
    ("quint4x2", 1, "quantized", "QUInt4x2Storage", None, "u1"),
    ("quint2x4", 1, "quantized", "QUInt2x4Storage", None, "u1"),
    ("bits1x8", 1, "bits", None, None, "struct:u1"),
    ("bits2x4", 1, "bits", None, None, "struct:u1"),
    ("bits4x2", 1, "bits", None, None, "struct:u1"),
    ("bits8", 1, "bits", None, None, "struct:u1"),
    ("bits16", 2, "bits", None, None, "struct:<u2"),
    *((f"uint{n}", 1, "shell", None, None, "u1") for n in range(1, 8)),
    *((f"int{n}", 1, "shell", None, None, "i1") for n in range(1, 8)),
)

_NUMPY_SPEC = {row[0]: row[5] for row in _ROWS}

DTYPES: dict[str, DType] = {
    name: DType(name, itemsize, kind, storage, st)
    for name, itemsize, kind, storage, st, _ in _ROWS
}

#: Names torch also accepts (``torch.half``) mapped to the canonical name.
_ALIASES = {
    "half": "float16",
    "float": "float32",
    "double": "float64",
    "long": "int64",
    "int": "int32",
    "short": "int16",
    "cfloat": "complex64",
    "cdouble": "complex128",
    "chalf": "complex32",
}

_BY_STORAGE = {d.storage_class: d for d in DTYPES.values() if d.storage_class}
_BY_SAFETENSORS = {d.safetensors: d for d in DTYPES.values() if d.safetensors}


def by_name(name: str) -> DType:
    """The DType called ``name`` (torch's name, with or without ``torch.``); KeyError for
    anything else, a name read from a file that is not a string included."""
    if not isinstance(name, str):
        raise KeyError(f"unknown dtype {name!r:.40}")
    key = name.removeprefix("torch.")
    key = _ALIASES.get(key, key)
    try:
        return DTYPES[key]
    except KeyError:
        raise KeyError(f"unknown dtype {name!r}") from None


def by_storage_class(name: str) -> DType | None:
    """The DType of a legacy typed-storage class name (``FloatStorage``), or None."""
    return _BY_STORAGE.get(name)


def by_safetensors(code: str) -> DType | None:
    """The DType of a safetensors dtype code (``F32``), or None when unknown."""
    return _BY_SAFETENSORS.get(code)


def _numpy_dtype(dtype: DType) -> np.dtype[Any]:
    import numpy as np

    spec = _NUMPY_SPEC[dtype.name]
    if spec.startswith("ml:"):
        import ml_dtypes

        found: np.dtype[Any] = np.dtype(getattr(ml_dtypes, spec[3:]))
        return found
    if spec == "struct:complex32":
        return np.dtype([("real", "<f2"), ("imag", "<f2")])
    if spec.startswith("struct:"):
        return np.dtype([(dtype.name, spec[7:])])
    return np.dtype(spec)


def from_numpy(np_dtype: np.dtype[Any]) -> DType | None:
    """The DType whose numpy form is ``np_dtype`` (either byte order), or None."""
    if np_dtype.names is not None:
        if np_dtype.names == ("real", "imag") and np_dtype == DTYPES["complex32"].numpy:
            return DTYPES["complex32"]
        if len(np_dtype.names) == 1 and np_dtype.names[0] in DTYPES:
            candidate = DTYPES[np_dtype.names[0]]
            if candidate.numpy == np_dtype:
                return candidate
        return None
    little = np_dtype.newbyteorder("<") if np_dtype.byteorder == ">" else np_dtype
    for name in _NUMPY_NATIVE_ORDER:
        d = DTYPES[name]
        if d.numpy == little:
            return d
    return None


#: Where several dtypes share a numpy form (quantized ints), prefer the plain one.
_NUMPY_NATIVE_ORDER = tuple(
    name for name, *_ in _ROWS if DTYPES[name].kind not in ("quantized", "shell")
)

NATIVE_BYTEORDER = sys.byteorder


# what numpy pickles and torchkeep's JSON trees record: a kind letter and an item size
# ('<f8', 'S5'); numpy's own parser would take far more (shapes, comma lists, eval-ed
# strings) and raise anything from SyntaxError on
_PLAIN_NUMPY_SPEC = re.compile(r"[<>|=]?[A-Za-z?][0-9]{0,6}\Z")


def plain_numpy_dtype(spec: Any) -> np.dtype[Any]:
    """The numpy dtype a file names by ``spec``: plain kinds and sizes only (no object,
    datetime, structured or zero-size dtypes); ValueError for anything else."""
    plain = type(spec) is str and _PLAIN_NUMPY_SPEC.match(spec) is not None
    if not plain or spec.lstrip("<>|=")[:1] in "OMm":
        raise ValueError(f"numpy dtype {str(spec)[:40]!r} is not allowed (only plain kinds "
                         "and sizes; no object or time dtypes)")
    import numpy as np

    try:
        base: np.dtype[Any] = np.dtype(spec)
    except TypeError as e:
        raise ValueError(f"bad numpy dtype {spec!r}") from e
    if base.hasobject or base.names is not None or base.itemsize == 0:
        raise ValueError(f"numpy dtype {spec!r} is not allowed")
    return base
