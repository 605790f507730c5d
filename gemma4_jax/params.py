"""The params pytree, declared once.

`declare(config)` lists every tensor the model needs: its GGUF name, logical numpy shape
(`[..., N, K]`, GGUF orientation) and logical sharding axes. The loader fills exactly this
declaration and checks each tensor against it; sharding reads the axes; benchmarks build random
weights from it. Layer tensors are stacked per scan segment: `params.segments[s][slot][name]`
has a leading axis of `n_periods`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from .config import Gemma4Config, LayerSpec, segments


@dataclasses.dataclass(frozen=True)
class TensorDecl:
    gguf_name: str  # e.g. "blk.{i}.attn_q.weight"
    shape: tuple[int, ...]  # logical numpy shape, one layer
    axes: tuple[str | None, ...]  # logical axis names, one per dim
    matrix: bool = True  # matrices may stay quantized; vectors/scalars become float32 arrays
    optional: bool = False  # absent -> default (layer_output_scale = 1)


def layer_decls(c: Gemma4Config, s: LayerSpec) -> dict[str, TensorDecl]:
    """Tensors of one layer, keyed by the short name the model uses."""
    d, h, dh, kv = c.d_model, c.n_heads, s.head_dim, s.n_kv_heads

    def m(name, shape, axes):
        return TensorDecl(f"blk.{{i}}.{name}.weight", shape, axes)

    def v(name, n, axis="embed", suffix="weight", optional=False):
        return TensorDecl(
            f"blk.{{i}}.{name}.{suffix}", (n,), (axis,), matrix=False, optional=optional
        )

    out = {
        "attn_norm": v("attn_norm", d),
        "attn_q": m("attn_q", (h * dh, d), ("heads", "embed")),
        "attn_q_norm": v("attn_q_norm", dh, "head_dim"),
        "attn_output": m("attn_output", (d, h * dh), ("embed", "heads")),
        "post_attention_norm": v("post_attention_norm", d),
        "ffn_norm": v("ffn_norm", d),
        "ffn_gate": m("ffn_gate", (s.ffn_dim, d), ("mlp", "embed")),
        "ffn_up": m("ffn_up", (s.ffn_dim, d), ("mlp", "embed")),
        "ffn_down": m("ffn_down", (d, s.ffn_dim), ("embed", "mlp")),
        "post_ffw_norm": v("post_ffw_norm", d),
        "layer_output_scale": v("layer_output_scale", 1, None, optional=True),
    }
    if s.has_kv:
        out["attn_k"] = m("attn_k", (kv * dh, d), ("kv_heads", "embed"))
        out["attn_k_norm"] = v("attn_k_norm", dh, "head_dim")
        if not s.k_eq_v:
            out["attn_v"] = m("attn_v", (kv * dh, d), ("kv_heads", "embed"))
    if s.moe:
        e, fe = c.n_experts, c.expert_ffn_dim
        out.update(
            {
                "router": m("ffn_gate_inp", (e, d), (None, "embed")),
                "router_scale": v("ffn_gate_inp", d, suffix="scale"),
                "experts_gate_up": m(
                    "ffn_gate_up_exps", (e, 2 * fe, d), ("experts", "mlp", "embed")
                ),
                "experts_down": m("ffn_down_exps", (e, d, fe), ("experts", "embed", "mlp")),
                "expert_scale": v("ffn_down_exps", e, "experts", suffix="scale"),
                "pre_ffw_norm_2": v("pre_ffw_norm_2", d),
                "post_ffw_norm_1": v("post_ffw_norm_1", d),
                "post_ffw_norm_2": v("post_ffw_norm_2", d),
            }
        )
    if c.ple_dim:
        p = c.ple_dim
        out.update(
            {
                "ple_gate": m("inp_gate", (p, d), (None, "embed")),
                "ple_proj": m("proj", (d, p), ("embed", None)),
                "ple_post_norm": v("post_norm", d),
            }
        )
    return out


def global_decls(c: Gemma4Config) -> dict[str, TensorDecl]:
    d, v = c.d_model, c.vocab_size
    out = {
        "embed": TensorDecl("token_embd.weight", (v, d), ("vocab", "embed")),
        "output_norm": TensorDecl("output_norm.weight", (d,), ("embed",), matrix=False),
    }
    if not c.tied_embeddings:
        out["lm_head"] = TensorDecl("output.weight", (v, d), ("vocab", "embed"))
    if c.ple_dim:
        lp = c.ple_dim * c.n_layers
        out["ple_embed"] = TensorDecl("per_layer_token_embd.weight", (v, lp), ("vocab", None))
        out["ple_model_proj"] = TensorDecl("per_layer_model_proj.weight", (lp, d), (None, "embed"))
        out["ple_proj_norm"] = TensorDecl(
            "per_layer_proj_norm.weight", (c.ple_dim,), (None,), matrix=False
        )
    return out


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Params:
    """Model weights plus the static config. A pytree: jit, shard and donate it freely.

    `globals` maps names of `global_decls` to tensors; `segments[s][slot]` maps names of
    `layer_decls` to tensors stacked over the segment's periods; `rope` holds the inverse
    frequencies of sliding and global layers.
    """

    globals: dict[str, Any]
    segments: tuple[tuple[dict[str, Any], ...], ...]
    rope: dict[str, Any]
    config: Gemma4Config = dataclasses.field(metadata=dict(static=True))
    dtype: str = dataclasses.field(default="float32", metadata=dict(static=True))

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)


def segment_layer_decls(c: Gemma4Config):
    """[(segment, [(slot_spec, decls)])] in scan order."""
    return [(seg, [(s, layer_decls(c, s)) for s in seg.slots]) for seg in segments(c)]
