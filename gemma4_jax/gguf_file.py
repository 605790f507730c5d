"""A small, fast GGUF reader: metadata as python values, tensors as views of one memmap.

Why not `gguf.GGUFReader`: it builds a numpy view for every part of every metadata value (a
length and a byte view per string, a one-element view per number), so opening a real Gemma 4
GGUF, whose tokenizer holds 262,144 token strings, their scores and types and ~500K merges,
takes ~9 s before a single value has been decoded. Here the header is walked once with
`struct.unpack_from` on a memoryview of the file, string arrays are decoded in one tight loop
and numeric arrays with one `np.frombuffer(...).tolist()` each.

What comes back matches `GGUFReader` (the tests compare the two on every fixture):
`GGUFFile.fields[key]` equals `GGUFReader(...).fields[key].contents()` (python scalars, lists
of str / int / float / bool for arrays) and each `TensorInfo.data` has the dtype and shape of
`ReaderTensor.data`: float32/float16/float64/int8/int16/int32/int64 arrays in numpy order for
the plain ggml types, uint8 bytes `[..., bytes per row]` for every other type (BF16 included).
One difference: an array of arrays comes back nested here; `GGUFReader` flattens it.

Only little-endian GGUF v2/v3 is read. Every problem is a `GGUFError` naming the file.
"""

from __future__ import annotations

import dataclasses
import math
import struct
from os import PathLike
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from .errors import GGUFError

__all__ = ["GGUFFile", "TensorInfo", "read_gguf"]

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_ARRAY_DEPTH = 64  # arrays of arrays: deeper than any real file, shallow enough to recurse

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")

# GGUF value type code -> struct format of one scalar (numpy dtype for arrays below).
_STRING, _ARRAY = 8, 9
_SCALAR_FORMATS = {
    0: "<B",  # uint8
    1: "<b",  # int8
    2: "<H",  # uint16
    3: "<h",  # int16
    4: "<I",  # uint32
    5: "<i",  # int32
    6: "<f",  # float32
    7: "<?",  # bool
    10: "<Q",  # uint64
    11: "<q",  # int64
    12: "<d",  # float64
}
_SCALARS = {code: struct.Struct(fmt) for code, fmt in _SCALAR_FORMATS.items()}
_ARRAY_DTYPES = {code: np.dtype(fmt.replace("?", "b1")) for code, fmt in _SCALAR_FORMATS.items()}

# ggml types that GGUFReader hands over as typed arrays; every other type comes as raw bytes.
_T = gguf.GGMLQuantizationType
_PLAIN_DTYPES = {
    _T.F32: np.dtype(np.float32),
    _T.F16: np.dtype(np.float16),
    _T.F64: np.dtype(np.float64),
    _T.I8: np.dtype(np.int8),
    _T.I16: np.dtype(np.int16),
    _T.I32: np.dtype(np.int32),
    _T.I64: np.dtype(np.int64),
}


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """One tensor of a GGUF file; `data` is a read-only view of the file (nothing is copied)."""

    name: str
    tensor_type: gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # ggml `ne` order: fastest-varying dimension first
    data_offset: int  # absolute byte offset in the file
    n_bytes: int
    n_elements: int
    data: np.ndarray = dataclasses.field(repr=False, compare=False)

    @property
    def numpy_shape(self) -> tuple[int, ...]:
        return tuple(reversed(self.shape))


@dataclasses.dataclass(frozen=True)
class GGUFFile:
    """What `read_gguf` returns: the metadata and the tensor table of one GGUF file."""

    path: Path
    version: int
    alignment: int
    data_start: int  # absolute offset of the tensor data section
    fields: dict[str, Any] = dataclasses.field(repr=False)
    tensors: list[TensorInfo] = dataclasses.field(repr=False)


def read_gguf(path: str | PathLike[str]) -> GGUFFile:
    """Read the header of a GGUF file: metadata values and tensors (as views of a memmap)."""
    path = Path(path)
    mm, size = _open(path)
    r = _HeaderReader(path, memoryview(mm), size)
    version = _check_version(path, r.u32("version"))
    n_tensors = r.u64("tensor count")
    n_fields = r.u64("metadata count")
    fields, alignment = _read_fields(r, n_fields)
    raw_tensors = _read_tensor_infos(r, n_tensors)
    data_start = _align(r.pos, alignment)
    tensors = [_tensor(path, mm, size, data_start, *raw) for raw in raw_tensors]
    return GGUFFile(path, version, alignment, data_start, fields, tensors)


