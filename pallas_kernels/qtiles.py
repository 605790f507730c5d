"""ggml block formats as *runs* of dequantized weights: the piece the qmatmul kernels share.

Fields follow docs/LAYOUT.md (``Q4_K(qs, d, dmin, sc, m)`` and so on, blocks along the last
axis, element order inside a block exactly ggml's). A quant block of ``B`` elements along K is
cut into ``S`` *runs* of ``R = B / S`` consecutive elements, chosen so that one run comes out
of one load of packed bytes with one scale (Q6_K: one scale per half run):

=====  ===  ==  ==  ==========================================================================
fmt     B   S   R   run j of a block
=====  ===  ==  ==  ==========================================================================
Q8_0    32   1  32  ``d * qs[0:32]``
Q4_0    32   2  16  ``d * (nibble j of qs[0:16] - 8)``
Q4_1    32   2  16  ``d * nibble j of qs[0:16] + m``
Q5_0    32   2  16  ``d * ((nibble j of qs[0:16] | 16 * bit 16j + i of qh) - 16)``
Q5_1    32   2  16  ``d * (nibble j of qs[0:16] | 16 * bit 16j + i of qh) + m``
Q4_K   256   8  32  ``(d*sc[j]) * nibble (j%2) of qs chunk j//2 - dmin*m[j]``
Q5_K   256   8  32  as Q4_K, plus ``16 * bit j of qh[0:32]``
Q6_K   256   8  32  ``(d*sc[2j + i//16]) * (nibble (j%4)//2 of ql[64(j//4) + 32(j%2) + i]``
                    ``| 2 bits (j%4) of qh[32(j//4) + i] << 4) - 32)``
=====  ===  ==  ==  ==========================================================================

Because every run holds *consecutive* elements of K, the activations need no permutation for
the CUDA-core kernel: ``x[M, K]`` viewed as ``x[M, K/B, S, R]`` (a free reshape) puts run ``j``
of block ``b`` of x opposite run ``j`` of block ``b`` of W and the kernel multiply-adds run by
run. The tensor-core kernel wants one ``dot`` per step, so ``join_runs`` fuses G runs with
Triton ``join``s (no data movement; the elements come out interleaved) and
``permute_for_join`` applies the same interleave to x, which is tiny, once per call. Nothing
ever undoes ggml's nibble order on the weights.

Integer codes become floats with the "magic number" trick: placing an integer ``u < 2**23``
in the mantissa of ``2.0**23`` and subtracting ``2**23 + bias`` is exact and costs an integer
op plus one FADD, where an int->float conversion runs at 1/8 of the FP32 rate on sm_90 (16 vs
128 per SM per clock) and would cap a 4-bit matvec below the HBM bandwidth. In compiled
kernels the bit surgery is inline PTX (``codes_ptx``: masks and shifts on four packed bytes,
then one ``prmt`` per element); the jnp formulation of the same bits, which interpret mode
uses, lowers through LLVM to ~4 integer instructions per element instead of ~1.3.

Every product here is exact in f32 (f16 scale x 6-bit sub-scale x <= 8-bit code fits in 24
bits), so ``scale * q - min`` (or ``d * q + m``) rounds once whether or not the compiler fuses
it into an FMA and the kernels' f32 weights are bit-identical to ``gguf.quants.dequantize``.

``field_views`` gives each field the block axis (``[..., N, K/B, ...]``, a free reshape);
``tile_runs`` reads one tile of runs from those views (refs inside a kernel, or plain arrays);
``dequantize`` is the independent pure-jnp reference (the order of gguf-py's numpy code).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
from jax import lax

__all__ = [
    "FORMATS",
    "QFormat",
    "check_fields",
    "codes_ptx",
    "dequantize",
    "field_views",
    "INT_DOT_FORMATS",
    "fma",
    "get_format",
    "int_dot_fma",
    "int_dot_ptx",
    "INT_LAYOUT",
    "IntCall",
    "IntLayout",
    "int_calls",
    "int_views",
    "int_x_view",
    "quantize_runs",
    "join_runs",
    "permute_for_join",
    "tile_runs",
    "weight_bytes",
]


@dataclasses.dataclass(frozen=True, slots=True)
class QFormat:
    """Static description of one block format.

    Attributes:
      name: ggml type name.
      block: elements per quant block along K (``B``).
      runs: runs per block (``S``).
      fields: field name -> (dtype, field elements per block, view shape per block).
      bits_per_weight: storage cost, for rooflines.
    """

    name: str
    block: int
    runs: int
    fields: Mapping[str, tuple]
    bits_per_weight: float

    @property
    def run(self) -> int:
        return self.block // self.runs


_U8, _I8, _U32, _F16 = jnp.uint8, jnp.int8, jnp.uint32, jnp.float16
_Q32_NIBBLES = {"qs": (_U8, 16, (16,)), "d": (_F16, 1, ())}  # Q4_0 and its 32-element kin

FORMATS: dict[str, QFormat] = {
    "Q8_0": QFormat("Q8_0", 32, 1, {"qs": (_I8, 32, (32,)), "d": (_F16, 1, ())}, 8.5),
    "Q4_0": QFormat("Q4_0", 32, 2, _Q32_NIBBLES, 4.5),
    "Q4_1": QFormat("Q4_1", 32, 2, {**_Q32_NIBBLES, "m": (_F16, 1, ())}, 5.0),
    "Q5_0": QFormat("Q5_0", 32, 2, {**_Q32_NIBBLES, "qh": (_U32, 1, ())}, 5.5),
    "Q5_1": QFormat("Q5_1", 32, 2, {**_Q32_NIBBLES, "qh": (_U32, 1, ()), "m": (_F16, 1, ())}, 6.0),
    "Q4_K": QFormat(
        "Q4_K",
        256,
        8,
        {
            "qs": (_U8, 128, (4, 32)),
            "d": (_F16, 1, ()),
            "dmin": (_F16, 1, ()),
            "sc": (_U8, 8, (8,)),
            "m": (_U8, 8, (8,)),
        },
        4.5,
    ),
    "Q5_K": QFormat(
        "Q5_K",
        256,
        8,
        {
            "qs": (_U8, 128, (4, 32)),
            "qh": (_U8, 32, (32,)),
            "d": (_F16, 1, ()),
            "dmin": (_F16, 1, ()),
            "sc": (_U8, 8, (8,)),
            "m": (_U8, 8, (8,)),
        },
        5.5,
    ),
    "Q6_K": QFormat(
        "Q6_K",
        256,
        8,
        {
            "ql": (_U8, 128, (4, 32)),
            "qh": (_U8, 64, (2, 32)),
            "sc": (_I8, 16, (16,)),
            "d": (_F16, 1, ()),
        },
        6.5625,
    ),
}


def get_format(fmt: str) -> QFormat:
    try:
        return FORMATS[fmt]
    except KeyError:
        raise ValueError(f"{fmt=} is not one of {tuple(FORMATS)}") from None


def check_fields(fmt: str, fields: Mapping[str, jax.Array]) -> tuple[tuple[int, ...], int, int]:
    """Validates names, dtypes and shapes against LAYOUT.md; returns ``(lead, N, K)``."""
    spec = get_format(fmt)
    if set(fields) != set(spec.fields):
        raise ValueError(f"{fmt} needs fields {sorted(spec.fields)}, got {sorted(fields)}")
    d = fields["d"]
    *lead, n, nb = d.shape
    k = nb * spec.block
    for name, (dtype, per_block, _) in spec.fields.items():
        a = fields[name]
        want = (*lead, n, nb * per_block)
        if tuple(a.shape) != want or jnp.dtype(a.dtype) != jnp.dtype(dtype):
            raise ValueError(
                f"{fmt}.{name}: expected {jnp.dtype(dtype).name}{list(want)} for a "
                f"[..., {n}, {k}] weight, got {jnp.dtype(a.dtype).name}{list(a.shape)}"
            )
    return tuple(lead), n, k


def field_views(fmt: str, fields: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """Each field as ``[..., N, K/B, *per-block shape]`` (row-major reshapes: no copies)."""
    spec = get_format(fmt)
    out = {}
    for name, (_, per_block, shape) in spec.fields.items():
        a = fields[name]
        nb = a.shape[-1] // per_block
        out[name] = a.reshape(*a.shape[:-1], nb, *shape)
    return out


def weight_bytes(fmt: str, n: int, k: int) -> int:
    """Bytes of all fields of an ``[N, K]`` weight (what one matvec must read)."""
    spec = get_format(fmt)
    nb = k // spec.block
    return sum(
        n * nb * per_block * jnp.dtype(dt).itemsize for dt, per_block, _ in spec.fields.values()
    )


# ---------------------------------------------------------------------------------------------
# In-kernel dequantization of one tile (also runs on plain arrays)
# ---------------------------------------------------------------------------------------------
_MAGIC = 0x4B000000  # bit pattern of 2.0**23


def _f32(a: jax.Array) -> jax.Array:
    return a.astype(jnp.float32)


def _u8(a: jax.Array) -> jax.Array:
    return lax.bitcast_convert_type(a, jnp.uint8) if a.dtype == jnp.int8 else a


def _shift(a, n: int):
    """``a << n`` (``a >> -n`` for negative ``n``); bytes in jnp, packed words in PTX."""
    return a << n if n > 0 else (a >> -n if n < 0 else a)


def _ptx_shift(dst: str, src: str, n: int) -> str:
    if n > 0:
        return f"shl.b32 {dst}, {src}, {n};"
    if n < 0:
        return f"shr.b32 {dst}, {src}, {-n};"
    return f"mov.b32 {dst}, {src};"


def _code_bits_ptx(dst: str, nibble: int | None, high: tuple[int, int] | None) -> list[str]:
    """PTX lines leaving in ``dst`` the 4 integer codes of the packed bytes in ``$4`` (as
    ``_code_bits``; the high-bit bytes in ``$5``, scratch register ``h``)."""
    if nibble is None:
        lines = [f"xor.b32 {dst}, $4, 0x80808080;"]
    elif nibble == 0:
        lines = [f"and.b32 {dst}, $4, 0x0F0F0F0F;"]
    else:
        lines = [f"shr.b32 {dst}, $4, 4;", f"and.b32 {dst}, {dst}, 0x0F0F0F0F;"]
    if high is not None:
        n, mask = high
        m4 = int.from_bytes(bytes([mask]) * 4, "little")
        lines += [_ptx_shift("h", "$5", n), f"and.b32 h, h, {m4:#x};", f"or.b32 {dst}, {dst}, h;"]
    return lines


def _code_bits(q, nibble: int | None, high=None):
    """The integer codes of the bytes ``q`` (jnp): ``q + 128`` (int8 ``q``, ``nibble=None``),
    else nibble ``nibble`` OR'ed with ``shift(qh, n) & mask`` for ``high=(qh, n, mask)``."""
    if nibble is None:
        u = _u8(q) ^ 0x80
    else:
        u = (q >> 4 * nibble) & 15
    if high is not None:
        qh, n, mask = high
        u = u | (_shift(qh, n) & mask)
    return u


