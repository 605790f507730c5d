"""Quantized matmul ``x[M, K] @ W[N, K]^T -> [M, N]`` on ggml block formats, Pallas GPU (Triton).

Contract (docs/LAYOUT.md): ``W`` arrives as the repacked field arrays of its format (``qs``,
``d``, ...; see ``qtiles`` for how each format is read), ``x`` is f32/bf16/f16, the result has
``x.dtype`` and products are accumulated in f32. Formats: Q8_0, Q4_0, Q4_K, Q5_K, Q6_K.

What is notable here:
- **Runs, not interleaves.** Every format is read as runs of R consecutive K elements (one
  load of packed bytes, one scale; see ``qtiles``), so the nibble order of ggml never has to
  be undone in registers: the cheap side, x, is reshaped or permuted instead.
- **Three kernels, chosen by the static M** (``BlockSizes.resolve``):
  * ``vector`` (M <= 4, batch-1 decode): CUDA-core multiply-add. A program owns ``block_n``
    rows of W and a range of K; it dequantizes ``[block_n, block_k/B, R]`` run tiles in f32
    and accumulates ``w * x`` elementwise in registers (x viewed as ``[M, K/B, S, R]``, a free
    reshape), reducing across lanes once at the end. Per weight, the arithmetic is ~1.3
    integer instructions (inline-PTX ``prmt`` code extraction), an FADD (magic-number float),
    an FMA for scale and min and an FMA per row of x (``qtiles.fma``: the Triton lowering
    does not contract a multiply and an add by itself), plus the bf16 -> f32 shift of x.
    Nsight Compute counts ~8 executed instructions per weight with the addressing (Q4_K;
    ~10 before the FMAs), at 22-30% occupancy (96-128 registers); at 20480 x 2560 it reaches
    69% (Q8_0), 54% (Q6_K) and 38% (Q4_K) of the DRAM peak (RESULTS.md runs r, s). The next
    step's weight tile AND its slice of x are loaded a step ahead (``_TileLoads``,
    ``load_x``): x loaded in the step it was used stalled every warp on an L2 round trip
    (the top stall site in run s's Nsight Compute source view). Tensor cores would idle 15/16
    of their rows, and the ``mma`` kernel with x padded to 16 rows measured slower (run s).
  * ``vector`` with **integer dot products** (``BlockSizes.int_dot``; by default Q4_K against
    one bf16 row): the kernel rounds each run of x to 15-bit codes with a power-of-two step
    (two int8 planes, ``qtiles.quantize_runs``) and contracts them with the weights' 4-bit
    codes by ``dp4a``, two per four weights (``qtiles.int_dot_fma``): 7.5 instructions per
    weight against 8.1 in floats, and whole blocks' codes and scales in a few wide loads;
    E4B Q4_K_M 279-282 -> 325-329 tok/s (RESULTS.md run u). Q6_K has it too, not faster.
  * ``mma`` with small tiles (4 < M <= 64, batched decode) and large tiles (M > 64, prefill):
    each loop step dequantizes ``block_k`` K elements of ``block_n`` rows (f32, then x.dtype)
    and contracts them with ONE ``dot`` (``qtiles.join_runs`` interleaves the runs; x comes
    pre-permuted by ``qtiles.permute_for_join``). One dot per step matters: Triton folds
    ``acc + dot`` into the wgmma accumulator and overlaps the next step's dequantization with
    it; a dot per run cost an accumulator add and a wgmma wait each. Prefill is
    compute-bound; dequantization is paid once per W tile and amortised over ``block_m`` rows.
  * Decode-sized grids are too small for 132 SMs (N=2048 is 32 tiles of 64 rows), so the K
    range is **split** over a third grid axis; the f32 partial sums ``[split, M, N]`` are added
    by XLA (which can fuse that sum into the consumer), or, with ``parts=True`` at batch 1, by
    the Pallas kernel that consumes them (norm+RoPE, residual+norm: E4B Q4_K_M 272-275 ->
    280-283 tok/s, RESULTS.md run t; running without the split was slower). One row of x takes
    16-row tiles and splits until there are two programs per SM.
- **Ragged N without masks.** The last N tile is shifted back to end at row N (it overlaps its
  neighbour, whose rows it recomputes bit-identically), so no load or store is ever partial;
  only N < 16 is padded. M is padded to the tile (x is tiny). K is always whole blocks.
- **Grouped (MoE) variant** ``grouped_qmatmul(x, fmt, fields[E, N, K], expert_ids[T, k])``:
  with few (token, choice) pairs (decode) the vector kernel runs one program row per pair,
  reading the expert index from ``expert_ids``; with many, the pairs are sorted by expert and
  ``ragged_qmatmul`` runs the mma kernel over (row tile, expert) *visits*: a tile that straddles
  two experts is visited once per expert and each visit stores only its own rows (masked
  store), so no per-expert padding is needed (at most ``E - 1`` extra visits).
- **Stacked variant** ``stacked_qmatmul(x, fmt, fields[L, N, K], layer)``: the model's layer
  scan holds each weight as an ``[L, N, K]`` stack; a slice before the custom call would be a
  copy of the layer's weight, so the stack goes in whole and the ragged kernel's visits all
  name expert ``layer``. ``stacked_qmatmul_many`` runs several such stacks of one format and
  K against one row in ONE vector launch (a layer's q|k|v, gate|up): batch-1 decode's small
  matvecs cost a launch's fixed ~2 us each (E4B Q4_K_M: 254 -> 270 tok/s, RESULTS.md run s).
- Interpret mode (CPU) runs the same kernels with the pure-jnp code extraction instead of the
  inline PTX (bit-identical by construction, tested against each other only on the GPU).

Roofline, E4B shapes (batch-1 decode reads every weight byte once; 2.15 TB/s is the 80% target
of the 2.69 TB/s copy ceiling; FLOPs per call = 2 M N K):

=============  ==========  ==========  ==========  ================  ===================
N x K          Q8_0 bytes  Q4_K bytes  Q6_K bytes  Q8_0 @2.15 TB/s   GFLOP at M = 2048
=============  ==========  ==========  ==========  ================  ===================
2048 x 2560    5.57 MB     2.95 MB     4.30 MB     2.6 us            21.5
512 x 2560     1.39 MB     0.74 MB     1.08 MB     0.6 us            5.4
2560 x 2048    5.57 MB     2.95 MB     4.30 MB     2.6 us            21.5
10240 x 2560   27.9 MB     14.7 MB     21.5 MB     13.0 us           107
2560 x 10240   27.9 MB     14.7 MB     21.5 MB     13.0 us           107
262144 x 2560  713 MB      377 MB      551 MB      332 us            2749
=============  ==========  ==========  ==========  ================  ===================

The small projections (a few MB) take ~1-3 us at the bandwidth limit, comparable to a launch,
so for them the split-K occupancy matters more than the inner loop.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import _compat, qtiles

__all__ = [
    "BlockSizes",
    "grouped_qmatmul",
    "grouped_qmatmul_reference",
    "stacked_qmatmul",
    "stacked_qmatmul_many",
    "qmatmul",
    "qmatmul_reference",
    "ragged_qmatmul",
    "ragged_qmatmul_reference",
]

VECTOR_MAX_M = 4  # up to this many rows of x: the CUDA-core kernel
DECODE_MAX_M = 64  # up to this: small mma tiles + split-K; above: prefill tiles
GATHER_MAX_PAIRS = 16  # grouped: up to this many (token, choice) pairs, one vector row each
# Programs a bandwidth-bound launch should have (132 SMs x a few resident programs each).
_TARGET_PROGRAMS = 512
_SMS = 132  # H100 SXM
_MIN_DOT = 16  # Triton dots need every dimension >= 16
_MIN_VECTOR_N = 8  # the vector kernel has no dot: 8-row tiles are allowed
# ``BlockSizes.int_dot=None`` with one bf16 row: integer dot products for these formats (E4B
# Q4_K_M batch-1 decode 279-282 -> 325-329 tok/s with Q4_K's, RESULTS.md run u).
INT_DOT_DEFAULT = ("Q4_K",)


@dataclasses.dataclass(frozen=True, slots=True)
class BlockSizes:
    """Tile sizes; ``None`` picks the heuristic for the call's shapes (see ``resolve``).

    Attributes:
      kernel: ``"vector"`` (CUDA cores, tiny M) or ``"mma"`` (tensor cores).
      block_m: rows of x per program (vector: rows sharing one pass over W, unrolled).
      block_n: rows of W per program (a power of two >= 16; >= 8 for the vector kernel).
      block_k: K elements per loop step. vector: whole quant blocks, each run tile is
        ``[block_n, block_k / B, R]``. mma: the K of each ``dot``; at least a quant block it
        spans ``block_k / B`` blocks (all runs joined), below it ``block_k / R`` runs of one
        block (``B / block_k`` dots per block).
      split_k: K ranges per output tile (a grid axis; partial sums added by XLA).
      num_warps: Triton warps per program.
      num_stages: Triton software-pipelining depth of the K loop.
      int_dot: vector kernel on ``qtiles.INT_DOT_FORMATS``: integer dot products on x
        rounded to 15-bit codes per run (``qtiles.quantize_runs``) instead of f32 weights.
        ``None``: on for one bf16 row of the ``INT_DOT_DEFAULT`` formats, else off (f32 x
        keeps the exact float path); True asks for it with any x and rows.
    """

    kernel: str | None = None
    block_m: int | None = None
    block_n: int | None = None
    block_k: int | None = None
    split_k: int | None = None
    num_warps: int | None = None
    num_stages: int | None = None
    int_dot: bool | None = None

    def resolve(
        self, fmt: str, *, m: int, n: int, k: int, split: bool = True, dtype=None, pairs: int = 1
    ) -> BlockSizes:
        """Fills every ``None`` for an ``[m, k] x [n, k]^T`` call with x of ``dtype`` (untuned
        H100 guesses, to be swept by benchmarks/bench_qmatmul.py) and fits the given sizes to
        the shapes; ``int_dot`` comes back a bool. ``pairs``: a grouped vector call's one-row
        programs per row tile (``m=1``, each pair its own expert): the split counts them all."""
        spec = qtiles.get_format(fmt)
        nb = k // spec.block
        kernel = self.kernel or ("vector" if m <= VECTOR_MAX_M else "mma")
        if kernel not in ("vector", "mma"):
            raise ValueError(f"{kernel=} must be 'vector' or 'mma'")
        int_dot = kernel == "vector" and fmt in qtiles.INT_DOT_FORMATS
        if self.int_dot is None:
            int_dot &= fmt in INT_DOT_DEFAULT and m == 1 and _is_bf16(dtype)
        else:
            int_dot &= self.int_dot
        if int_dot and m == 1:
            # Swept on the H100 (bench_qmatmul --sweep --int-dot, RESULTS.md run u): 16 rows,
            # 4 blocks per step; 2 warps (more programs per SM) unless K is long (FFN down).
            bm, bn, bk, stages = 1, 16, 1024, 1
            warps = 4 if k >= 8192 else 2
        elif kernel == "vector" and m == 1:
            # One row (batch-1 decode): 16 rows of W per program, split over K only up to two
            # programs per SM (below); 4 KiB of Q8_0 / Q4_K bytes per loop step, prefetched a
            # step ahead (see the kernel).
            # Nsight Compute, 20480 x 2560 (RESULTS.md): 64-row tiles took 255 registers
            # per thread and ran at 11% occupancy.
            bm, bn, warps, stages = 1, 16, 4, 1
            bk = 512 if spec.block == 256 else 256
        elif kernel == "vector":
            bm = max(1, min(m, VECTOR_MAX_M))
            bn, warps, stages = 64, 4, 3
            # The f32 accumulators hold bm x [bn, block_k / S] elements: keep them at <= 64
            # registers per thread (<= 256 K elements per step, at least one block).
            bk = (64 * 32 * warps * spec.runs) // ((self.block_m or bm) * (self.block_n or bn))
            bk = max(spec.block, min(256, _floor_pow2(bk)))
        elif m <= DECODE_MAX_M:
            # Swept on the H100 at M = 32 over the E4B layer shapes (benchmarks/RESULTS.md run
            # k): 32-element blocks do best with 128 K per step (4 blocks), super-blocks with one.
            bm = max(_MIN_DOT, _compat.next_pow2(m))
            bn, bk, warps, stages = 64, (128 if spec.block == 32 else 256), 4, 3
        else:
            # Shared memory per pipeline stage is about x [bm, K per step] + W's bytes; a
            # K-quant step is a whole super-block (x: 64 KiB at bm=128), so 2 stages there
            # and 3 for 32-blocks keep it under the H100's 227 KiB.
            bm = 64 if m < 128 else 128
            bn, bk, warps = 128, 128, 8
            stages = 3 if spec.block == 32 else 2
        bm = self.block_m or bm
        bn = self.block_n or bn
        if kernel == "mma" and (bm < _MIN_DOT or not _compat.is_pow2(bm)):
            raise ValueError(f"mma {bm=} must be a power of two >= {_MIN_DOT}")
        min_n = _MIN_VECTOR_N if kernel == "vector" else _MIN_DOT
        if bn < min_n or not _compat.is_pow2(bn):
            raise ValueError(f"{bn=} must be a power of two >= {min_n}")
        # A tile never exceeds N (the last tile is shifted back, see the module docstring).
        bn = max(min_n, min(bn, _floor_pow2(n)))
        bk = self.block_k or bk
        if not _compat.is_pow2(bk):
            raise ValueError(f"block_k={bk} must be a power of two")
        if kernel == "vector" or bk >= spec.block:
            nblk = _fit_blocks(max(1, bk // spec.block), nb)
            bk = nblk * spec.block
        else:
            bk = max(bk, spec.run)
        steps = nb // max(1, bk // spec.block)
        if self.split_k is not None:
            sk = max(1, min(self.split_k, steps))
        elif not split or m > DECODE_MAX_M:
            sk = 1
        elif kernel == "vector" and m == 1:
            # At least two programs per SM: a long-K matrix with few row tiles (the FFN down
            # projection: 160 tiles, 40 steps each) otherwise leaves the SMs one slow program.
            tiles = pl.cdiv(n, bn) * pairs
            sk = max(1, min(steps, pl.cdiv(2 * _SMS, tiles)))
        else:
            tiles = pl.cdiv(n, bn) * pl.cdiv(m, bm)
            sk = max(1, min(steps, pl.cdiv(_TARGET_PROGRAMS, tiles)))
        return BlockSizes(
            kernel=kernel,
            block_m=bm,
            block_n=bn,
            block_k=bk,
            split_k=sk,
            num_warps=self.num_warps or warps,
            num_stages=self.num_stages or stages,
            int_dot=int_dot,
        )


def _is_bf16(dtype) -> bool:
    return dtype is not None and jnp.dtype(dtype) == jnp.bfloat16


def _floor_pow2(n: int) -> int:
    return 1 << (max(int(n), 1).bit_length() - 1)


def _fit_blocks(nblk: int, nb: int) -> int:
    """The largest power of two <= ``nblk`` that divides ``nb`` (blocks per loop step)."""
    c = _floor_pow2(min(nblk, nb))
    while nb % c:
        c //= 2
    return c


def _k_layout(fmt: str, block_k: int) -> tuple[int, int]:
    """(quant blocks per loop step, runs joined per dot) of a resolved mma ``block_k``."""
    spec = qtiles.get_format(fmt)
    if block_k >= spec.block:
        return block_k // spec.block, spec.runs
    return 1, block_k // spec.run


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------
def _k_range(pid_s, *, steps: int, split: int):
    """Loop bounds ``[lo, hi)`` over K steps of split ``pid_s`` (balanced integer split)."""
    if split == 1:
        return 0, steps
    return lax.div(pid_s * steps, split), lax.div((pid_s + 1) * steps, split)


class _TileLoads:
    """Field access for ``qtiles.tile_runs`` that software-pipelines the vector kernel's loop.

    Every array ``tile_runs`` asks for is loaded again with the block index (position
    ``block_axis`` of the index) replaced by ``ahead``, and recorded in ``loaded``. Without
    ``current`` the new load is also what is handed back (the loop's prologue); with it, the
    arrays of ``current`` (the previous step's ``loaded``) are handed back in order, so this
    step computes on bytes loaded a step earlier while the next step's are in flight."""

    def __init__(self, refs, block_axis: int, ahead, current=None):
        self.refs, self.block_axis, self.ahead = refs, block_axis, ahead
        self.current = None if current is None else iter(current)
        self.loaded = []

    def __getitem__(self, name):
        return _FieldLoads(self, name)


class _FieldLoads:
    def __init__(self, owner: _TileLoads, name: str):
        self.owner, self.name = owner, name

    def __getitem__(self, index: tuple):
        o = self.owner
        k = o.block_axis
        o.loaded.append(o.refs[self.name][(*index[:k], o.ahead, *index[k + 1 :])])
        return o.loaded[-1] if o.current is None else next(o.current)


def _vector_kernel(
    *refs, fmt, names, bm, bn, nbk, weights, steps, split, grouped, asm, int_dot=False
):
    """CUDA-core matvec over one ``[bn]``-row tile of W and one K split.

    refs (in order):
      experts_ref: [P] int32 expert of each pair (grouped only)
      xrow_ref: [P] int32 row of x of each pair (grouped only)
      x_ref: [Mp, K/B, S, R] in x's dtype (converted here: no separate XLA convert launch);
        with ``int_dot``, ``[Mp, K/B, *INT_LAYOUT[fmt].x_block]`` (``qtiles.int_x_view``)
      *field refs: ``qtiles.field_views`` of each weight in turn, ``[(E,) N_g, K/B, ...]``
      *o_refs, one per weight: [split, Mp, N_g] f32 if split > 1 else [Mp, N_g] x.dtype
    grid: (row tiles of all weights, Mp / bm (pairs if grouped), split)

    ``weights`` is ``((first row tile, N), ...)``: usually one weight; several of one format
    and K (``stacked_qmatmul_many``) share one launch, each program running the tile of the
    weight its row tile falls in (the others' code skipped by a branch on ``program_id``).

    The loop is software-pipelined by hand: step t's weight bytes and x are loaded (into
    registers) during step t - 1, so each program always has a tile in flight. Without it a
    program waited for every tile it had just asked for, and the kernel ran latency-bound
    (Nsight Compute, 20480 x 2560 Q4_K: 30% of DRAM bandwidth at 46% issue utilisation; with
    the weights ahead but x loaded in its own step, x's loads were the top stall site).
    """
    if grouped:
        experts_ref, xrow_ref, x_ref, *refs = refs
    else:
        (x_ref, *refs), experts_ref, xrow_ref = refs, None, None
    # Program ids read here, outside any branch (interpret mode lowers them only at top level).
    pid_n, pid_m, pid_s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    nf = len(names)
    o_refs = refs[len(weights) * nf :]
    for g, (first, n_g) in enumerate(weights):
        tile = functools.partial(
            _vector_tile_int if int_dot else _vector_tile, x_ref,
            dict(zip(names, refs[g * nf : (g + 1) * nf], strict=True)),
            o_refs[g], (pid_n - first if first else pid_n, pid_m, pid_s), experts_ref, xrow_ref,
            fmt=fmt, bm=bm,
            bn=bn, nbk=nbk, n=n_g, steps=steps, split=split, asm=asm,
        )  # fmt: skip
        if len(weights) == 1:
            tile()  # the whole grid is this weight's: no branch
        else:
            pl.when((pid_n >= first) & (pid_n < first + pl.cdiv(n_g, bn)))(tile)


def _vector_tile(
    x_ref, w_refs, o_ref, pids, experts_ref, xrow_ref, *, fmt, bm, bn, nbk, n, steps, split, asm
):
    """One program of ``_vector_kernel``: row tile ``pids[0]`` of one weight (``w_refs``)."""
    rows, lead, x_rows, out_rows = _tile_rows(pids, experts_ref, xrow_ref, bm=bm, bn=bn, n=n)
    pid_s = pids[2]
    r = qtiles.get_format(fmt).run
    blocks = functools.partial(_blocks, nbk=nbk)

    n_runs = qtiles.get_format(fmt).runs

    def load_x(t):  # x of step t: rows x runs of [nbk, R], in x's dtype
        return tuple(x_ref[xr, blocks(t), j, :] for xr in x_rows for j in range(n_runs))

    def read(loads, t, live):  # S x [bn, nbk, R]; the prologue's dequantization is dead code
        return qtiles.tile_runs(fmt, loads, (*lead, blocks(t)), asm=asm and live)

    def update(accs, runs, xs):
        accs = list(accs)
        for j, w in enumerate(runs):
            for i in range(len(x_rows)):
                x = xs[i * n_runs + j].astype(jnp.float32)  # [nbk, R]
                accs[i] = qtiles.fma(w, x[None], accs[i], asm=asm)
        return tuple(accs)

    def init():
        return (jnp.zeros((bn, nbk, r), jnp.float32),) * len(x_rows)

    k_range = _k_range(pid_s, steps=steps, split=split)
    accs = _pipelined_steps(w_refs, len(lead), blocks, k_range, read, load_x, update, init)
    for acc, orow in zip(accs, out_rows, strict=True):
        _store_row(o_ref, acc.sum(axis=2).sum(axis=1), orow, rows, pid_s, split)


def _pipelined_steps(w_refs, block_axis, blocks, k_range, read, load_x, update, init):
    """The vector kernel's K loop over steps ``k_range = (lo, hi)``, software-pipelined by hand:
    step t's weight arrays (``read(loads, t, live)`` through ``_TileLoads``) and x
    (``load_x(t)``) are loaded during step t - 1, so a tile is always in flight; each step
    computes ``acc = update(acc, read's values, x)`` from ``acc = init()``. Every split has
    at least one step (split_k <= steps), so step ``lo`` is in bounds; the last step loads
    its own tile again (an L2 hit) rather than branch."""
    lo, hi = k_range
    first = _TileLoads(w_refs, block_axis, blocks(lo))
    read(first, lo, False)  # the prologue: only its loads matter

    def body(t, carry):
        acc, tile, xs = carry
        ahead = jnp.minimum(t + 1, hi - 1)
        loads = _TileLoads(w_refs, block_axis, blocks(ahead), tile)
        acc = update(acc, read(loads, t, True), xs)
        return acc, tuple(loads.loaded), load_x(ahead)

    acc, _, _ = lax.fori_loop(lo, hi, body, (init(), tuple(first.loaded), load_x(lo)))
    return acc


def _tile_rows(pids, experts_ref, xrow_ref, *, bm, bn, n):
    """``(rows, lead index, rows of x, output rows)`` of a vector-kernel program."""
    pid_n, pid_m, _ = pids
    rows = pl.ds(jnp.minimum(pid_n * bn, n - bn), bn)
    if experts_ref is not None:  # grouped: one (expert, row of x) pair per program row
        return rows, (experts_ref[pid_m], rows), [xrow_ref[pid_m]], [pid_m]
    x_rows = [pid_m * bm + i for i in range(bm)]
    return rows, (rows,), x_rows, x_rows


def _blocks(t, *, nbk):
    """The quant blocks of loop step ``t``."""
    start = t * nbk
    return pl.ds(start if isinstance(start, int) else pl.multiple_of(start, nbk), nbk)


def _store_row(o_ref, y, orow, rows, pid_s, split):
    if split > 1:
        o_ref[pid_s, orow, rows] = y
    else:
        o_ref[orow, rows] = y.astype(o_ref.dtype)


def _vector_tile_int(
    x_ref, w_refs, o_ref, pids, experts_ref, xrow_ref, *, fmt, bm, bn, nbk, n, steps, split, asm
):
    """``_vector_tile`` with integer dot products (``qtiles.int_dot_fma``): x is rounded to
    15-bit codes step by step (``qtiles.quantize_runs``; a separate launch for it cost ~2 us
    a call, RESULTS.md run u), the weights stay 4/6-bit codes with a scale and a min per run
    piece, so per four weights the loop spends two ``dp4a`` and a few integer ops where the
    float path dequantizes every weight and converts every element of x. A piece's sum is
    ``(scale * xs) * sum(code * q) - min * sum(x)``: the first term per group of four
    (``int_dot_fma``), the min term once per piece and row. Each step covers its blocks in a
    few calls (``qtiles.int_calls``: Q4_K 2, Q6_K 4); x is ``qtiles.int_x_view``."""
    rows, lead, x_rows, out_rows = _tile_rows(pids, experts_ref, xrow_ref, bm=bm, bn=bn, n=n)
    pid_s = pids[2]
    layout = qtiles.INT_LAYOUT[fmt]
    shape = (bn, nbk, *_call_shape(layout))
    blocks = functools.partial(_blocks, nbk=nbk)
    per_row = len(layout.x_index)

    def load_x(t):  # per row of x, the x tile of each call: [nbk, *call shape]
        b = blocks(t)
        return tuple(x_ref[(xr, b, *ix)] for xr in x_rows for ix in layout.x_index)

    def read(loads, t, live):
        return qtiles.int_calls(fmt, loads, (*lead, blocks(t)))

    def update(acc, calls, xs_all):
        accs, mins = list(acc[0]), list(acc[1])
        for i in range(len(x_rows)):
            for c, call in enumerate(calls):
                hi, lo, step, xsum = qtiles.quantize_runs(xs_all[i * per_row + c], layout.run_axes)
                sc = jnp.broadcast_to((call.scale * step[None])[..., None], shape)
                accs[i] = qtiles.int_dot_fma(
                    call.q, jnp.broadcast_to(hi[None], shape), jnp.broadcast_to(lo[None], shape),
                    sc, accs[i], nibble=call.nibble, high=call.high, asm=asm,
                )  # fmt: skip
                mins[i] = qtiles.fma(call.min, xsum[None], mins[i], asm=asm)
        return tuple(accs), tuple(mins)

    def init():
        zeros, zmins = jnp.zeros(shape, jnp.float32), jnp.zeros(shape[:-1], jnp.float32)
        return (zeros,) * len(x_rows), (zmins,) * len(x_rows)

    k_range = _k_range(pid_s, steps=steps, split=split)
    accs, mins = _pipelined_steps(w_refs, len(lead), blocks, k_range, read, load_x, update, init)
    for acc, mn, orow in zip(accs, mins, out_rows, strict=True):
        _store_row(o_ref, _row_sum(acc) - _row_sum(mn), orow, rows, pid_s, split)


_ALL = slice(None)


def _call_shape(layout) -> tuple[int, ...]:
    """The per-block shape of one ``int_calls`` tile (x_block with the call's index applied)."""
    return tuple(n for n, ix in zip(layout.x_block, layout.x_index[0], strict=True) if ix == _ALL)


def _row_sum(a):
    """``a[bn, ...]`` summed over every axis but the first (one reduction per axis)."""
    while a.ndim > 1:
        a = a.sum(axis=-1)
    return a


def _mma_kernel(*refs, fmt, names, bm, bn, nblk, group, n, steps, split, ragged, precision, asm):
    """Tensor-core tile ``[bm, bn]`` of ``x @ W^T`` over one K split.

    Each loop step dequantizes ``nblk`` quant blocks of ``bn`` rows of W and contracts them
    with one ``dot`` per ``group`` runs (``qtiles.join_runs``; x arrives permuted to match):
    a single dot per step lets Triton accumulate in the MMA registers and overlap the next
    step's dequantization with the current wgmma.

    refs (in order):
      ragged only: nvis_ref [1] int32 (visits in use), tile_ref [V] int32 (row tile of each
        visit), group_ref [V] int32 (expert of each visit), start_ref / end_ref [E] int32
        (first / one-past-last sorted row of each expert)
      x_ref: [Mp, K] in the dot dtype, ``qtiles.permute_for_join(x, fmt, group)``
      *field refs: ``qtiles.field_views`` of W, ``[(E,) N, K/B, ...]``
      o_ref: [split, Mp, N] f32 if split > 1 else [Mp, N] x.dtype
    grid: (Mp / bm (visits if ragged), cdiv(N, bn), split)
    """
    if ragged:
        nvis_ref, tile_ref, group_ref, start_ref, end_ref, x_ref, *w_refs, o_ref = refs
    else:
        x_ref, *w_refs, o_ref = refs
    w_refs = dict(zip(names, w_refs, strict=True))
    spec = qtiles.get_format(fmt)
    pid_m, pid_n, pid_s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    n0 = jnp.minimum(pid_n * bn, n - bn)
    rows = pl.ds(n0, bn)
    dot_dtype = x_ref.dtype
    kdot = nblk * group * spec.run  # K of one dot

    def compute(m0, lead):
        m_rows = pl.ds(m0, bm)

        def body(t, acc):
            blocks = pl.ds(pl.multiple_of(t * nblk, nblk), nblk) if nblk > 1 else t
            for g in range(spec.runs // group):
                runs = qtiles.tile_runs(
                    fmt, w_refs, (*lead, blocks), asm=asm, runs=range(g * group, (g + 1) * group)
                )  # group x [bn, (nblk,) R] f32
                w = qtiles.join_runs(runs).astype(dot_dtype)  # [bn, kdot]
                k0 = pl.multiple_of(t * (nblk * spec.block) + g * kdot, kdot)
                xk = x_ref[m_rows, pl.ds(k0, kdot)]  # [bm, kdot]
                acc += lax.dot_general(
                    xk,
                    w,
                    (((1,), (1,)), ((), ())),
                    precision=precision,
                    preferred_element_type=jnp.float32,
                )  # [bm, bn]
            return acc

        lo, hi = _k_range(pid_s, steps=steps, split=split)
        return lax.fori_loop(lo, hi, body, jnp.zeros((bm, bn), jnp.float32))

    if not ragged:
        m0 = pid_m * bm
        acc = compute(m0, (rows,))
        if split > 1:
            o_ref[pid_s, pl.ds(m0, bm), rows] = acc
        else:
            o_ref[pl.ds(m0, bm), rows] = acc.astype(o_ref.dtype)
        return

    @pl.when(pid_m < nvis_ref[0])
    def _():
        g = group_ref[pid_m]
        m0 = tile_ref[pid_m] * bm
        acc = compute(m0, (g, rows))
        r = m0 + lax.broadcasted_iota(jnp.int32, (bm,), 0)
        mine = (r >= start_ref[g]) & (r < end_ref[g])  # rows of this visit's expert
        _compat.store(o_ref.at[pl.ds(m0, bm), rows], acc.astype(o_ref.dtype), mask=mine[:, None])


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------
def _pad_axis(a: jax.Array, axis: int, size: int) -> jax.Array:
    if a.shape[axis] == size:
        return a
    pad = [(0, 0)] * a.ndim
    pad[axis] = (0, size - a.shape[axis])
    return jnp.pad(a, pad)


def _prepare_w(fmt, fields, n_axis: int):
    """Field views, padded to 16 rows when N < 16 (the smallest tile)."""
    views = qtiles.field_views(fmt, fields)
    n = views["d"].shape[n_axis]
    if n < _MIN_DOT:
        views = {k: _pad_axis(v, n_axis, _MIN_DOT) for k, v in views.items()}
    return views, max(n, _MIN_DOT)


def _use_asm(interpret: bool, run_tile: int, num_warps: int) -> bool:
    """Inline PTX exists only in compiled kernels, and packs 4 bytes per thread: a run tile
    must give every thread a multiple of 4 elements (tiny tiles use the jnp extraction)."""
    return not interpret and run_tile % (4 * 32 * num_warps) == 0


def _dot_dtype(dtype):
    return dtype if jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) else jnp.float32


def _x_view(x2, fmt, rows: int, dtype):
    spec = qtiles.get_format(fmt)
    x2 = _pad_axis(x2, 0, rows).astype(dtype)
    return x2.reshape(rows, x2.shape[1] // spec.block, spec.runs, spec.run)


def _finish(y, split: int, dtype, parts: bool = False):
    """The output of a launch: split-K partials summed (XLA), or with ``parts`` left to the
    consumer as ``[split, ...]`` (f32 when split > 1, else ``[1, ...]`` in ``dtype``)."""
    if parts:
        return y if split > 1 else y[None]
    return y.sum(axis=0).astype(dtype) if split > 1 else y


def _vector_call(x2, fmt, views, ns, bs, interpret, *, experts=None, x_rows=None, parts=False):
    """The vector kernel over the weights ``views`` (a list of field-view dicts of one format
    and K, ``ns`` their row counts) in one launch; a list of outputs, one per weight (with
    ``parts``, split-K partials ``[split, rows, N]``: see ``_finish``)."""
    spec = qtiles.get_format(fmt)
    k = x2.shape[1]
    nb = k // spec.block
    grouped = experts is not None
    if grouped:
        bm, m_programs = 1, experts.shape[0]
        mp = x2.shape[0]
        pre = [experts.astype(jnp.int32), x_rows.astype(jnp.int32)]
        rows_out = m_programs
    else:
        bm = bs.block_m
        m_programs = pl.cdiv(x2.shape[0], bm)
        mp = rows_out = m_programs * bm
        pre = []
    split, nbk = bs.split_k, bs.block_k // spec.block
    asm = _use_asm(interpret, bs.block_n * nbk * spec.run, bs.num_warps)
    # dp4a exists only as inline PTX: a compiled tile too small for it takes the float path.
    int_dot = bool(bs.int_dot) and (interpret or asm)
    if int_dot:
        views = [qtiles.int_views(fmt, v) for v in views]
        xv = qtiles.int_x_view(fmt, _pad_axis(x2, 0, mp))
    else:
        xv = _x_view(x2, fmt, mp, x2.dtype)
    out_dtype = jnp.float32 if split > 1 else x2.dtype
    out_shapes = [
        jax.ShapeDtypeStruct((split, rows_out, n_g) if split > 1 else (rows_out, n_g), out_dtype)
        for n_g in ns
    ]
    tiles = [pl.cdiv(n_g, bs.block_n) for n_g in ns]
    kernel = functools.partial(
        _vector_kernel,
        fmt=fmt,
        names=tuple(views[0]),
        bm=bm,
        bn=bs.block_n,
        nbk=nbk,
        weights=tuple((sum(tiles[:g]), n_g) for g, n_g in enumerate(ns)),
        steps=nb // nbk,
        split=split,
        grouped=grouped,
        asm=asm,
        int_dot=int_dot,
    )
    ys = pl.pallas_call(
        kernel,
        out_shape=out_shapes,
        grid=(sum(tiles), m_programs, split),
        compiler_params=_compat.compiler_params(num_warps=bs.num_warps, num_stages=bs.num_stages),
        interpret=interpret,
        name=f"qmatmul_vector_{fmt.lower()}",
    )(*pre, xv, *(a for v in views for a in v.values()))
    return [_finish(y, split, x2.dtype, parts) for y in ys]


def _mma_call(x2, fmt, views, n, bs, interpret, *, ragged=None):
    spec = qtiles.get_format(fmt)
    k = x2.shape[1]
    nb = k // spec.block
    bm, bn, split = bs.block_m, bs.block_n, bs.split_k
    nblk, group = _k_layout(fmt, bs.block_k)
    m_tiles = pl.cdiv(x2.shape[0], bm)
    dot_dtype = _dot_dtype(x2.dtype)
    xp = qtiles.permute_for_join(_pad_axis(x2, 0, m_tiles * bm).astype(dot_dtype), fmt, group)
    if ragged is not None:
        pre = list(ragged)
        m_programs = pre[1].shape[0]  # visits
        split = 1
    else:
        pre = []
        m_programs = m_tiles
    out_shape = (split, m_tiles * bm, n) if split > 1 else (m_tiles * bm, n)
    out_dtype = jnp.float32 if split > 1 else x2.dtype
    kernel = functools.partial(
        _mma_kernel,
        fmt=fmt,
        names=tuple(views),
        bm=bm,
        bn=bn,
        nblk=nblk,
        group=group,
        n=n,
        steps=nb // nblk,
        split=split,
        ragged=ragged is not None,
        precision=_compat.dot_precision(dot_dtype),
        asm=_use_asm(interpret, bn * nblk * spec.run, bs.num_warps),
    )
    y = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct(out_shape, out_dtype),
        grid=(m_programs, pl.cdiv(n, bn), split),
        compiler_params=_compat.compiler_params(num_warps=bs.num_warps, num_stages=bs.num_stages),
        interpret=interpret,
        name=f"qmatmul_{'ragged' if ragged is not None else 'mma'}_{fmt.lower()}",
    )(*pre, xp, *views.values())
    return _finish(y, split, x2.dtype)


def _check_x(x, k: int):
    if x.shape[-1] != k:
        raise ValueError(f"{x.shape=} does not contract with a weight of K={k}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"x must be floating point, got {x.dtype}")


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("fmt", "interpret", "block_sizes"))
def qmatmul(
    x: jax.Array,
    fmt: str,
    fields: dict[str, jax.Array],
    *,
    interpret: bool = False,
    block_sizes: BlockSizes | None = None,
) -> jax.Array:
    """``x[..., K] @ W[N, K]^T -> [..., N]`` in ``x.dtype`` (f32 accumulation).

    Args:
      x: activations, f32 / bf16 / f16, any leading shape (flattened to M rows).
      fmt: ggml type name, one of ``qtiles.FORMATS``.
      fields: the weight's LAYOUT.md field arrays (2-D: ``[N, ...]``).
      interpret: run the kernels in the Pallas interpreter (CPU).
      block_sizes: overrides of the tile heuristic.
    """
    lead, n, k = qtiles.check_fields(fmt, fields)
    if lead:
        raise ValueError(f"qmatmul needs a 2-D weight, got leading axes {lead}")
    _check_x(x, k)
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    views, n_pad = _prepare_w(fmt, fields, 0)
    bs = (block_sizes or BlockSizes()).resolve(fmt, m=m, n=n_pad, k=k, dtype=x.dtype)
    with jax.named_scope(f"qmatmul_{fmt}"):
        if bs.kernel == "vector":
            [y] = _vector_call(x2, fmt, [views], [n_pad], bs, interpret)
        else:
            y = _mma_call(x2, fmt, views, n_pad, bs, interpret)
    return y[:m, :n].reshape(*x.shape[:-1], n)


def _expert_setup(fmt, fields, x2, block_sizes, rows_each: int, what: str):
    """Checks, field views and mma tile sizes of a call on a ``W[E, N, K]`` stack (experts or
    layers); the row tile fits ``rows_each``, the rows one expert gets.
    Returns ``(E, N, views, padded N, block sizes)``."""
    lead, n, k = qtiles.check_fields(fmt, fields)
    if len(lead) != 1:
        raise ValueError(f"{what}_qmatmul needs a weight [E, N, K], got leading axes {lead}")
    _check_x(x2, k)
    views, n_pad = _prepare_w(fmt, fields, 1)
    base = block_sizes or BlockSizes()
    if base.block_m is None:
        bm = min(128, max(_MIN_DOT, _compat.next_pow2(rows_each)))
        base = dataclasses.replace(base, block_m=bm)
    bs = dataclasses.replace(base, kernel="mma").resolve(
        fmt, m=x2.shape[0], n=n_pad, k=k, split=False
    )
    return lead[0], n, views, n_pad, bs


@functools.partial(jax.jit, static_argnames=("fmt", "interpret", "block_sizes"))
def stacked_qmatmul(
    x: jax.Array,
    fmt: str,
    fields: dict[str, jax.Array],
    layer: jax.Array,
    *,
    interpret: bool = False,
    block_sizes: BlockSizes | None = None,
) -> jax.Array:
    """``x[..., K] @ W[layer]^T -> [..., N]`` for a stacked weight ``W[L, N, K]``, read in place.

    Inside the model's layer scan the weights are ``[L, N, K]`` stacks; slicing ``W[layer]``
    before a custom call makes XLA copy that layer's weight first (a batch-32 E4B decode
    profile: 384 such copies, 3.6 of 10.3 ms per step). Here the stack goes to the ragged mma
    kernel whole, every row tile visiting expert ``layer``, so only the tiles the kernel
    reads leave memory. Up to ``VECTOR_MAX_M`` rows (unless ``block_sizes`` asks for mma) it is
    the vector kernel with every row's "expert" the layer, as ``grouped_qmatmul`` runs it.
    ``layer`` is clamped to ``[0, L)`` as jnp indexing is.
    """
    x2 = x.reshape(-1, x.shape[-1])
    m = x2.shape[0]
    base = block_sizes or BlockSizes()
    if base.kernel == "vector" or (base.kernel is None and m <= VECTOR_MAX_M):
        with jax.named_scope(f"stacked_qmatmul_{fmt}"):
            [y] = _stacked_vector(x, fmt, [fields], layer, base, interpret)
        return y
    n_layers, n, views, n_pad, bs = _expert_setup(fmt, fields, x2, block_sizes, m, "stacked")
    m_tiles = pl.cdiv(m, bs.block_m)
    layer = jnp.clip(jnp.asarray(layer, jnp.int32).reshape(()), 0, n_layers - 1)
    # One visit per row tile, all of expert `layer` (rows [0, m) in every expert's bounds).
    ragged = (
        jnp.full((1,), m_tiles, jnp.int32),
        jnp.arange(m_tiles, dtype=jnp.int32),
        jnp.full((m_tiles,), layer, jnp.int32),
        jnp.zeros((n_layers,), jnp.int32),
        jnp.full((n_layers,), m, jnp.int32),
    )
    with jax.named_scope(f"stacked_qmatmul_{fmt}"):
        y = _mma_call(x2, fmt, views, n_pad, bs, interpret, ragged=ragged)
    return y[:m, :n].reshape(*x.shape[:-1], n)


@functools.partial(jax.jit, static_argnames=("fmt", "interpret", "block_sizes", "parts"))
def stacked_qmatmul_many(
    x: jax.Array,
    fmt: str,
    fields_list: list[dict[str, jax.Array]],
    layer: jax.Array,
    *,
    interpret: bool = False,
    block_sizes: BlockSizes | None = None,
    parts: bool = False,
) -> tuple[jax.Array, ...]:
    """``x @ W_g[layer]^T`` for stacked weights ``W_g[L, N_g, K]`` of one format, as
    ``stacked_qmatmul`` gives each, but for one row of x in ONE launch of the vector kernel.

    Batch-1 decode projects q|k(|v) and gate|up from one row; each small matvec costs a
    launch's fixed ~2 us (ramp, tail, its split sum) next to a few us of reading, so one
    merged grid over all the weights' row tiles saves a launch per extra weight and fills the
    SMs better. Other row counts (or ``block_sizes`` asking for mma) run one
    ``stacked_qmatmul`` per weight.

    ``parts=True`` (one row only) leaves the split-K partial sums to the consumer: each
    result is ``[S, *x.shape[:-1], N_g]``, f32 when the launch splits K (S > 1), else S = 1 in
    x's dtype; the value is ``sum(axis=0)`` in f32 rounded to x's dtype. A Pallas consumer
    (``qk_norm_rope``, ``residual_norm``) adds them while loading, which saves XLA's summing
    launch per weight (~1.2 us each at batch 1).
    """
    x2 = x.reshape(-1, x.shape[-1])
    base = block_sizes or BlockSizes()
    if not fields_list:
        raise ValueError("stacked_qmatmul_many needs at least one weight")
    if x2.shape[0] != 1 or base.kernel == "mma":
        if parts:
            raise ValueError(f"parts=True needs one row of x and the vector kernel ({x.shape=})")
        return tuple(
            stacked_qmatmul(x, fmt, f, layer, interpret=interpret, block_sizes=block_sizes)
            for f in fields_list
        )
    with jax.named_scope(f"stacked_qmatmul_many_{fmt}"):
        return _stacked_vector(x, fmt, fields_list, layer, base, interpret, parts=parts)


def _stacked_vector(x, fmt, fields_list, layer, base, interpret, *, parts=False):
    """``x @ W_g[layer]^T`` for stacks ``W_g[L, N_g, K]`` of one format and K in ONE vector
    launch, every row of x a pair whose "expert" is ``layer`` (clamped to ``[0, L)``); a tuple
    of ``[..., N_g]`` results (``parts``: ``[S, ..., N_g]``, see ``_finish``)."""
    x2 = x.reshape(-1, x.shape[-1])
    m = x2.shape[0]
    checked = [qtiles.check_fields(fmt, f) for f in fields_list]
    lead, _, k = checked[0]
    if len(lead) != 1 or any(c[0] != lead or c[2] != k for c in checked):
        shapes = [(*c[0], c[1], c[2]) for c in checked]
        raise ValueError(f"stacked qmatmul needs [L, N_g, K] stacks of one L and K: {shapes}")
    _check_x(x2, k)
    prepared = [_prepare_w(fmt, f, 1) for f in fields_list]
    ns = [n_pad for _, n_pad in prepared]
    # Tiles and split for the whole grid; the row tile must fit the smallest weight.
    bs = dataclasses.replace(base, kernel="vector", block_m=1)
    bs = bs.resolve(fmt, m=m, n=sum(ns), k=k, dtype=x.dtype)
    bs = dataclasses.replace(bs, block_n=max(_MIN_VECTOR_N, min(bs.block_n, _floor_pow2(min(ns)))))
    layer = jnp.clip(jnp.asarray(layer, jnp.int32).reshape(()), 0, lead[0] - 1)
    ys = _vector_call(
        x2, fmt, [v for v, _ in prepared], ns, bs, interpret,
        experts=jnp.full((m,), layer), x_rows=jnp.arange(m, dtype=jnp.int32), parts=parts,
    )  # fmt: skip
    return tuple(  # y is [rows, N_pad], or [S, rows, N_pad] partials
        y[..., :n].reshape(*y.shape[:-2], *x.shape[:-1], n)
        for y, (_, n, _) in zip(ys, checked, strict=True)
    )


@functools.partial(jax.jit, static_argnames=("fmt", "interpret", "block_sizes"))
def ragged_qmatmul(
    x: jax.Array,
    fmt: str,
    fields: dict[str, jax.Array],
    group_sizes: jax.Array,
    *,
    interpret: bool = False,
    block_sizes: BlockSizes | None = None,
) -> jax.Array:
    """Rows sorted by expert: ``x[R, K]``, ``W[E, N, K]``, ``group_sizes[E]`` -> ``[R, N]``.

    Rows ``sum(group_sizes[:e]) ..`` use expert ``e``; ``sum(group_sizes)`` must equal R (rows
    past it are left unwritten). Always the mma kernel: the grid walks (row tile, expert) visits
    (``R / block_m + min(E, R) - 1`` of them at most; unused ones exit at once).
    """
    r = x.shape[0]
    # Average rows per expert picks the row tile (decode batches: a few rows each).
    avg = max(1, r // max(1, group_sizes.size))
    e, n, views, n_pad, bs = _expert_setup(fmt, fields, x, block_sizes, avg, "ragged")
    if x.ndim != 2 or group_sizes.shape != (e,):
        raise ValueError(f"need x[R, K] and group_sizes[{e}], got {x.shape}, {group_sizes.shape}")
    bm = bs.block_m
    m_tiles = pl.cdiv(r, bm)
    n_visits = m_tiles + min(e, r) - 1
    sizes = group_sizes.astype(jnp.int32)
    ends = jnp.cumsum(sizes)
    starts = ends - sizes
    first = starts // bm
    count = jnp.where(sizes > 0, (ends - 1) // bm - first + 1, 0)  # row tiles of each expert
    cum = jnp.cumsum(count)
    v = jnp.arange(n_visits, dtype=jnp.int32)
    group = jnp.minimum(jnp.searchsorted(cum, v, side="right"), e - 1).astype(jnp.int32)
    tile = jnp.clip(first[group] + v - (cum[group] - count[group]), 0, m_tiles - 1)
    ragged = (cum[-1:], tile.astype(jnp.int32), group, starts, ends)
    with jax.named_scope(f"ragged_qmatmul_{fmt}"):
        y = _mma_call(x, fmt, views, n_pad, bs, interpret, ragged=ragged)
    return y[:r, :n]


@functools.partial(jax.jit, static_argnames=("fmt", "interpret", "block_sizes"))
def grouped_qmatmul(
    x: jax.Array,
    fmt: str,
    fields: dict[str, jax.Array],
    expert_ids: jax.Array,
    *,
    interpret: bool = False,
    block_sizes: BlockSizes | None = None,
) -> jax.Array:
    """Per-choice expert projection: ``x[T, K]`` (shared by the k choices) or ``x[T, k, K]``
    (one input per choice), ``W[E, N, K]``, ``expert_ids[T, k]`` -> ``[T, k, N]``.

    Up to ``GATHER_MAX_PAIRS`` pairs: the vector kernel, one program row per pair. Beyond:
    pairs sorted by expert (stable), ``ragged_qmatmul``, unsorted. Pass 2-D ``x`` when the
    choices share it: that avoids materialising ``T * k`` copies for the kernel.
    """
    lead, n, k = qtiles.check_fields(fmt, fields)
    if len(lead) != 1:
        raise ValueError(f"grouped_qmatmul needs a weight [E, N, K], got leading axes {lead}")
    (e,) = lead
    _check_x(x, k)
    t, kc = expert_ids.shape
    pairs = t * kc
    if x.ndim == 2 and x.shape[0] == t:
        x2 = x
        x_rows = jnp.arange(pairs, dtype=jnp.int32) // kc
    elif x.shape[:-1] == (t, kc):
        x2 = x.reshape(pairs, k)
        x_rows = jnp.arange(pairs, dtype=jnp.int32)
    else:
        raise ValueError(f"x {x.shape} matches neither [T, K] nor [T, k, K] for ids {(t, kc)}")
    experts = expert_ids.reshape(pairs).astype(jnp.int32)
    bs = block_sizes or BlockSizes()
    use_vector = bs.kernel == "vector" or (bs.kernel is None and pairs <= GATHER_MAX_PAIRS)
    if use_vector:
        views, n_pad = _prepare_w(fmt, fields, 1)
        # One program row per pair, each a batch-1 matvec against its expert: the one-row
        # tiles (and integer dot products) of batch-1 decode, the split sized for all pairs.
        bs = dataclasses.replace(bs, kernel="vector", block_m=1)
        bs = bs.resolve(fmt, m=1, n=n_pad, k=k, dtype=x.dtype, pairs=pairs)
        with jax.named_scope(f"grouped_qmatmul_{fmt}"):
            [y] = _vector_call(
                x2, fmt, [views], [n_pad], bs, interpret, experts=experts, x_rows=x_rows
            )
        return y[:, :n].reshape(t, kc, n)
    order = jnp.argsort(experts, stable=True)
    xs = x2[x_rows[order]]
    sizes = jnp.zeros((e,), jnp.int32).at[experts].add(1)
    ys = ragged_qmatmul(xs, fmt, fields, sizes, interpret=interpret, block_sizes=block_sizes)
    y = jnp.zeros_like(ys).at[order].set(ys)
    return y.reshape(t, kc, n)


# ---------------------------------------------------------------------------------------------
# References
# ---------------------------------------------------------------------------------------------
def _ref_dot(subscripts, x, w):
    # As gemma4_jax.quant.matmul_reference: the weight rounded once to x.dtype, f32 accumulate.
    return jnp.einsum(
        subscripts,
        x,
        w.astype(x.dtype),
        precision=lax.Precision.HIGHEST,
        preferred_element_type=jnp.float32,
    ).astype(x.dtype)


def qmatmul_reference(x: jax.Array, fmt: str, fields: dict[str, jax.Array]) -> jax.Array:
    """``x @ dequantize(W)^T`` in pure jnp (dequantization bit-identical to gguf)."""
    return _ref_dot("...k,nk->...n", x, qtiles.dequantize(fmt, fields))


def grouped_qmatmul_reference(x, fmt, fields, expert_ids):
    """``y[t, c] = x[t(, c)] @ dequantize(W[expert_ids[t, c]])^T``."""
    w = qtiles.dequantize(fmt, fields)  # [E, N, K]
    if x.ndim == 2:
        x = jnp.broadcast_to(x[:, None, :], (*expert_ids.shape, x.shape[-1]))
    if expert_ids.size <= w.shape[0]:  # few pairs: gather their experts
        return _ref_dot("tck,tcnk->tcn", x, w[expert_ids])
    y = _ref_dot("tck,enk->tcen", x, w)  # every expert, then pick (no [T, k, N, K] gather)
    return jnp.take_along_axis(y, expert_ids[:, :, None, None], axis=2)[:, :, 0]


def ragged_qmatmul_reference(x, fmt, fields, group_sizes):
    """Row ``r`` of ``x`` (sorted by expert) times its expert's weight."""
    ends = jnp.cumsum(group_sizes)
    g = jnp.searchsorted(ends, jnp.arange(x.shape[0]), side="right")
    g = jnp.minimum(g, group_sizes.shape[0] - 1)
    y = _ref_dot("rk,enk->ren", x, qtiles.dequantize(fmt, fields))  # [R, E, N]
    return jnp.take_along_axis(y, g[:, None, None], axis=1)[:, 0]
