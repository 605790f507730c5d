"""Gemma 4 as pure functions over `Params`.

One layer function serves every family member: per-layer questions (sliding? own K/V? K=V?
MoE? PLE?) are asked of the static `LayerSpec`, never of names. Layers run under `lax.scan`
over segments of identical periods (config.segments); the few layers of a period are unrolled
inside the scan body.

Two ways to run the attention of a layer:
- "sequence": queries and keys are the same chunk of tokens (full-sequence `forward`, and
  the non-shared layers of `prefill`), flash attention over the chunk's own K/V;
- "cache": one query per row against a KV cache (decode; and the KV-shared layers of prefill,
  which only need the last prompt position: their queries elsewhere feed nothing).

Einsum letters: B batch, T query positions, S key positions, D model width, H query heads,
K kv heads, d head dim, F FFN width, E experts, k experts chosen, V vocab, L layers, P PLE width.
The layer math follows transformers' modeling_gemma4.py; shared/docs/gemma4.md numbers steps.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from . import inputs, ops, quant
from .config import Gemma4Config, LayerSpec, layer_plan, locate, segments
from .errors import InputError
from .executable_cache import CachedProgram
from .params import Params

# ---------------------------------------------------------------------------- small pieces


def rms_norm(x: jax.Array, w: jax.Array | None, eps: float) -> jax.Array:
    """Gemma 4 RMSNorm: x * rsqrt(mean(x^2) + eps) * w, in float32 (no `1 + w`)."""
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    if w is not None:
        y = y * ops.taken(w).astype(jnp.float32)  # w may be a stacked weight's LayerSlice
    return y.astype(x.dtype)


def gelu(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=True)


def _scale(value: float, w) -> jax.Array:
    """`value` rounded to the storage dtype of an embedding table (bf16 -> 50.5 for 2560)."""
    stored = (
        jnp.bfloat16
        if w.ggml_type == "BF16"
        else (jnp.float16 if w.ggml_type == "F16" else jnp.float32)
    )
    return jnp.asarray(value, stored).astype(jnp.float32)


def _embed_rows(w, tokens: jax.Array, dtype) -> jax.Array:
    """Rows of a (possibly quantized) [V, N] table for `tokens` -> [..., N]."""
    return w.take_rows(tokens).dequantize(dtype)


def embed(params: Params, tokens: jax.Array):
    """Token embeddings h[B,T,D] and per-layer inputs ple[B,T,L,P] (None without PLE)."""
    c, dt = params.config, params.compute_dtype
    g = params.globals
    # The reference multiplies by sqrt(D) rounded to the weight dtype (50.5 for E4B in bf16):
    # a bf16 checkpoint rounds it, an f32 one does not, whatever dtype we compute in.
    h = _embed_rows(g["embed"], tokens, jnp.float32) * _scale(math.sqrt(c.d_model), g["embed"])
    # The gather clamps: a token outside the vocabulary (only a device array that decode_step
    # does not read back can hold one, see inputs.py) would borrow the last row's embedding.
    # NaN instead, which reaches the logits of its row and nowhere else.
    valid = (tokens >= 0) & (tokens < c.vocab_size)
    h = jnp.where(valid[..., None], h, jnp.nan)
    # The residual stream stays float32 whatever the compute dtype: bf16 applies to matmul
    # operands and the KV cache (a bf16 residual loses ~15% of top-1 agreement on fixtures).
    h = h.astype(jnp.float32)
    if not c.ple_dim:
        return h, None
    lead = tokens.shape
    tok = _embed_rows(g["ple_embed"], tokens, jnp.float32) * _scale(
        math.sqrt(c.ple_dim), g["ple_embed"]
    )
    tok = tok.reshape(*lead, c.n_layers, c.ple_dim)
    ctx = ops.matmul(h.astype(dt), g["ple_model_proj"]).astype(jnp.float32) * c.d_model**-0.5
    ctx = rms_norm(ctx.reshape(*lead, c.n_layers, c.ple_dim), g["ple_proj_norm"], c.rms_eps)
    ple = (ctx + tok.astype(jnp.float32)) * 2**-0.5
    return h, ple


def lm_head(params: Params, h: jax.Array) -> jax.Array:
    """Final norm, tied (or separate) output projection, soft-cap. Returns float32 logits."""
    c, g = params.config, params.globals
    x = rms_norm(h, g["output_norm"], c.rms_eps).astype(params.compute_dtype)
    logits = ops.matmul(x, g.get("lm_head", g["embed"])).astype(jnp.float32)
    if c.final_softcap:
        logits = c.final_softcap * jnp.tanh(logits / c.final_softcap)
    return logits


def _mlp(p: dict, x: jax.Array, gate: str, up: str, down: str) -> jax.Array:
    g, u = ops.matmuls(x, [p[gate], p[up]])
    return ops.matmul(gelu(g) * u, p[down])


def _moe(c: Gemma4Config, p: dict, h: jax.Array, dt) -> jax.Array:
    """Routed experts branch: router softmax in f32, top-k, renormalise, per-expert scale."""
    lead, d = h.shape[:-1], h.shape[-1]
    hf = h.reshape(-1, d)
    r = rms_norm(hf, None, c.rms_eps) * p["router_scale"] * c.d_model**-0.5
    probs = jax.nn.softmax(
        ops.matmul(r.astype(dt), p["router"]).astype(jnp.float32), axis=-1
    )  # [T, E]
    top_p, top_i = jax.lax.top_k(probs, c.n_experts_used)  # [T, k]
    top_p = top_p / jnp.sum(top_p, axis=-1, keepdims=True)
    top_p = top_p * p["expert_scale"][top_i]
    z = rms_norm(hf, p["pre_ffw_norm_2"], c.rms_eps).astype(dt)
    gu = ops.expert_matmul(z, p["experts_gate_up"], top_i)  # [T, k, 2F]
    gate, up = jnp.split(gu, 2, axis=-1)
    act = gelu(gate) * up  # [T, k, F]
    # Down-project each choice, then mix with the routing weights.
    y = ops.expert_matmul(act, p["experts_down"], top_i)  # [T, k, D]
    y = jnp.einsum("tkD,tk->tD", y.astype(jnp.float32), top_p)
    return rms_norm(y.reshape(*lead, d), p["post_ffw_norm_2"], c.rms_eps)


# ---------------------------------------------------------------------------- attention


def _project_qkv(c: Gemma4Config, s: LayerSpec, p: dict, x, positions, inv_freq):
    """q[B,T,H,d] and, for layers with their own cache, k/v[B,T,K,d], normed and roped."""
    b, t, _ = x.shape
    names = ["attn_q"]
    if s.has_kv:
        # K=V layers: V is the raw K projection, normalised without weight and not rotated.
        names += ["attn_k"] if s.k_eq_v else ["attn_k", "attn_v"]
    # parts: at batch 1 the norm+RoPE kernel adds the projections' split-K partials itself.
    ys = ops.matmuls(x, [p[name] for name in names], parts=True)
    q = ys[0].reshape(b, t, c.n_heads, s.head_dim)
    k = v = None
    if s.has_kv:
        k = ys[1].reshape(b, t, s.n_kv_heads, s.head_dim)
        v = k if s.k_eq_v else ys[2].reshape(b, t, s.n_kv_heads, s.head_dim)
    return ops.qk_norm_rope(
        q, k, v, p["attn_q_norm"], p.get("attn_k_norm"), positions, inv_freq, eps=c.rms_eps
    )


def _cache_slot(pos: jax.Array, size: int, ring: bool) -> jax.Array:
    return pos % size if ring else pos


def write_cache(
    kc: jax.Array,
    vc: jax.Array,
    k: jax.Array,
    v: jax.Array,
    pos: jax.Array,
    ring: bool,
    period: jax.Array | int = 0,
):
    """Write one token per row: k/v[B,K,d] into stacked caches [n,B,S,K,d] at [period, row, slot].

    A scatter of B tokens into the loop-carried cache, which XLA updates in place.
    """
    b = kc.shape[1]
    slot = _cache_slot(pos, kc.shape[2], ring)
    rows = jnp.arange(b)
    return (
        kc.at[period, rows, slot].set(k.astype(kc.dtype)),
        vc.at[period, rows, slot].set(v.astype(vc.dtype)),
    )


def fill_cache(k: jax.Array, v: jax.Array, lengths: jax.Array, size: int, ring: bool):
    """Cache [B,size,K,d] holding a prompt's k/v[B,T,K,d] (rows valid up to `lengths`).

    Global caches take positions 0..T-1 as they are. A sliding ring of `size` slots keeps, in
    slot s, the latest valid position p < length with p % size == s: a gather, so prompts
    longer than the window (and right-padded rows of a ragged batch) land correctly.
    """
    b, t = k.shape[:2]
    if not ring:
        if t >= size:
            return k[:, :size], v[:, :size]
        pad = ((0, 0), (0, size - t), (0, 0), (0, 0))
        return jnp.pad(k, pad), jnp.pad(v, pad)
    s = jnp.arange(size)[None, :]  # [1, S]
    last = lengths[:, None] - 1  # [B, 1]
    src = s + size * jnp.floor_divide(last - s, size)  # latest p <= last with p % size == s
    src = jnp.clip(src, 0, t - 1)  # slots never written (p < 0) are masked by decode attention
    take = lambda a: jnp.take_along_axis(a, src[:, :, None, None], axis=1)
    return take(k), take(v)


# ---------------------------------------------------------------------------- one layer


def layer(
    c: Gemma4Config,
    s: LayerSpec,
    p: dict,
    h: jax.Array,
    ple: jax.Array | None,
    inv_freq: jax.Array,
    ctx: dict[str, Any],
):
    """One decoder layer. Returns (h, kv, x_next): kv is this layer's new (k, v) or None.

    ctx["mode"] == "sequence": h[B,T,D] at positions 0..T-1; ctx["donor_seq"] maps donor layer ->
    (k, v) over the same chunk. ctx["mode"] == "cache": h[B,1,D] at ctx["pos"][B];
    ctx["cache"] = (k, v, period): the segment's stacked caches [n,B,S,K,d] and this layer's
    period (own K/V layers write the new token there first and return the updated stacks);
    ctx["donor_cache"] maps donor layer -> (k, v, period): its segment's stacked caches.

    Layer-end fusion (cache mode, `ops.fuse_layer_end`): ctx["x"] is this layer's attention
    input already normalised by the previous layer, and ctx["next_attn_norm"] the next layer's
    attention-norm weight; the layer then ends with one `ops.residual_norm` (last residual add,
    layer scale, next norm) and returns that normalised row as `x_next` (else None).
    """
    eps, dt = c.rms_eps, ctx["dtype"]
    b, t, _ = h.shape
    with jax.named_scope(f"attn_{'sliding' if s.sliding else 'global'}"):
        x = ctx.get("x")
        if x is None:
            x = rms_norm(h, p["attn_norm"], eps).astype(dt)
        if ctx["mode"] == "sequence":
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        else:
            positions = ctx["pos"][:, None]
        q, k, v = _project_qkv(c, s, p, x, positions, inv_freq)
        window = c.window if s.sliding else None
        if ctx["mode"] == "sequence":
            kv = (k, v) if s.has_kv else ctx["donor_seq"][s.kv_donor]
            a = ops.flash_attention(q, kv[0], kv[1], jnp.zeros((b,), jnp.int32), window=window)
            new = (k, v) if s.has_kv else None
        else:
            if s.has_kv:
                kfull, vfull, period = ctx["cache"]
                kfull, vfull = write_cache(
                    kfull, vfull, k[:, 0], v[:, 0], ctx["pos"], s.sliding, period
                )
                new = (kfull, vfull)
            else:
                kfull, vfull, period = ctx["donor_cache"][s.kv_donor]
                new = None
            # The stacks go in whole: kfull[period] before the kernel (a custom call) would be
            # a copy of this layer's cache every layer of every step; the kernel indexes them.
            a = ops.decode_attention(
                q[:, 0], kfull, vfull, ctx["pos"], ring=s.sliding, layer=period
            )[:, None]
        # parts: the residual+norm kernel adds the projection's split-K partials (batch 1).
        [a] = ops.matmuls(a.reshape(b, t, c.n_heads * s.head_dim), [p["attn_output"]], parts=True)
        # h + post-attention norm of a, then the pre-MLP norm: one kernel when decoding.
        h, y = ops.residual_norm(
            h, a, p["post_attention_norm"], p["ffn_norm"], eps=eps, dtype=dt, site="attn"
        )

    with jax.named_scope("moe" if s.moe else "mlp"):
        y = _mlp(p, y, "ffn_gate", "ffn_up", "ffn_down")
        if s.moe:
            y = rms_norm(y, p["post_ffw_norm_1"], eps).astype(jnp.float32) + _moe(c, p, h, dt)
        # The layer's last branch and its post-norm weight (added below, or after the PLE).
        branch, branch_norm = y, p["post_ffw_norm"]

    if ple is not None:
        with jax.named_scope("ple"):
            # (residual_norm here, with h in the compute dtype as second output, was measured:
            # no kernel fewer, no speed-up; RESULTS.md run q.)
            h = h + rms_norm(branch, branch_norm, eps)
            g = gelu(ops.matmul(h.astype(dt), p["ple_gate"])) * ple.astype(dt)
            branch, branch_norm = ops.matmul(g, p["ple_proj"]), p["ple_post_norm"]

    scale = p["layer_output_scale"]
    if ctx.get("next_attn_norm") is not None:
        # h + the branch's post-norm, times the layer scale, and the next layer's attention
        # norm: one launch per decode row instead of XLA's three or four.
        h, x_next = ops.residual_norm(
            h, branch, branch_norm, ctx["next_attn_norm"], eps=eps, dtype=dt, scale=scale,
            site="end",
        )  # fmt: skip
        return h, new, x_next
    h = (h + rms_norm(branch, branch_norm, eps)) * scale.astype(h.dtype)
    return h, new, None


# ---------------------------------------------------------------------------- the trunk


def _segment_ple(c: Gemma4Config, seg, ple: jax.Array | None):
    """ple[B,T,L,P] -> [n_periods, period, B, T, P] for the scan's xs (None without PLE)."""
    if ple is None:
        return None
    x = ple[:, :, seg.start : seg.stop]  # [B, T, n*p, P]
    b, t = x.shape[:2]
    x = x.reshape(b, t, seg.n_periods, seg.period, c.ple_dim)
    return jnp.transpose(x, (2, 3, 0, 1, 4))


