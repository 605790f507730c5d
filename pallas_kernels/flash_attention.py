"""Prefill attention (flash attention forward) for Gemma 4, Pallas GPU (Triton lowering).

Contract (docs/LAYOUT.md): ``q[B,T,H,D]``, ``k, v[B,S,Hk,D]``, ``q_start[B]``. Query ``t`` of
row ``b`` sits at position ``q_start[b] + t``, key ``s`` at position ``s``; key ``s`` is visible
to a query at ``p`` iff ``s <= p`` and (``window is None`` or ``p - s < window``). Query head
``h`` uses kv head ``h // (H // Hk)``. Softmax in float32; output dtype = ``q.dtype``.

What is notable here:
- One program = one block of query tokens of one batch row and ONE kv head. The ``G = H // Hk``
  query heads of that kv head are stacked into the rows of the matmul (``M = block_q * G``), so
  every K/V tile is read once per group, not once per query head.
- Key-block loop bounds come from the block's positions: a sliding layer never visits a key
  block that lies wholly outside ``[p - window + 1, p]`` of every row in the block, and the
  causal upper bound stops at the block's last position. Blocks that every row sees in full
  run in a separate loop without any mask arithmetic; only the (at most two) edge ranges pay
  for masks.
- Ragged ``T`` and ``S`` need no padding copies: partial tiles use masked loads/stores (a
  masked lane is never read on the GPU), and keys past the last visible one are zeroed at load
  so garbage (even NaN) in an unwritten cache tail cannot leak into the output.
- Default tiles are sized for the H100's 227 KiB of shared memory: ``BlockSizes.resolve``
  shrinks them until the conservative ``smem_bytes`` estimate is under ``SMEM_BUDGET``
  (160 KiB), and a caller's tiles that cannot fit at all are rejected before compiling.
- A query row with no visible key at all (only possible with ``q_start`` past ``S`` plus a
  window) returns zeros, in the kernel and the reference alike.
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

__all__ = [
    "SMEM_BUDGET",
    "SMEM_LIMIT",
    "BlockSizes",
    "flash_attention",
    "flash_attention_reference",
    "check_smem",
    "smem_bytes",
    "smem_lower_bound",
]

_LOG2E = math.log2(math.e)


# Shared memory per thread block on the H100 (the opt-in maximum Triton may request), and the
# budget every DEFAULT config must stay under by the conservative estimate below. Triton's own
# allocation was only measured once (D=512 f32, M=32, block_k=16, 2 stages: 270592 B requested,
# which this estimate puts at 266240 B); the gap between budget and limit is the safety margin.
SMEM_LIMIT = 232448  # 227 KiB
SMEM_BUDGET = 160 * 1024


def smem_bytes(*, rows: int, block_k: int, head_dim: int, itemsize: int, num_stages: int) -> int:
    """Conservative shared-memory estimate of one attention program (flash or decode).

    ``rows * D * itemsize`` (the q tile, a dot operand for the whole loop)
    ``+ 2 * copies * block_k * D * itemsize`` (K and V tiles; ``copies = num_stages + 1``: the
    ``num_stages`` software-pipeline buffers plus one dot-operand copy, which the f32 (IEEE,
    FMA) dots were seen to need; 1 when ``num_stages == 1``, as nothing is pipelined then)
    ``+ rows * block_k * 4`` (the P tile as a dot operand, counted at f32 size).
    """
    copies = 1 if num_stages <= 1 else num_stages + 1
    tile = block_k * head_dim * itemsize
    return rows * head_dim * itemsize + 2 * copies * tile + rows * block_k * 4


def smem_lower_bound(
    *, rows: int, block_k: int, head_dim: int, itemsize: int, num_stages: int
) -> int:
    """What Triton needs at the least: the q tile and ``num_stages`` K and V tiles."""
    tile = block_k * head_dim * itemsize
    return rows * head_dim * itemsize + 2 * max(num_stages, 1) * tile


def check_smem(what: str, **kw) -> None:
    """Raise a clear error for a tile config that cannot fit the H100's shared memory."""
    need = smem_lower_bound(**kw)
    if need > SMEM_LIMIT:
        raise ValueError(
            f"{what}: tiles {kw} need at least {need} B of shared memory (q tile + num_stages x "
            f"K and V tiles), over the H100's {SMEM_LIMIT} B; use a smaller block_q, block_k "
            f"or num_stages (the defaults stay under {SMEM_BUDGET} B by smem_bytes)"
        )


