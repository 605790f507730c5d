"""Packed-byte batch-1 matvecs (gemma4_jax/matvec.py) against the dequantize-then-dot reference.

Raw ggml blocks of random bits (finite f16 scales) go through the loader's own repack, so every
nibble, high bit and scale position is exercised. In f32 the weight values are identical to
`dequantize`'s and only the summation order differs; in bf16 the reference also rounds the
weight to bf16, the matvec does not.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_kernels_qmatmul import random_raw_blocks, random_x

from gemma4_jax import matvec, ops, quant

TOL = {jnp.float32: 2e-6, jnp.bfloat16: 1e-2}


def _weight(fmt: str, n: int, k: int, seed: int = 0) -> quant.QTensor:
    from gguf import GGMLQuantizationType

    raw = random_raw_blocks(fmt, n, k, seed)
    return quant.from_gguf(raw, GGMLQuantizationType[fmt], (n, k))


def _check(out, ref, dtype):
    assert out.shape == ref.shape and out.dtype == ref.dtype
    out = np.asarray(out.astype(jnp.float32))
    ref = np.asarray(ref.astype(jnp.float32))
    # Per output: |error| against the size of the terms summed (sum |w| |x|), since a dot of
    # random signs can cancel to ~0 where a relative error means nothing.
    err = np.abs(out - ref).max() / max(np.abs(ref).max(), 1e-30)
    assert np.isfinite(out).all()
    assert err <= TOL[dtype], f"max error {err:.3g} x max|ref|"


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("fmt", matvec.FORMATS)
@pytest.mark.parametrize("n,k", [(40, 512), (17, 768), (64, 2560)])
def test_matches_reference(fmt, dtype, n, k, jit):
    # Under jit too, as the model calls it: XLA fuses the whole formula into one reduction, and
    # XLA:CPU once miscompiled Q6_K's int8 offset there (eager was right, jit off by ~4x).
    w = _weight(fmt, n, k, seed=n + k)
    x = random_x((1, 1, k), dtype, seed=k)
    ref = quant.matmul_reference(x, w)
    out = (jax.jit(matvec.matvec) if jit else matvec.matvec)(x, w)
    _check(out, ref, dtype)


@pytest.mark.parametrize("fmt", ["Q8_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q6_K"])
def test_f32_weights_are_the_dequantized_values(fmt):
    # One-hot activations pick single weights: the matvec must reproduce each dequantized value
    # exactly (same f32 operations), whatever the nibble / high-bit position.
    n, k = 8, 256
    w = _weight(fmt, n, k, seed=3)
    dense = np.asarray(w.dequantize(jnp.float32))
    for col in (0, 1, 15, 16, 31, 32, 63, 64, 100, 127, 128, 200, 255):
        x = jnp.zeros((1, k), jnp.float32).at[0, col].set(1.0)
        np.testing.assert_array_equal(np.asarray(matvec.matvec(x, w))[0], dense[:, col])


def test_supports_and_errors():
    w = _weight("Q4_K", 8, 256)
    assert matvec.supports(jnp.zeros((1, 1, 256)), w)
    assert not matvec.supports(jnp.zeros((2, 256)), w)
    assert not matvec.supports(jnp.zeros((1, 256)), quant.F32(jnp.zeros((8, 256))))
    with pytest.raises(ValueError, match="one row"):
        matvec.matvec(jnp.zeros((2, 256)), w)
    with pytest.raises(ValueError, match="contract"):
        matvec.matvec(jnp.zeros((1, 512)), w)


def test_auto_mode_dispatch_matches_reference():
    # ops.matmul routes batch-1 Q8_0 calls through the packed matvec in `auto` mode (the GPU
    # default; Q4_K / Q6_K take the Pallas vector kernel, tested below).
    w = _weight("Q8_0", 24, 512, seed=5)
    x = random_x((1, 1, 512), jnp.bfloat16, seed=7)
    with ops.use_kernels("reference"):
        ref = ops.matmul(x, w)
    with ops.use_kernels("auto"):
        out = ops.matmul(x, w)
    _check(out, ref, jnp.bfloat16)


def test_pallas_matvec_switch_routes_one_row_to_the_kernel(monkeypatch):
    # GEMMA4_JAX_PALLAS_MATVEC: batch-1 calls on the listed formats take the Pallas vector
    # kernel in `auto` mode (interpret mode here), the others stay on XLA.
    from pallas_kernels import qmatmul as qk

    calls = []
    real = qk.qmatmul
    monkeypatch.setattr(qk, "qmatmul", lambda *a, **kw: calls.append(a[1]) or real(*a, **kw))
    monkeypatch.setenv("GEMMA4_JAX_PALLAS_MATVEC", "q8_0,Q4_K")
    x = random_x((1, 1, 512), jnp.float32, seed=3)
    for fmt in ("Q8_0", "Q4_K", "Q6_K"):
        w = _weight(fmt, 24, 512, seed=9)
        with ops.use_kernels("auto"):
            out = ops.matmul(x, w)
        _check(out, quant.matmul_reference(x, w), jnp.float32)
    assert calls == ["Q8_0", "Q4_K"]
    calls.clear()  # unset: the default formats; "none": XLA for every format
    monkeypatch.delenv("GEMMA4_JAX_PALLAS_MATVEC")
    for fmt in ("Q8_0", "Q4_K", "Q6_K"):
        with ops.use_kernels("auto"):
            ops.matmul(x, _weight(fmt, 24, 512, seed=9))
    assert calls == list(ops.PALLAS_MATVEC_DEFAULT) == ["Q4_K", "Q6_K"]
    calls.clear()
    monkeypatch.setenv("GEMMA4_JAX_PALLAS_MATVEC", "none")
    with ops.use_kernels("auto"):
        ops.matmul(x, _weight("Q4_K", 24, 512, seed=9))
    assert calls == []
    monkeypatch.setenv("GEMMA4_JAX_PALLAS_MATVEC", "Q9_X")
    with pytest.raises(ValueError, match="GEMMA4_JAX_PALLAS_MATVEC"), ops.use_kernels("auto"):
        ops.matmul(x, w)


@pytest.mark.parametrize(
    "shape,kernel",
    [
        ((1, 1), False),
        ((4, 1), False),
        ((8, 1), True),
        ((64,), True),
        ((65, 1), False),
        ((1, 32), False),
        ((2, 8), False),
    ],
)
def test_auto_mode_sends_batched_decode_to_the_kernel(monkeypatch, shape, kernel):
    # Batched decode (8-64 single-token rows) takes the Pallas quantized matmul in `auto` mode
    # (interpret mode here); fewer or more rows, and prompts (T > 1), stay on XLA. The answer is
    # the reference's either way.
    from pallas_kernels import qmatmul as qk

    calls = []
    real = qk.qmatmul
    monkeypatch.setattr(qk, "qmatmul", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    w = _weight("Q8_0", 16, 256, seed=len(shape))
    x = random_x((*shape, 256), jnp.float32, seed=shape[0])
    with ops.use_kernels("auto"):
        out = ops.matmul(x, w)
    assert bool(calls) == kernel
    _check(out, quant.matmul_reference(x, w), jnp.float32)


def test_matmuls_merges_one_row_projections_of_a_format(monkeypatch):
    # ops.matmuls: one row against layer slices of stacks that take the Pallas vector kernel;
    # those of one format go through ONE stacked_qmatmul_many call, the odd one out through
    # matmul, and every output equals the reference of its own weight at that layer.
    # GEMMA4_JAX_MERGE_MATVEC=0 gives one call per weight with the same values.
    from pallas_kernels import qmatmul as qk

    stack = lambda fmt, n, seed: jax.tree.map(
        lambda *a: jnp.stack(a), *(_weight(fmt, n, 512, seed=seed + i) for i in range(3))
    )
    ws = [stack("Q4_K", 24, 0), stack("Q6_K", 16, 10), stack("Q4_K", 40, 20)]
    layer = jnp.int32(1)
    x = random_x((1, 1, 512), jnp.float32, seed=3)
    refs = [quant.matmul_reference(x, jax.tree.map(lambda a: a[1], w)) for w in ws]
    calls = []
    real = qk.stacked_qmatmul_many
    monkeypatch.setattr(
        qk, "stacked_qmatmul_many", lambda *a, **kw: calls.append(a[1]) or real(*a, **kw)
    )
    for merge, want in (("1", ["Q4_K"]), ("0", [])):
        calls.clear()
        monkeypatch.setenv("GEMMA4_JAX_MERGE_MATVEC", merge)
        with ops.use_kernels("auto"):
            outs = ops.matmuls(x, [ops.LayerSlice(w, layer) for w in ws])
        assert calls == want
        for out, ref in zip(outs, refs, strict=True):
            _check(out, ref, jnp.float32)


def test_matmuls_parts_reach_the_norm_kernels(monkeypatch):
    # ops.matmuls(..., parts=True) at one row: every format's launch (a lone weight too) comes
    # back as an ops.SplitSum whose value is the summed projection, and qk_norm_rope /
    # residual_norm given SplitSums return what they return on those values.
    # GEMMA4_JAX_SPLIT_PARTS=0 gives plain arrays again.
    stack = lambda fmt, n, seed: jax.tree.map(
        lambda *a: jnp.stack(a), *(_weight(fmt, n, 2048, seed=seed + i) for i in range(2))
    )
    d = 32
    ws = [stack("Q4_K", 4 * d, 0), stack("Q4_K", 2 * d, 10), stack("Q6_K", 2 * d, 20)]
    layer = jnp.int32(1)
    x = random_x((1, 1, 2048), jnp.bfloat16, seed=4)  # 2+ K steps: split
    with ops.use_kernels("pallas"):
        parts = ops.matmuls(x, [ops.LayerSlice(w, layer) for w in ws], parts=True)
        monkeypatch.setenv("GEMMA4_JAX_SPLIT_PARTS", "0")
        plain = ops.matmuls(x, [ops.LayerSlice(w, layer) for w in ws], parts=True)
        monkeypatch.delenv("GEMMA4_JAX_SPLIT_PARTS")
        assert all(isinstance(p, ops.SplitSum) and p.parts.shape[0] > 1 for p in parts)
        assert not any(isinstance(p, ops.SplitSum) for p in plain)
        for p, y in zip(parts, plain, strict=True):
            np.testing.assert_array_equal(np.asarray(p.value()), np.asarray(y))
        heads = lambda a, n: a.reshape(1, 1, n, d)
        q_w = jnp.ones((d,)) * 1.5
        args = (q_w, q_w, jnp.zeros((1, 1), jnp.int32) + 7, jnp.ones((d // 2,)) * 0.1)
        got = ops.qk_norm_rope(heads(parts[0], 4), heads(parts[1], 2), heads(parts[2], 2),
                               *args, eps=1e-6)  # fmt: skip
        want = ops.qk_norm_rope(heads(plain[0], 4), heads(plain[1], 2), heads(plain[2], 2),
                                *args, eps=1e-6)  # fmt: skip
        for g, w in zip(got, want, strict=True):
            np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
        h = random_x((1, 1, 4 * d), jnp.float32, seed=5)
        norms = (jnp.ones((4 * d,)), jnp.ones((4 * d,)) * 2.0)
        kw = dict(eps=1e-6, dtype=jnp.bfloat16, site="attn")
        got = ops.residual_norm(h, parts[0], *norms, **kw)
        want = ops.residual_norm(h, plain[0], *norms, **kw)
        for g, w in zip(got, want, strict=True):
            np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def test_int_dot_switch(monkeypatch):
    # GEMMA4_JAX_INT_DOT (read at trace time): unset is the kernel default (integer dot
    # products for one bf16 row of Q4_K; an f32 row keeps the exact float path), 0 / 1 force
    # them off / on, anything else is an error that names the variable. f32 x tells the two
    # paths apart (x rounded to 15-bit codes); in bf16 their outputs round alike here.
    from pallas_kernels import qmatmul as qm

    w = jax.tree.map(lambda *a: jnp.stack(a), *(_weight("Q4_K", 48, 512, seed=s) for s in (1, 2)))
    x = random_x((1, 1, 512), jnp.float32, seed=9)
    fields = ops._fields(w)

    def kernel(int_dot):
        bs = qm.BlockSizes(int_dot=int_dot)
        return qm.stacked_qmatmul(x, "Q4_K", fields, jnp.int32(1), interpret=True, block_sizes=bs)

    with ops.use_kernels("pallas"):
        run = lambda: np.asarray(ops.matmul(x, ops.LayerSlice(w, jnp.int32(1))))  # noqa: E731
        default = run()
        monkeypatch.setenv("GEMMA4_JAX_INT_DOT", "0")
        off = run()
        monkeypatch.setenv("GEMMA4_JAX_INT_DOT", "1")
        on = run()
        monkeypatch.setenv("GEMMA4_JAX_INT_DOT", "yes")
        with pytest.raises(ValueError, match="GEMMA4_JAX_INT_DOT"):
            run()
    float_path, int_path = np.asarray(kernel(False)), np.asarray(kernel(True))
    assert (float_path != int_path).any()
    np.testing.assert_array_equal(default, float_path)
    np.testing.assert_array_equal(off, float_path)
    np.testing.assert_array_equal(on, int_path)


def test_grouped_decode_switch_routes_few_expert_pairs_to_the_kernel(monkeypatch):
    # GEMMA4_JAX_GROUPED_DECODE: in `auto` mode, "1" sends decode's few (token, choice) pairs
    # to the grouped kernel (interpret mode here), "0" keeps XLA's gather + dequantize + dot;
    # both agree with the reference. Another value is an error that names the variable.
    from pallas_kernels import qmatmul as qk

    calls = []
    real = qk.grouped_qmatmul
    monkeypatch.setattr(
        qk, "grouped_qmatmul", lambda *a, **kw: calls.append(a[1]) or real(*a, **kw)
    )
    e, n, k = 6, 24, 512
    w = _weight("Q4_K", e * n, k, seed=11)
    w = jax.tree.map(lambda a: a.reshape(e, n, *a.shape[1:]), w)
    ids = jnp.array([[4, 1, 3]], jnp.int32)
    x = random_x((1, k), jnp.float32, seed=12)
    with ops.use_kernels("reference"):
        ref = ops.expert_matmul(x, w, ids)
    for env, expect in (("1", ["Q4_K"]), ("0", [])):
        monkeypatch.setenv("GEMMA4_JAX_GROUPED_DECODE", env)
        calls.clear()
        with ops.use_kernels("auto"):
            out = ops.expert_matmul(x, w, ids)
        assert calls == expect, env
        _check(out.reshape(3, n), ref.reshape(3, n), jnp.float32)
    # More pairs than the kernel's vector path takes (18 > 16), fewer than the experts (24):
    # batched MoE decode, which stays on XLA's gather path.
    w24 = _weight("Q4_K", 24 * n, k, seed=13)
    w24 = jax.tree.map(lambda a: a.reshape(24, n, *a.shape[1:]), w24)
    ids18 = jax.random.randint(jax.random.PRNGKey(14), (6, 3), 0, 24)
    x6 = random_x((6, k), jnp.float32, seed=15)
    calls.clear()
    monkeypatch.setenv("GEMMA4_JAX_GROUPED_DECODE", "1")
    with ops.use_kernels("auto"):
        ops.expert_matmul(x6, w24, ids18)
    assert calls == []
    monkeypatch.setenv("GEMMA4_JAX_GROUPED_DECODE", "yes")
    with pytest.raises(ValueError, match="GEMMA4_JAX_GROUPED_DECODE"), ops.use_kernels("auto"):
        ops.expert_matmul(x, w, ids)
    monkeypatch.setenv("GEMMA4_JAX_GROUPED_DECODE", "1")
    monkeypatch.setenv("GEMMA4_JAX_GROUPED_SPLIT", "two")
    with pytest.raises(ValueError, match="GEMMA4_JAX_GROUPED_SPLIT"):
        ops._grouped_sizes()
