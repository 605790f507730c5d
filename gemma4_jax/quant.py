"""Quantized weight tensors: ggml blocks repacked into pytrees of plain arrays.

A GGUF file stores a quantized matrix as an array of ggml *blocks*, each an interleaved
struct of half-precision scales and packed integer codes. That layout is awkward on an
accelerator (odd byte strides such as 144 or 210 bytes per block, scales that need bit
surgery before every use), so at load time `from_gguf` splits the blocks once, with
vectorised numpy, into one array per field (see docs/LAYOUT.md, the contract with the Pallas
kernels): `Q4_K(qs, d, dmin, sc, m)` and so on. Only the *block structure* is taken apart; the
element order inside a block is kept exactly as ggml has it, so dequantization is a handful of
shifts and masks and stays bit-identical to `gguf.quants.dequantize` (the reference
llama.cpp's gguf-py implements, and which the fixtures' reference logits were computed with).

Design points:

* Every type is a frozen dataclass registered with `jax.tree_util.register_dataclass`. All
  fields are array children and there is no static metadata: the logical shape `(..., N, K)`
  is derived from the arrays. Slicing the pytree along a leading axis (`lax.scan` over
  stacked layers, `jax.tree.map(lambda a: a[i], w)`) therefore always yields a consistent
  tensor, and the same tree can hold `ShapeDtypeStruct`s or shardings.
* Every field keeps the matrix's leading axes and its row axis `N` at position -2, with the
  quantization blocks running along the last axis. Row gathers (`take_rows`, for embedding
  lookups) and layer stacking (`stack`) are thus the same operation on every field.
* `from_gguf` returns numpy fields (the loader decides when and where to `device_put`); every
  jnp method accepts numpy or jax fields alike.
* `dequantize` mirrors gguf-py's operation order. For the K-quants it computes
  `(d * sc) * q - dmin * m` in float32; every product there is exact (an f16 scale has 11
  significant bits, a 6-bit sub-scale and a <= 6-bit code add at most 12 more, within f32's
  24), so the single rounding is the final subtraction and the result does not depend on
  whether XLA contracts `a * b - c` into an FMA (XLA:CPU and XLA:GPU both do, which breaks
  any formulation with an inexact product). The Pallas kernels can use the same formulation
  and stay exact.
* `matmul_reference` is the pure-jnp `x @ W.T` the kernels are tested against.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import ClassVar

import gguf
import jax
import jax.numpy as jnp
import numpy as np

from gemma4_jax.errors import GGUFError
from gemma4_jax.executable_cache import CachedProgram

__all__ = [
    "BF16",
    "F16",
    "F32",
    "Q4_0",
    "Q4_1",
    "Q4_K",
    "Q5_0",
    "Q5_1",
    "Q5_K",
    "Q6_K",
    "Q8_0",
    "SUPPORTED_TYPES",
    "QTensor",
    "UnsupportedTensorType",
    "from_gguf",
    "from_gguf_on_device",
    "matmul_reference",
    "stack",
]

QK_K = 256  # elements per K-quant super-block

SUPPORTED_TYPES: tuple[str, ...] = (
    "F32",
    "F16",
    "BF16",
    "Q8_0",
    "Q4_0",
    "Q4_1",
    "Q5_0",
    "Q5_1",
    "Q4_K",
    "Q5_K",
    "Q6_K",
)


class UnsupportedTensorType(GGUFError):
    """A GGUF tensor uses a ggml type this package cannot dequantize."""


_REGISTRY: dict[str, type[QTensor]] = {}


class QTensor:
    """Base class of the repacked tensor types; see the module docstring.

    Subclasses define `ggml_type`, `block_size` (elements per block along K; 1 for dense
    types), their array fields, `shape`, `_from_blocks` and `_dequantize_f32`.
    """

    ggml_type: ClassVar[str]
    block_size: ClassVar[int]
    # bytes of one ggml block in the file (gguf.GGML_QUANT_SIZES)
    type_size: ClassVar[int]

    # -- introspection ---------------------------------------------------------------------
    def arrays(self) -> tuple:
        """The field arrays, in declaration order."""
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self))

    @property
    def shape(self) -> tuple[int, ...]:
        """Logical shape `(..., N, K)` of the dequantized tensor."""
        raise NotImplementedError

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes held by all field arrays (what the tensor costs on the device)."""
        # From shape/dtype rather than `.nbytes` so tracers and ShapeDtypeStructs work too.
        return sum(
            int(np.prod(a.shape, dtype=np.int64)) * np.dtype(a.dtype).itemsize
            for a in self.arrays()
        )

    def __repr__(self) -> str:
        # The dataclass repr would print every weight.
        fields = ", ".join(
            f"{f.name}={np.dtype(a.dtype).name}{list(a.shape)}"
            for f, a in zip(dataclasses.fields(self), self.arrays(), strict=True)
        )
        return f"{type(self).__name__}(shape={self.shape}, {fields})"

    # -- construction ----------------------------------------------------------------------
    @classmethod
    def from_raw(cls, raw: np.ndarray, shape: Sequence[int]) -> QTensor:
        """Builds the tensor from raw ggml data of logical numpy shape `shape`.

        `raw` is either the bytes of the ggml blocks (any uint8 array holding exactly the
        tensor's bytes, e.g. `ReaderTensor.data`) or, for dense types, an array of that dtype.
        Returns numpy fields.
        """
        shape = tuple(int(s) for s in shape)
        raw = cls._checked_bytes(raw, shape)
        return cls(*cls._split(_blocks(raw, shape, cls.block_size, cls.type_size), np))

    @classmethod
    def _checked_bytes(cls, raw, shape: tuple[int, ...]) -> np.ndarray:
        """`raw` as a contiguous flat uint8 array after checking it fits `shape`."""
        if not shape:
            raise GGUFError(f"{cls.ggml_type} tensor has an empty shape")
        k = shape[-1]
        if k % cls.block_size:
            raise GGUFError(
                f"{cls.ggml_type} row length {k} is not a multiple of its block size "
                f"{cls.block_size} (shape {shape})"
            )
        raw = np.asarray(raw)
        n_bytes = int(np.prod(shape, dtype=np.int64)) // cls.block_size * cls.type_size
        if raw.nbytes != n_bytes:
            raise GGUFError(
                f"{cls.ggml_type} tensor of shape {shape} needs {n_bytes} bytes, "
                f"got {raw.nbytes} ({raw.dtype}{list(raw.shape)})"
            )
        return np.ascontiguousarray(raw).reshape(-1).view(np.uint8)

    @classmethod
    def _split(cls, b, xp) -> tuple:
        """The field arrays, in declaration order, of ggml blocks `b [..., nb, type_size]`
        (uint8). `xp` is numpy (host repack) or jax.numpy (inside a jitted device repack)."""
        raise NotImplementedError

    # -- jnp ops -----------------------------------------------------------------------------
    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        """The logical `[..., N, K]` tensor in `dtype`.

        Computed in float32 (bit-identical to `gguf.quants.dequantize`) and then rounded once
        to `dtype`. Pure jnp, jit-friendly.
        """
        return self._dequantize_f32().astype(dtype)

    def _dequantize_f32(self) -> jax.Array:
        raise NotImplementedError

    def take_rows(self, ids) -> QTensor:
        """Gathers rows (axis N) without dequantizing, e.g. for an embedding lookup.

        For a 2-D `[N, K]` tensor the result has logical shape `(*ids.shape, K)`; in general
        `[..., N, K]` becomes `[..., *ids.shape, K]`. Out-of-range ids are clamped (the gather
        semantics of `jnp.take(mode="clip")`), never an error inside jit.
        """
        ids = jnp.asarray(ids)
        if not jnp.issubdtype(ids.dtype, jnp.integer):
            raise TypeError(f"take_rows needs integer ids, got {ids.dtype}")
        # Every field has the row axis N at -2 (see the module docstring).
        return type(self)(*(jnp.take(a, ids, axis=-2, mode="clip") for a in self.arrays()))