def _inv_freq(params: Params, s: LayerSpec):
    return params.rope["sliding" if s.sliding else "global"]


def run_sequence(
    params: Params,
    h: jax.Array,
    ple,
    *,
    seg_ids,
    cache_size=None,
    lengths=None,
    collect_hidden: bool = False,
):
    """Run segments `seg_ids` in sequence mode.

    Returns (h, donor_seq, caches): donor_seq maps each donor layer to its chunk (k, v) (needed by
    later KV-shared segments in `forward`); with `cache_size` set, caches[seg] is the segment's
    filled KV cache (per slot {"k","v"} stacked over periods, None for slots without K/V).
    With `collect_hidden`, a fourth item: the residual stream after every layer run, float32
    [n_layers_run, B, T, D] in layer order, emitted as scan outputs (no host round trip).
    """
    c = params.config
    segs = segments(c)
    donors = {s.kv_donor for s in layer_plan(c) if not s.has_kv}
    donor_seq: dict[int, tuple] = {}
    caches: dict[int, tuple] = {}
    hidden: list[jax.Array] = []
    for si in seg_ids:
        seg = segs[si]
        sp = params.segments[si]
        # Which slots must emit their chunk K/V: donors (for forward), or everything (prefill).
        emit = tuple(
            s.has_kv
            and (
                cache_size is not None
                or any(seg.layer_index(pi, j) in donors for pi in range(seg.n_periods))
            )
            for j, s in enumerate(seg.slots)
        )

        def body(h, xs, seg=seg, emit=emit):
            lp, lple = xs
            outs, hs = [], []
            for j, s in enumerate(seg.slots):
                ctx = {"mode": "sequence", "donor_seq": donor_seq, "dtype": params.compute_dtype}
                h, kv, _ = layer(
                    c, s, lp[j], h, None if lple is None else lple[j], _inv_freq(params, s), ctx
                )
                if not emit[j]:
                    outs.append(None)
                elif cache_size is None:
                    outs.append(kv)
                else:
                    size = min(c.window, cache_size) if s.sliding else cache_size
                    kc, vc = fill_cache(kv[0], kv[1], lengths, size, s.sliding)
                    outs.append({"k": kc, "v": vc})
                if collect_hidden:
                    hs.append(h)
            return h, (tuple(outs), jnp.stack(hs) if collect_hidden else None)

        h, (ys, hs) = jax.lax.scan(body, h, (sp, _segment_ple(c, seg, ple)))
        if collect_hidden:  # [n_periods, period, B, T, D] -> [layers, B, T, D]
            hidden.append(hs.reshape(seg.n_periods * seg.period, *hs.shape[2:]))
        if cache_size is not None:
            caches[si] = ys
        for j in range(seg.period):
            if not emit[j] or cache_size is not None:
                continue
            for pi in range(seg.n_periods):
                li = seg.layer_index(pi, j)
                if li in donors:
                    donor_seq[li] = (ys[j][0][pi], ys[j][1][pi])
    if collect_hidden:
        return h, donor_seq, caches, jnp.concatenate(hidden, axis=0)
    return h, donor_seq, caches