def codes_ptx(nibble: int | None, high: tuple[int, int] | None) -> str:
    """Inline PTX for ``_codes``: ``$4`` holds 4 packed bytes of q (``$5``: of qh when ``high =
    (shift, mask)``), ``$0..$3`` receive the f32 bit patterns ``0x4B0000cc`` (= 2**23 + code)
    of bytes 0..3. Triton packs element ``i`` of each group of 4 into byte ``i``."""
    lines = [
        "{",
        ".reg .b32 t, h, m;",
        f"mov.b32 m, {_MAGIC:#x};",
        *_code_bits_ptx("t", nibble, high),
    ]
    # prmt selector 0x744k: byte 0 <- byte k of t, bytes 1-2 <- 0x00, byte 3 <- 0x4B (of m)
    lines += [f"prmt.b32 ${k}, t, m, {0x7440 + k:#x};" for k in range(4)]
    lines.append("}")
    return "\n".join(lines)


def _codes(q, *, bias: int, nibble: int | None, high=None, asm: bool) -> jax.Array:
    """``float(code) - bias`` for every byte of ``q`` (uint8, or int8 when ``nibble`` is None).

    code = ``q + 128`` (int8 ``q``, ``nibble=None``), else nibble ``nibble`` of ``q`` OR'ed with
    ``shift(qh, n) & mask`` for ``high=(qh, n, mask)``: the 5th/6th bits of Q5_K/Q6_K.

    The float is built by the magic-number trick (module docstring). With ``asm`` (compiled
    GPU kernels) the bit surgery runs in inline PTX on four packed bytes per 32-bit register and
    one ``prmt`` per element places the code byte under the exponent of 2**23; the Triton/LLVM
    lowering of the same jnp code unpacks every byte first and spends ~4 integer instructions
    per element, which made the 4-bit matvec issue-bound on sm_90 (see module docstring).
    """
    if not asm:
        bits = _code_bits(q, nibble, high).astype(jnp.int32) | _MAGIC
    else:
        from jax.experimental.pallas import triton as plgpu

        args = [q] if high is None else [q, high[0]]
        text = codes_ptx(nibble, None if high is None else high[1:])
        [bits] = plgpu.elementwise_inline_asm(
            text,
            args=args,
            constraints="=r,=r,=r,=r," + ",".join("r" * len(args)),
            pack=4,
            result_shape_dtypes=[jax.ShapeDtypeStruct(q.shape, jnp.int32)],
        )
    return lax.bitcast_convert_type(bits, jnp.float32) - jnp.float32(2**23 + bias)


