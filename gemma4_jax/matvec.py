"""Batch-1 quantized matvecs written over the *packed* bytes, for XLA to fuse.

`quant.matmul_reference` dequantizes `W[N, K]` to its logical element order and contracts.
With one activation row XLA lowers that to a row reduction, but for the nibble formats the
logical order is not the byte order: ggml packs elements `i` and `i + 32` (or `+ 16`, `+ 64`)
into one byte, so each reduction step reads a byte to use half of it and the scale products
(`d * sc`) become kernels of their own (the profile of an E4B Q4_K_M decode step: the
gate|up reduction at 0.87 TB/s, six scale-product kernels per layer; benchmarks/RESULTS.md).

Here the reduction runs over the packed array itself: every element of the reduced operand is
one stored byte (or, for Q6_K, one byte of high bits and the two low-bit bytes it completes),
and the activation vector is rearranged (once per call, it is K elements) into the same order,
one slice per nibble. Each weight value is computed exactly as `dequantize` computes it (same
f32 operations, so the same value), multiplied by the activation in f32 and summed in f32; only
the summation order differs from the reference, and the weight is not rounded to bf16 first.

Integer codes become f32 through `_codes`: by default with the "magic number" trick (an
integer `u < 2**23` ORed into the mantissa of `2.0**23`, minus `2**23 + bias`: exact, one
integer op and one FADD) rather than XLA's `convert`, which is an I2F instruction at 1/8 of the
FP32 rate on sm_90 (16 per SM per clock). A 4-bit reduction converts a nibble plus its
sub-block's scale and min per element (vectorised loads share some of the latter), so on the
H100 the conversions, not the bytes, bounded XLA's Q4_K reductions (~0.85 TB/s, RESULTS.md).
`GEMMA4_JAX_MATVEC_CODES=convert` restores the plain converts (an A/B switch, read at trace
time); the values are the same either way.

`matvec(x, w)` takes `x[..., K]` with a single row (all leading dims 1) and `w[N, K]`;
`supports(x, w)` says when it applies. ops.matmul uses it in `auto` mode on batch-1 calls.
"""

from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
from jax import lax

from . import quant

__all__ = ["FORMATS", "matvec", "supports"]

FORMATS = ("Q8_0", "Q4_0", "Q4_K", "Q5_K", "Q6_K")


def supports(x: jax.Array, w: quant.QTensor) -> bool:
    """One activation row against a 2-D weight of a packed format."""
    return w.ggml_type in FORMATS and w.ndim == 2 and math.prod(x.shape[:-1]) == 1


def matvec(x: jax.Array, w: quant.QTensor) -> jax.Array:
    """`x[..., K] @ dequantize(w)^T -> [..., N]` in x.dtype for one row (see `supports`)."""
    if not supports(x, w):
        raise ValueError(f"matvec needs one row and a 2-D {FORMATS} weight: {x.shape=}, {w!r}")
    if x.shape[-1] != w.shape[-1]:
        raise ValueError(f"{x.shape=} does not contract with weight shape {w.shape} over K")
    xf = x.reshape(-1).astype(jnp.float32)
    y = _KERNELS[w.ggml_type](xf, w)
    return y.astype(x.dtype).reshape(*x.shape[:-1], y.shape[-1])


def _f32(a) -> jax.Array:
    return jnp.asarray(a).astype(jnp.float32)


_MAGIC = 0x4B000000  # the bits of 2.0**23: integers below 2**23 fill its mantissa exactly


def _magic() -> bool:
    mode = os.environ.get("GEMMA4_JAX_MATVEC_CODES", "magic")
    if mode not in ("magic", "convert"):
        raise ValueError(f"GEMMA4_JAX_MATVEC_CODES={mode!r} is not 'magic' or 'convert'")
    return mode == "magic"


def _codes(q, bias: int = 0) -> jax.Array:
    """Unsigned integer codes `q` (< 2**23) as exact f32 values `q - bias`."""
    q = jnp.asarray(q)
    if not _magic():
        out = _f32(q)
        return out - float(bias) if bias else out
    bits = q.astype(jnp.uint32) | jnp.uint32(_MAGIC)
    return lax.bitcast_convert_type(bits, jnp.float32) - jnp.float32(2**23 + bias)


def _signed_codes(q) -> jax.Array:
    """int8 codes as exact f32 values (offset to unsigned, then `_codes`)."""
    if not _magic():
        return _f32(q)
    u = lax.bitcast_convert_type(jnp.asarray(q), jnp.uint8) ^ jnp.uint8(0x80)
    return _codes(u, bias=128)


def _rows(a, *shape) -> jax.Array:
    """A field `[N, ...]` viewed as `[N, *shape]`."""
    a = jnp.asarray(a)
    return a.reshape(a.shape[0], *shape)


def _sum(terms: jax.Array) -> jax.Array:
    """Sum `[N, ...]` over everything but N (one row reduction, f32)."""
    return jnp.sum(terms.reshape(terms.shape[0], -1), axis=-1)


