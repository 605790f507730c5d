"""Decode attention (one query token per row against a KV cache), Pallas GPU (Triton lowering).

Contract (docs/LAYOUT.md): ``q[B,H,D]``, ``k, v[B,S,Hk,D]``, ``pos[B]``; the current token is
already in the cache. ``ring=False`` (global cache): slot ``s`` holds position ``s``, visible iff
``s <= pos``. ``ring=True`` (sliding layer, ``S == window``): slot ``s`` holds position
``pos - ((pos - s) mod S)``, visible iff that position is ``>= 0``. Stacked form: ``k, v`` may
be ``[L,B,S,Hk,D]`` (the model's per-period caches, carried by its layer scan) with ``layer``
(a traced int32 of shape ``()`` or ``(1,)``, clamped to ``[0, L)`` as jnp indexing does) naming
the one to read; the result is that of ``k[layer], v[layer]``.

What is notable here:
- The stacked cache is read in place: a jnp ``k[layer]`` before the call would be a copy of the
  whole layer cache (XLA materialises the operands of a custom call), every layer of every
  decode step. The kernel's block covers the whole ``L`` axis and it adds ``layer`` (loaded
  from a one-element ref: the Triton lowering has no scalar prefetch) to its load offsets. The
  unstacked form is the stack with ``L = 1`` (a free reshape), so there is one kernel.
- Both cache kinds reduce to one rule: the visible slots are exactly ``s < n`` with
  ``n = min(pos + 1, S)``. For the ring, a slot's position is ``>= 0`` iff ``s <= pos`` or the
  ring has wrapped (``pos >= S - 1``); softmax does not care about slot order, so the ring is
  read in place (no unroll, no copy) and ``ring`` only changes the reference's wording.
- The live prefix ``[0, n)`` (not the whole cache) is divided among ``k_splits`` programs per
  (row, kv head) at run time: each reads only its share, so a 128K global cache at position
  4K reads 4K slots and still keeps ``k_splits`` programs busy. Splits that get no block (more
  splits than live blocks) skip their loop entirely and contribute ``l = 0``.
- Each split writes unnormalised partials (``acc``, running max ``m`` in log2 units, sum ``l``)
  in f32; a log-sum-exp combine afterwards is exact. The combine is a second small Pallas
  launch (``_combine_kernel``, one program per row, head and 64 columns): in jnp, XLA made it
  two kernels (the max over splits behind an optimisation barrier, then the weighted sum), and
  at batch 1 each launch costs more than its work. Split counts that are not a power of two
  (only if the caller sets them) take the jnp combine.
- All ``G = H // Hk`` query heads of a kv head share one program (rows of the matmul, padded to
  16 for the Triton dot), so each cache tile is read once per group.
- Slots ``>= n`` are masked at load (read as 0, never touched on the GPU), so an unwritten
  cache tail may hold anything, NaN included.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import _compat
from pallas_kernels import flash_attention as fa

__all__ = ["BlockSizes", "decode_attention", "decode_attention_reference"]

_LOG2E = math.log2(math.e)


@dataclasses.dataclass(frozen=True, slots=True)
class BlockSizes:
    """Tile sizes; ``None`` picks the heuristic for the call's shapes (see ``resolve``).

    Attributes:
      block_k: cache slots per inner-loop step.
      k_splits: programs per (batch row, kv head) sharing the live prefix of the cache.
      num_warps: Triton warps per program.
      num_stages: Triton software-pipelining depth of the slot loop.
      pallas_combine: combine the splits with the Pallas launch (None: yes) or in jnp (XLA's
        two kernels; for A/B runs).
    """

    block_k: int | None = None
    k_splits: int | None = None
    num_warps: int | None = None
    num_stages: int | None = None
    pallas_combine: bool | None = None

    def resolve(
        self, *, batch: int, kv_heads: int, seq_k: int, head_dim: int, itemsize: int, rows: int
    ) -> BlockSizes:
        """Fill the ``None`` fields: start from 64 slots and 2 stages, then shrink block_k to 16
        and then to 1 stage until ``flash_attention.smem_bytes <= SMEM_BUDGET`` (``rows`` =
        the group padded to 16). Splits: ~2 waves of programs over 132 SMs when the cache is
        long enough, capped at 64 so the f32 partials stay small next to the cache bytes they
        summarise. Fields the caller set are kept (``decode_attention`` then rejects a config
        that cannot fit at all). bf16 with D >= 512 takes the tiles measured best on the H100
        (16 slots, 4 stages, see below); re-sweep with bench_attention.py --sweep."""
        block_k, num_stages = self.block_k, self.num_stages
        tuned = (
            itemsize == 2
            and head_dim >= 512
            and block_k is None
            and num_stages is None
            and fa.smem_lower_bound(
                rows=rows, block_k=16, head_dim=head_dim, itemsize=itemsize, num_stages=4
            )
            <= fa.SMEM_LIMIT
        )
        if tuned:
            # Measured bf16 on the H100 (RESULTS.md run n, bench_attention.py --sweep): 16
            # slots x 4 stages read a 32K D=512 cache in 58.9 us (84% of copy) and a 4K one in
            # 16.7, against 75.7 / 19.6 with 2 stages; over the f32-made budget, under the limit.
            block_k, num_stages = 16, 4
        else:
            block_k, num_stages = self._fit_budget(rows, seq_k, head_dim, itemsize)
        k_splits = self.k_splits
        if k_splits is None:
            want = _compat.next_pow2(max(1, 264 // (batch * kv_heads)))
            # A power of two, so the Pallas combine can hold all splits in one block.
            k_splits = max(1, min(want, 64, _prev_pow2(pl.cdiv(seq_k, block_k))))
        num_warps = self.num_warps or 4
        combine = self.pallas_combine is None or self.pallas_combine
        return BlockSizes(block_k, k_splits, num_warps, num_stages, combine)

    def _fit_budget(self, rows: int, seq_k: int, head_dim: int, itemsize: int):
        """(block_k, num_stages): the caller's, else 64 slots and 2 stages shrunk (block_k to
        16, then 1 stage) until ``flash_attention.smem_bytes <= SMEM_BUDGET``."""
        block_k = self.block_k or max(16, min(64, _compat.next_pow2(seq_k)))
        num_stages = self.num_stages or 2
        while (
            fa.smem_bytes(
                rows=rows,
                block_k=block_k,
                head_dim=head_dim,
                itemsize=itemsize,
                num_stages=num_stages,
            )
            > fa.SMEM_BUDGET
        ):
            if self.block_k is None and block_k > 16:
                block_k //= 2
            elif not self.num_stages and num_stages > 1:
                num_stages = 1
            else:
                break  # nothing left to shrink; decode_attention checks the hard limit
        return block_k, num_stages


def _decode_kernel(
    n_ref,  # [] int32: visible slots of this row, min(pos + 1, S)
    layer_ref,  # [] int32: which of the L stacked caches to read, in [0, L)
    q_ref,  # [G, D]: the query heads of this kv head
    k_ref,  # [L, S, D]: every stacked cache of this (row, kv head), read in place at [layer]
    v_ref,  # [L, S, D]
    acc_ref,  # [G, D] f32: unnormalised partial output of this split
    m_ref,  # [G] f32: running max of this split, log2 units (MASK_VALUE if it saw nothing)
    l_ref,  # [G] f32: running softmax denominator of this split
    *,
    block_k: int,
    k_splits: int,
    group: int,
    rows: int,
    qk_scale: float,
    precision,
):
    bk = block_k
    d = q_ref.shape[-1]
    j = pl.program_id(2)
    n = n_ref[()]
    layer = layer_ref[()]
    # This split's share of the live blocks [0, cdiv(n, bk)): a run-time partition.
    n_blocks = lax.div(jnp.maximum(n, 0) + (bk - 1), bk)
    per_split = lax.div(n_blocks + (k_splits - 1), k_splits)
    kb_lo = jnp.minimum(j * per_split, n_blocks)
    kb_hi = jnp.minimum(kb_lo + per_split, n_blocks)

    row_ok = jnp.arange(rows, dtype=jnp.int32) < group  # [rows]: pad G up to the dot's 16
    q = _compat.load(q_ref.at[pl.ds(0, rows)], mask=row_ok[:, None], other=0)  # [rows, D]

    def step(kb, carry):
        acc, m_i, l_i = carry  # [rows, D] f32, [rows] f32, [rows] f32
        s0 = kb * bk
        col_ok = (s0 + jnp.arange(bk, dtype=jnp.int32)) < n  # [bk]
        kv_tile = (layer, pl.ds(s0, bk))
        k = _compat.load(k_ref.at[kv_tile], mask=col_ok[:, None], other=0)  # [bk, D]
        v = _compat.load(v_ref.at[kv_tile], mask=col_ok[:, None], other=0)  # [bk, D]
        s = lax.dot_general(
            q, k, (((1,), (1,)), ((), ())), precision=precision, preferred_element_type=jnp.float32
        )  # [rows, bk]
        s = jnp.where(col_ok[None, :], s * qk_scale, _compat.MASK_VALUE)
        m_new = jnp.maximum(m_i, jnp.max(s, axis=1))
        alpha = jnp.exp2(m_i - m_new)
        p = jnp.where(col_ok[None, :], jnp.exp2(s - m_new[:, None]), 0.0)  # [rows, bk]
        l_new = alpha * l_i + jnp.sum(p, axis=1)
        pv = jnp.dot(
            p.astype(v.dtype), v, precision=precision, preferred_element_type=jnp.float32
        )  # [rows, D]
        return acc * alpha[:, None] + pv, m_new, l_new

    acc, m_i, l_i = lax.fori_loop(
        kb_lo,
        kb_hi,
        step,
        (
            jnp.zeros((rows, d), jnp.float32),
            jnp.full((rows,), _compat.MASK_VALUE, jnp.float32),
            jnp.zeros((rows,), jnp.float32),
        ),
    )
    _compat.store(acc_ref.at[pl.ds(0, rows)], acc, mask=row_ok[:, None])
    _compat.store(m_ref.at[pl.ds(0, rows)], m_i, mask=row_ok)
    _compat.store(l_ref.at[pl.ds(0, rows)], l_i, mask=row_ok)


def _prev_pow2(n: int) -> int:
    return 1 << (max(1, int(n)).bit_length() - 1)


def _combine_kernel(acc_ref, m_ref, l_ref, o_ref):
    # acc_ref [S, bd] f32 | m_ref, l_ref [S] f32 | o_ref [bd]: one (row, head, column block).
    m = m_ref[...]
    w = jnp.exp2(m - jnp.max(m))  # [S]; 0 for splits that saw nothing
    l_tot = jnp.sum(w * l_ref[...])
    o = jnp.sum(w[:, None] * acc_ref[...], axis=0)  # [bd]
    o_ref[...] = (o / jnp.where(l_tot == 0.0, 1.0, l_tot)).astype(o_ref.dtype)


def _combine(acc, m, l, out_dtype, *, interpret: bool, pallas: bool = True):
    """Exact log-sum-exp combine of the splits' partials: acc[B, S, H, D], m/l[B, S, H] (log2
    units) -> o[B, H, D] in `out_dtype`. One Pallas launch when S is a power of two."""
    batch, splits, heads, d = acc.shape
    if not pallas or not _compat.is_pow2(splits) or d % 16:
        m_max = jnp.max(m, axis=1, keepdims=True)  # [B, 1, H]
        # Upstream's decode kernel (jax ops/gpu/decode_attention.py, b/389925439) needs this
        # barrier to keep XLA from producing NaNs in the fused combine; it costs nothing.
        m_max = lax.optimization_barrier(m_max)
        w = jnp.exp2(m - m_max)  # [B, S, H]
        l_tot = jnp.sum(w * l, axis=1)  # [B, H]
        o = jnp.sum(w[..., None] * acc, axis=1)  # [B, H, D]
        return (o / jnp.where(l_tot == 0.0, 1.0, l_tot)[..., None]).astype(out_dtype)
    bd = math.gcd(d, 64)
    stats = pl.BlockSpec((None, splits, None), lambda b, h, c: (b, 0, h))
    return pl.pallas_call(
        _combine_kernel,
        grid=(batch, heads, d // bd),
        in_specs=[
            pl.BlockSpec((None, splits, None, bd), lambda b, h, c: (b, 0, h, c)),
            stats,
            stats,
        ],
        out_specs=pl.BlockSpec((None, None, bd), lambda b, h, c: (b, h, c)),
        out_shape=jax.ShapeDtypeStruct((batch, heads, d), out_dtype),
        compiler_params=_compat.compiler_params(
            num_warps=1 if splits * bd <= 1024 else 4, num_stages=1
        ),
        interpret=interpret,
        name="decode_attention_combine",
    )(acc, m, l)


def _validate(q, k, v, pos, ring, scale, block_sizes, layer):
    if q.ndim != 3:
        raise ValueError(f"{q.shape=} must be [B, H, D]")
    if layer is None:
        if k.ndim != 4 or k.shape != v.shape:
            raise ValueError(f"{k.shape=} and {v.shape=} must be equal and [B, S, Hk, D]")
    else:
        if k.ndim != 5 or k.shape != v.shape:
            raise ValueError(
                f"{k.shape=} and {v.shape=} must be equal and [L, B, S, Hk, D] with a layer"
            )
        if jnp.size(layer) != 1 or not jnp.issubdtype(jnp.result_type(layer), jnp.integer):
            raise ValueError(f"{jnp.shape(layer)=} must be one integer (shape () or (1,))")
    batch, heads, head_dim = q.shape
    if k.shape[-4] != batch or k.shape[-1] != head_dim:
        raise ValueError(f"{k.shape=} must match {q.shape=} in batch and head dim")
    kv_heads = k.shape[-2]
    if heads % kv_heads != 0:
        raise ValueError(f"{heads=} must be a multiple of {kv_heads=}")
    if head_dim < 16 or not _compat.is_pow2(head_dim):
        raise ValueError(f"{head_dim=} must be a power of two >= 16")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"{q.dtype=}, {k.dtype=}, {v.dtype=} must be equal")
    if q.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
        raise ValueError(f"{q.dtype=} must be float32, bfloat16 or float16")
    if pos.shape != (batch,) or not jnp.issubdtype(pos.dtype, jnp.integer):
        raise ValueError(f"{pos.shape=} {pos.dtype=} must be an integer [B={batch}]")
    if not isinstance(ring, bool):
        raise ValueError(f"{ring=} must be a static bool")
    if not isinstance(scale, int | float):
        raise ValueError(f"{scale=} must be a static Python float")
    if block_sizes is not None and not isinstance(block_sizes, BlockSizes):
        raise ValueError(f"{block_sizes=} must be a decode_attention.BlockSizes")


@functools.partial(jax.jit, static_argnames=["ring", "scale", "interpret", "block_sizes"])
def decode_attention(
    q: jax.Array,  # [B, H, D]
    k: jax.Array,  # [B, S, Hk, D], or [L, B, S, Hk, D] with `layer`
    v: jax.Array,  # like k
    pos: jax.Array,  # [B] int: position of the current (already written) token
    *,
    ring: bool,
    scale: float = 1.0,
    layer: jax.Array | int | None = None,  # [] or [1] int: which of the L stacked caches
    interpret: bool = False,
    block_sizes: BlockSizes | None = None,
) -> jax.Array:  # [B, H, D], q.dtype
    """One query token per row against a global or ring KV cache; see the module doc."""
    _validate(q, k, v, pos, ring, scale, block_sizes, layer)
    if layer is None:
        k, v, layer = k[None], v[None], 0  # a stack of one (a reshape: no copy)
    n_layers = k.shape[0]
    # Clamped like jnp's k[layer], so a bad index can never read outside the stack on the GPU.
    layer = jnp.clip(jnp.asarray(layer, jnp.int32).reshape(1), 0, n_layers - 1)  # [1]
    batch, heads, head_dim = q.shape
    seq_k, kv_heads = k.shape[2], k.shape[3]
    group = heads // kv_heads
    rows = max(16, _compat.next_pow2(group))  # Triton dots need M >= 16
    bs = (block_sizes or BlockSizes()).resolve(
        batch=batch,
        kv_heads=kv_heads,
        seq_k=seq_k,
        head_dim=head_dim,
        itemsize=q.dtype.itemsize,
        rows=rows,
    )
    if not (_compat.is_pow2(bs.block_k) and bs.block_k >= 16):
        raise ValueError(f"{bs.block_k=} must be a power of two >= 16")
    if bs.k_splits < 1:
        raise ValueError(f"{bs.k_splits=} must be >= 1")
    if bs.num_stages < 1:
        raise ValueError(f"{bs.num_stages=} must be >= 1")
    fa.check_smem(
        "decode_attention",
        rows=rows,
        block_k=bs.block_k,
        head_dim=head_dim,
        itemsize=q.dtype.itemsize,
        num_stages=bs.num_stages,
    )

    # Ring or not, the visible slots are [0, n): see the module doc.
    n = jnp.minimum(pos.astype(jnp.int32) + 1, seq_k)  # [B]
    kernel = functools.partial(
        _decode_kernel,
        block_k=bs.block_k,
        k_splits=bs.k_splits,
        group=group,
        rows=rows,
        qk_scale=float(scale) * _LOG2E,
        precision=_compat.dot_precision(q.dtype),
    )
    part = (batch, bs.k_splits, heads)
    acc, m, l = pl.pallas_call(
        kernel,
        grid=(batch, kv_heads, bs.k_splits),
        in_specs=[
            pl.BlockSpec((None,), lambda b, h, j: (b,)),
            pl.BlockSpec((None,), lambda b, h, j: (0,)),
            pl.BlockSpec((None, group, head_dim), lambda b, h, j: (b, h, 0)),
            # The whole L axis: the layer is picked inside the kernel (index maps cannot read
            # a traced value without scalar prefetch, which the Triton lowering lacks).
            pl.BlockSpec((n_layers, None, seq_k, None, head_dim), lambda b, h, j: (0, b, 0, h, 0)),
            pl.BlockSpec((n_layers, None, seq_k, None, head_dim), lambda b, h, j: (0, b, 0, h, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, None, group, head_dim), lambda b, h, j: (b, j, h, 0)),
            pl.BlockSpec((None, None, group), lambda b, h, j: (b, j, h)),
            pl.BlockSpec((None, None, group), lambda b, h, j: (b, j, h)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((*part, head_dim), jnp.float32),
            jax.ShapeDtypeStruct(part, jnp.float32),
            jax.ShapeDtypeStruct(part, jnp.float32),
        ],
        compiler_params=_compat.compiler_params(num_warps=bs.num_warps, num_stages=bs.num_stages),
        interpret=interpret,
        name="decode_attention",
    )(n, layer, q, k, v)

    # Exact log-sum-exp combine of the splits (log2 units, as the kernel keeps them).
    return _combine(acc, m, l, q.dtype, interpret=interpret, pallas=bs.pallas_combine)


@functools.partial(jax.jit, static_argnames=["ring", "scale"])
def decode_attention_reference(
    q: jax.Array,  # [B, H, D]
    k: jax.Array,  # [B, S, Hk, D], or [L, B, S, Hk, D] with `layer`
    v: jax.Array,  # like k
    pos: jax.Array,  # [B] int
    *,
    ring: bool,
    scale: float = 1.0,
    layer: jax.Array | int | None = None,  # [] or [1] int: which of the L stacked caches
) -> jax.Array:  # [B, H, D], q.dtype
    """Plain jnp decode attention, slot visibility written as in the contract; f32 softmax.

    Einsum letters: b batch, s cache slot, k kv head, g query head within the group, d head dim.
    """
    if layer is not None:  # the reference may slice (and dynamic indexing clamps to [0, L))
        layer = jnp.asarray(layer, jnp.int32).reshape(())
        k = lax.dynamic_index_in_dim(k, layer, 0, keepdims=False)
        v = lax.dynamic_index_in_dim(v, layer, 0, keepdims=False)
    batch, heads, head_dim = q.shape
    seq_k, kv_heads = k.shape[1], k.shape[2]
    group = heads // kv_heads
    prec = lax.Precision.HIGHEST  # bf16 operands are exact in f32; f32 ones must not use TF32
    pos = pos.astype(jnp.int32)[:, None]  # [B, 1]
    slot = jnp.arange(seq_k, dtype=jnp.int32)[None, :]  # [1, S]
    if ring:
        vis = pos - jnp.remainder(pos - slot, seq_k) >= 0  # [B, S]
    else:
        vis = slot <= pos  # [B, S]
    qg = q.reshape(batch, kv_heads, group, head_dim)
    logits = jnp.einsum(
        "bkgd,bskd->bkgs", qg, k, precision=prec, preferred_element_type=jnp.float32
    )
    if scale != 1.0:
        logits = logits * jnp.float32(scale)
    vis4 = vis[:, None, None, :]  # [B, 1, 1, S]
    logits = jnp.where(vis4, logits, -jnp.inf)
    m = jnp.max(logits, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.where(vis4, jnp.exp(logits - m), 0.0)  # [B, Hk, G, S]
    l = jnp.sum(p, axis=-1, keepdims=True)
    # Invisible slots may hold anything (an unwritten tail): zero them before P @ V.
    vf = jnp.where(vis[:, :, None, None], v.astype(jnp.float32), 0.0)
    o = jnp.einsum("bkgs,bskd->bkgd", p, vf, precision=prec)
    o = o / jnp.where(l == 0.0, 1.0, l)
    return o.reshape(batch, heads, head_dim).astype(q.dtype)