def fma(a, b, c, *, asm: bool) -> jax.Array:
    """``a * b + c`` in f32, one rounding on the GPU (``asm``: inline PTX ``fma.rn.f32``).

    The Triton lowering does not contract a multiply and an add into an FMA: Nsight Compute
    counted separate FMUL and FADD instructions in the vector kernel's inner loop (RESULTS.md
    run s), two issue slots where one does. Interpret mode keeps the plain expression."""
    if not asm:
        return a * b + c
    from jax.experimental.pallas import triton as plgpu

    shape = jnp.broadcast_shapes(jnp.shape(a), jnp.shape(b), jnp.shape(c))
    args = [jnp.broadcast_to(jnp.asarray(v, jnp.float32), shape) for v in (a, b, c)]
    [y] = plgpu.elementwise_inline_asm(
        "fma.rn.f32 $0, $1, $2, $3;",
        args=args,
        constraints="=r,r,r,r",
        pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(shape, jnp.float32)],
    )
    return y


def _runs_q8_0(refs, ix, asm, want):
    q = refs["qs"][(*ix, slice(None))]  # int8 [..., 32]
    d = _f32(refs["d"][ix])[..., None]
    return [_codes(q, bias=128, nibble=None, asm=asm) * d]


def _runs_q4_0(refs, ix, asm, want):
    q = refs["qs"][(*ix, slice(None))]  # uint8 [..., 16]
    d = _f32(refs["d"][ix])[..., None]
    return [_codes(q, bias=8, nibble=s, asm=asm) * d for s in want]