def _q8_0(x, w):
    nb = w.shape[1] // 32
    q = _signed_codes(_rows(w.qs, nb, 32))
    d = _f32(_rows(w.d, nb, 1))
    return _sum(q * d * x.reshape(nb, 32))


def _q4_0(x, w):
    # Block of 32 = 16 bytes: byte i holds element i (low nibble) and i + 16 (high nibble).
    nb = w.shape[1] // 32
    qs = _rows(w.qs, nb, 16)
    d = _f32(_rows(w.d, nb, 1))
    xs = x.reshape(nb, 2, 16)
    lo = d * _codes(qs & 0x0F, bias=8)
    hi = d * _codes(qs >> 4, bias=8)
    return _sum(lo * xs[:, 0] + hi * xs[:, 1])


def _k_scales(w, nb):
    """Q4_K/Q5_K sub-block scales and mins `[N, nb, 4 chunks, 2 nibbles, 1]` (exact f32)."""
    d = _f32(_rows(w.d, nb, 1, 1, 1))
    dmin = _f32(_rows(w.dmin, nb, 1, 1, 1))
    sc = _codes(_rows(w.sc, nb, 4, 2, 1))
    m = _codes(_rows(w.m, nb, 4, 2, 1))
    return d * sc, dmin * m


def _q4_k(x, w):
    # Super-block of 256 = 4 chunks of 32 bytes: byte i of chunk c holds element 64c + i
    # (low nibble, sub-block 2c) and 64c + 32 + i (high nibble, sub-block 2c + 1).
    nb = w.shape[1] // 256
    qs = _rows(w.qs, nb, 4, 32)
    scale, mins = _k_scales(w, nb)
    xs = x.reshape(nb, 4, 2, 32)
    lo = scale[..., 0, :] * _codes(qs & 0x0F) - mins[..., 0, :]
    hi = scale[..., 1, :] * _codes(qs >> 4) - mins[..., 1, :]
    return _sum(lo * xs[:, :, 0] + hi * xs[:, :, 1])


def _q5_k(x, w):
    # Q4_K's layout plus qh: bit j of byte i (32 bytes per super-block) is the 5th bit of
    # element 32j + i, i.e. bit 2c of byte i for chunk c's low nibble and 2c + 1 for its high.
    nb = w.shape[1] // 256
    qs = _rows(w.qs, nb, 4, 32)
    qh = _rows(w.qh, nb, 1, 32)
    shift = 2 * jnp.arange(4, dtype=jnp.uint8)[:, None]  # [4, 1] per chunk
    scale, mins = _k_scales(w, nb)
    xs = x.reshape(nb, 4, 2, 32)
    q_lo = (qs & 0x0F) | (((qh >> shift) & 1) << 4)
    q_hi = (qs >> 4) | (((qh >> (shift + 1)) & 1) << 4)
    lo = scale[..., 0, :] * _codes(q_lo) - mins[..., 0, :]
    hi = scale[..., 1, :] * _codes(q_hi) - mins[..., 1, :]
    return _sum(lo * xs[:, :, 0] + hi * xs[:, :, 1])


def _q6_k(x, w):
    # Super-block of 256 = 2 halves h of 128. ql: 64 bytes per half, byte t holds element
    # 128h + t (low nibble) and 128h + 64 + t (high). qh: 32 bytes per half, bits 2s..2s+1 of
    # byte i are the top bits of element 128h + 32s + i. So one qh byte (h, i) completes four
    # elements, s = 0..3, whose low bits are the nibbles of ql bytes (h, i) and (h, 32 + i):
    # the reduction runs over the qh bytes, each step reading 1 + 2 bytes it uses entirely.
    # Element 128h + 32s + i has sub-block scale sc[8h + 2s + i // 16].
    nb = w.shape[1] // 256
    ql = _rows(w.ql, nb, 2, 2, 2, 16)  # [N, nb, h, t // 32, i // 16, i % 16]
    qh = _rows(w.qh, nb, 2, 2, 16)  # [N, nb, h, i // 16, i % 16]
    sc = _signed_codes(_rows(w.sc, nb, 2, 4, 2, 1))  # [N, nb, h, s, i // 16, 1]
    d = _f32(_rows(w.d, nb, 1, 1, 1))
    xs = x.reshape(nb, 2, 4, 2, 16)  # [nb, h, s, i // 16, i % 16]
    low = (ql[:, :, :, 0] & 0x0F, ql[:, :, :, 1] & 0x0F, ql[:, :, :, 0] >> 4, ql[:, :, :, 1] >> 4)
    acc = None
    for s in range(4):
        # The -32 offset in f32 (exact for 0..63): as an int8 subtraction fused into this
        # reduction, XLA:CPU (jax 0.10.2) summed wrong values under jit (tests/test_matvec.py).
        q = _codes(low[s] | (((qh >> (2 * s)) & 3) << 4), bias=32)
        term = ((d * sc[:, :, :, s]) * q) * xs[:, :, s]
        acc = term if acc is None else acc + term
    return _sum(acc)


_KERNELS = {"Q8_0": _q8_0, "Q4_0": _q4_0, "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k}
