"""The one dispatch point between the model and its kernels.

The model calls `matmul` (`matmuls` for projections of one input), `expert_matmul`,
`flash_attention`, `decode_attention`, `qk_norm_rope` and `residual_norm`; each runs either the
pure-jnp reference or a Pallas kernel, chosen by `GEMMA4_JAX_KERNELS`:
- `reference` (the default on CPU): the jnp references;
- `pallas`: every kernel (on CPU in interpret mode);
- `auto` (the default on GPU): the Pallas attention, norm+RoPE and (decode rows)
  residual+norm kernels, the grouped expert kernel for MoE prefill and for decode steps of at
  most 16 (token, choice) pairs (the expert stacks read in place, `keep_experts_stacked`;
  batched MoE decode keeps XLA's gather path), and the quantized matmul
  kernel for batched decode (8-64 rows) and for batch-1 Q4_K / Q6_K matmuls
  (`PALLAS_MATVEC_DEFAULT`); XLA for the other matmuls (other batch-1 ones as reductions over
  the packed bytes, matvec.py; prefill as dequantize+dot).

The mode is read when a function is traced: the public entry points (`forward`, `prefill`,
`decode_step`, `generate`) make it part of their jit cache key, so flipping the variable
between calls takes effect. The finer switches below (GEMMA4_JAX_BATCH_QMATMUL,
GEMMA4_JAX_PACKED_MATVEC, GEMMA4_JAX_STACKED_QMATMUL, GEMMA4_JAX_RESIDUAL_NORM,
GEMMA4_JAX_ATTN_COMBINE, GEMMA4_JAX_PALLAS_MATVEC, GEMMA4_JAX_MERGE_MATVEC,
GEMMA4_JAX_SPLIT_PARTS, GEMMA4_JAX_INT_DOT, GEMMA4_JAX_GROUPED_DECODE,
GEMMA4_JAX_GROUPED_SPLIT; for A/B runs) are
also read at trace time but are NOT part of any cache key: set them before the first call,
or call `jax.clear_caches()` and clear `generate._PROGRAMS` as benchmarks/decode_probe.py does.

Meshes (see `sharding.py`): the jnp reference path is partitioned by XLA from the shardings of
its inputs. A Pallas call is opaque to XLA's partitioner (it would gather its operands and run
whole on every device), so in `pallas` mode under a ("data", "model") mesh set with
`jax.set_mesh(mesh)` the attention kernels run per shard inside `shard_map` (rows on "data",
whole heads on "model"). The matmul kernels cannot see how their weight is split (row or
column parallel), so under a "model" axis > 1 the matmuls take the jnp path, which XLA
partitions along the weights' shards; under pure data parallelism they run per row shard.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
import os

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from . import matvec, quant

MODES = ("reference", "pallas", "auto")
_MODE: contextvars.ContextVar[str | None] = contextvars.ContextVar("gemma4_kernels", default=None)


def default_mode() -> str:
    env = os.environ.get("GEMMA4_JAX_KERNELS", "").strip().lower()
    if env:
        if env not in MODES:
            raise ValueError(f"GEMMA4_JAX_KERNELS={env!r} is not one of {MODES}")
        return env
    # On a GPU: Pallas attention + XLA's fused dequantize+dot. Measured on an H100 (jax 0.11.2,
    # E4B Q8_0 decode): auto 266 tok/s, reference 253, pallas (also the matmul kernels) 110.
    return "auto" if jax.default_backend() == "gpu" else "reference"


def kernel_mode() -> str:
    """The mode in force while tracing (set by `use_kernels`), else the default."""
    return _MODE.get() or default_mode()


@contextlib.contextmanager
def use_kernels(mode: str):
    if mode not in MODES:
        raise ValueError(f"kernel mode {mode!r} is not one of {MODES}")
    token = _MODE.set(mode)
    try:
        yield
    finally:
        _MODE.reset(token)


def _interpret() -> bool:
    # Pallas GPU kernels compile only on a GPU; elsewhere the same kernels run interpreted.
    return jax.default_backend() != "gpu"


def _pallas() -> bool:
    """Pallas attention / norm+RoPE kernels: in `pallas` and `auto` modes."""
    return kernel_mode() in ("pallas", "auto")


# `auto` sends batched-decode matmuls (this many single-token rows) to the Pallas kernel:
# there XLA writes the dequantized weight to memory before its GEMM (the profile of a batch-32
# E4B step: 6.1 of 13 ms in those converts), while the kernel reads each quantized tile once
# (batch 32: 2,505 -> 2,855 tok/s). Fewer rows: XLA's fused reductions (and matvec.py) are as
# fast or faster. Prefill stays on XLA whatever its length: with many rows its GEMM wins, and a
# short prompt would pay the Triton compiles of every matmul shape in its first-token time.
AUTO_PALLAS_ROWS = (8, 64)


def _batched_decode(x: jax.Array) -> bool:
    """x holds AUTO_PALLAS_ROWS single-token rows (x[B, 1, K] or x[B, K]), not a prompt
    (x[B, T, K], T > 1). A caller that flattens a prompt to x[B*T, K] looks like decode here:
    only the MoE router does, and its weight is F32 (never a Pallas matmul)."""
    lo, hi = AUTO_PALLAS_ROWS
    return lo <= math.prod(x.shape[:-1]) <= hi and not (x.ndim >= 3 and x.shape[-2] > 1)


def _pallas_matmul(batched_decode: bool = False, x=None, fmt: str | None = None) -> bool:
    """Pallas quantized matmuls: always in `pallas` mode; in `auto` mode for batched decode
    (GEMMA4_JAX_BATCH_QMATMUL=0 turns that off, for A/B runs) and for one-row calls on the
    formats GEMMA4_JAX_PALLAS_MATVEC lists (`_pallas_matvec_formats`)."""
    mode = kernel_mode()
    if mode == "pallas":
        return True
    if mode != "auto":
        return False
    if batched_decode and os.environ.get("GEMMA4_JAX_BATCH_QMATMUL", "1") != "0":
        return True
    return x is not None and _one_row(x) and fmt in _pallas_matvec_formats()


def _one_row(x) -> bool:
    return math.prod(x.shape[:-1]) == 1


# Batch-1 matmuls on the Pallas vector kernel in `auto` mode. Measured on the H100 (E4B, one
# process each): Q4_K_M 216.1 -> 235.1 tok/s with Q4_K and Q6_K on the kernel (run r; XLA's
# K-quant reductions are issue-bound at ~0.86 TB/s), 214-219 -> 249-253 with run s's kernel;
# Q8_0 stays on XLA, whose reductions still beat the kernel there (294-298 vs 270 tok/s,
# run s). Q5_K was not measured.
PALLAS_MATVEC_DEFAULT = ("Q4_K", "Q6_K")


def _pallas_matvec_formats() -> tuple[str, ...]:
    """GEMMA4_JAX_PALLAS_MATVEC: comma-separated ggml types whose batch-1 matmuls take the
    Pallas vector kernel in `auto` mode (stacks read in place) instead of XLA's reductions
    (matvec.py); "none" for none. Unset: `PALLAS_MATVEC_DEFAULT`. Read at trace time."""
    env = os.environ.get("GEMMA4_JAX_PALLAS_MATVEC")
    if env is None:
        return PALLAS_MATVEC_DEFAULT
    if env.strip().lower() == "none":
        return ()
    fmts = tuple(f.strip().upper() for f in env.split(",") if f.strip())
    bad = [f for f in fmts if f not in _PALLAS_MATMUL_TYPES]
    if bad:
        raise ValueError(f"GEMMA4_JAX_PALLAS_MATVEC names {bad}, not in {_PALLAS_MATMUL_TYPES}")
    return fmts


# ---------------------------------------------------------------------------- meshes


def _mesh():
    """The ("data", "model") mesh of `jax.set_mesh` in Pallas mode, if it spans > 1 device."""
    if not _pallas():
        return None
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1 or not set(mesh.axis_names) <= {"data", "model"}:
        return None
    return mesh


def _size(mesh, axis: str) -> int:
    return dict(mesh.shape).get(axis, 1)


def _split(mesh, axis: str, n: int) -> str | None:
    """`axis` if that mesh axis (> 1) splits n items evenly, else None (kept whole)."""
    m = _size(mesh, axis)
    return axis if m > 1 and n % m == 0 else None


def _head_split(mesh, h: int, hk: int) -> tuple[str | None, str | None, int]:
    """How attention splits heads over "model": (q axis, kv axis, kv slice group).

    Both on "model" when each device gets whole KV heads; with fewer KV heads (the cache then
    stays replicated, see `sharding.py`) each device keeps every KV head and slices the one its
    query heads use, which needs model % hk == 0 (group = model // hk devices per KV head);
    otherwise heads stay whole on every device.
    """
    m = _size(mesh, "model")
    if m == 1 or h % m:
        return None, None, 0
    if hk % m == 0:
        return "model", "model", 0
    if m % hk == 0:
        return "model", None, m // hk
    return None, None, 0


def _shard_map(fn, in_specs, out_specs):
    # check_vma off: pallas_call does not declare how its outputs vary over mesh axes.
    return jax.shard_map(fn, in_specs=in_specs, out_specs=out_specs, check_vma=False)


def _kv_slice(k, v, group: int):
    """This device's KV head of k/v[B,S,Hk,D] (see `_head_split`)."""
    if not group:
        return k, v
    j = jax.lax.axis_index("model") // group
    take = lambda a: jax.lax.dynamic_slice_in_dim(a, j, 1, axis=2)
    return take(k), take(v)


# ---------------------------------------------------------------------------- matmuls


def _fields(w: quant.QTensor) -> dict:
    """The block-format field arrays of a quantized tensor, by name (what kernels take)."""
    return {f.name: getattr(w, f.name) for f in dataclasses.fields(w)}


def stacked_weights() -> bool:
    """False under GEMMA4_JAX_STACKED_QMATMUL=0: the layer scan slices every weight (A/B runs
    of `keep_stacked` and of the stacked head-norm weights; read when programs are traced)."""
    return os.environ.get("GEMMA4_JAX_STACKED_QMATMUL", "1") != "0"


def keep_stacked(w: quant.QTensor, rows: int) -> bool:
    """Whether the cache-mode layer scan hands weight `w` over whole (a `LayerSlice`, see
    model._split_matrices) for `rows` rows a step, so a Pallas matmul reads the stack in place
    (a slice before a custom call is a copy of the layer's weight every step).

    Batched decode: always (H100, RESULTS.md run n: batch 32 2,961 -> 3,265 tok/s, batch 8
    790 -> 969). One row, where XLA's reductions read either form in place, it was measured:
    K-quant stacks are faster taken in the layer body (Q4_K_M 192 -> 206 tok/s), Q8_0 ones as
    the scan's own slices (273 vs 265), so only the K-quants stay whole (and those the Pallas
    vector kernel takes at batch 1, `_pallas_matvec_formats`, must). In `pallas` mode every
    stack stays whole. GEMMA4_JAX_STACKED_QMATMUL=0 slices every weight (A/B runs); read when
    decode programs are traced."""
    if not stacked_weights():
        return False
    if kernel_mode() == "pallas":  # every matmul is a Pallas call
        return True
    if rows == 1 and w.ggml_type in _pallas_matvec_formats():
        return True
    return rows >= AUTO_PALLAS_ROWS[0] or w.ggml_type in ("Q4_K", "Q5_K", "Q6_K")


def keep_experts_stacked(w: quant.QTensor, pairs: int) -> bool:
    """Whether the cache-mode layer scan hands an expert stack `w[L, E, N, K]` over whole (a
    `LayerSlice`) when a step asks for `pairs` (token, choice) pairs: where `expert_matmul`
    sends them to the grouped kernel's vector path, which then reads the chosen experts in
    place. Sliced by the scan, each layer's whole expert set (285 MB for 26B-A4B Q4_K_M's
    gate|up) was copied before the custom call: 10.3 of a 14.2 ms step (RESULTS.md run z)."""
    return stacked_weights() and _grouped_vector(w.ggml_type, pairs)


def _grouped_vector(ggml_type: str, pairs: int) -> bool:
    """Whether `expert_matmul` sends a call of `pairs` (token, choice) pairs on experts of this
    type to the grouped kernel's vector path (few pairs: decode): in `pallas` mode, and in
    `auto` where `_grouped_decode` says so."""
    from pallas_kernels.qmatmul import GATHER_MAX_PAIRS

    mode = kernel_mode()
    return (
        ggml_type in _PALLAS_MATMUL_TYPES
        and pairs <= GATHER_MAX_PAIRS
        and (mode == "pallas" or (mode == "auto" and _grouped_decode()))
    )


@dataclasses.dataclass(frozen=True)
class LayerSlice:
    """Layer `index` of a stacked weight `stack[L, N, K]` (or `[L, D]`), not sliced yet.

    The model's cache-mode layer scan hands its matmul weights over this way. XLA's own
    fusions read a dynamic slice in place, but a custom call gets its operands materialised:
    slicing before a Pallas matmul copied each layer's weight every step (see `matmul`).
    """

    stack: quant.QTensor | jax.Array  # a stacked matrix, or stacked [L, D] norm weights
    index: jax.Array  # int32 scalar

    def take(self) -> quant.QTensor:
        return jax.tree.map(
            lambda a: jax.lax.dynamic_index_in_dim(a, self.index, 0, keepdims=False), self.stack
        )


def matmul(x: jax.Array, w: quant.QTensor | LayerSlice) -> jax.Array:
    """x[..., K] @ w[N, K]^T -> [..., N] in x.dtype, f32 accumulation. `w` may be a
    `LayerSlice`: the Pallas kernel then reads the stack in place, other paths slice it."""
    batched = _batched_decode(x)
    if isinstance(w, LayerSlice):
        stack = w.stack
        # The same rule as below, with the stack read in place. (`auto` keeps batch 1 on XLA:
        # the vector kernel in place measured slower there, Q4_K_M 194 vs 206 tok/s, Q8_0 221
        # vs 265; RESULTS.md run n.)
        use = _pallas_matmul(batched, x, stack.ggml_type)
        if use and stack.ggml_type in _PALLAS_MATMUL_TYPES and _mesh() is None:
            from pallas_kernels import qmatmul as qk

            return qk.stacked_qmatmul(
                x, stack.ggml_type, _fields(stack), w.index, interpret=_interpret(),
                block_sizes=_int_dot_sizes(),
            )  # fmt: skip
        w = w.take()
    use = _pallas_matmul(batched, x, w.ggml_type)
    if use and w.ggml_type in _PALLAS_MATMUL_TYPES and _matmul_kernel_ok():
        from pallas_kernels import qmatmul as qk

        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        fields = _fields(w)
        call = lambda x2, fields: qk.qmatmul(
            x2, w.ggml_type, fields, interpret=_interpret(), block_sizes=_int_dot_sizes()
        )
        mesh = _mesh()
        if mesh is not None:  # data parallel only (`_matmul_kernel_ok`): weights replicated
            rows = P(_split(mesh, "data", x2.shape[0]), None)
            call = _shard_map(call, (rows, jax.tree.map(lambda _: P(), fields)), rows)
        y = call(x2, fields)
        return y.reshape(*lead, y.shape[-1])
    if _packed_matvec() and matvec.supports(x, w):
        return matvec.matvec(x, w)
    if isinstance(w, quant.F32) and x.dtype != jnp.float32:
        # Weights keep the precision the file stores them in: bf16 compute rounds activations,
        # not an F32 file's weights (that alone moves fixture logits by up to ~4).
        return quant.matmul_reference(x.astype(jnp.float32), w).astype(x.dtype)
    return quant.matmul_reference(x, w)


@dataclasses.dataclass(frozen=True)
class SplitSum:
    """A projection left as the split-K partial sums of its Pallas launch, for a Pallas
    consumer to add while loading (`qk_norm_rope`, `residual_norm`): at batch 1 XLA's summing
    kernel is a launch of ~1.2 us per projection. `parts` is `[S, *shape]` (f32 when S > 1,
    else in `dtype`); the value is their f32 sum rounded to `dtype` (`value()`), exactly what
    the summed matmul returns."""

    parts: jax.Array
    dtype: jnp.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return self.parts.shape[1:]

    def reshape(self, *shape) -> SplitSum:
        return SplitSum(self.parts.reshape(self.parts.shape[0], *shape), self.dtype)

    def value(self) -> jax.Array:
        return self.parts.astype(jnp.float32).sum(axis=0).astype(self.dtype)


def value(a):
    """`a`, with a `SplitSum` summed (for consumers that are not Pallas kernels)."""
    return a.value() if isinstance(a, SplitSum) else a


def _int_dot_sizes():
    """GEMMA4_JAX_INT_DOT=1 / 0: batch-1 Q4_K matmuls with / without integer dot products
    (`qmatmul.BlockSizes.int_dot`; A/B runs, read at trace time); unset: the kernel default."""
    env = os.environ.get("GEMMA4_JAX_INT_DOT", "").strip()
    if env not in ("", "0", "1"):
        raise ValueError(f"GEMMA4_JAX_INT_DOT={env!r} must be 0 or 1")
    if not env:
        return None
    from pallas_kernels import qmatmul as qk

    return qk.BlockSizes(int_dot=env == "1")


def _split_parts() -> bool:
    """GEMMA4_JAX_SPLIT_PARTS=0: `matmuls(..., parts=True)` sums as usual (A/B runs)."""
    return os.environ.get("GEMMA4_JAX_SPLIT_PARTS", "1") != "0"


def matmuls(
    x: jax.Array, ws: list[quant.QTensor | LayerSlice], *, parts: bool = False
) -> list[jax.Array | SplitSum]:
    """`[matmul(x, w) for w in ws]`: several projections of one input (q|k|v, gate|up).

    One row of x against stacked weights that take the Pallas vector kernel: those sharing a
    format (and K, and layer) run as ONE launch (`qmatmul.stacked_qmatmul_many`), saving a
    launch's fixed cost per extra weight. GEMMA4_JAX_MERGE_MATVEC=0 turns the merging off
    (A/B runs); everything else is `matmul` per weight.

    `parts=True` (for consumers that take them: `qk_norm_rope`, `residual_norm`): the
    projections of those launches come back as `SplitSum`s, single weights included."""
    out: list = [None] * len(ws)
    parts = parts and _split_parts()
    if _one_row(x) and _mesh() is None and os.environ.get("GEMMA4_JAX_MERGE_MATVEC", "1") != "0":
        groups: dict[tuple, list[int]] = {}
        for i, w in enumerate(ws):
            if not isinstance(w, LayerSlice) or not isinstance(w.stack, quant.QTensor):
                continue
            fmt = w.stack.ggml_type
            if fmt in _PALLAS_MATMUL_TYPES and _pallas_matmul(_batched_decode(x), x, fmt):
                key = (fmt, w.stack.shape[0], w.stack.shape[-1], id(w.index))
                groups.setdefault(key, []).append(i)
        for (fmt, *_), idx in groups.items():
            if len(idx) < 2 and not parts:
                continue
            from pallas_kernels import qmatmul as qk

            ys = qk.stacked_qmatmul_many(
                x, fmt, [_fields(ws[i].stack) for i in idx], ws[idx[0]].index,
                interpret=_interpret(), parts=parts, block_sizes=_int_dot_sizes(),
            )  # fmt: skip
            for i, y in zip(idx, ys, strict=True):
                out[i] = SplitSum(y, x.dtype) if parts else y
    return [matmul(x, w) if y is None else y for y, w in zip(out, ws, strict=True)]


# The formats the dispatch sends to the Pallas matmul kernels (qtiles' formats). Q4_1, Q5_0 and
# Q5_1 are llama-quantize's fallbacks (a real 26B-A4B Q4_K_M file's ffn_down / ffn_down_exps are
# Q5_0); their batch-1 matmuls stay on matvec.py in `auto` (not in PALLAS_MATVEC_DEFAULT).
_PALLAS_MATMUL_TYPES = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")


def _packed_matvec() -> bool:
    """Batch-1 matmuls as reductions over the packed bytes (matvec.py): `auto` mode only, so
    `reference` stays dequantize-then-dot. GEMMA4_JAX_PACKED_MATVEC=0 turns it off (A/B runs)."""
    return kernel_mode() == "auto" and os.environ.get("GEMMA4_JAX_PACKED_MATVEC", "1") != "0"


def _matmul_kernel_ok() -> bool:
    """False under a "model" axis > 1: the kernel would need its weight's split (see top)."""
    mesh = _mesh()
    return mesh is None or _size(mesh, "model") == 1


def expert_matmul(x: jax.Array, w: quant.QTensor | LayerSlice, expert_ids: jax.Array) -> jax.Array:
    """Per-choice expert projection: x[T, K] (shared by the choices) or x[T, k, K] (one input per
    choice), w[E, N, K], expert_ids[T, k] -> [T, k, N].

    Reference: when few (token, choice) pairs are asked for, gather those experts' blocks and
    dequantize only them; otherwise run every expert densely and pick (cheaper than a gather of
    T*k dequantized matrices).

    `w` may be a `LayerSlice` of a stack [L, E, N, K] (`keep_experts_stacked`): the grouped
    kernel's vector path then reads the stack in place as [L*E, N, K], expert e of layer l at
    l*E + e; the other paths slice it.
    """
    if isinstance(w, LayerSlice):
        return _stacked_expert_matmul(x, w, expert_ids)
    t, k = expert_ids.shape
    n_experts = w.shape[0]
    many = t * k > n_experts
    # `auto` sends many-pair calls (prefill) to the grouped kernel too: XLA has no grouped
    # matmul (its ragged_dot expands to dense), so its path runs every expert on every token.
    # Few pairs (decode) take its vector path where `_grouped_vector` says so; the pairs of
    # batched MoE decode (more than its vector path takes, fewer than `many`) stay on XLA.
    if (
        (
            _pallas_matmul()
            or (kernel_mode() == "auto" and many)
            or _grouped_vector(w.ggml_type, t * k)
        )
        and w.ggml_type in _PALLAS_MATMUL_TYPES
        and _matmul_kernel_ok()
    ):
        fields = _fields(w)
        call = lambda x, fields, ids: _grouped_kernel().grouped_qmatmul(
            x, w.ggml_type, fields, ids, interpret=_interpret()
        )
        mesh = _mesh()
        if mesh is not None:  # data parallel only: weights replicated, tokens split
            d = _split(mesh, "data", t)
            rep = jax.tree.map(lambda _: P(), fields)
            xs = P(d, *([None] * (x.ndim - 1)))  # x is [T, K] (shared) or [T, k, K]
            call = _shard_map(call, (xs, rep, P(d, None)), P(d, None, None))
        return call(x, fields, expert_ids)
    dt = x.dtype
    if not many:  # decode: gather the chosen experts' blocks, dequantize only them
        if x.ndim == 2:
            x = jnp.broadcast_to(x[:, None, :], (t, k, x.shape[-1]))
        wg = jax.tree.map(lambda a: a[expert_ids.reshape(-1)], w)  # [T*k, N, K]
        wd = wg.dequantize(dt).reshape(t, k, *w.shape[1:])
        return jnp.einsum(
            "tkK,tkNK->tkN", x, wd, preferred_element_type=jnp.float32, precision=_precision(dt)
        ).astype(dt)
    # Many pairs: every expert once per token, then pick the chosen ones, in chunks of tokens
    # so the [tokens, E, N] intermediate stays bounded (~EXPERT_CHUNK_BYTES) at any length.
    n, kk = w.shape[1], w.shape[2]
    chunk = max(1, EXPERT_CHUNK_BYTES // (n_experts * (n + kk) * 4))
    wd = w.dequantize(dt)
    if t <= chunk:
        return _all_experts(x, wd, expert_ids)
    n_chunks = -(-t // chunk)
    pad = n_chunks * chunk - t
    xp = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
    ids = jnp.pad(expert_ids, [(0, pad), (0, 0)])
    split = lambda a: a.reshape(n_chunks, chunk, *a.shape[1:])
    y = jax.lax.map(lambda a: _all_experts(a[0], wd, a[1]), (split(xp), split(ids)))
    return y.reshape(n_chunks * chunk, k, n)[:t]


# Bytes of the per-chunk [tokens, E, N] / [tokens, E, K] intermediates of the reference
# all-experts path (a 32K-token 26B-A4B prompt needed 44 GiB in one piece).
EXPERT_CHUNK_BYTES = 512 << 20


def _stacked_expert_matmul(x, w: LayerSlice, expert_ids):
    stack = w.stack
    n_layers, n_experts = stack.shape[0], stack.shape[1]
    if not (_grouped_vector(stack.ggml_type, expert_ids.size) and _mesh() is None):
        return expert_matmul(x, w.take(), expert_ids)
    layer = jnp.clip(jnp.asarray(w.index, jnp.int32), 0, n_layers - 1)
    flat = jax.tree.map(lambda a: a.reshape(n_layers * n_experts, *a.shape[2:]), _fields(stack))
    return _grouped_kernel().grouped_qmatmul(
        x, stack.ggml_type, flat, expert_ids.astype(jnp.int32) + layer * n_experts,
        interpret=_interpret(), block_sizes=_grouped_sizes(),
    )  # fmt: skip


def _grouped_decode() -> bool:
    """GEMMA4_JAX_GROUPED_DECODE (`auto` mode, read at trace time): "1" sends few-pair expert
    calls (decode) to the grouped kernel, which reads the chosen experts' blocks in place;
    "0" keeps XLA's path (gather the chosen experts' blocks, dequantize, dot)."""
    env = os.environ.get("GEMMA4_JAX_GROUPED_DECODE", GROUPED_DECODE_DEFAULT)
    if env not in ("0", "1"):
        raise ValueError(f"GEMMA4_JAX_GROUPED_DECODE must be 0 or 1, got {env!r}")
    return env == "1"


# 26B-A4B Q4_K_M batch-1 decode on the H100 (RESULTS.md run z): 227.5 -> 252.5 tok/s.
GROUPED_DECODE_DEFAULT = "1"


def _grouped_sizes():
    """GEMMA4_JAX_GROUPED_SPLIT=S (A/B runs): the grouped kernel's decode calls split K S
    ways; unset: the kernel's own choice."""
    env = os.environ.get("GEMMA4_JAX_GROUPED_SPLIT")
    if env is None:
        return None
    from pallas_kernels.qmatmul import BlockSizes

    if not env.isdigit() or int(env) < 1:
        raise ValueError(f"GEMMA4_JAX_GROUPED_SPLIT must be a positive integer, got {env!r}")
    return BlockSizes(split_k=int(env))


def _all_experts(x, wd, expert_ids):
    """Every expert on every token of x[T, K] / x[T, k, K], then the chosen [T, k, N]. Per-choice
    inputs are first routed to their expert's row (a one-hot sum: each token picks an expert at
    most once, so it only adds zeros and is exact), so the work is E*T, not k*E*T."""
    dt = x.dtype
    if x.ndim == 3:
        onehot = (expert_ids[:, :, None] == jnp.arange(wd.shape[0])).astype(dt)  # [T, k, E]
        x = jnp.einsum("tkK,tke->teK", x, onehot, precision=_precision(dt))
        spec = "teK,eNK->teN"
    else:
        spec = "tK,eNK->teN"
    y = jnp.einsum(
        spec, x, wd, preferred_element_type=jnp.float32, precision=_precision(dt)
    )  # [T, E, N]
    return jnp.take_along_axis(y, expert_ids[:, :, None], axis=1).astype(dt)


def _grouped_kernel():
    from pallas_kernels import qmatmul

    return qmatmul


def _precision(dt):
    return jax.lax.Precision.HIGHEST if jnp.dtype(dt) == jnp.float32 else None


# ---------------------------------------------------------------------------- attention


def flash_attention(q, k, v, q_start, *, window: int | None, scale: float = 1.0):
    """Prefill attention, see docs/LAYOUT.md. q[B,T,H,D], k/v[B,S,Hk,D], q_start[B]."""
    from pallas_kernels import flash_attention as fa

    if _pallas():
        call = lambda q, k, v, q_start: fa.flash_attention(
            q, k, v, q_start, window=window, scale=scale, interpret=_interpret()
        )
        mesh = _mesh()
        if mesh is not None:
            b = _split(mesh, "data", q.shape[0])
            hq, hkv, group = _head_split(mesh, q.shape[2], k.shape[2])
            kernel = call
            call = _shard_map(
                lambda q, k, v, q_start: kernel(q, *_kv_slice(k, v, group), q_start),
                (P(b, None, hq, None), P(b, None, hkv, None), P(b, None, hkv, None), P(b)),
                P(b, None, hq, None),
            )
        return call(q, k, v, q_start)
    return fa.flash_attention_reference(q, k, v, q_start, window=window, scale=scale)


def decode_attention(q, k, v, pos, *, ring: bool, scale: float = 1.0, layer=None):
    """One query per row against a cache. q[B,H,D], k/v[B,S,Hk,D], pos[B]; or stacked
    k/v[L,B,S,Hk,D] with layer (int32 [] or [1]): the kernel reads k[layer] in place, where a
    slice before the call would copy that layer's cache (see pallas_kernels/decode_attention)."""
    from pallas_kernels import decode_attention as da

    if layer is not None:
        layer = jnp.asarray(layer, jnp.int32)
    if _pallas():
        # GEMMA4_JAX_ATTN_COMBINE=jnp: XLA combines the splits (A/B runs; trace time).
        jnp_combine = os.environ.get("GEMMA4_JAX_ATTN_COMBINE", "pallas") == "jnp"
        bs = da.BlockSizes(pallas_combine=False) if jnp_combine else None
        call = lambda q, k, v, pos, layer: da.decode_attention(
            q, k, v, pos, ring=ring, scale=scale, layer=layer, interpret=_interpret(),
            block_sizes=bs,
        )  # fmt: skip
        mesh = _mesh()
        if mesh is not None:
            b = _split(mesh, "data", q.shape[0])
            hq, hkv, group = _head_split(mesh, q.shape[1], k.shape[-2])
            if layer is not None and group:
                # Replicated KV heads: each device slices out its head (`_kv_slice`), a copy
                # the kernel cannot avoid; take the layer first so that copy is one layer's.
                take = lambda a: jax.lax.dynamic_index_in_dim(a, layer.reshape(()), 0, False)
                k, v, layer = take(k), take(v), None
            kv = P(b, None, hkv, None) if layer is None else P(None, b, None, hkv, None)
            kernel = call
            call = _shard_map(
                lambda q, k, v, pos, layer: kernel(q, *_kv_slice(k, v, group), pos, layer),
                (P(b, hq, None), kv, kv, P(b), P()),
                P(b, hq, None),
            )
        return call(q, k, v, pos, layer)
    return da.decode_attention_reference(q, k, v, pos, ring=ring, scale=scale, layer=layer)


def qk_norm_rope(q, k, v, q_w, k_w, positions, inv_freq, *, eps: float):
    """Per-head RMSNorm of q/k (weighted) and v (no weight) + NeoX RoPE of q/k.

    `q_w` / `k_w` may be `LayerSlice`s of stacked `[L, D]` weights (the cache-mode layer scan):
    the kernel then reads its row in place (a slice before the custom call is a copy per
    layer per step, ~2 us each: 66 per E4B decode step); other paths slice."""
    from pallas_kernels import qk_norm_rope as nr

    xs = [a for a in (q, k, v) if a is not None]
    as_parts = all(isinstance(a, SplitSum) for a in xs)
    if _pallas() and _mesh() is None and as_parts:
        # q, k, v straight from their split-K launches: the kernel adds the partials.
        q, k, v = (None if a is None else a.parts for a in (q, k, v))
        extra = dict(parts=True, dtype=xs[0].dtype)
    else:
        q, k, v = value(q), value(k), value(v)
        extra = {}
    if _pallas():
        mesh = _mesh()
        if mesh is None:
            if isinstance(q_w, LayerSlice):
                return nr.qk_norm_rope(
                    q, k, v, q_w.stack, None if k_w is None else k_w.stack, positions, inv_freq,
                    eps=eps, interpret=_interpret(), layer=q_w.index, **extra,
                )  # fmt: skip
            return nr.qk_norm_rope(
                q, k, v, q_w, k_w, positions, inv_freq, eps=eps, interpret=_interpret(), **extra
            )
        q_w, k_w = taken(q_w), taken(k_w)
        # Per row and head: rows on "data", whole q heads and (separately) kv heads on "model".
        b = _split(mesh, "data", q.shape[0])
        heads = lambda x: None if x is None else P(b, None, _split(mesh, "model", x.shape[2]), None)
        rep = lambda x: None if x is None else P()
        specs = (heads(q), heads(k), heads(v))
        call = _shard_map(
            lambda q, k, v, q_w, k_w, positions, inv_freq: nr.qk_norm_rope(
                q, k, v, q_w, k_w, positions, inv_freq, eps=eps, interpret=_interpret()
            ),
            (*specs, rep(q_w), rep(k_w), P(b, None), P()),
            specs,
        )
        return call(q, k, v, q_w, k_w, positions, inv_freq)
    return nr.qk_norm_rope_reference(q, k, v, taken(q_w), taken(k_w), positions, inv_freq, eps=eps)


RESIDUAL_NORM_SITES = ("attn", "end")


def residual_norm_kernel(h, site: str) -> bool:
    """Whether `residual_norm` of residual rows `h` at `site` runs the Pallas kernel: decode
    rows (h[B, 1, D]) in `pallas` / `auto` mode, no mesh, and the site switched on by
    GEMMA4_JAX_RESIDUAL_NORM (an A/B switch read at trace time: "1" (default) every site, "0"
    none, or a comma list of `RESIDUAL_NORM_SITES`: "attn" between attention and MLP, "end"
    the layer end fused with the next layer's attention norm (`fuse_layer_end`)). Elsewhere
    the jnp reference, the model's own arithmetic."""
    if site not in RESIDUAL_NORM_SITES:
        raise ValueError(f"unknown residual_norm site {site!r}")
    env = os.environ.get("GEMMA4_JAX_RESIDUAL_NORM", "1").strip()
    on = env == "1" or (env != "0" and site in env.split(","))
    decode = h.ndim == 3 and h.shape[1] == 1
    return on and _pallas() and decode and _mesh() is None


def fuse_layer_end(h) -> bool:
    """Whether the cache-mode layer scan ends each layer with `residual_norm` (last residual
    add, layer scale and the NEXT layer's attention norm in one launch) and carries the
    normalised row: site "end" of `residual_norm_kernel`, norm weights kept stacked."""
    return stacked_weights() and residual_norm_kernel(h, "end")


def residual_norm(h, a, w_a, w_n, *, eps: float, dtype, site: str, scale=None):
    """`(h + rms_norm(a, w_a)) * scale` (no scale: 1) and the RMSNorm of that with `w_n` in
    `dtype`: the glue between attention and MLP, or between one layer and the next (`site`,
    see `residual_norm_kernel`, which says when the Pallas kernel runs). Weights may be
    `LayerSlice`s of stacked norms (`w_n` possibly of another stack), read in place by the
    kernel; otherwise the jnp reference."""
    from pallas_kernels import residual_norm as rn

    if residual_norm_kernel(h, site):
        a_stack, layer = (w_a.stack, w_a.index) if isinstance(w_a, LayerSlice) else (w_a[None], 0)
        n_stack, nxt = (w_n.stack, w_n.index) if isinstance(w_n, LayerSlice) else (w_n[None], 0)
        if scale is not None:
            s = scale.stack if isinstance(scale, LayerSlice) else scale[None]
            scale = s.reshape(a_stack.shape[0])  # [L, 1] per-layer scalars -> [L]
        b, _, d = h.shape
        if isinstance(a, SplitSum):  # the kernel adds the projection's partials itself
            a, a_dtype = a.parts.reshape(a.parts.shape[0], b, d), a.dtype
        else:
            a, a_dtype = a.reshape(b, d), None
        h2, x = rn.residual_norm(
            h.reshape(b, d), a, a_stack, n_stack, layer, layer_next=nxt,
            scale=scale, eps=eps, out_dtype=dtype, interpret=_interpret(), a_dtype=a_dtype,
        )  # fmt: skip
        return h2.reshape(h.shape), x.reshape(h.shape)
    return rn.residual_norm_reference(
        h, value(a), taken(w_a), taken(w_n), eps=eps, out_dtype=dtype,
        scale=None if scale is None else taken(scale),
    )  # fmt: skip


def taken(w):
    """A `LayerSlice` sliced (XLA fuses the dynamic slice into its consumer); else `w`."""
    return w.take() if isinstance(w, LayerSlice) else w