def _runs_q45_01(refs, ix, asm, want, *, fifth_bit: bool, offset: bool):
    """Q4_1 (offset), Q5_0 (fifth_bit) and Q5_1 (both): Q4_0's nibble runs, plus the 5th bit
    of element 16j + i (bit 16j + i of the block's qh word, moved to bit 4) and/or the block
    offset m: ``d * q + m`` is one FMA of an exact product, bit-identical to gguf-py."""
    q = refs["qs"][(*ix, slice(None))]  # uint8 [..., 16]
    d = _f32(refs["d"][ix])[..., None]
    m = _f32(refs["m"][ix])[..., None] if offset else None
    lane = lax.broadcasted_iota(jnp.int32, (16,), 0).astype(jnp.uint32)
    runs = []
    for j in want:
        high = None
        if fifth_bit:
            bits = (refs["qh"][ix][..., None] >> (lane + jnp.uint32(16 * j))) & 1  # [..., 16]
            high = (bits.astype(jnp.uint8), 4, 0x10)
        u = _codes(q, bias=0 if offset else 16, nibble=j, high=high, asm=asm)
        runs.append(fma(d, u, m, asm=asm) if offset else u * d)
    return runs


def _runs_q45_k(refs, ix, asm, want, *, fifth_bit: bool):
    d = _f32(refs["d"][ix])
    dmin = _f32(refs["dmin"][ix])
    qh = refs["qh"][(*ix, slice(None))] if fifth_bit else None  # uint8 [..., 32]
    chunks = {}
    runs = []
    for j in want:
        c, s = divmod(j, 2)
        if c not in chunks:
            chunks[c] = refs["qs"][(*ix, c, slice(None))]  # uint8 [..., 32]: bytes of chunk c
        high = (qh, 4 - j, 0x10) if fifth_bit else None  # bit j of qh -> bit 4
        u = _codes(chunks[c], bias=0, nibble=s, high=high, asm=asm)
        scale = (d * _f32(refs["sc"][(*ix, j)]))[..., None]
        mins = (dmin * _f32(refs["m"][(*ix, j)]))[..., None]
        runs.append(fma(scale, u, -mins, asm=asm))  # scale * u is exact: same bits either way
    return runs