def _open(path: Path) -> tuple[np.memmap, int]:
    if not path.exists():
        raise GGUFError(f"{path}: no such file")
    try:
        size = path.stat().st_size
        # The magic is checked before mapping: np.memmap cannot map an empty file.
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic != MAGIC:
            raise GGUFError(f"{path}: not a GGUF file (magic {magic!r}, expected {MAGIC!r})")
        return np.memmap(path, mode="r"), size
    except OSError as e:
        raise GGUFError(f"{path}: cannot read: {e}") from e


def _check_version(path: Path, version: int) -> int:
    if version in SUPPORTED_VERSIONS:
        return version
    # A big-endian file read as little-endian shows its version in the high 16 bits.
    if version & 0xFFFF == 0:
        raise GGUFError(
            f"{path}: big-endian GGUF (version {version >> 24}) is not supported; "
            "only little-endian files can be read"
        )
    if version == 1:
        raise GGUFError(f"{path}: GGUF version 1 is not supported (convert it to v3)")
    raise GGUFError(f"{path}: unsupported GGUF version {version} (supported: {SUPPORTED_VERSIONS})")


class _HeaderReader:
    """A cursor over the file's bytes; every read checks that it stays inside the file."""

    def __init__(self, path: Path, buf: memoryview, size: int):
        self.path, self.buf, self.size = path, buf, size
        self.pos = 4  # after the magic
        self.errors = "strict"  # utf-8 decoding of values; see _read_fields

    def need(self, n: int, what: str) -> None:
        if self.pos + n > self.size:
            raise GGUFError(
                f"{self.path}: unreadable or truncated GGUF (the header runs past the end of "
                f"the file: {what} at byte {self.pos} needs {n} bytes, the file has "
                f"{self.size})"
            )

    def u32(self, what: str) -> int:
        self.need(4, what)
        (v,) = _U32.unpack_from(self.buf, self.pos)
        self.pos += 4
        return v

    def u64(self, what: str) -> int:
        self.need(8, what)
        (v,) = _U64.unpack_from(self.buf, self.pos)
        self.pos += 8
        return v

    def raw_string(self, what: str) -> memoryview:
        n = self.u64(what)
        self.need(n, what)
        s = self.buf[self.pos : self.pos + n]
        self.pos += n
        return s

    def name(self, what: str) -> str:
        """A key or tensor name: invalid UTF-8 there makes the whole file unreadable."""
        at = self.pos
        try:
            return str(self.raw_string(what), "utf-8")
        except UnicodeDecodeError as e:
            raise GGUFError(
                f"{self.path}: unreadable GGUF: the {what} at byte {at} is not valid UTF-8 ({e})"
            ) from e

    def value(self, vtype: int, key: str) -> Any:
        if vtype == _STRING:
            return str(self.raw_string(f"metadata {key!r}"), "utf-8", self.errors)
        if vtype == _ARRAY:
            return self.array(key)
        fmt = _SCALARS.get(vtype)
        if fmt is None:
            raise _unknown_value_type(self.path, key, vtype)
        self.need(fmt.size, f"metadata {key!r}")
        (v,) = fmt.unpack_from(self.buf, self.pos)
        self.pos += fmt.size
        return v

    def array(self, key: str, depth: int = 0) -> list:
        if depth > MAX_ARRAY_DEPTH:  # a corrupt or hostile file; recursion would overflow
            raise GGUFError(
                f"{self.path}: unreadable GGUF: metadata {key!r} nests arrays deeper than "
                f"{MAX_ARRAY_DEPTH}"
            )
        itype = self.u32(f"metadata {key!r}")
        count = self.u64(f"metadata {key!r}")
        if itype == _STRING:
            return self.string_array(count, key)
        dtype = _ARRAY_DTYPES.get(itype)
        if dtype is None:
            if itype != _ARRAY:
                raise _unknown_value_type(self.path, key, itype)
            # Each inner array is at least its 12-byte header: reject absurd counts up front.
            self.need(12 * count, f"metadata {key!r}")
            return [self.array(key, depth + 1) for _ in range(count)]
        n = count * dtype.itemsize
        self.need(n, f"metadata {key!r}")
        out = np.frombuffer(self.buf, dtype, count, self.pos).tolist()
        self.pos += n
        return out

    def string_array(self, count: int, key: str) -> list[str]:
        # The hot loop (262K tokens, ~500K merges): locals only, one slice + decode per item.
        what = f"metadata {key!r}"
        self.need(8 * count, what)
        buf, size, pos = self.buf, self.size, self.pos
        unpack = _U64.unpack_from
        out = [""] * count
        for i in range(count):
            if pos + 8 > size:
                self.pos = pos
                self.need(8, what)
            (n,) = unpack(buf, pos)
            pos += 8
            end = pos + n
            if end > size:
                self.pos = pos
                self.need(n, what)
            out[i] = str(buf[pos:end], "utf-8", self.errors)
            pos = end
        self.pos = pos
        return out


