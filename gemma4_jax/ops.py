"""The one dispatch point between the model and its kernels.

The model calls `matmul`, `expert_matmul`, `flash_attention`, `decode_attention` and
`qk_norm_rope`; each runs either the pure-jnp reference or a Pallas kernel, chosen by
`GEMMA4_JAX_KERNELS` = `reference` | `pallas` (default: `pallas` on GPU, `reference` on CPU;
`pallas` on CPU runs the kernels in interpret mode). The mode is read when a function is traced:
the public entry points (`forward`, `prefill`, `decode_step`, `generate`) make it part of their
jit cache key, so flipping the variable between calls takes effect.
"""

from __future__ import annotations

import contextlib
import contextvars
import os

import jax
import jax.numpy as jnp

from . import quant

MODES = ("reference", "pallas")
_MODE: contextvars.ContextVar[str | None] = contextvars.ContextVar("gemma4_kernels", default=None)


def default_mode() -> str:
    env = os.environ.get("GEMMA4_JAX_KERNELS", "").strip().lower()
    if env:
        if env not in MODES:
            raise ValueError(f"GEMMA4_JAX_KERNELS={env!r} is not one of {MODES}")
        return env
    return "pallas" if jax.default_backend() == "gpu" else "reference"


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
    return kernel_mode() == "pallas"


# ---------------------------------------------------------------------------- matmuls


def _fields(w: quant.QTensor) -> dict:
    return {f.name: getattr(w, f.name) for f in __import__("dataclasses").fields(w)}


def matmul(x: jax.Array, w: quant.QTensor) -> jax.Array:
    """x[..., K] @ w[N, K]^T -> [..., N] in x.dtype, f32 accumulation."""
    if _pallas() and w.ggml_type in _PALLAS_MATMUL_TYPES:
        from pallas_kernels import qmatmul as qk

        lead = x.shape[:-1]
        y = qk.qmatmul(x.reshape(-1, x.shape[-1]), w.ggml_type, _fields(w), interpret=_interpret())
        return y.reshape(*lead, y.shape[-1])
    if isinstance(w, quant.F32) and x.dtype != jnp.float32:
        # Weights keep the precision the file stores them in: bf16 compute rounds activations,
        # not an F32 file's weights (that alone moves fixture logits by up to ~4).
        return quant.matmul_reference(x.astype(jnp.float32), w).astype(x.dtype)
    return quant.matmul_reference(x, w)


_PALLAS_MATMUL_TYPES = ("Q8_0", "Q4_0", "Q4_K", "Q5_K", "Q6_K")


def expert_matmul(x: jax.Array, w: quant.QTensor, expert_ids: jax.Array) -> jax.Array:
    """Per-choice expert projection: x[T, K] (shared by the choices) or x[T, k, K] (one input per
    choice), w[E, N, K], expert_ids[T, k] -> [T, k, N].

    Reference: when few (token, choice) pairs are asked for, gather those experts' blocks and
    dequantize only them; otherwise run every expert densely and pick (cheaper than a gather of
    T*k dequantized matrices).
    """
    t, k = expert_ids.shape
    n_experts = w.shape[0]
    if x.ndim == 2:
        x = jnp.broadcast_to(x[:, None, :], (t, k, x.shape[-1]))
    if (
        _pallas()
        and w.ggml_type in _PALLAS_MATMUL_TYPES
        and hasattr(_grouped_kernel(), "grouped_qmatmul")
    ):
        return _grouped_kernel().grouped_qmatmul(
            x, w.ggml_type, _fields(w), expert_ids, interpret=_interpret()
        )
    dt = x.dtype
    if t * k <= n_experts:
        wg = jax.tree.map(lambda a: a[expert_ids.reshape(-1)], w)  # [T*k, N, K]
        wd = wg.dequantize(dt).reshape(t, k, *w.shape[1:])
        return jnp.einsum(
            "tkK,tkNK->tkN", x, wd, preferred_element_type=jnp.float32, precision=_precision(dt)
        ).astype(dt)
    wd = w.dequantize(dt)  # [E, N, K]
    y = jnp.einsum(
        "tkK,eNK->tkeN", x, wd, preferred_element_type=jnp.float32, precision=_precision(dt)
    )
    return jnp.take_along_axis(y, expert_ids[:, :, None, None], axis=2)[:, :, 0].astype(dt)


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
        return fa.flash_attention(
            q, k, v, q_start, window=window, scale=scale, interpret=_interpret()
        )
    return fa.flash_attention_reference(q, k, v, q_start, window=window, scale=scale)


def decode_attention(q, k, v, pos, *, ring: bool, scale: float = 1.0):
    """One query per row against a cache. q[B,H,D], k/v[B,S,Hk,D], pos[B]."""
    from pallas_kernels import decode_attention as da

    if _pallas():
        return da.decode_attention(q, k, v, pos, ring=ring, scale=scale, interpret=_interpret())
    return da.decode_attention_reference(q, k, v, pos, ring=ring, scale=scale)


def qk_norm_rope(q, k, v, q_w, k_w, positions, inv_freq, *, eps: float):
    """Per-head RMSNorm of q/k (weighted) and v (no weight) + NeoX RoPE of q/k."""
    from pallas_kernels import qk_norm_rope as nr

    if _pallas():
        return nr.qk_norm_rope(
            q, k, v, q_w, k_w, positions, inv_freq, eps=eps, interpret=_interpret()
        )
    return nr.qk_norm_rope_reference(q, k, v, q_w, k_w, positions, inv_freq, eps=eps)