def _runs_q6_k(refs, ix, asm, want):
    d = _f32(refs["d"][ix])
    first_half = lax.broadcasted_iota(jnp.int32, (32,), 0) < 16  # element i of a run: i < 16
    loaded = {}

    def load(name, i):
        if (name, i) not in loaded:
            loaded[name, i] = refs[name][(*ix, i, slice(None))]  # uint8 [..., 32]
        return loaded[name, i]

    runs = []
    for j in want:
        h, r = divmod(j, 4)  # 128-element half h, run r of that half
        # low 4 bits: nibble r // 2 of ql half r % 2; bits 2r, 2r+1 of qh -> bits 4, 5
        high = (load("qh", h), 4 - 2 * r, 0x30)
        u = _codes(load("ql", 2 * h + r % 2), bias=32, nibble=r // 2, high=high, asm=asm)
        s_lo = (d * _f32(refs["sc"][(*ix, 2 * j)]))[..., None]
        s_hi = (d * _f32(refs["sc"][(*ix, 2 * j + 1)]))[..., None]
        runs.append(jnp.where(first_half, s_lo, s_hi) * u)
    return runs


_RUNS: dict[str, Callable] = {
    "Q8_0": _runs_q8_0,
    "Q4_0": _runs_q4_0,
    "Q4_1": lambda *a: _runs_q45_01(*a, fifth_bit=False, offset=True),
    "Q5_0": lambda *a: _runs_q45_01(*a, fifth_bit=True, offset=False),
    "Q5_1": lambda *a: _runs_q45_01(*a, fifth_bit=True, offset=True),
    "Q4_K": lambda *a: _runs_q45_k(*a, fifth_bit=False),
    "Q5_K": lambda *a: _runs_q45_k(*a, fifth_bit=True),
    "Q6_K": _runs_q6_k,
}


def tile_runs(
    fmt: str, refs: Mapping, index: tuple, *, asm: bool = False, runs: range | None = None
) -> list[jax.Array]:
    """Runs ``runs`` (default: all ``S``) of the weight blocks at ``index``, dequantized to f32.

    ``refs`` maps field names to ``field_views`` (Pallas refs in a kernel, or arrays);
    ``index`` indexes their leading ``[..., N, K/B]`` axes (e.g. ``(expert, pl.ds(n0, bn),
    pl.ds(b0, nbk))`` or ``(pl.ds(n0, bn), b)``). Run ``j`` has shape ``[*index shape, R]``
    and holds elements ``j*R .. j*R + R - 1`` of each indexed block. ``asm`` selects the
    inline-PTX code extraction (compiled Triton kernels only; bit-identical results).
    """
    spec = get_format(fmt)
    want = range(spec.runs) if runs is None else runs
    return _RUNS[fmt](refs, tuple(index), asm, want)


# ---------------------------------------------------------------------------------------------
# Integer dot products: x as two int8 planes of a 15-bit code per run (batch-1 vector kernel)
# ---------------------------------------------------------------------------------------------
# Formats whose blocks ``int_calls`` gives as raw codes (``INT_LAYOUT`` describes them).
INT_DOT_FORMATS = ("Q4_K", "Q6_K")
_ROUND_MAGIC = 12582912.0  # 1.5 * 2**23: adding it rounds |v| < 2**22 to an integer, in the bits
_ROUND_BITS = 0x4B400000  # its bit pattern


def quantize_runs(x: jax.Array, run_axes: int = 1):
    """Runs of ``x`` (its last ``run_axes`` axes; any float dtype) as integer codes for
    ``int_dot_fma``: ``(hi, lo, xs, xsum)``, the planes in x's shape, the steps
    ``x.shape[:-1]`` (a run's step repeated over its other axes) and the sums over x's last
    axis.

    Each run gets a power-of-two step ``xs`` with every ``|x / xs| < 2**14``;
    ``q = round(x / xs) = 256 * hi + lo`` with ``hi`` int8 in [-64, 64] and ``lo`` uint8, so a
    run's dot with 4-bit codes is two ``dp4a`` per four weights, exact in int32. The step is a
    power of two, so ``x / xs`` is exact and only the rounding to an integer loses anything:
    for a bf16 x (8 significant bits) every element within 2**6 of the run's largest is exact,
    smaller ones are off by at most ``2**-15`` of the largest. ``xsum`` (the sums of x itself,
    f32) carries the formats' min term. Plain jnp: the vector kernel runs it on its x tiles.
    """
    xf = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(xf), axis=-1)
    for _ in range(run_axes - 1):
        amax = jnp.max(amax, axis=-1, keepdims=True)
    # amax < 2**(e - 126) for its biased exponent e; the step 2**(e - 140) leaves 14 bits.
    # e >= 14 keeps both powers normal (a run of zeros, or of values below 2**-113).
    e = jnp.maximum((lax.bitcast_convert_type(amax, jnp.int32) >> 23) & 0xFF, 14)
    e = jnp.broadcast_to(e, x.shape[:-1])
    xs = lax.bitcast_convert_type((e - 13) << 23, jnp.float32)
    inv = lax.bitcast_convert_type((267 - e) << 23, jnp.float32)
    # x * inv is exact; adding 1.5 * 2**23 rounds it to the nearest integer (ties to even),
    # which the low mantissa bits then hold.
    t = xf * inv[..., None] + jnp.float32(_ROUND_MAGIC)
    q = lax.bitcast_convert_type(t, jnp.int32) - _ROUND_BITS
    return (q >> 8).astype(jnp.int8), (q & 0xFF).astype(jnp.uint8), xs, xf.sum(axis=-1)