def run_cached(
    params: Params, h: jax.Array, ple, pos: jax.Array, cache: tuple, *, seg_ids, write: bool = True
):
    """Run segments `seg_ids` in cache mode on one token per row at positions pos[B].

    `cache` is the full per-segment cache tuple; own-K/V segments write the new token (when
    `write`); KV-shared ones read their donors' caches. Returns (h, new cache tuple).

    With `ops.fuse_layer_end`, the scan also carries the next layer's normalised input `x`:
    each layer ends with the next one's attention norm (see `layer`), the next slot's weight,
    or slot 0's at the next period. A segment's first `x` is normed before its scan; the last
    layer's `x` (normed with a clamped index) is dropped.
    """
    c = params.config
    segs = segments(c)
    cache = list(cache)
    fuse = ops.fuse_layer_end(h)
    dt = params.compute_dtype
    for si in seg_ids:
        seg = segs[si]
        norms = _STACKED_NORMS
        if fuse:
            norms += _LAYER_END_NORMS
        sliced, stacked = _split_matrices(
            params.segments[si], rows=h.shape[0] * h.shape[1], norms=norms,
            experts_used=c.n_experts_used,
        )  # fmt: skip
        donor_cache = _donor_caches(c, seg, cache)
        n_slots = len(seg.slots)

        def body(carry, xs, seg=seg, donor_cache=donor_cache, stacked=stacked, n_slots=n_slots):
            h, x, seg_cache = carry
            lp, lple, period = xs
            lp = [
                {**small, **{k: ops.LayerSlice(w, period) for k, w in mats.items()}}
                for small, mats in zip(lp, stacked, strict=True)
            ]
            new_slots = list(seg_cache)
            for j, s in enumerate(seg.slots):
                ctx = {"mode": "cache", "pos": pos, "donor_cache": donor_cache, "dtype": dt}
                if s.has_kv:
                    ctx["cache"] = (new_slots[j]["k"], new_slots[j]["v"], period)
                if fuse:
                    nj = (j + 1) % n_slots
                    ctx["x"] = x
                    ctx["next_attn_norm"] = ops.LayerSlice(
                        stacked[nj]["attn_norm"], period + (1 if nj == 0 else 0)
                    )
                h, kv, x = layer(
                    c, s, lp[j], h, None if lple is None else lple[j], _inv_freq(params, s), ctx
                )
                if s.has_kv and write:
                    new_slots[j] = {"k": kv[0], "v": kv[1]}
            return (h, x, tuple(new_slots)), None

        seg_cache = cache[si] if cache[si] is not None else tuple(None for _ in seg.slots)
        xs = (sliced, _segment_ple(c, seg, ple), jnp.arange(seg.n_periods))
        x0 = rms_norm(h, stacked[0]["attn_norm"][0], c.rms_eps).astype(dt) if fuse else None
        (h, _, seg_cache), _ = jax.lax.scan(body, (h, x0, seg_cache), xs)
        if seg.has_kv:
            cache[si] = seg_cache
    return h, tuple(cache)


