"""Residual add of a normed branch + the next RMSNorm, one launch per decode row (Pallas GPU).

Contract: ``residual_norm(h[R, D] f32, a[R, D], w_a[L, D], w_n[L, D], layer, *, eps, out_dtype,
scale=None | [L]) -> (h2, x)`` with, per row,
``h2 = (h + rms_norm(a, w_a[layer])) * scale[layer]`` (the norm rounded to ``a.dtype`` before
the add, as the model's `rms_norm` returns its input's dtype; no scale: 1) and
``x = rms_norm(h2, w_n[layer_n])`` in ``out_dtype``, where ``rms_norm(x, w) = x * rsqrt(mean(x^2)
+ eps) * w`` in f32 and ``layer_n`` is ``layer_next`` if given, else ``layer``.

Why a kernel for so little arithmetic: in a batch-1 decode step this is the glue between the
attention output projection and the MLP (post-attention norm, residual add, pre-MLP norm), and
between one layer and the next (the last post-norm, residual add, layer scale, and the next
layer's attention norm, whose weight may sit in another stack: ``w_n`` and ``layer_next``).
XLA runs it as three kernels of ~1.3-2.9 us (the statistics of ``a``; the add fused with the
statistics of ``h2``; the normalised row), each a launch whose work is a few KB. Here it is one
launch: a program per row holds the whole row (D padded to a power of two, masked) and does
both reductions in registers.

The weights come stacked ``[L, D]`` with ``layer`` (read inside the kernel), so the model's
layer scan passes them whole: a slice before the call would be a copy per layer and step.

``a`` may arrive as split-K partial sums ``[S, R, D]`` of its projection (``a_dtype`` given;
``qmatmul.stacked_qmatmul_many(..., parts=True)``): the kernel adds them while loading and
rounds to ``a_dtype``, the value the summed projection would have had, which saves XLA's
summing launch at batch 1.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import _compat

__all__ = ["BlockSizes", "residual_norm", "residual_norm_reference"]


@dataclasses.dataclass(frozen=True, slots=True)
class BlockSizes:
    """Launch parameters; ``None`` picks the heuristic (see ``resolve``).

    Attributes:
      num_warps: Triton warps per program (one program per row).
    """

    num_warps: int | None = None

    def resolve(self, *, dim: int) -> BlockSizes:
        # ~8 f32 values per thread and tensor at D = 2560 with 4 warps (D padded to 4096).
        return BlockSizes(self.num_warps or (4 if dim <= 4096 else 8))


def _residual_norm_kernel(*refs, dim, eps, has_scale, a_dtype, parts):
    # layer_ref, next_ref [] int32 | h_ref [Dp] f32 | a_ref [Dp] ([S, Dp] partials) |
    # wa_ref [L, Dp] | wn_ref [Ln, Dp] | s_ref [L] f32 (only with has_scale) | outs [Dp]
    if has_scale:
        layer_ref, next_ref, h_ref, a_ref, wa_ref, wn_ref, s_ref, h_out, x_out = refs
    else:
        layer_ref, next_ref, h_ref, a_ref, wa_ref, wn_ref, h_out, x_out = refs
    dp = h_ref.shape[-1]
    ok = jnp.arange(dp, dtype=jnp.int32) < dim  # D padded to a power of two
    layer, nxt = layer_ref[()], next_ref[()]
    cols = pl.ds(0, dp)
    if parts:  # split-K partials of the projection: their sum, rounded as XLA's sum would be
        a = _compat.load_partials_sum(a_ref, (), mask=ok).astype(a_dtype).astype(jnp.float32)
    else:
        a = _compat.load(a_ref, mask=ok, other=0).astype(jnp.float32)
    w_a = _compat.load(wa_ref.at[layer, cols], mask=ok, other=0).astype(jnp.float32)
    w_n = _compat.load(wn_ref.at[nxt, cols], mask=ok, other=0).astype(jnp.float32)
    r = lax.rsqrt(jnp.sum(a * a) / dim + eps)
    branch = (a * r * w_a).astype(a_dtype).astype(jnp.float32)  # the model rounds here
    h2 = _compat.load(h_ref, mask=ok, other=0).astype(jnp.float32) + branch
    if has_scale:
        h2 = h2 * _compat.load(s_ref.at[pl.ds(layer, 1)]).astype(jnp.float32)  # [1]
    _compat.store(h_out, h2.astype(h_out.dtype), mask=ok)
    r2 = lax.rsqrt(jnp.sum(h2 * h2) / dim + eps)
    _compat.store(x_out, (h2 * r2 * w_n).astype(x_out.dtype), mask=ok)


def _validate(h, a, w_a, w_n, layer, layer_next, scale, a_dtype):
    if a_dtype is not None:
        if a.ndim != 3:
            raise ValueError(f"{a.shape=} must be [S, R, D] partials when a_dtype is given")
        a = a[0]
    if h.ndim != 2 or a.shape != h.shape:
        raise ValueError(f"{h.shape=} and {a.shape=} must be equal and [R, D]")
    if h.dtype != jnp.float32:
        raise ValueError(f"{h.dtype=} must be float32 (the residual stream)")
    d = h.shape[1]
    for name, w in (("w_a", w_a), ("w_n", w_n)):
        if w.ndim != 2 or w.shape[1] != d:
            raise ValueError(f"{name}.shape={w.shape} must be [L, {d}]")
    if layer_next is None and w_a.shape != w_n.shape:
        raise ValueError(f"{w_a.shape=} must equal {w_n.shape=} (or give layer_next)")
    if scale is not None and scale.shape != (w_a.shape[0],):
        raise ValueError(f"{scale.shape=} must be ({w_a.shape[0]},): one per stacked layer")
    for name, i in (("layer", layer), ("layer_next", layer_next)):
        if i is None and name == "layer_next":
            continue
        if jnp.size(i) != 1 or not jnp.issubdtype(jnp.result_type(i), jnp.integer):
            raise ValueError(f"{name}: shape {jnp.shape(i)} must be one integer (() or (1,))")


@functools.partial(
    jax.jit, static_argnames=["eps", "out_dtype", "interpret", "block_sizes", "a_dtype"]
)
def residual_norm(
    h: jax.Array,  # [R, D] f32
    a: jax.Array,  # [R, D]
    w_a: jax.Array,  # [L, D]
    w_n: jax.Array,  # [L, D]
    layer: jax.Array | int,  # [] or [1] int: the row of the stacked weights
    *,
    eps: float,
    out_dtype,
    scale: jax.Array | None = None,  # [L]: h2's factor per stacked layer (None: 1)
    layer_next: jax.Array | int | None = None,  # the row of w_n (None: `layer`)
    interpret: bool = False,
    block_sizes: BlockSizes | None = None,
    a_dtype=None,  # given: `a` is [S, R, D] split-K partials of a value in this dtype
) -> tuple[jax.Array, jax.Array]:
    """``((h + rms_norm(a, w_a[layer])) * scale[layer], rms_norm(that, w_n[layer_next]))``;
    see the module doc."""
    _validate(h, a, w_a, w_n, layer, layer_next, scale, a_dtype)
    parts = a_dtype is not None
    rows, dim = h.shape
    dp = _compat.next_pow2(dim)
    bs = (block_sizes or BlockSizes()).resolve(dim=dim)
    n_a, n_n = w_a.shape[0], w_n.shape[0]
    # No scale, no operand: a ones vector would be one more XLA kernel per call.
    scales = () if scale is None else (scale.astype(jnp.float32),)
    # Clamped like jnp's w[layer], so a bad index can never read outside the stack on the GPU.
    layer_next = layer if layer_next is None else layer_next
    layer = jnp.clip(jnp.asarray(layer, jnp.int32).reshape(1), 0, n_a - 1)
    layer_next = jnp.clip(jnp.asarray(layer_next, jnp.int32).reshape(1), 0, n_n - 1)
    row = pl.BlockSpec((None, dp), lambda i: (i, 0))
    a_row = pl.BlockSpec((a.shape[0], None, dp), lambda i: (0, i, 0)) if parts else row
    index = pl.BlockSpec((None,), lambda i: (0,))
    return pl.pallas_call(
        functools.partial(
            _residual_norm_kernel,
            dim=dim,
            eps=float(eps),
            has_scale=scale is not None,
            a_dtype=jnp.dtype(a_dtype or a.dtype),
            parts=parts,
        ),  # fmt: skip
        grid=(rows,),
        in_specs=[
            index,
            index,
            row,
            a_row,
            pl.BlockSpec((n_a, dp), lambda i: (0, 0)),
            pl.BlockSpec((n_n, dp), lambda i: (0, 0)),
            *[pl.BlockSpec((n_a,), lambda i: (0,)) for _ in scales],
        ],
        out_specs=[row, row],
        out_shape=[
            jax.ShapeDtypeStruct(h.shape, jnp.float32),
            jax.ShapeDtypeStruct(h.shape, out_dtype),
        ],
        compiler_params=_compat.compiler_params(num_warps=bs.num_warps, num_stages=1),
        interpret=interpret,
        name="residual_norm",
    )(layer, layer_next, h, a, w_a, w_n, *scales)


def _rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    """The model's RMSNorm: f32 math, result in x's dtype."""
    xf = x.astype(jnp.float32)
    y = xf * lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (y * w.astype(jnp.float32)).astype(x.dtype)


def residual_norm_reference(
    h: jax.Array,  # [..., D] f32
    a: jax.Array,  # [..., D]
    w_a: jax.Array,  # [D]
    w_n: jax.Array,  # [D]
    *,
    eps: float,
    out_dtype,
    scale: jax.Array | None = None,  # [] or [1]
) -> tuple[jax.Array, jax.Array]:
    """jnp: exactly the model's `h + rms_norm(a, w_a)` (times `scale`) then
    `rms_norm(h, w_n).astype(...)`."""
    h2 = h + _rms_norm(a, w_a, eps)
    if scale is not None:
        h2 = h2 * scale.astype(h2.dtype)
    return h2, _rms_norm(h2, w_n, eps).astype(out_dtype)
