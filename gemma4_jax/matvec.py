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

`matvec(x, w)` takes `x[..., K]` with a single row (all leading dims 1) and `w[N, K]`;
`supports(x, w)` says when it applies. ops.matmul uses it in `auto` mode on batch-1 calls.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from . import quant

__all__ = ["FORMATS", "matvec", "supports"]

FORMATS = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")


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


def _rows(a, *shape) -> jax.Array:
    """A field `[N, ...]` viewed as `[N, *shape]`."""
    a = jnp.asarray(a)
    return a.reshape(a.shape[0], *shape)


def _sum(terms: jax.Array) -> jax.Array:
    """Sum `[N, ...]` over everything but N (one row reduction, f32)."""
    return jnp.sum(terms.reshape(terms.shape[0], -1), axis=-1)


def _q8_0(x, w):
    nb = w.shape[1] // 32
    q = _f32(_rows(w.qs, nb, 32))
    d = _f32(_rows(w.d, nb, 1))
    return _sum(q * d * x.reshape(nb, 32))


def _q4_0(x, w):
    # Block of 32 = 16 bytes: byte i holds element i (low nibble) and i + 16 (high nibble).
    nb = w.shape[1] // 32
    qs = _rows(w.qs, nb, 16)
    d = _f32(_rows(w.d, nb, 1))
    xs = x.reshape(nb, 2, 16)
    lo = d * (_f32(qs & 0x0F) - 8.0)
    hi = d * (_f32(qs >> 4) - 8.0)
    return _sum(lo * xs[:, 0] + hi * xs[:, 1])


def _q32_high_bits(w, nb):
    """Q5_0/Q5_1: the 5th bits `[N, nb, 2, 16]` (uint8) of elements i (half 0) and i + 16
    (half 1), i.e. of qs byte i's low and high nibble: bit 16 * half + i of the block's qh."""
    qh = _rows(w.qh, nb, 1, 1)  # [N, nb, 1, 1] uint32
    shift = jnp.arange(32, dtype=jnp.uint32).reshape(2, 16)
    return ((qh >> shift) & 1).astype(jnp.uint8)


def _q4_1(x, w):
    # Q4_0's nibble order, value d * q + m.
    nb = w.shape[1] // 32
    qs = _rows(w.qs, nb, 16)
    d, m = _f32(_rows(w.d, nb, 1)), _f32(_rows(w.m, nb, 1))
    xs = x.reshape(nb, 2, 16)
    lo = d * _f32(qs & 0x0F) + m
    hi = d * _f32(qs >> 4) + m
    return _sum(lo * xs[:, 0] + hi * xs[:, 1])


def _q5_codes(w, nb):
    """Q5_0/Q5_1 5-bit codes of qs byte i's low / high nibble (elements i, i + 16) as f32."""
    qs = _rows(w.qs, nb, 16)
    qh = _q32_high_bits(w, nb)
    return _f32((qs & 0x0F) | (qh[:, :, 0] << 4)), _f32((qs >> 4) | (qh[:, :, 1] << 4))


def _q5_0(x, w):
    # Value d * (q - 16); the offset in f32 (exact), as for Q6_K below.
    nb = w.shape[1] // 32
    q_lo, q_hi = _q5_codes(w, nb)
    d = _f32(_rows(w.d, nb, 1))
    xs = x.reshape(nb, 2, 16)
    return _sum(d * (q_lo - 16.0) * xs[:, 0] + d * (q_hi - 16.0) * xs[:, 1])


def _q5_1(x, w):
    nb = w.shape[1] // 32
    q_lo, q_hi = _q5_codes(w, nb)
    d, m = _f32(_rows(w.d, nb, 1)), _f32(_rows(w.m, nb, 1))
    xs = x.reshape(nb, 2, 16)
    return _sum((d * q_lo + m) * xs[:, 0] + (d * q_hi + m) * xs[:, 1])


def _k_scales(w, nb):
    """Q4_K/Q5_K sub-block scales and mins `[N, nb, 4 chunks, 2 nibbles, 1]` (exact f32)."""
    d = _f32(_rows(w.d, nb, 1, 1, 1))
    dmin = _f32(_rows(w.dmin, nb, 1, 1, 1))
    sc = _f32(_rows(w.sc, nb, 4, 2, 1))
    m = _f32(_rows(w.m, nb, 4, 2, 1))
    return d * sc, dmin * m


def _q4_k(x, w):
    # Super-block of 256 = 4 chunks of 32 bytes: byte i of chunk c holds element 64c + i
    # (low nibble, sub-block 2c) and 64c + 32 + i (high nibble, sub-block 2c + 1).
    nb = w.shape[1] // 256
    qs = _rows(w.qs, nb, 4, 32)
    scale, mins = _k_scales(w, nb)
    xs = x.reshape(nb, 4, 2, 32)
    lo = scale[..., 0, :] * _f32(qs & 0x0F) - mins[..., 0, :]
    hi = scale[..., 1, :] * _f32(qs >> 4) - mins[..., 1, :]
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
    lo = scale[..., 0, :] * _f32(q_lo) - mins[..., 0, :]
    hi = scale[..., 1, :] * _f32(q_hi) - mins[..., 1, :]
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
    sc = _f32(_rows(w.sc, nb, 2, 4, 2, 1))  # [N, nb, h, s, i // 16, 1]
    d = _f32(_rows(w.d, nb, 1, 1, 1))
    xs = x.reshape(nb, 2, 4, 2, 16)  # [nb, h, s, i // 16, i % 16]
    low = (ql[:, :, :, 0] & 0x0F, ql[:, :, :, 1] & 0x0F, ql[:, :, :, 0] >> 4, ql[:, :, :, 1] >> 4)
    acc = None
    for s in range(4):
        # The -32 offset in f32 (exact for 0..63): as an int8 subtraction fused into this
        # reduction, XLA:CPU (jax 0.10.2) summed wrong values under jit (tests/test_matvec.py).
        q = _f32(low[s] | (((qh >> (2 * s)) & 3) << 4)) - 32.0
        term = ((d * sc[:, :, :, s]) * q) * xs[:, :, s]
        acc = term if acc is None else acc + term
    return _sum(acc)


_KERNELS = {
    "Q8_0": _q8_0,
    "Q4_0": _q4_0,
    "Q4_1": _q4_1,
    "Q5_0": _q5_0,
    "Q5_1": _q5_1,
    "Q4_K": _q4_k,
    "Q5_K": _q5_k,
    "Q6_K": _q6_k,
}