# Norm weights [L, D] that kernels read in place from the stack (norm+RoPE, residual_norm).
_STACKED_NORMS = ("attn_q_norm", "attn_k_norm", "post_attention_norm", "ffn_norm")
# ... and those the layer-end `residual_norm` reads (`ops.fuse_layer_end`).
_LAYER_END_NORMS = ("attn_norm", "post_ffw_norm", "ple_post_norm", "layer_output_scale")


def _split_matrices(
    seg_params, *, rows: int, norms=_STACKED_NORMS, experts_used: int = 0
) -> tuple[list, list]:
    """Per slot: (what the scan slices per layer, the weights handed over stacked).

    The matrices `ops.keep_stacked` picks stay whole and reach `ops.matmul` as `LayerSlice`s:
    a Pallas matmul needs the stack itself, as a slice before a custom call is a copy of the
    layer's weight every step (a batch-32 E4B profile: 3.6 of 10.3 ms). So do the norm weights
    that kernels read (`norms`): sliced, the q/k head norms alone cost 66 small copies,
    ~3% of an E4B batch-1 step. Expert stacks [L, E, N, K] likewise where the grouped kernel
    takes the step's `rows * experts_used` pairs (`ops.keep_experts_stacked`).
    """

    def whole(k, w) -> bool:
        if k in norms and ops.stacked_weights():
            return True
        if not isinstance(w, quant.QTensor):
            return False
        if w.ndim == 3:
            return ops.keep_stacked(w, rows)
        return w.ndim == 4 and ops.keep_experts_stacked(w, rows * experts_used)

    sliced, stacked = [], []
    for slot in seg_params:
        mats = {k: w for k, w in slot.items() if whole(k, w)}
        sliced.append({k: w for k, w in slot.items() if k not in mats})
        stacked.append(mats)
    return sliced, stacked


