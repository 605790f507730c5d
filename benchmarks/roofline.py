"""Roofline numbers for Gemma 4 decode and prefill, from the config alone.

Decode (batch B, context c): every weight byte a token touches is read once per step (the
matrices of every layer, incl. the per-layer-input (PLE) projections, the F32
`per_layer_model_proj`, the tied LM head `V x D`, the routed experts' share for MoE), plus the
KV cache each layer attends over (sliding layers min(c, window) positions, global layers c;
KV-shared layers read their donor's cache again), plus the embedding rows (tiny). Predicted
tok/s = B / (bytes / bandwidth).

Prefill (prompt T, batch 1): 2 FLOPs per weight per token for the layers that run on every
position (KV-shared layers run on the last position only: their cost is divided by T; so is
the LM head's), plus causal attention `4 * H * dh * keys` per token per layer (keys: the
visible prefix, ~T/2 for global layers, ~window for sliding ones). Predicted tok/s = rate /
FLOPs per token.

    python benchmarks/roofline.py [--bw-tb-s 2.69] [--tflops 652]   # markdown for RESULTS.md
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.random_model import (  # noqa: E402
    family_config,
    layer_matrix_bytes,
    tensor_types,
    type_bytes,
)
from gemma4_jax.config import Gemma4Config, layer_plan  # noqa: E402
from gemma4_jax.params import global_decls, layer_decls  # noqa: E402

KV_BYTES = 2  # bf16 cache


def decode_bytes(
    c: Gemma4Config, quant_mix: str, context: int, batch: int = 1, exact: bool = True
) -> dict[str, float]:
    """Bytes moved per decode step (all `batch` rows together), by part."""
    L = c.n_layers
    per_layer = layer_matrix_bytes(c, quant_mix, exact)
    g = global_decls(c)
    gtypes = tensor_types(c, quant_mix)
    layers = experts = 0.0
    for mats in per_layer:
        for name, b in mats.items():
            if name.startswith("experts_"):
                e, k = c.n_experts, c.n_experts_used
                distinct = e * (1 - (1 - k / e) ** batch)  # expected distinct experts touched
                experts += b * distinct / e
            else:
                layers += b
    lm_head = type_bytes(
        gtypes[("global", "lm_head" if "lm_head" in g else "embed")], g["embed"].shape
    )
    ple_proj = (
        type_bytes(gtypes[("global", "ple_model_proj")], g["ple_model_proj"].shape)
        if c.ple_dim
        else 0
    )
    # one row of the token embedding and of the per-layer embedding per token
    rows = batch * type_bytes(gtypes[("global", "embed")], (1, c.d_model))
    if c.ple_dim:
        rows += batch * type_bytes(gtypes[("global", "ple_embed")], (1, c.ple_dim * L))
    kv = 0.0
    for s in layer_plan(c):
        visible = min(context, c.window) if s.sliding else context
        kv += batch * visible * s.n_kv_heads * s.head_dim * 2 * KV_BYTES
    total = layers + experts + lm_head + ple_proj + rows + kv
    return {
        "layers": layers,
        "experts": experts,
        "lm_head": lm_head,
        "ple_model_proj": ple_proj,
        "embedding_rows": rows,
        "kv_cache": kv,
        "total": total,
    }


def prefill_flops_per_token(c: Gemma4Config, t: int) -> dict[str, float]:
    """FLOPs per prompt token for a prompt of `t` tokens (batch 1), by part."""
    dense = shared = attn = 0.0
    for s in layer_plan(c):
        decls = layer_decls(c, s)
        params = 0
        for name, d in decls.items():
            if not d.matrix or name == "router":
                continue
            n = 1
            for x in d.shape:
                n *= x
            if name.startswith("experts_"):
                n = n * c.n_experts_used // c.n_experts
            params += n
        if s.sliding:
            # mean over positions p = 0..t-1 of min(p + 1, window)
            w = c.window
            keys = (sum(range(1, min(t, w) + 1)) + max(0, t - w) * w) / t
        else:
            keys = (t + 1) / 2
        a = 4.0 * c.n_heads * s.head_dim * keys
        if s.has_kv:
            dense += 2.0 * params
            attn += a
        else:  # KV-shared: last position only
            shared += (
                2.0 * params + 4.0 * c.n_heads * s.head_dim * (min(t, c.window) if s.sliding else t)
            ) / t
    g = global_decls(c)
    ple = 2.0 * g["ple_model_proj"].shape[0] * c.d_model if c.ple_dim else 0.0
    head = 2.0 * c.vocab_size * c.d_model / t
    total = dense + shared + attn + ple + head
    return {
        "layers": dense,
        "attention": attn,
        "kv_shared_last_only": shared,
        "ple_model_proj": ple,
        "lm_head": head,
        "total": total,
    }


def _gb(x: float) -> str:
    return f"{x / 1e9:.3f}"


def markdown(bw_tb_s: float, tflops: float, family: str = "e4b") -> str:
    c = family_config(family)
    lines = []
    lines.append(
        f"Bandwidth {bw_tb_s} TB/s (device copy, read+write), bf16 matmul {tflops} TFLOP/s.\n"
    )
    lines.append(
        "| mix | context | weights GB | LM head GB | PLE proj GB | KV GB | total GB/token "
        "| predicted tok/s |"
    )
    lines.append("|---|---|---|---|---|---|---|---|")
    for mix, exact in (("q8_0", True), ("q4_k_m", True), ("q4_k_m", False), ("bf16", True)):
        for ctx in (128, 4096, 32768):
            b = decode_bytes(c, mix, ctx, 1, exact)
            label = mix + ("" if exact else " (stacked)")
            tok = bw_tb_s * 1e12 / b["total"]
            lines.append(
                f"| {label} | {ctx} | {_gb(b['layers'] + b['experts'])} | {_gb(b['lm_head'])} "
                f"| {_gb(b['ple_model_proj'])} | {_gb(b['kv_cache'])} | {_gb(b['total'])} "
                f"| {tok:.0f} |"
            )
    lines.append("")
    lines.append("| batch (q8_0, ctx 128) | GB/step | predicted tok/s (all rows) |")
    lines.append("|---|---|---|")
    for bsz in (1, 8, 32):
        b = decode_bytes(c, "q8_0", 128 + 128, bsz)
        lines.append(f"| {bsz} | {_gb(b['total'])} | {bsz * bw_tb_s * 1e12 / b['total']:.0f} |")
    lines.append("")
    lines.append("| prompt | GFLOP/token | of which attention | predicted prefill tok/s |")
    lines.append("|---|---|---|---|")
    for t in (512, 2048, 8192):
        f = prefill_flops_per_token(c, t)
        lines.append(
            f"| {t} | {f['total'] / 1e9:.2f} | {f['attention'] / 1e9:.3f} "
            f"| {tflops * 1e12 / f['total']:.0f} |"
        )
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--bw-tb-s", type=float, default=2.69)
    ap.add_argument("--tflops", type=float, default=652.0)
    ap.add_argument("--family", default="e4b")
    a = ap.parse_args(argv)
    print(markdown(a.bw_tb_s, a.tflops, a.family))


if __name__ == "__main__":
    main()