def _register(cls):
    """Makes `cls` a frozen dataclass, a JAX pytree (all fields children) and registers it."""
    # eq=False: elementwise `==` on array fields has no single truth value.
    cls = dataclasses.dataclass(frozen=True, eq=False, repr=False)(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    jax.tree_util.register_dataclass(cls, data_fields=names, meta_fields=[])
    cls.block_size, cls.type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[cls.ggml_type]]
    _REGISTRY[cls.ggml_type] = cls
    return cls


def _f16_field(blocks, start: int, xp=np):
    """The f16 stored at byte `start` of every block: `[..., nb, type_size]` -> `[..., nb]`."""
    if xp is np:
        return np.ascontiguousarray(blocks[..., start : start + 2]).view(np.float16)[..., 0]
    return jax.lax.bitcast_convert_type(blocks[..., start : start + 2], jnp.float16)


def _flat_field(blocks, start: int, stop: int, dtype=np.uint8, xp=np):
    """Bytes `[start, stop)` of every block, concatenated along the row: `[..., nb * width]`."""
    if xp is np:
        f = np.ascontiguousarray(blocks[..., start:stop]).view(dtype)
    else:  # byte-sized types only on this path (uint8 / int8)
        f = jax.lax.bitcast_convert_type(blocks[..., start:stop], dtype)
    return f.reshape(*f.shape[:-2], -1)


