"""The few Pallas GPU (Triton lowering) APIs the kernels use, behind one import.

Checked against jax 0.10.2 (CPU here) and 0.11.2 (the GPU machine): ``pl.load``/``pl.store``
are gone from ``jax.experimental.pallas`` in both, while ``jax.experimental.pallas.triton``
keeps ``load``/``store`` (masked memory ops, the only way to read a partial tile without
touching memory past the end of an array on the GPU) and ``CompilerParams(num_warps,
num_stages)``. If a later jax moves them again, this is the one place to change.

Interpret mode (``interpret=True``) runs the same kernel bodies on the CPU; masked loads there
pad the ref instead of clamping the slice start, so they match the GPU semantics.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas import triton as plgpu

__all__ = [
    "MASK_VALUE",
    "compiler_params",
    "dot_precision",
    "is_pow2",
    "load",
    "load_partials_sum",
    "next_pow2",
    "store",
]

# A finite stand-in for -inf in online softmax: exp2(MASK_VALUE - m) underflows to 0 and
# (MASK_VALUE - MASK_VALUE) stays 0, so an all-masked tile never produces NaN.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def load(ref, *, mask=None, other=None) -> jax.Array:
    """Masked load from a (sliced) ref; lanes where ``mask`` is False read ``other``."""
    return plgpu.load(ref, mask=mask, other=other)


def load_partials_sum(ref, index: tuple, *, mask=None) -> jax.Array:
    """The f32 sum over ``ref``'s leading axis of the masked loads ``ref[s, *index]``: split-K
    partial sums added by their consumer kernel. One load per partial, since the Triton
    lowering needs power-of-two shapes and the split need not be one (``jnp.int32`` indices:
    interpret mode cannot discharge a Python int index of a ref)."""
    total = None
    for s in range(ref.shape[0]):
        x = load(ref.at[(jnp.int32(s), *index)], mask=mask, other=0).astype(jnp.float32)
        total = x if total is None else total + x
    return total


def store(ref, val, *, mask=None) -> None:
    """Masked store to a (sliced) ref; lanes where ``mask`` is False are left untouched."""
    plgpu.store(ref, val, mask=mask)


def compiler_params(*, num_warps: int, num_stages: int):
    """Triton launch parameters for ``pallas_call(compiler_params=...)``."""
    return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def dot_precision(dtype) -> lax.Precision | None:
    """f32 operands need HIGHEST: the Triton lowering maps DEFAULT to TF32 on the GPU."""
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def is_pow2(n: int) -> bool:
    return n >= 1 and (n & (n - 1)) == 0