@dataclasses.dataclass(frozen=True)
class IntLayout:
    """How ``int_calls`` cuts a block: ``x_block`` is the shape one block of x is viewed as
    (``int_x_view``), ``x_index`` the static index into it of each call's x tile, whose last
    ``run_axes`` axes are one run (one step for x's codes); ``views`` the shapes the weight's
    fields are viewed as per block (``int_views``)."""

    x_block: tuple[int, ...]
    x_index: tuple[tuple, ...]
    run_axes: int
    views: Mapping[str, tuple[int, ...]]


_A = slice(None)
INT_LAYOUT = {
    # Run j = 2c + s: chunk c of qs, nibble s; scales and mins at [c, s].
    "Q4_K": IntLayout((4, 2, 32), ((_A, 0, _A), (_A, 1, _A)), 1, {"sc": (4, 2), "m": (4, 2)}),
    # Run j = 4h + 2s + p: nibble s of ql chunk 2h + p, bits 2(2s + p) of qh chunk h; a scale
    # per 16 elements (the last axes: half, 16).
    "Q6_K": IntLayout(
        (2, 2, 2, 2, 16),
        tuple((_A, s, p, _A, _A) for s in (0, 1) for p in (0, 1)),
        2,
        {"ql": (2, 2, 2, 16), "qh": (2, 2, 16), "sc": (2, 2, 2, 2)},
    ),
}


def _int_layout(fmt: str) -> IntLayout:
    if fmt not in INT_DOT_FORMATS:
        raise ValueError(f"integer dot products cover {INT_DOT_FORMATS}, not {fmt}")
    return INT_LAYOUT[fmt]