def _u32_field(blocks, start: int, xp=np):
    """The little-endian uint32 at byte `start` of every block: `[..., nb, type_size]` ->
    `[..., nb]` (as `_f16_field`; ggml reads Q5_0/Q5_1's `qh[4]` with a memcpy into a uint32)."""
    if xp is np:
        return np.ascontiguousarray(blocks[..., start : start + 4]).view("<u4")[..., 0]
    return jax.lax.bitcast_convert_type(blocks[..., start : start + 4], jnp.uint32)


def _blocks(raw, shape: tuple[int, ...], block_size: int, type_size: int):
    """Raw bytes as `[..., N, K / block_size, type_size]` blocks (numpy: a view, no copy)."""
    if isinstance(raw, np.ndarray):
        raw = raw.reshape(-1).view(np.uint8)
    return raw.reshape(*shape[:-1], shape[-1] // block_size, type_size)


def _split_blocks(x: jax.Array, width: int) -> jax.Array:
    """`[..., nb * width]` -> `[..., nb, width]`."""
    return x.reshape(*x.shape[:-1], x.shape[-1] // width, width)


def _nibbles(x: jax.Array) -> jax.Array:
    """`[..., c, w]` bytes -> `[..., c, 2, w]`: low nibbles first, then high nibbles.

    This is ggml's order in Q4_0/Q4_1/Q5_0/Q5_1 (w=16), Q4_K/Q5_K (w=32) and Q6_K's low bits
    (w=64).
    """
    return jnp.stack([x & 0x0F, x >> 4], axis=-2)


# ---------------------------------------------------------------------------------------------
# Dense types
# ---------------------------------------------------------------------------------------------
class _Dense(QTensor):
    np_dtype: ClassVar[np.dtype]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.w.shape)

    @classmethod
    def _split(cls, b, xp):
        # Blocks of one element: b [..., K, itemsize]. numpy: a view of the file's bytes (a
        # memmap): no copy until device_put.
        if xp is np:
            return (b.view(cls.np_dtype)[..., 0],)
        return (jax.lax.bitcast_convert_type(b, cls.np_dtype),)

    def _dequantize_f32(self):
        return jnp.asarray(self.w).astype(jnp.float32)

    def dequantize(self, dtype=jnp.float32):
        # Skip the f32 round trip (exact anyway: f32 holds every f16/bf16 value).
        return jnp.asarray(self.w).astype(dtype)


@_register
class F32(_Dense):
    """`w f32 [..., N, K]`."""

    ggml_type: ClassVar[str] = "F32"
    np_dtype: ClassVar[np.dtype] = np.dtype(np.float32)
    w: jax.Array


@_register
class F16(_Dense):
    """`w f16 [..., N, K]`."""

    ggml_type: ClassVar[str] = "F16"
    np_dtype: ClassVar[np.dtype] = np.dtype(np.float16)
    w: jax.Array


@_register
class BF16(_Dense):
    """`w bf16 [..., N, K]` (GGUFReader hands BF16 over as raw uint8; viewed as bf16 here)."""

    ggml_type: ClassVar[str] = "BF16"
    np_dtype: ClassVar[np.dtype] = np.dtype(jnp.bfloat16)
    w: jax.Array


# ---------------------------------------------------------------------------------------------
# 32-element block types
# ---------------------------------------------------------------------------------------------
class _PackedNibbles(QTensor):
    """Types whose `qs` packs two 4-bit codes per byte: K is twice its last axis."""

    @property
    def shape(self):
        return (*self.qs.shape[:-1], self.qs.shape[-1] * 2)


def _q32_codes(qs) -> jax.Array:
    """qs `[..., K/2]` -> the 4-bit codes of 32-element blocks in element order, `[..., nb, 32]`."""
    qs = _split_blocks(jnp.asarray(qs), 16)  # [..., nb, 16]
    return _nibbles(qs).reshape(*qs.shape[:-1], 32)


def _q32_high_bits(qh) -> jax.Array:
    """qh `[..., nb]` (a uint32 per block) -> the 5th bits `[..., nb, 32]` (uint8), in element
    order."""
    bits = (jnp.asarray(qh)[..., None] >> jnp.arange(32, dtype=jnp.uint32)) & 1
    return bits.astype(jnp.uint8)


def _q5_codes(t: Q5_0 | Q5_1) -> jax.Array:
    """The 5-bit codes `[..., nb, 32]` (uint8) of a Q5_0 / Q5_1 tensor, in element order."""
    return _q32_codes(t.qs) | (_q32_high_bits(t.qh) << 4)


def _block_scale(a) -> jax.Array:
    """A per-block f16 field `[..., nb]` as f32 `[..., nb, 1]`."""
    return jnp.asarray(a).astype(jnp.float32)[..., None]


@_register
class Q8_0(QTensor):
    """Block of 32: `x = d * q`. `qs int8 [..., N, K]`, `d f16 [..., N, K/32]`."""

    ggml_type: ClassVar[str] = "Q8_0"
    qs: jax.Array
    d: jax.Array

    @property
    def shape(self):
        return tuple(self.qs.shape)

    @classmethod
    def _split(cls, b, xp):
        # ggml block_q8_0: d f16 | qs int8[32]
        return _flat_field(b, 2, 34, np.int8, xp), _f16_field(b, 0, xp)

    def _dequantize_f32(self):
        q = _split_blocks(jnp.asarray(self.qs), 32).astype(jnp.float32)
        d = jnp.asarray(self.d).astype(jnp.float32)
        x = q * d[..., None]
        return x.reshape(self.shape)


@_register
class Q4_0(_PackedNibbles):
    """Block of 32: `x = d * (q - 8)`, q 4-bit.

    `qs uint8 [..., N, K/2]` (per block 16 bytes: byte i holds element i in its low nibble
    and element i+16 in its high nibble), `d f16 [..., N, K/32]`.
    """

    ggml_type: ClassVar[str] = "Q4_0"
    qs: jax.Array
    d: jax.Array

    @classmethod
    def _split(cls, b, xp):
        # ggml block_q4_0: d f16 | qs uint8[16]
        return _flat_field(b, 2, 18, xp=xp), _f16_field(b, 0, xp)

    def _dequantize_f32(self):
        q = _q32_codes(self.qs).astype(jnp.int8) - jnp.int8(8)  # [..., nb, 32]
        return (_block_scale(self.d) * q.astype(jnp.float32)).reshape(self.shape)


# Q4_1, Q5_0 and Q5_1 rarely make up a whole file, but llama-quantize falls back to them: a
# K-quant needs rows that are a multiple of 256, so in a Q4_K_M (Q5_K_M) mix a tensor with
# shorter rows becomes Q5_0 (Q5_1), e.g. 26B-A4B's ffn_down (K = 2112) and its experts'
# ffn_down_exps (K = 704). All three keep ggml's element order inside a block: byte i of qs
# holds element i in its low nibble and element i + 16 in its high nibble; bit i of qh (ggml's
# four bytes, kept as one little-endian uint32 per block) is the 5th bit of element i.
@_register
class Q4_1(_PackedNibbles):
    """Block of 32: `x = d * q + m`, q 4-bit. `qs uint8 [..., N, K/2]` (as Q4_0), `d, m f16
    [..., N, K/32]`. (`d * q` is exact in f32, so the one rounding is the add, with or without
    an FMA.)"""

    ggml_type: ClassVar[str] = "Q4_1"
    qs: jax.Array
    d: jax.Array
    m: jax.Array

    @classmethod
    def _split(cls, b, xp):
        # ggml block_q4_1: d f16 | m f16 | qs uint8[16]
        return _flat_field(b, 4, 20, xp=xp), _f16_field(b, 0, xp), _f16_field(b, 2, xp)

    def _dequantize_f32(self):
        q = _q32_codes(self.qs).astype(jnp.float32)
        return (_block_scale(self.d) * q + _block_scale(self.m)).reshape(self.shape)


@_register
class Q5_0(_PackedNibbles):
    """Block of 32: `x = d * (q - 16)`, q 5-bit. `qs uint8 [..., N, K/2]` (low 4 bits, as
    Q4_0), `qh uint32 [..., N, K/32]` (bit i: the 5th bit of element i), `d f16 [..., N, K/32]`."""

    ggml_type: ClassVar[str] = "Q5_0"
    qs: jax.Array
    qh: jax.Array
    d: jax.Array

    @classmethod
    def _split(cls, b, xp):
        # ggml block_q5_0: d f16 | qh uint8[4] | qs uint8[16]
        return _flat_field(b, 6, 22, xp=xp), _u32_field(b, 2, xp), _f16_field(b, 0, xp)

    def _dequantize_f32(self):
        q = _q5_codes(self).astype(jnp.int8) - jnp.int8(16)
        return (_block_scale(self.d) * q.astype(jnp.float32)).reshape(self.shape)


@_register
class Q5_1(_PackedNibbles):
    """Block of 32: `x = d * q + m`, q 5-bit. Fields as `Q5_0` plus `m f16 [..., N, K/32]`."""

    ggml_type: ClassVar[str] = "Q5_1"
    qs: jax.Array
    qh: jax.Array
    d: jax.Array
    m: jax.Array

    @classmethod
    def _split(cls, b, xp):
        # ggml block_q5_1: d f16 | m f16 | qh uint8[4] | qs uint8[16]
        return (
            _flat_field(b, 8, 24, xp=xp),
            _u32_field(b, 4, xp),
            _f16_field(b, 0, xp),
            _f16_field(b, 2, xp),
        )

    def _dequantize_f32(self):
        q = _q5_codes(self).astype(jnp.float32)
        return (_block_scale(self.d) * q + _block_scale(self.m)).reshape(self.shape)


# ---------------------------------------------------------------------------------------------
# K-quants (super-blocks of 256)
# ---------------------------------------------------------------------------------------------
def _unpack_k_scales(scales, xp=np):
    """ggml's 12-byte packing of 8 6-bit scales and 8 6-bit mins -> `[..., 8]` each.

    Mirrors `gguf.quants.Q4_K.get_scale_min` (bytes 0-3: scales 0-3 low 6 bits, 4-7: mins 0-3,
    8-11: low/high nibbles of scales/mins 4-7, top 2 bits of bytes 0-7 their high bits).
    """
    d, m, m_d = scales[..., 0:4], scales[..., 4:8], scales[..., 8:12]
    sc = xp.concatenate([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = xp.concatenate([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc, mn


def _k_header(b, xp):
    """The Q4_K/Q5_K block header as fields: `d, dmin` f16 and the 6-bit `sc, m` unpacked to a
    byte each, one row per matrix row (`[..., nb, 8]` -> `[..., nb * 8]`)."""
    sc, m = _unpack_k_scales(b[..., 4:16], xp)
    row = lambda a: a.reshape(*a.shape[:-2], -1)
    return _f16_field(b, 0, xp), _f16_field(b, 2, xp), row(sc), row(m)


def _k_scale_min(t: Q4_K | Q5_K) -> tuple[jax.Array, jax.Array]:
    """`(d * sc, dmin * m)` as f32 `[..., nb, 8, 1]` (exact products, as in gguf-py)."""
    d = jnp.asarray(t.d).astype(jnp.float32)[..., None]  # [..., nb, 1]
    dmin = jnp.asarray(t.dmin).astype(jnp.float32)[..., None]
    sc = _split_blocks(jnp.asarray(t.sc), 8).astype(jnp.float32)  # [..., nb, 8]
    m = _split_blocks(jnp.asarray(t.m), 8).astype(jnp.float32)
    return (d * sc)[..., None], (dmin * m)[..., None]


def _k_low4(qs: jax.Array) -> jax.Array:
    """Q4_K/Q5_K low 4 bits `[..., K/2]` -> `[..., nb, 8, 32]` (sub-block j = 2*chunk + nibble)."""
    qs = _split_blocks(_split_blocks(qs, QK_K // 2), 32)  # [..., nb, 4, 32]
    return _nibbles(qs).reshape(*qs.shape[:-2], 8, 32)


@_register
class Q4_K(_PackedNibbles):
    """Super-block of 256 = 8 sub-blocks j of 32: `x = (d * sc[j]) * q - dmin * m[j]`.

    `qs uint8 [..., N, K/2]` (per super-block 4 chunks of 32 bytes; byte i of chunk c holds
    element 64c+i in its low nibble, 64c+32+i in its high nibble), `d, dmin f16 [..., N,
    K/256]`, `sc, m uint8 [..., N, K/32]` (the 6-bit sub-block scales and mins, unpacked).
    """

    ggml_type: ClassVar[str] = "Q4_K"
    qs: jax.Array
    d: jax.Array
    dmin: jax.Array
    sc: jax.Array
    m: jax.Array

    @classmethod
    def _split(cls, b, xp):
        # ggml block_q4_K: d f16 | dmin f16 | scales uint8[12] | qs uint8[128]
        return (_flat_field(b, 16, 144, xp=xp), *_k_header(b, xp))

    def _dequantize_f32(self):
        scale, mins = _k_scale_min(self)
        q = _k_low4(jnp.asarray(self.qs)).astype(jnp.float32)
        return (scale * q - mins).reshape(self.shape)


@_register
class Q5_K(_PackedNibbles):
    """Q4_K plus a 5th bit per element: `x = (d * sc[j]) * q - dmin * m[j]`, q 5-bit.

    Fields as `Q4_K` plus `qh uint8 [..., N, K/8]` (32 bytes per super-block; bit j of byte i
    is the 5th bit of element 32j+i).
    """

    ggml_type: ClassVar[str] = "Q5_K"
    qs: jax.Array
    qh: jax.Array
    d: jax.Array
    dmin: jax.Array
    sc: jax.Array
    m: jax.Array

    @classmethod
    def _split(cls, b, xp):
        # ggml block_q5_K: d f16 | dmin f16 | scales uint8[12] | qh uint8[32] | qs uint8[128]
        return (_flat_field(b, 48, 176, xp=xp), _flat_field(b, 16, 48, xp=xp), *_k_header(b, xp))

    def _dequantize_f32(self):
        scale, mins = _k_scale_min(self)
        ql = _k_low4(jnp.asarray(self.qs))  # [..., nb, 8, 32]
        qh = _split_blocks(jnp.asarray(self.qh), 32)[..., None, :]  # [..., nb, 1, 32]
        qh = (qh >> jnp.arange(8, dtype=jnp.uint8)[:, None]) & 1  # [..., nb, 8, 32]
        q = (ql | (qh << 4)).astype(jnp.float32)
        return (scale * q - mins).reshape(self.shape)


@_register
class Q6_K(QTensor):
    """Super-block of 256 = 16 sub-blocks j of 16: `x = (d * sc[j]) * (q - 32)`, q 6-bit.

    ggml orders: `ql uint8 [..., N, K/2]` (per super-block 2 halves of 64 bytes; byte t of half
    h holds element 128h+t in its low nibble, 128h+64+t in its high nibble), `qh uint8
    [..., N, K/4]` (2 halves of 32 bytes; bits 2s..2s+1 of byte i of half h are the top 2 bits
    of element 128h+32s+i), `sc int8 [..., N, K/16]`, `d f16 [..., N, K/256]`.
    """

    ggml_type: ClassVar[str] = "Q6_K"
    ql: jax.Array
    qh: jax.Array
    sc: jax.Array
    d: jax.Array

    @property
    def shape(self):
        return (*self.ql.shape[:-1], self.ql.shape[-1] * 2)

    @classmethod
    def _split(cls, b, xp):
        # ggml block_q6_K: ql uint8[128] | qh uint8[64] | scales int8[16] | d f16
        return (
            _flat_field(b, 0, 128, xp=xp),
            _flat_field(b, 128, 192, xp=xp),
            _flat_field(b, 192, 208, np.int8, xp),
            _f16_field(b, 208, xp),
        )

    def _dequantize_f32(self):
        ql = _split_blocks(_split_blocks(jnp.asarray(self.ql), QK_K // 2), 64)  # [..., nb, 2, 64]
        ql = _nibbles(ql).reshape(*ql.shape[:-2], 8, 32)
        qh = _split_blocks(_split_blocks(jnp.asarray(self.qh), QK_K // 4), 32)  # [..., nb, 2, 32]
        qh = (qh[..., None, :] >> jnp.array([0, 2, 4, 6], jnp.uint8)[:, None]) & 3
        qh = qh.reshape(*qh.shape[:-3], 8, 32)
        q = (ql | (qh << 4)).astype(jnp.int8) - jnp.int8(32)
        q = q.reshape(*q.shape[:-2], 16, 16).astype(jnp.float32)  # [..., nb, 16, 16]
        d = jnp.asarray(self.d).astype(jnp.float32)[..., None]  # [..., nb, 1]
        sc = _split_blocks(jnp.asarray(self.sc), 16).astype(jnp.float32)  # [..., nb, 16]
        return ((d * sc)[..., None] * q).reshape(self.shape)


# ---------------------------------------------------------------------------------------------
# Module functions
# ---------------------------------------------------------------------------------------------
def from_gguf(
    data: np.ndarray,
    ggml_type: gguf.GGMLQuantizationType | int | str,
    shape: Sequence[int],
    *,
    name: str | None = None,
) -> QTensor:
    """Repacks one GGUF tensor into its `QTensor` type (numpy fields).

    `data` is `gguf.ReaderTensor.data` (raw block bytes for quantized types and BF16, a typed
    array for F32/F16); `shape` is the logical numpy shape, e.g. `(N, K)` or `(E, N, K)` (the
    reverse of ggml's `ne`). `name`, if given, is quoted in error messages.
    """
    cls = _lookup(ggml_type, name)
    try:
        return cls.from_raw(data, shape)
    except GGUFError as e:
        raise GGUFError(f"{_what(name)}: {e}") from None


def from_gguf_on_device(
    datas: Sequence[np.ndarray],
    ggml_type: gguf.GGMLQuantizationType | int | str,
    shape: Sequence[int],
    *,
    stacked: bool,
    name: str | None = None,
    transfer: Callable[[np.ndarray], concurrent.futures.Future] | None = None,
) -> QTensor:
    """`from_gguf` with the block split done on the default device.

    `datas` holds one tensor's raw data (`stacked=False`) or several same-shape tensors to
    stack on a new leading axis (the layers of a scan segment). Each goes to the device as
    the file stores it (no host-side repack or stack), and one jitted program per (type,
    shape, count, pieces) joins and splits the blocks into fields: the same `_split` code as
    the host path, so the fields are bit-identical. Why: on a GPU host the numpy repack ran at
    ~0.75 GB/s per thread and dominated load time; the device does it at memory bandwidth.

    With `transfer` (numpy piece -> future of the device array; the loader's is
    `file_transfer.FileTransfers`), the bytes travel in whole-row pieces of at most
    `TRANSFER_PIECE_BYTES`, all in flight at once; without it, each tensor is one
    `jax.device_put` here. Why pieces: they spread one tensor (E4B's 3 GB per-layer embedding
    table, or a 42-layer stack) over the transfer threads.
    """
    cls = _lookup(ggml_type, name)
    shape = tuple(int(s) for s in shape)
    try:
        raws = [cls._checked_bytes(d, shape) for d in datas]
    except GGUFError as e:
        raise GGUFError(f"{_what(name)}: {e}") from None
    if not stacked and len(raws) != 1:
        raise ValueError("stacked=False takes exactly one tensor")
    if transfer is None:
        pieces = [[r] for r in raws]
        on_device = [jax.device_put(r) for r in raws]
    else:
        row_bytes = shape[-1] // cls.block_size * cls.type_size
        pieces = [_row_pieces(r, row_bytes) for r in raws]
        futures = [transfer(piece) for ps in pieces for piece in ps]
        on_device = [f.result() for f in futures]
    split = _device_split(cls, shape, tuple(len(ps) for ps in pieces), stacked)
    return cls(*split(*on_device))


# Largest host -> device transfer `from_gguf_on_device` makes (see there): big enough that
# per-call overhead is small, small enough that 16 threads share a 3 GB tensor.
TRANSFER_PIECE_BYTES = 64 << 20


def _row_pieces(flat: np.ndarray, row_bytes: int) -> list[np.ndarray]:
    """`flat` (a tensor's bytes) cut at row boundaries into pieces of at most
    `TRANSFER_PIECE_BYTES` (one row if a row is larger)."""
    step = max(1, TRANSFER_PIECE_BYTES // row_bytes) * row_bytes
    return [flat[i : i + step] for i in range(0, flat.size, step)]


@functools.cache
def _device_split(cls: type[QTensor], shape: tuple[int, ...], pieces: tuple[int, ...], stacked):
    """The jitted join + split for tensors arriving as `pieces[i]` pieces each."""
    n = len(pieces)

    def split(*flat):
        starts = np.cumsum((0, *pieces))
        raws = [
            flat[a] if b - a == 1 else jnp.concatenate(flat[a:b])
            for a, b in zip(starts[:-1], starts[1:], strict=True)
        ]
        b = jnp.stack(raws) if stacked else raws[0]
        lead = (n,) if stacked else ()
        blocks = b.reshape(*lead, *shape[:-1], shape[-1] // cls.block_size, cls.type_size)
        return cls._split(blocks, jnp)

    # Not donated: XLA aliases only buffers of equal shape and type, which the flat raw bytes
    # and the fields never are (it would warn and copy anyway). The raw bytes die on return.
    # Through the executable cache: a warm load then skips tracing and lowering ~30 of these.
    kind = "stacked" if stacked else "single"
    name = f"split_{cls.ggml_type}_{'x'.join(map(str, shape))}_{kind}"
    return CachedProgram(name, split)


def _what(name: str | None) -> str:
    return f"tensor {name!r}" if name else "tensor"


def _lookup(ggml_type, name: str | None) -> type[QTensor]:
    try:
        type_name = (
            gguf.GGMLQuantizationType[ggml_type]
            if isinstance(ggml_type, str)
            else gguf.GGMLQuantizationType(ggml_type)
        ).name
    except (KeyError, ValueError):
        type_name = str(ggml_type)
    cls = _REGISTRY.get(type_name)
    if cls is None:
        raise UnsupportedTensorType(
            f"{_what(name)} has ggml type {type_name}, which is not supported; "
            f"supported types: {', '.join(SUPPORTED_TYPES)}"
        )
    return cls


def stack(tensors: Sequence[QTensor]) -> QTensor:
    """Stacks same-type, same-shape tensors on a new leading axis (e.g. the layers of a scan).

    numpy fields stay numpy (the loader stacks before `device_put`); otherwise jnp is used.
    """
    if not tensors:
        raise ValueError("stack needs at least one tensor")
    cls, shape = type(tensors[0]), tensors[0].shape
    for t in tensors[1:]:
        if type(t) is not cls or t.shape != shape:
            raise ValueError(
                f"stack needs tensors of one type and shape: got {cls.__name__}{list(shape)} "
                f"and {type(t).__name__}{list(t.shape)}"
            )
    fields = zip(*(t.arrays() for t in tensors), strict=True)
    out = []
    for arrays in fields:
        xp = np if all(isinstance(a, np.ndarray) for a in arrays) else jnp
        out.append(xp.stack(arrays))
    return cls(*out)


def matmul_reference(x: jax.Array, w: QTensor, *, precision=jax.lax.Precision.HIGHEST) -> jax.Array:
    """`x[..., K] @ dequantize(w)^T -> [..., N]` for a 2-D `w [N, K]`.

    The weight is dequantized to `x.dtype` (f32 or bf16), products are accumulated in f32 and
    the result is cast back to `x.dtype`: the reference the matmul kernels are checked against.
    """
    if w.ndim != 2:
        raise ValueError(f"matmul_reference needs a 2-D weight [N, K], got shape {w.shape}")
    if x.shape[-1] != w.shape[-1]:
        raise ValueError(f"{x.shape=} does not contract with weight shape {w.shape} over K")
    y = jnp.einsum(
        "...k,nk->...n",
        x,
        w.dequantize(x.dtype),
        precision=precision,
        preferred_element_type=jnp.float32,
    )
    return y.astype(x.dtype)