@dataclasses.dataclass(frozen=True, slots=True)
class BlockSizes:
    """Tile sizes; ``None`` picks the heuristic for the call's shapes (see ``resolve``).

    Attributes:
      block_q: query TOKENS per program; the matmul has ``block_q * G`` rows (G = H // Hk).
      block_k: keys per inner-loop step.
      num_warps: Triton warps per program.
      num_stages: Triton software-pipelining depth of the key loop.
    """

    block_q: int | None = None
    block_k: int | None = None
    num_warps: int | None = None
    num_stages: int | None = None

    def resolve(
        self, *, seq_q: int, seq_k: int, group: int, head_dim: int, itemsize: int
    ) -> BlockSizes:
        """Fill the ``None`` fields: start from M = 128 rows (64 for D > 128), 64 keys and 2
        stages, then shrink the free fields until ``smem_bytes <= SMEM_BUDGET``: block_k to
        32, rows to 32, block_k to 16, 1 stage, rows to 16. Fields the caller set are kept
        (``flash_attention`` then rejects a config that cannot fit at all). bf16 at the head
        dims in ``_TUNED_BF16`` starts from the tiles measured best on the H100 instead (the
        fields the caller left free), if they fit the hard shared-memory lower bound."""
        min_q = max(1, -(-16 // group))  # Triton dots need M >= 16

        def start(rows: int, bk: int, warps: int, stages: int) -> BlockSizes:
            """The caller's fields, the rest from these tiles (fitted to short sequences)."""
            return BlockSizes(
                self.block_q or max(min(rows // group, _compat.next_pow2(seq_q)), min_q),
                self.block_k or max(16, min(bk, _compat.next_pow2(seq_k))),
                self.num_warps or warps,
                self.num_stages or stages,
            )

        tuned = _TUNED_BF16.get(head_dim) if itemsize == 2 else None
        if tuned is not None:
            cand = start(*tuned)
            need = smem_lower_bound(
                rows=cand.block_q * group,
                block_k=cand.block_k,
                head_dim=head_dim,
                itemsize=itemsize,
                num_stages=cand.num_stages,
            )
            if need <= SMEM_LIMIT:
                return cand
        first = start(128 if head_dim <= 128 else 64, 64, 4 if head_dim <= 64 else 8, 2)
        block_q, block_k, num_warps, num_stages = (
            first.block_q,
            first.block_k,
            first.num_warps,
            first.num_stages,
        )
        free_q, free_k, free_s = self.block_q is None, self.block_k is None, not self.num_stages

        while (
            smem_bytes(
                rows=block_q * group,
                block_k=block_k,
                head_dim=head_dim,
                itemsize=itemsize,
                num_stages=num_stages,
            )
            > SMEM_BUDGET
        ):
            if free_k and block_k > 32:
                block_k //= 2
            elif free_q and block_q * group > 32 and block_q // 2 >= min_q:
                block_q //= 2
            elif free_k and block_k > 16:
                block_k //= 2
            elif free_s and num_stages > 1:
                num_stages = 1
            elif free_q and block_q // 2 >= min_q:
                block_q //= 2
            else:
                break  # nothing left to shrink; flash_attention checks the hard limit
        return BlockSizes(block_q, block_k, num_warps, num_stages)


# Measured bf16 tiles on the H100 (benchmarks/RESULTS.md run n, bench_attention.py --sweep at
# T = 2048, H = 8, Hk = 2): head_dim -> (rows = block_q * group, block_k, warps, stages).
# D = 512 global: 233 us vs 669 with the budget rule below; D = 256 window 512: 48 vs 81 us.
# They exceed the conservative SMEM_BUDGET estimate (made for f32 dots) but compile and run in
# bf16; a tuned config is still checked against the hard lower bound.
_TUNED_BF16 = {512: (32, 32, 4, 2), 256: (128, 32, 8, 3)}


def _flash_kernel(
    q_start_ref,  # [] int32: position of query token 0 of this batch row
    q_ref,  # [block_q, G, D]: this block's query tokens, the G heads of this kv head
    k_ref,  # [S, D]: all keys of this (batch row, kv head)
    v_ref,  # [S, D]
    o_ref,  # [block_q, G, D]
    *,
    block_q: int,
    block_k: int,
    group: int,
    seq_q: int,
    seq_k: int,
    window: int | None,
    qk_scale: float,
    precision,
):
    bq, bk, g = block_q, block_k, group
    d = q_ref.shape[-1]
    rows = bq * g
    # Heavier (later) query blocks first: the launch order evens out the causal triangle.
    i = pl.num_programs(0) - 1 - pl.program_id(0)
    t0 = i * bq

    row_ok = (t0 + jnp.arange(bq, dtype=jnp.int32)) < seq_q  # [bq]
    q = _compat.load(q_ref, mask=row_ok[:, None, None], other=0)  # [bq, G, D]
    q = q.reshape(rows, d)  # row r = token r // G, head r % G
    p_lo = q_start_ref[()] + t0  # position of the block's first token
    p_hi = p_lo + jnp.minimum(bq, seq_q - t0) - 1  # ... and of its last real token
    pos = p_lo + jnp.arange(bq, dtype=jnp.int32)  # [bq]
    pos = jnp.broadcast_to(pos[:, None], (bq, g)).reshape(rows)  # [M]

    # Key-block ranges. Some row of the block may see keys in [p_lo - window + 1, key_hi]
    # (blocks [kb_lo, n_hi)); every real row sees [p_hi - window + 1, full_hi_key] (blocks
    # [full_lo, full_hi), run without masks). Padded rows past T are computed but not stored.
    key_hi = jnp.minimum(p_hi, seq_k - 1)
    n_hi = lax.div(jnp.maximum(key_hi + 1, 0) + (bk - 1), bk)  # exclusive block bound
    full_hi_key = jnp.minimum(p_lo, seq_k - 1)
    full_hi = lax.div(jnp.maximum(full_hi_key + 1, 0), bk)  # blocks wholly <= full_hi_key
    if window is None:
        kb_lo = jnp.int32(0)
        full_lo = jnp.int32(0)
    else:
        kb_lo = lax.div(jnp.maximum(p_lo - window + 1, 0), bk)
        full_lo = lax.div(jnp.maximum(p_hi - window + 1, 0) + (bk - 1), bk)
    kb_lo = jnp.minimum(kb_lo, n_hi)
    full_lo = jnp.clip(full_lo, kb_lo, n_hi)
    full_hi = jnp.clip(full_hi, full_lo, n_hi)

    def step(kb, carry, *, masked: bool):
        acc, m_i, l_i = carry  # [M, D] f32, [M] f32, [M] f32
        s0 = kb * bk
        cols = s0 + jnp.arange(bk, dtype=jnp.int32)  # [bk]
        if masked:
            col_ok = cols <= key_hi  # in bounds and not past every row's position
            k = _compat.load(k_ref.at[pl.ds(s0, bk)], mask=col_ok[:, None], other=0)  # [bk, D]
            v = _compat.load(v_ref.at[pl.ds(s0, bk)], mask=col_ok[:, None], other=0)  # [bk, D]
        else:
            k = k_ref[pl.ds(s0, bk), :]  # [bk, D]
            v = v_ref[pl.ds(s0, bk), :]  # [bk, D]
        s = lax.dot_general(
            q, k, (((1,), (1,)), ((), ())), precision=precision, preferred_element_type=jnp.float32
        )  # [M, bk]
        s = s * qk_scale  # log2 domain: exp2(s) == exp(scale * q.k)
        if masked:
            vis = (cols[None, :] <= pos[:, None]) & col_ok[None, :]  # [M, bk]
            if window is not None:
                vis = vis & ((pos[:, None] - cols[None, :]) < window)
            s = jnp.where(vis, s, _compat.MASK_VALUE)
        m_new = jnp.maximum(m_i, jnp.max(s, axis=1))  # [M]
        alpha = jnp.exp2(m_i - m_new)  # [M]
        p = jnp.exp2(s - m_new[:, None])  # [M, bk]
        if masked:
            p = jnp.where(vis, p, 0.0)
        l_new = alpha * l_i + jnp.sum(p, axis=1)
        pv = jnp.dot(
            p.astype(v.dtype), v, precision=precision, preferred_element_type=jnp.float32
        )  # [M, D]
        return acc * alpha[:, None] + pv, m_new, l_new

    carry = (
        jnp.zeros((rows, d), jnp.float32),
        jnp.full((rows,), _compat.MASK_VALUE, jnp.float32),
        jnp.zeros((rows,), jnp.float32),
    )
    # Two loop bodies, not three (each is a separately pipelined loop for Triton to compile):
    # the masked edges [kb_lo, full_lo) and [full_hi, n_hi) share one loop, the order of the
    # blocks being irrelevant to the online softmax.
    n_edge_lo = full_lo - kb_lo

    def masked_step(j, carry):
        kb = jnp.where(j < n_edge_lo, kb_lo + j, full_hi + (j - n_edge_lo))
        return step(kb, carry, masked=True)

    n_masked = n_edge_lo + (n_hi - full_hi)
    carry = lax.fori_loop(0, n_masked, masked_step, carry)
    if bk <= seq_k:  # otherwise no block lies wholly inside [0, S) and the loop is empty
        carry = lax.fori_loop(full_lo, full_hi, functools.partial(step, masked=False), carry)
    acc, _, l_i = carry

    l_safe = jnp.where(l_i == 0.0, 1.0, l_i)  # a row that saw no key returns 0
    o = (acc / l_safe[:, None]).reshape(bq, g, d)
    _compat.store(o_ref, o.astype(o_ref.dtype), mask=row_ok[:, None, None])


def _validate(q, k, v, q_start, window, scale, block_sizes):
    if q.ndim != 4:
        raise ValueError(f"{q.shape=} must be [B, T, H, D]")
    if k.ndim != 4 or k.shape != v.shape:
        raise ValueError(f"{k.shape=} and {v.shape=} must be equal and [B, S, Hk, D]")
    batch, _, heads, head_dim = q.shape
    if k.shape[0] != batch or k.shape[3] != head_dim:
        raise ValueError(f"{k.shape=} must match {q.shape=} in batch and head dim")
    kv_heads = k.shape[2]
    if heads % kv_heads != 0:
        raise ValueError(f"{heads=} must be a multiple of {kv_heads=}")
    if not _compat.is_pow2(heads // kv_heads):
        raise ValueError(f"{heads // kv_heads=} (the GQA group) must be a power of two")
    if head_dim < 16 or not _compat.is_pow2(head_dim):
        raise ValueError(f"{head_dim=} must be a power of two >= 16")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"{q.dtype=}, {k.dtype=}, {v.dtype=} must be equal")
    if q.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
        raise ValueError(f"{q.dtype=} must be float32, bfloat16 or float16")
    if q_start.shape != (batch,) or not jnp.issubdtype(q_start.dtype, jnp.integer):
        raise ValueError(f"{q_start.shape=} {q_start.dtype=} must be an integer [B={batch}]")
    if window is not None and (not isinstance(window, int) or window < 1):
        raise ValueError(f"{window=} must be None or a positive int")
    if not isinstance(scale, int | float):
        raise ValueError(f"{scale=} must be a static Python float")
    if block_sizes is not None and not isinstance(block_sizes, BlockSizes):
        raise ValueError(f"{block_sizes=} must be a flash_attention.BlockSizes")


@functools.partial(jax.jit, static_argnames=["window", "scale", "interpret", "block_sizes"])
def flash_attention(
    q: jax.Array,  # [B, T, H, D]
    k: jax.Array,  # [B, S, Hk, D]
    v: jax.Array,  # [B, S, Hk, D]
    q_start: jax.Array,  # [B] int: position of query token 0 of each row
    *,
    window: int | None = None,
    scale: float = 1.0,
    interpret: bool = False,
    block_sizes: BlockSizes | None = None,
) -> jax.Array:  # [B, T, H, D], q.dtype
    """Causal (optionally sliding-window) GQA attention over a prompt; see the module doc."""
    _validate(q, k, v, q_start, window, scale, block_sizes)
    batch, seq_q, heads, head_dim = q.shape
    seq_k, kv_heads = k.shape[1], k.shape[2]
    group = heads // kv_heads
    bs = (block_sizes or BlockSizes()).resolve(
        seq_q=seq_q, seq_k=seq_k, group=group, head_dim=head_dim, itemsize=q.dtype.itemsize
    )
    if not (_compat.is_pow2(bs.block_q) and bs.block_q * group >= 16):
        raise ValueError(f"{bs.block_q=} must be a power of two with block_q * {group=} >= 16")
    if not (_compat.is_pow2(bs.block_k) and bs.block_k >= 16):
        raise ValueError(f"{bs.block_k=} must be a power of two >= 16")
    if bs.num_stages < 1:
        raise ValueError(f"{bs.num_stages=} must be >= 1")
    check_smem(
        "flash_attention",
        rows=bs.block_q * group,
        block_k=bs.block_k,
        head_dim=head_dim,
        itemsize=q.dtype.itemsize,
        num_stages=bs.num_stages,
    )

    kernel = functools.partial(
        _flash_kernel,
        block_q=bs.block_q,
        block_k=bs.block_k,
        group=group,
        seq_q=seq_q,
        seq_k=seq_k,
        window=window,
        qk_scale=float(scale) * _LOG2E,
        precision=_compat.dot_precision(q.dtype),
    )
    n_q = pl.cdiv(seq_q, bs.block_q)

    def q_map(i, b, h):
        return (b, n_q - 1 - i, h, 0)  # matches the kernel's reversed block order

    return pl.pallas_call(
        kernel,
        grid=(n_q, batch, kv_heads),
        in_specs=[
            pl.BlockSpec((None,), lambda i, b, h: (b,)),
            pl.BlockSpec((None, bs.block_q, group, head_dim), q_map),
            pl.BlockSpec((None, seq_k, None, head_dim), lambda i, b, h: (b, 0, h, 0)),
            pl.BlockSpec((None, seq_k, None, head_dim), lambda i, b, h: (b, 0, h, 0)),
        ],
        out_specs=pl.BlockSpec((None, bs.block_q, group, head_dim), q_map),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_compat.compiler_params(num_warps=bs.num_warps, num_stages=bs.num_stages),
        interpret=interpret,
        name="flash_attention",
    )(q_start.astype(jnp.int32), q, k, v)


@functools.partial(jax.jit, static_argnames=["window", "scale"])
def flash_attention_reference(
    q: jax.Array,  # [B, T, H, D]
    k: jax.Array,  # [B, S, Hk, D]
    v: jax.Array,  # [B, S, Hk, D]
    q_start: jax.Array,  # [B] int
    *,
    window: int | None = None,
    scale: float = 1.0,
) -> jax.Array:  # [B, T, H, D], q.dtype
    """Plain jnp attention with the same semantics: f32 logits, f32 softmax, f32 P @ V.

    Einsum letters: b batch, t query, s key, k kv head, g query head within the group, d head dim.
    """
    batch, seq_q, heads, head_dim = q.shape
    seq_k, kv_heads = k.shape[1], k.shape[2]
    group = heads // kv_heads
    prec = lax.Precision.HIGHEST  # bf16 operands are exact in f32; f32 ones must not use TF32
    qg = q.reshape(batch, seq_q, kv_heads, group, head_dim)
    logits = jnp.einsum(
        "btkgd,bskd->bkgts", qg, k, precision=prec, preferred_element_type=jnp.float32
    )
    if scale != 1.0:
        logits = logits * jnp.float32(scale)
    q_pos = q_start.astype(jnp.int32)[:, None] + jnp.arange(seq_q, dtype=jnp.int32)  # [B, T]
    k_pos = jnp.arange(seq_k, dtype=jnp.int32)  # [S]
    vis = k_pos[None, None, :] <= q_pos[:, :, None]  # [B, T, S]
    if window is not None:
        vis = vis & (q_pos[:, :, None] - k_pos[None, None, :] < window)
    vis = vis[:, None, None]  # [B, 1, 1, T, S]
    logits = jnp.where(vis, logits, -jnp.inf)
    m = jnp.max(logits, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.where(vis, jnp.exp(logits - m), 0.0)  # [B, Hk, G, T, S]
    l = jnp.sum(p, axis=-1)  # [B, Hk, G, T]
    # Keys no query of the row can see are zeroed so garbage there cannot reach the output.
    v_live = k_pos[None, :] <= (q_pos[:, -1:])  # [B, S]
    vf = jnp.where(v_live[:, :, None, None], v.astype(jnp.float32), 0.0)
    o = jnp.einsum("bkgts,bskd->btkgd", p, vf, precision=prec)
    l = jnp.transpose(l, (0, 3, 1, 2))[..., None]  # [B, T, Hk, G, 1]
    o = o / jnp.where(l == 0.0, 1.0, l)
    return o.reshape(batch, seq_q, heads, head_dim).astype(q.dtype)