def _donor_caches(c: Gemma4Config, seg, cache) -> dict[int, tuple]:
    out = {}
    for s in seg.slots:
        if s.has_kv:
            continue
        si, period, slot = locate(c, s.kv_donor)
        d = cache[si][slot]
        # The whole stacks, not d["k"][period]: before a custom call that static slice is a
        # copy of the donor's cache every decode step (~64 MB for a global donor at 32K). The
        # stacks enter the layer scan as read-only operands, which XLA's copy insertion (shared
        # by CPU and GPU) does not copy: checked in XLA:CPU's optimised HLO of a scan feeding
        # an opaque custom call, where the slice showed up as a copy and the stack as none.
        # Only the jnp reference path still slices, per shared layer.
        out[s.kv_donor] = (d["k"], d["v"], period)
    return out


# ---------------------------------------------------------------------------- forward


def forward_impl(params: Params, tokens: jax.Array, *, return_hidden: bool | str = False):
    h, ple = embed(params, tokens)
    seg_ids = range(len(params.segments))
    if return_hidden == "layers":
        return run_sequence(params, h, ple, seg_ids=seg_ids, collect_hidden=True)[3]
    h, _, _ = run_sequence(params, h, ple, seg_ids=seg_ids)
    if return_hidden:
        return h
    return lm_head(params, h)