def int_views(fmt: str, views: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """``field_views`` reshaped for ``int_calls`` (free reshapes of each block's fields)."""
    shapes = _int_layout(fmt).views
    out = {}
    for name, v in views.items():
        per_block = get_format(fmt).fields[name][2]
        lead = v.shape[: v.ndim - len(per_block)]
        out[name] = v.reshape(*lead, *shapes[name]) if name in shapes else v
    return out


def int_x_view(fmt: str, x: jax.Array) -> jax.Array:
    """``x[M, K]`` viewed as ``[M, K/B, *x_block]`` for ``int_calls``' x tiles."""
    spec = get_format(fmt)
    return x.reshape(x.shape[0], x.shape[1] // spec.block, *_int_layout(fmt).x_block)


@dataclasses.dataclass(frozen=True)
class IntCall:
    """One ``int_dot_fma`` over a tile: ``q`` packed code bytes, ``nibble`` and ``high``
    (``(qh bytes, shift, mask)`` or None) as in ``_codes``; the weights are
    ``scale * code - min`` with ``scale``/``min`` one per run piece (``q.shape[:-1]``); its x
    tile is ``INT_LAYOUT[fmt].x_index[i]`` of the block's x."""

    q: jax.Array
    nibble: int
    high: tuple | None
    scale: jax.Array
    min: jax.Array


def int_calls(fmt: str, refs: Mapping, index: tuple) -> list[IntCall]:
    """The blocks at ``index`` (as ``tile_runs``; ``refs`` are ``int_views``) as the calls of
    ``int_dot_fma`` that cover them, one per entry of ``INT_LAYOUT[fmt].x_index``. Whole
    blocks in a few wide loads: per-run loads of the scales were each a scattered byte per row
    (Nsight Compute, RESULTS.md run u)."""
    _int_layout(fmt)
    ix = tuple(index)
    d = _f32(refs["d"][ix])
    if fmt == "Q4_K":
        d, dmin = d[..., None], _f32(refs["dmin"][ix])[..., None]
        q = refs["qs"][(*ix, _A, _A)]  # [..., 4, 32]
        calls = []
        for s in (0, 1):  # scales and mins [..., 4]: one per chunk
            scale = d * _f32(refs["sc"][(*ix, _A, s)])
            calls.append(IntCall(q, s, None, scale, dmin * _f32(refs["m"][(*ix, _A, s)])))
        return calls
    # Q6_K: weights d * sc * (code - 32): the min is 32 * d * sc.
    d = d[..., None, None]
    qh = refs["qh"][(*ix, _A, _A, _A)]  # [..., 2 (h), 2 (half), 16]
    calls = []
    for s in (0, 1):
        for p in (0, 1):
            q = refs["ql"][(*ix, _A, p, _A, _A)]  # [..., 2 (h), 2 (half), 16]
            scale = d * _f32(refs["sc"][(*ix, _A, s, p, _A)])  # [..., 2 (h), 2 (half)]
            calls.append(IntCall(q, s, (qh, 4 - 2 * (2 * s + p), 0x30), scale, 32.0 * scale))
    return calls


def int_dot_ptx(nibble: int, high: tuple[int, int] | None = None) -> str:
    """Inline PTX for ``int_dot_fma`` on four elements: ``$4`` packed code bytes (and ``$5``
    packed high-bit bytes when ``high = (shift, mask)``), then the packed hi (int8) / lo
    (uint8) planes of x, the scale (and 3 copies), the 4 accumulators in; ``$0-$3`` out."""
    a = 5 if high is None else 6  # first operand after the code bytes
    hi, lo, sc, acc = f"${a}", f"${a + 1}", f"${a + 2}", a + 6
    return "\n".join(
        ["{", ".reg .b32 c, h, l;", *_code_bits_ptx("c", nibble, high)]
        + [
            f"dp4a.u32.s32 h, c, {hi}, 0;",  # sum of code * hi (signed)
            f"dp4a.u32.u32 l, c, {lo}, 0;",  # sum of code * lo (unsigned)
            "mad.lo.s32 h, h, 256, l;",  # the exact integer dot, |h| < 2**22 (6-bit codes too)
            f"add.s32 h, h, {_ROUND_BITS:#x};",  # magic-number int -> float (full rate)
            f"sub.f32 h, h, 0f{_ROUND_BITS:08X};",
            f"fma.rn.f32 $0, h, {sc}, ${acc};",
            f"mov.b32 $1, ${acc + 1};",
            f"mov.b32 $2, ${acc + 2};",
            f"mov.b32 $3, ${acc + 3};",
            "}",
        ]
    )


def int_dot_fma(q, hi, lo, scale, acc, *, nibble: int, high=None, asm: bool) -> jax.Array:
    """``acc`` plus ``scale * sum(code * (256 * hi + lo))`` over each group of 4 consecutive
    elements, added to the group's first element (the other three pass through).

    ``q`` holds the packed code bytes (``nibble`` 0 or 1 of each, OR'ed with
    ``shift(qh, n) & mask`` for ``high = (qh, n, mask)``, as ``_codes``), ``hi``/``lo`` x's
    planes (``quantize_runs``), all of ``acc``'s shape ``[..., R]`` (broadcast by the caller);
    ``scale`` is the same for the 4 elements of a group. With ``asm`` (compiled kernels) one
    inline-PTX call per 4 elements does it with two ``dp4a``: ~2 instructions per weight
    where the float path (``tile_runs`` + ``fma``) spends ~5 plus x's conversion. Which 4
    elements the compiled call groups is Triton's packing order (4 consecutive elements a
    thread holds): the vector kernel's tiles keep at least 8 consecutive bytes per thread
    (runs, or halves of a Q6_K run), so a group never straddles two scales; the GPU tests
    against the reference would catch it if one did.
    """
    if asm:
        from jax.experimental.pallas import triton as plgpu

        codes = [q] if high is None else [q, high[0]]
        [y] = plgpu.elementwise_inline_asm(
            int_dot_ptx(nibble, None if high is None else high[1:]),
            args=[*codes, hi, lo, scale, acc],
            constraints="=r,=r,=r,=r," + ",".join("r" * (len(codes) + 10)),
            pack=4,
            result_shape_dtypes=[jax.ShapeDtypeStruct(acc.shape, jnp.float32)],
        )
        return y
    x_codes = hi.astype(jnp.int32) * 256 + lo.astype(jnp.int32)
    prod = _code_bits(q, nibble, high).astype(jnp.int32) * x_codes
    *lead, r = acc.shape
    groups = prod.reshape(*lead, r // 4, 4).sum(axis=-1).astype(jnp.float32)
    first = scale.reshape(*lead, r // 4, 4)[..., 0] * groups
    one_hot = lax.broadcasted_iota(jnp.int32, (*lead, r // 4, 4), len(lead) + 1) == 0
    add = jnp.where(one_hot, first[..., None], 0.0).reshape(acc.shape)
    return acc + add


def join_runs(runs: list[jax.Array]) -> jax.Array:
    """``G`` runs ``[rows, ..., R]`` (G a power of two) -> one ``[rows, G * ... * R]`` tile.

    Built with pairwise ``stack(axis=-1)`` (Triton ``join``: no data movement) and a reshape,
    so within each R-element stretch the runs come out interleaved: element ``i`` of run ``q``
    lands at ``i * G + bitreverse(q)``. ``permute_for_join`` puts x in the same order, which
    lets a kernel contract G runs (or G runs of several blocks) with a single ``dot``: Triton
    fuses ``acc + dot(a, b)`` into the MMA accumulator only for a single dot per loop step.
    """
    while len(runs) > 1:
        runs = [jnp.stack(runs[k : k + 2], axis=-1) for k in range(0, len(runs), 2)]
    (t,) = runs
    return t.reshape(t.shape[0], -1)


def permute_for_join(x: jax.Array, fmt: str, group: int) -> jax.Array:
    """``x[..., K]`` reordered to match ``join_runs`` of ``group`` consecutive runs per block."""
    spec = get_format(fmt)
    levels = _log2(group)
    if group < 1 or 1 << levels != group or spec.runs % group:
        raise ValueError(f"{group=} must be a power of two dividing {spec.runs} runs of {fmt}")
    *lead, k = x.shape
    nl = len(lead)
    # [..., nb, S/G, q_{L-1}, ..., q_0, R] -> [..., nb, S/G, R, q_0, ..., q_{L-1}]
    t = x.reshape(*lead, k // spec.block, spec.runs // group, *([2] * levels), spec.run)
    q_axes = [nl + 2 + a for a in range(levels)]  # q_{L-1} .. q_0
    perm = [*range(nl + 2), nl + 2 + levels, *reversed(q_axes)]
    return t.transpose(perm).reshape(*lead, k)


def _log2(n: int) -> int:
    return int(n).bit_length() - 1


# ---------------------------------------------------------------------------------------------
# Reference dequantization (pure jnp, written independently of the tile code above)
# ---------------------------------------------------------------------------------------------
def _nibbles(q: jax.Array) -> jax.Array:
    """``[..., w]`` bytes -> ``[..., 2, w]``: low nibbles, then high nibbles."""
    return jnp.stack([q & 0x0F, q >> 4], axis=-2)


def dequantize(fmt: str, fields: Mapping[str, jax.Array]) -> jax.Array:
    """The ``[..., N, K]`` float32 weight, bit-identical to ``gguf.quants.dequantize``."""
    lead, n, k = check_fields(fmt, fields)
    v = field_views(fmt, fields)
    if fmt == "Q8_0":
        w = _f32(v["qs"]) * _f32(v["d"])[..., None]
    elif fmt == "Q4_0":
        q = _nibbles(v["qs"]).reshape(*v["qs"].shape[:-1], 32)
        w = _f32(v["d"])[..., None] * (_f32(q) - 8.0)
    elif fmt in ("Q4_1", "Q5_0", "Q5_1"):
        q = _nibbles(v["qs"]).reshape(*v["qs"].shape[:-1], 32)  # [..., nb, 32]
        if fmt != "Q4_1":
            hi = (v["qh"][..., None] >> jnp.arange(32, dtype=jnp.uint32)) & 1
            q = q | (hi.astype(jnp.uint8) << 4)
        d = _f32(v["d"])[..., None]
        w = d * (_f32(q) - 16.0) if fmt == "Q5_0" else d * _f32(q) + _f32(v["m"])[..., None]
    elif fmt in ("Q4_K", "Q5_K"):
        q = _nibbles(v["qs"]).reshape(*v["qs"].shape[:-2], 8, 32)  # [..., nb, 8, 32]
        if fmt == "Q5_K":
            hi = (v["qh"][..., None, :] >> jnp.arange(8, dtype=jnp.uint8)[:, None]) & 1
            q = q | (hi << 4)
        scale = (_f32(v["d"])[..., None] * _f32(v["sc"]))[..., None]  # [..., nb, 8, 1]
        mins = (_f32(v["dmin"])[..., None] * _f32(v["m"]))[..., None]
        w = scale * _f32(q) - mins
    elif fmt == "Q6_K":
        ql = v["ql"].reshape(*v["ql"].shape[:-2], 2, 64)  # [..., nb, 2 halves, 64]
        ql = _nibbles(ql).reshape(*ql.shape[:-2], 8, 32)
        qh = (v["qh"][..., None, :] >> jnp.array([0, 2, 4, 6], jnp.uint8)[:, None]) & 3
        qh = qh.reshape(*qh.shape[:-3], 8, 32)
        q = (_f32(ql | (qh << 4)) - 32.0).reshape(*ql.shape[:-2], 16, 16)
        scale = _f32(v["d"])[..., None] * _f32(v["sc"])  # [..., nb, 16]
        w = scale[..., None] * q
    else:  # pragma: no cover - get_format already rejected it
        raise AssertionError(fmt)
    return w.reshape(*lead, n, k)