def _unknown_value_type(path: Path, key: str, vtype: int) -> GGUFError:
    return GGUFError(f"{path}: unreadable GGUF: metadata {key!r} has unknown value type {vtype}")


def _read_fields(r: _HeaderReader, count: int) -> tuple[dict[str, Any], int]:
    fields: dict[str, Any] = {}
    alignment = DEFAULT_ALIGNMENT
    for _ in range(count):
        key = r.name("metadata key")
        if key in fields:
            raise GGUFError(f"{r.path}: unreadable GGUF: metadata key {key!r} appears twice")
        vtype = r.u32(f"type of metadata {key!r}")
        start = r.pos
        try:
            fields[key] = r.value(vtype, key)
        except UnicodeDecodeError as e:
            # The tokenizer needs its strings exact; any other text (llama.cpp writes names,
            # descriptions, licenses unchecked) is informational: keep it, bad bytes replaced.
            if key.startswith("tokenizer."):
                raise GGUFError(f"{r.path}: metadata {key!r} is not valid UTF-8: {e}") from e
            r.pos, r.errors = start, "replace"
            fields[key] = r.value(vtype, key)
            r.errors = "strict"
        if key == "general.alignment":
            alignment = _check_alignment(r.path, vtype, fields[key])
    return fields, alignment


def _check_alignment(path: Path, vtype: int, value: Any) -> int:
    # Same rule as GGUFReader: a uint32 power of two (it places every tensor's data).
    if vtype != 4 or value == 0 or value & (value - 1):
        raise GGUFError(
            f"{path}: unreadable GGUF: general.alignment must be a uint32 power of two, "
            f"got {value!r}"
        )
    return value


def _read_tensor_infos(r: _HeaderReader, count: int) -> list[tuple[str, tuple[int, ...], int, int]]:
    """(name, ne, ggml type id, offset in the data section) for each tensor, in file order."""
    infos = []
    for _ in range(count):
        name = r.name("tensor name")
        n_dims = r.u32(f"tensor {name!r}")
        r.need(8 * n_dims, f"tensor {name!r}")
        ne = struct.unpack_from(f"<{n_dims}Q", r.buf, r.pos)
        r.pos += 8 * n_dims
        type_id = r.u32(f"tensor {name!r}")
        offset = r.u64(f"tensor {name!r}")
        infos.append((name, ne, type_id, offset))
    names = [i[0] for i in infos]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise GGUFError(f"{r.path}: unreadable GGUF: tensor {dup!r} appears twice")
    return infos


def _align(offset: int, alignment: int) -> int:
    return (offset + alignment - 1) // alignment * alignment


def _tensor(
    path: Path,
    mm: np.memmap,
    size: int,
    data_start: int,
    name: str,
    ne: tuple[int, ...],
    type_id: int,
    rel_offset: int,
) -> TensorInfo:
    ttype = _ggml_type(path, name, type_id)
    block, type_size = gguf.GGML_QUANT_SIZES[ttype]
    n_elements = math.prod(ne)
    if n_elements % block or (ne and ne[0] % block):
        raise GGUFError(
            f"{path}: tensor {name!r} of type {ttype.name} has shape {list(ne)}, whose rows "
            f"are not whole blocks of {block}"
        )
    n_bytes = n_elements // block * type_size
    start = data_start + rel_offset
    end = start + n_bytes
    if end > size:
        raise GGUFError(
            f"{path}: truncated: tensor {name!r} ends at byte {end} but the file has {size} bytes"
        )
    np_shape = tuple(reversed(ne))
    dtype = _PLAIN_DTYPES.get(ttype)
    if dtype is None:
        # GGUFReader's layout for block types: rows of raw bytes, [..., bytes per row].
        dtype = np.dtype(np.uint8)
        np_shape = (*np_shape[:-1], np_shape[-1] // block * type_size) if ne else (n_bytes,)
    data = mm[start:end].view(dtype).reshape(np_shape)
    return TensorInfo(name, ttype, tuple(ne), start, n_bytes, n_elements, data)


def _ggml_type(path: Path, name: str, type_id: int) -> gguf.GGMLQuantizationType:
    try:
        ttype = gguf.GGMLQuantizationType(type_id)
    except ValueError:
        ttype = None
    if ttype is None or ttype not in gguf.GGML_QUANT_SIZES:
        raise GGUFError(
            f"{path}: tensor {name!r} has unknown or unsupported ggml type id {type_id} "
            f"(this gguf package {_gguf_version()} does not know it)"
        )
    return ttype


def _gguf_version() -> str:
    try:
        from importlib.metadata import version

        return version("gguf")
    except Exception:  # only decorates an error message
        return "(unknown version)"
