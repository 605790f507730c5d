"""Fused per-head QK-norm + NeoX RoPE (and V-norm) for Gemma 4, Pallas GPU (Triton lowering).

Contract (docs/LAYOUT.md): ``qk_norm_rope(q[B,T,H,D], k[B,T,Hk,D] | None, v | None, q_w[D],
k_w[D], positions[B,T], inv_freq[D/2], *, eps) -> (q, k, v)``:
``x * rsqrt(mean(x^2) + eps) * w`` in f32 per head (Gemma 4 multiplies by ``w``, not ``1 + w``),
v with no weight; then NeoX RoPE on q and k: dim ``i`` pairs with ``i + D/2``, angle
``positions * inv_freq[i]``; ``inv_freq`` is 0 for unrotated pairs (proportional RoPE).

What is notable here:
- ONE pallas_call for q, k and v. Grid ``(B, T blocks, H + Hk + Hk)``: the last axis enumerates
  every head of every present tensor, so a decode step (T = 1) still runs H + 2 Hk programs in
  parallel instead of one program looping over heads.
- Each half of a head is loaded separately (``x[:D/2]``, ``x[D/2:]``), which is all
  rotate-half needs: no in-register slicing or concatenation.
- Everything stays in f32 from load to store: one rounding to the output dtype at the end.
  (The reference does the same; HF rounds to the activation dtype between norm and RoPE, which
  can differ by one bf16 ulp.)
- ``k`` and/or ``v`` may be None (KV-shared layers: only q). A K=V layer passes the raw k
  projection as ``v`` too: it is normalised without weight and not rotated.
- The weights may come stacked, ``q_w[L, D]`` / ``k_w[L, D]`` with ``layer``: the model's layer
  scan hands them over whole and the kernel reads row ``layer`` (loaded inside, like
  decode_attention's stacked caches). A slice before the call is a copy XLA makes per layer
  and step (an E4B decode step: 66 of them, ~2 us each, ~3% of the step).
- ``parts=True``: q, k, v arrive as split-K partial sums ``[S, B, T, N, D]`` of the projection
  (S per tensor: ``qmatmul.stacked_qmatmul_many(..., parts=True)``, one launch per format) and
  the kernel adds them while loading, rounding the sum to ``dtype`` as the unfused path's
  summed projection is: the same values, one launch per projection fewer than XLA summing
  them first (batch-1 decode).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import _compat

__all__ = ["BlockSizes", "qk_norm_rope", "qk_norm_rope_reference", "rms_norm", "rope"]


@dataclasses.dataclass(frozen=True, slots=True)
class BlockSizes:
    """Tile sizes; ``None`` picks the heuristic for the call's shapes (see ``resolve``).

    Attributes:
      block_t: tokens per program (each program handles one head of one tensor).
      num_warps: Triton warps per program.
    """

    block_t: int | None = None
    num_warps: int | None = None

    def resolve(self, *, seq: int, head_dim: int) -> BlockSizes:
        # ~8K elements per program: enough bytes in flight per program, modest registers.
        block_t = self.block_t or max(1, min(8192 // head_dim, _compat.next_pow2(seq)))
        return BlockSizes(block_t, self.num_warps or 4)


def _load_half(x_ref, cols, mask, sum_dtype):
    """``x[:, cols]`` in f32; with ``sum_dtype`` (``x_ref`` then a ``[S, bt, D]`` block of
    split-K partials) their f32 sum, rounded to ``sum_dtype`` as the summed projection was."""
    if sum_dtype is None:
        return _compat.load(x_ref.at[:, cols], mask=mask, other=0).astype(jnp.float32)
    x = _compat.load_partials_sum(x_ref, (slice(None), cols), mask=mask)
    return x.astype(sum_dtype).astype(jnp.float32)


def _norm_rope_head(
    x_ref, o_ref, w_ref, layer, cos, sin, row_ok, *, eps: float, half: int, sum_dtype=None
):
    """Normalise one head of ``block_t`` tokens (and rotate it when ``cos`` is given);
    the weight is row ``layer`` of ``w_ref[L, D]``. ``sum_dtype``: see ``_load_half``."""
    mask = row_ok[:, None]
    lo = pl.ds(0, half)
    hi = pl.ds(half, half)
    x1 = _load_half(x_ref, lo, mask, sum_dtype)  # [bt, D/2]
    x2 = _load_half(x_ref, hi, mask, sum_dtype)  # [bt, D/2]
    ms = (jnp.sum(x1 * x1, axis=1) + jnp.sum(x2 * x2, axis=1)) / (2 * half)  # [bt]
    r = lax.rsqrt(ms + eps)[:, None]  # [bt, 1]
    x1 = x1 * r
    x2 = x2 * r
    if w_ref is not None:
        x1 = x1 * _compat.load(w_ref.at[layer, lo]).astype(jnp.float32)[None, :]
        x2 = x2 * _compat.load(w_ref.at[layer, hi]).astype(jnp.float32)[None, :]
    if cos is not None:
        x1, x2 = x1 * cos - x2 * sin, x2 * cos + x1 * sin
    _compat.store(o_ref.at[:, lo], x1.astype(o_ref.dtype), mask=mask)
    _compat.store(o_ref.at[:, hi], x2.astype(o_ref.dtype), mask=mask)


def _qk_norm_rope_kernel(*refs, heads: tuple[int, ...], has_w: tuple[bool, ...], **kw):
    # refs, in order (one head of block_t tokens per program):
    #   pos_ref       [bt] int32
    #   layer_ref     [] int32: the row of the stacked weights
    #   inv_freq_ref  [D/2] f32
    #   w refs        [L, D] each: q_w, then k_w if k is present
    #   x refs        [bt, D] each: q, then k, then v (those present)
    #   out refs      [bt, D] each, same order as the x refs
    eps, half, block_t, seq = kw["eps"], kw["half"], kw["block_t"], kw["seq"]
    sum_dtype = kw["sum_dtype"]
    n = len(heads)
    pos_ref, layer_ref, inv_freq_ref = refs[:3]
    n_w = sum(has_w)
    w_refs = list(refs[3 : 3 + n_w])
    x_refs = refs[3 + n_w : 3 + n_w + n]
    o_refs = refs[3 + n_w + n :]
    layer = layer_ref[()]
    w_refs = [w_refs.pop(0) if hw else None for hw in has_w]

    row_ok = (pl.program_id(1) * block_t + jnp.arange(block_t, dtype=jnp.int32)) < seq
    g = pl.program_id(2)
    first = 0
    for idx in range(n):
        rotate = has_w[idx]  # q and k are weighted and rotated; v is neither

        @pl.when((g >= first) & (g < first + heads[idx]))
        def _(idx=idx, rotate=rotate):
            cos = sin = None
            if rotate:
                p = _compat.load(pos_ref, mask=row_ok, other=0).astype(jnp.float32)  # [bt]
                ang = p[:, None] * inv_freq_ref[...].astype(jnp.float32)[None, :]  # [bt, D/2]
                cos, sin = jnp.cos(ang), jnp.sin(ang)
            _norm_rope_head(
                x_refs[idx], o_refs[idx], w_refs[idx], layer, cos, sin, row_ok, eps=eps,
                half=half, sum_dtype=sum_dtype,
            )  # fmt: skip

        first += heads[idx]


def _validate(q, k, v, q_w, k_w, positions, inv_freq, eps, block_sizes, layer, parts):
    if parts:
        if any(x is not None and x.ndim != 5 for x in (q, k, v)):
            raise ValueError("parts=True needs q, k, v as [S, B, T, N, D] partials")
        q, k, v = (None if x is None else x[0] for x in (q, k, v))
    if q.ndim != 4:
        raise ValueError(f"{q.shape=} must be [B, T, H, D]")
    batch, seq, _, head_dim = q.shape
    if head_dim < 2 or not _compat.is_pow2(head_dim):
        raise ValueError(f"{head_dim=} must be a power of two >= 2")
    for name, x in (("k", k), ("v", v)):
        if x is not None and (x.ndim != 4 or x.shape[:2] != (batch, seq) or x.shape[3] != head_dim):
            raise ValueError(f"{name}.shape={x.shape} must be [B={batch}, T={seq}, Hk, {head_dim}]")
    if k is not None and v is not None and k.shape != v.shape:
        raise ValueError(f"{k.shape=} must equal {v.shape=}")
    if layer is None:
        want, what = (head_dim,), f"({head_dim},)"
    else:
        if jnp.size(layer) != 1 or not jnp.issubdtype(jnp.result_type(layer), jnp.integer):
            raise ValueError(f"{jnp.shape(layer)=} must be one integer (shape () or (1,))")
        want, what = (q_w.shape[0], head_dim), f"[L, {head_dim}] (stacked, with layer)"
        if q_w.ndim != 2:
            raise ValueError(f"{q_w.shape=} must be {what}")
    if q_w.shape != want:
        raise ValueError(f"{q_w.shape=} must be {what}")
    if k is not None and (k_w is None or k_w.shape != want):
        raise ValueError(f"k_w must be a {what} array when k is given, got {k_w=}")
    if positions.shape != (batch, seq) or not jnp.issubdtype(positions.dtype, jnp.integer):
        raise ValueError(f"{positions.shape=} {positions.dtype=} must be an integer [B, T]")
    if inv_freq.shape != (head_dim // 2,):
        raise ValueError(f"{inv_freq.shape=} must be ({head_dim // 2},)")
    if not isinstance(eps, int | float):
        raise ValueError(f"{eps=} must be a static Python float")
    if block_sizes is not None and not isinstance(block_sizes, BlockSizes):
        raise ValueError(f"{block_sizes=} must be a qk_norm_rope.BlockSizes")


@functools.partial(jax.jit, static_argnames=["eps", "interpret", "block_sizes", "parts", "dtype"])
def qk_norm_rope(
    q: jax.Array,  # [B, T, H, D]
    k: jax.Array | None,  # [B, T, Hk, D]
    v: jax.Array | None,  # [B, T, Hk, D]
    q_w: jax.Array,  # [D], or [L, D] with `layer`
    k_w: jax.Array | None,  # like q_w
    positions: jax.Array,  # [B, T] int
    inv_freq: jax.Array,  # [D/2] f32
    *,
    eps: float,
    interpret: bool = False,
    block_sizes: BlockSizes | None = None,
    layer: jax.Array | int | None = None,  # [] or [1] int: the row of stacked q_w / k_w
    parts: bool = False,
    dtype=None,
) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
    """Fused RMSNorm (+ RoPE) of q, k, v in one launch; see the module doc.

    ``parts=True``: q, k, v are ``[S, B, T, N, D]`` split-K partials (S may differ per tensor)
    whose sum (rounded to ``dtype``, default q's) is the projection; the outputs are
    ``[B, T, N, D]`` in ``dtype``."""
    _validate(q, k, v, q_w, k_w, positions, inv_freq, eps, block_sizes, layer, parts)
    out_dtype = jnp.dtype(dtype or q.dtype)  # what partials round to
    if layer is None:  # a stack of one (a reshape: no copy)
        q_w, k_w, layer = q_w[None], None if k_w is None else k_w[None], 0
    # Clamped like jnp's w[layer], so a bad index can never read outside the stack on the GPU.
    layer = jnp.clip(jnp.asarray(layer, jnp.int32).reshape(1), 0, q_w.shape[0] - 1)
    batch, seq, _, head_dim = q.shape[-4:]
    half = head_dim // 2
    bs = (block_sizes or BlockSizes()).resolve(seq=seq, head_dim=head_dim)
    if not _compat.is_pow2(bs.block_t):
        raise ValueError(f"{bs.block_t=} must be a power of two")

    xs = [x for x in (q, k, v) if x is not None]
    has_w = tuple([True] + [True] * (k is not None) + [False] * (v is not None))
    ws = [q_w] + ([k_w] if k is not None else [])
    heads = tuple(x.shape[-2] for x in xs)
    firsts = [sum(heads[:i]) for i in range(len(heads))]

    def head_spec(first, n, split=None):
        def index(b, i, g):  # clamp so programs of other tensors map to a valid (unused) block
            return (b, i, jnp.clip(g - first, 0, n - 1), 0)

        if split is None:
            return pl.BlockSpec((None, bs.block_t, None, head_dim), index)
        return pl.BlockSpec(
            (split, None, bs.block_t, None, head_dim), lambda b, i, g: (0, *index(b, i, g))
        )

    splits = [x.shape[0] if parts else None for x in xs]  # each its own launch's split
    x_specs = [head_spec(f, n, sp) for f, n, sp in zip(firsts, heads, splits, strict=True)]
    o_specs = [head_spec(f, n) for f, n in zip(firsts, heads, strict=True)]
    kernel = functools.partial(
        _qk_norm_rope_kernel,
        heads=heads,
        has_w=has_w,
        eps=float(eps),
        half=half,
        block_t=bs.block_t,
        seq=seq,
        sum_dtype=out_dtype if parts else None,
    )
    outs = pl.pallas_call(
        kernel,
        grid=(batch, pl.cdiv(seq, bs.block_t), sum(heads)),
        in_specs=[
            pl.BlockSpec((None, bs.block_t), lambda b, i, g: (b, i)),
            pl.BlockSpec((None,), lambda b, i, g: (0,)),
            pl.BlockSpec((half,), lambda b, i, g: (0,)),
            # Every stacked row: the layer is picked inside the kernel (an index map cannot
            # read a traced value without scalar prefetch, which the Triton lowering lacks).
            *[pl.BlockSpec(w.shape, lambda b, i, g: (0, 0)) for w in ws],
            *x_specs,
        ],
        out_specs=o_specs,
        out_shape=[jax.ShapeDtypeStruct(x.shape[-4:], dtype or x.dtype) for x in xs],
        compiler_params=_compat.compiler_params(num_warps=bs.num_warps, num_stages=1),
        interpret=interpret,
        name="qk_norm_rope",
    )(positions.astype(jnp.int32), layer, inv_freq.astype(jnp.float32), *ws, *xs)
    outs = iter(outs)
    return tuple(next(outs) if x is not None else None for x in (q, k, v))


def rms_norm(x: jax.Array, w: jax.Array | None, eps: float) -> jax.Array:
    """``x * rsqrt(mean(x^2) + eps) * w`` over the last axis, f32 in and out."""
    x = x.astype(jnp.float32)
    y = x * lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)
    return y if w is None else y * w.astype(jnp.float32)


def rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """NeoX RoPE of ``x[B, T, N, D]`` (f32) at ``positions[B, T]``: dim i pairs with i + D/2."""
    ang = positions.astype(jnp.float32)[..., None] * inv_freq.astype(jnp.float32)  # [B, T, D/2]
    cos, sin = jnp.cos(ang)[:, :, None], jnp.sin(ang)[:, :, None]  # [B, T, 1, D/2]
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


@functools.partial(jax.jit, static_argnames=["eps"])
def qk_norm_rope_reference(
    q: jax.Array,  # [B, T, H, D]
    k: jax.Array | None,  # [B, T, Hk, D]
    v: jax.Array | None,  # [B, T, Hk, D]
    q_w: jax.Array,  # [D], or [L, D] with `layer`
    k_w: jax.Array | None,  # like q_w
    positions: jax.Array,  # [B, T] int
    inv_freq: jax.Array,  # [D/2]
    *,
    eps: float,
    layer: jax.Array | int | None = None,  # [] or [1] int: the row of stacked q_w / k_w
) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
    """Unfused jnp: ``rope(rms_norm(x, w))`` for q and k, ``rms_norm(v)``; f32, one rounding."""
    if layer is not None:  # the reference may slice (dynamic indexing clamps to [0, L))
        layer = jnp.asarray(layer, jnp.int32).reshape(())
        q_w = lax.dynamic_index_in_dim(q_w, layer, 0, keepdims=False)
        if k_w is not None:
            k_w = lax.dynamic_index_in_dim(k_w, layer, 0, keepdims=False)
    qo = rope(rms_norm(q, q_w, eps), positions, inv_freq).astype(q.dtype)
    ko = None if k is None else rope(rms_norm(k, k_w, eps), positions, inv_freq).astype(k.dtype)
    vo = None if v is None else rms_norm(v, None, eps).astype(v.dtype)
    return qo, ko, vo