def _forward_entry(params, tokens, kernels, return_hidden):
    return with_kernels(kernels, forward_impl, params, tokens, return_hidden=return_hidden)


# Through the executable cache: a scoring script's new process loads the program compiled.
_forward_program = CachedProgram(
    "forward", _forward_entry, static_argnames=("kernels", "return_hidden")
)


def with_kernels(kernels: str, fn, *args, **kwargs):
    """`fn` traced under kernel mode `kernels` (a static argument of the jitted programs)."""
    with ops.use_kernels(kernels):
        return fn(*args, **kwargs)


def forward(params: Params, tokens, *, return_hidden: bool | str = False) -> jax.Array:
    """Full-sequence scoring: int tokens [B, T] -> float32 logits [B, T, V].

    Every position attends causally to the ones before it (sliding layers to their window);
    no cache is kept. `return_hidden=True` returns the final hidden states [B, T, D] (before
    the final norm) instead; `return_hidden="layers"` returns the residual stream after every
    layer, float32 [L, B, T, D] (entry -1 equals `return_hidden=True`): per-layer activations
    come out of the same jitted scan as scan outputs.
    """
    inputs.check_params(params, "forward")
    if return_hidden not in (False, True, "layers"):
        raise InputError(f"return_hidden={return_hidden!r}: expected False, True or 'layers'")
    tokens = inputs.token_array(params, tokens, ndim=2, what="tokens")
    if tokens.shape[1] > params.config.context_length:
        raise InputError(
            f"sequence of {tokens.shape[1]} tokens is longer than the model's "
            f"context ({params.config.context_length})"
        )
    return _forward_program(params, tokens, kernels=ops.kernel_mode(), return_hidden=return_hidden)
