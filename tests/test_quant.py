"""gemma4_jax.quant against gguf-py: bit-exact dequantization, pytree behaviour, matmul."""

import concurrent.futures
import dataclasses
import functools

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from gemma4_jax import quant
from gemma4_jax.errors import GGUFError

TYPES = quant.SUPPORTED_TYPES
DENSE = ("F32", "F16", "BF16")
# Byte offsets of the f16 scales inside each ggml block (everything else may be random bits).
F16_OFFSETS = {
    "Q8_0": (0,),
    "Q4_0": (0,),
    "Q4_1": (0, 2),
    "Q5_0": (0,),
    "Q5_1": (0, 2),
    "Q4_K": (0, 2),
    "Q5_K": (0, 2),
    "Q6_K": (208,),
}
# Fields of each type, as in docs/LAYOUT.md: name -> (dtype, elements per row per K element).
LAYOUT = {
    "F32": {"w": (np.float32, 1)},
    "F16": {"w": (np.float16, 1)},
    "BF16": {"w": (jnp.bfloat16, 1)},
    "Q8_0": {"qs": (np.int8, 1), "d": (np.float16, 1 / 32)},
    "Q4_0": {"qs": (np.uint8, 1 / 2), "d": (np.float16, 1 / 32)},
    "Q4_1": {"qs": (np.uint8, 1 / 2), "d": (np.float16, 1 / 32), "m": (np.float16, 1 / 32)},
    "Q5_0": {"qs": (np.uint8, 1 / 2), "qh": (np.uint32, 1 / 32), "d": (np.float16, 1 / 32)},
    "Q5_1": {
        "qs": (np.uint8, 1 / 2),
        "qh": (np.uint32, 1 / 32),
        "d": (np.float16, 1 / 32),
        "m": (np.float16, 1 / 32),
    },
    "Q4_K": {
        "qs": (np.uint8, 1 / 2),
        "d": (np.float16, 1 / 256),
        "dmin": (np.float16, 1 / 256),
        "sc": (np.uint8, 1 / 32),
        "m": (np.uint8, 1 / 32),
    },
    "Q5_K": {
        "qs": (np.uint8, 1 / 2),
        "qh": (np.uint8, 1 / 8),
        "d": (np.float16, 1 / 256),
        "dmin": (np.float16, 1 / 256),
        "sc": (np.uint8, 1 / 32),
        "m": (np.uint8, 1 / 32),
    },
    "Q6_K": {
        "ql": (np.uint8, 1 / 2),
        "qh": (np.uint8, 1 / 4),
        "sc": (np.int8, 1 / 16),
        "d": (np.float16, 1 / 256),
    },
}
QUANT_FILES = ["BF16", "F16", "Q8_0", "Q4_0", "Q4_K_M", "Q5_K_M", "Q6_K"]

_dequantize_jit = jax.jit(lambda t: t.dequantize())


def _bits(a) -> np.ndarray:
    """f32 array as uint32, so comparisons are bit-exact (signed zeros, NaN payloads)."""
    a = np.asarray(a)
    assert a.dtype == np.float32, a.dtype
    return a.view(np.uint32)


def _random_floats(rng, n, lo_exp, hi_exp, dtype) -> np.ndarray:
    """Finite normal-distributed values spread over magnitudes 10**lo_exp .. 10**hi_exp
    (so subnormals and zeros of `dtype` occur too)."""
    x = rng.standard_normal(n) * 10.0 ** rng.uniform(lo_exp, hi_exp, n)
    out = x.astype(np.float32).astype(dtype)
    assert np.isfinite(out.astype(np.float32)).all()
    return out


def random_raw(type_name: str, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Raw ggml bytes `[..., N, bytes per row]` for a tensor of logical `shape`: random code
    bits with finite random f16 scales (dense types: random finite values)."""
    rng = np.random.default_rng(seed)
    n = int(np.prod(shape))
    if type_name in DENSE:
        lo, hi, dtype = {
            "F32": (-40, 30, np.float32),
            "F16": (-8, 3, np.float16),
            "BF16": (-40, 30, jnp.bfloat16),
        }[type_name]
        vals = _random_floats(rng, n, lo, hi, dtype)
        return vals.view(np.uint8).reshape(*shape[:-1], -1)
    block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType[type_name]]
    blocks = rng.integers(0, 256, size=(*shape[:-1], shape[-1] // block, type_size), dtype=np.uint8)
    for off in F16_OFFSETS[type_name]:
        d = _random_floats(rng, blocks[..., 0].size, -8, 3, np.float16)
        blocks[..., off : off + 2] = d.view(np.uint8).reshape(*blocks.shape[:-1], 2)
    return blocks.reshape(*shape[:-1], -1)


def gguf_reference(raw: np.ndarray, type_name: str, shape) -> np.ndarray:
    return gguf.quants.dequantize(raw, GGMLQuantizationType[type_name]).reshape(shape)


def make(type_name: str, shape, seed: int = 0) -> tuple[quant.QTensor, np.ndarray]:
    raw = random_raw(type_name, shape, seed)
    return (
        quant.from_gguf(raw, GGMLQuantizationType[type_name], shape),
        gguf_reference(raw, type_name, shape),
    )


# ---------------------------------------------------------------------------------------------
# Bit-exactness
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("file_type", QUANT_FILES)
def test_fixture_files_bit_exact(fixtures_dir, file_type):
    path = fixtures_dir / "quant_small" / f"model-{file_type}.gguf"
    if not path.exists():
        pytest.skip(f"{path} missing")
    reader = gguf.GGUFReader(path)
    seen_types = set()
    for t in reader.tensors:
        shape = tuple(int(s) for s in reversed(t.shape.tolist()))  # ggml ne -> numpy order
        q = quant.from_gguf(t.data, t.tensor_type, shape, name=t.name)
        assert q.ggml_type == t.tensor_type.name
        assert q.shape == shape
        assert all(isinstance(a, np.ndarray) for a in q.arrays())
        want = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape)
        got = _dequantize_jit(q)
        np.testing.assert_array_equal(_bits(got), _bits(want), err_msg=t.name)
        seen_types.add(q.ggml_type)
    assert len(seen_types) >= 2  # every file mixes F32 norms with its main type


@pytest.mark.parametrize("type_name", TYPES)
def test_random_bit_exact(type_name):
    k = 96 if type_name in ("Q8_0", "Q4_0") else 512  # 32-blocks: K need not be a multiple of 256
    shape = (3, 5, k)
    q, want = make(type_name, shape)
    np.testing.assert_array_equal(_bits(q.dequantize()), _bits(want))  # eager, numpy fields
    np.testing.assert_array_equal(_bits(_dequantize_jit(q)), _bits(want))
    q_dev = jax.device_put(q)
    assert all(isinstance(a, jax.Array) for a in jax.tree.leaves(q_dev))
    np.testing.assert_array_equal(_bits(_dequantize_jit(q_dev)), _bits(want))


@pytest.mark.parametrize("type_name", TYPES)
def test_dequantize_dtype(type_name):
    q, want = make(type_name, (4, 256))
    got = jax.jit(lambda t: t.dequantize(jnp.bfloat16))(q)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got), want.astype(jnp.bfloat16))


def test_dense_from_typed_arrays():
    """GGUFReader gives F32/F16 as typed arrays (and BF16 as bytes); any of them must work."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((6, 64)).astype(np.float32)
    for type_name, arr in [
        ("F32", w),
        ("F16", w.astype(np.float16)),
        ("BF16", w.astype(jnp.bfloat16)),
        ("BF16", w.astype(jnp.bfloat16).view(np.uint16)),
        ("BF16", w.astype(jnp.bfloat16).view(np.uint8)),
    ]:
        q = quant.from_gguf(arr, GGMLQuantizationType[type_name], (6, 64))
        assert q.shape == (6, 64)
        want = gguf_reference(arr.view(np.uint8), type_name, (6, 64))
        np.testing.assert_array_equal(_bits(q.dequantize()), _bits(want))


# ---------------------------------------------------------------------------------------------
# Layout, shape, nbytes
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("type_name", TYPES)
def test_fields_follow_layout(type_name):
    shape = (2, 3, 512)
    q, _ = make(type_name, shape)
    cls = type(q)
    assert cls.__name__ == cls.ggml_type == type_name
    block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType[type_name]]
    assert cls.block_size == block
    names = [f.name for f in dataclasses.fields(q)]
    assert names == list(LAYOUT[type_name])
    assert len(jax.tree.leaves(q)) == len(names)  # every field is a pytree child
    fields = dict(zip(names, q.arrays(), strict=True))
    for name, (dtype, per_k) in LAYOUT[type_name].items():
        a = fields[name]
        assert a.dtype == np.dtype(dtype), name
        assert a.shape == (2, 3, int(512 * per_k)), name
    assert q.shape == shape and q.ndim == 3
    assert q.nbytes == sum(a.nbytes for a in q.arrays())
    raw_bytes = 2 * 3 * 512 // block * type_size
    # Unpacking the K-quants' 12 bytes of 6-bit scales/mins into 16 bytes is the only growth.
    extra = {"Q4_K": 4, "Q5_K": 4}.get(type_name, 0) * 2 * 3 * 2
    assert q.nbytes == raw_bytes + extra


def test_shape_of_abstract_tree():
    q, _ = make("Q4_K", (3, 5, 512))
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), q)
    assert type(abstract) is quant.Q4_K and abstract.shape == (3, 5, 512)
    assert abstract.nbytes == q.nbytes
    out = jax.eval_shape(lambda t: t.dequantize(jnp.bfloat16), q)
    assert out.shape == (3, 5, 512) and out.dtype == jnp.bfloat16
    assert "Q4_K(shape=(3, 5, 512)" in repr(q)


# ---------------------------------------------------------------------------------------------
# take_rows, stack, scan
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("type_name", TYPES)
def test_take_rows(type_name):
    q, want = make(type_name, (7, 256))
    ids = np.array([[3, 0, 6], [3, 3, 1]], np.int32)
    rows = q.take_rows(ids)
    assert type(rows) is type(q) and rows.shape == (2, 3, 256)
    np.testing.assert_array_equal(_bits(rows.dequantize()), _bits(want[ids]))
    got = jax.jit(lambda t, i: t.take_rows(i).dequantize())(q, jnp.asarray(ids[0]))
    np.testing.assert_array_equal(_bits(got), _bits(want[ids[0]]))
    scalar = q.take_rows(np.int32(5))
    assert scalar.shape == (256,)
    np.testing.assert_array_equal(_bits(scalar.dequantize()), _bits(want[5]))


@pytest.mark.parametrize("type_name", TYPES)
def test_stack_then_slice(type_name):
    parts = [make(type_name, (4, 256), seed=s) for s in range(3)]
    stacked = quant.stack([p for p, _ in parts])
    assert type(stacked) is type(parts[0][0]) and stacked.shape == (3, 4, 256)
    assert all(isinstance(a, np.ndarray) for a in stacked.arrays())  # numpy in, numpy out
    for i, (p, want) in enumerate(parts):
        sliced = jax.tree.map(lambda a, i=i: a[i], stacked)
        for a, b in zip(sliced.arrays(), p.arrays(), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        np.testing.assert_array_equal(_bits(sliced.dequantize()), _bits(want))
    on_device = quant.stack([jax.device_put(p) for p, _ in parts])
    assert all(isinstance(a, jax.Array) for a in on_device.arrays())
    assert on_device.shape == (3, 4, 256)


@pytest.mark.parametrize("pieces", ["whole", "pieces"])
@pytest.mark.parametrize("type_name", TYPES)
def test_device_repack_is_bit_identical(type_name, pieces, monkeypatch):
    """The loader's device-side block split (GPU hosts) gives the host repack's exact fields,
    single and stacked, also when the bytes travel in pieces (3, 3 and 2 rows here) through a
    thread pool."""
    shape = (8, 512)
    raws = [random_raw(type_name, shape, seed=s) for s in range(3)]
    host = [quant.from_gguf(r, type_name, shape) for r in raws]
    transfer = None
    if pieces == "pieces":
        block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType[type_name]]
        row_bytes = shape[-1] // block * type_size
        monkeypatch.setattr(quant, "TRANSFER_PIECE_BYTES", 3 * row_bytes + 1)
        flat = np.asarray(raws[0]).reshape(-1).view(np.uint8)
        assert [p.size for p in quant._row_pieces(flat, row_bytes)] == [3 * row_bytes] * 2 + [
            2 * row_bytes
        ]
        pool = concurrent.futures.ThreadPoolExecutor(4)
        transfer = functools.partial(pool.submit, jax.device_put)
    one = quant.from_gguf_on_device(raws[:1], type_name, shape, stacked=False, transfer=transfer)
    many = quant.from_gguf_on_device(raws, type_name, shape, stacked=True, transfer=transfer)
    for got, want in ((one, host[0]), (many, quant.stack(host))):
        assert type(got) is type(want) and got.shape == want.shape
        for a, b in zip(got.arrays(), want.arrays(), strict=True):
            assert a.dtype == b.dtype and a.shape == b.shape
            np.testing.assert_array_equal(
                np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8)
            )
    with pytest.raises(GGUFError, match="needs"):
        quant.from_gguf_on_device([raws[0][:-1]], type_name, shape, stacked=False)


def test_stack_rejects_mixed():
    a, _ = make("Q4_K", (4, 256))
    b, _ = make("Q6_K", (4, 256))
    c, _ = make("Q4_K", (2, 256))
    with pytest.raises(ValueError, match="one type and shape"):
        quant.stack([a, b])
    with pytest.raises(ValueError, match="one type and shape"):
        quant.stack([a, c])
    with pytest.raises(ValueError):
        quant.stack([])


@pytest.mark.parametrize("type_name", TYPES)
def test_scan_over_leading_axis(type_name):
    q, want = make(type_name, (3, 5, 256))

    @jax.jit
    def run(stacked):
        def body(carry, layer):
            assert type(layer) is type(stacked) and layer.shape == (5, 256)
            return carry + 1, layer.dequantize()

        return jax.lax.scan(body, 0, stacked)

    n, per_layer = run(q)
    assert int(n) == 3
    np.testing.assert_array_equal(_bits(per_layer), _bits(want))


# ---------------------------------------------------------------------------------------------
# matmul_reference
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("type_name", TYPES)
def test_matmul_reference(type_name):
    q, w = make(type_name, (16, 512))
    x = np.random.default_rng(7).standard_normal((2, 3, 512)).astype(np.float32)
    bound = np.abs(x).astype(np.float64) @ np.abs(w).astype(np.float64).T

    y = jax.jit(quant.matmul_reference)(jnp.asarray(x), q)
    assert y.shape == (2, 3, 16) and y.dtype == jnp.float32
    want = x @ w.T  # numpy f32
    # f32 accumulation of 512 products: the error relative to sum |x_k w_nk| stays far below
    # 1e-5 (the tiny atol only covers outputs that cancel to ~0). The random data of Q4_1, Q5_0
    # and Q5_1 has outputs nearer 0 (seen: error 1.1e-7 of the bound, 4.5e-5 of the output),
    # hence their larger atol; the per-element bound check below is the same for every type.
    atol = (1e-6 if type_name in ("Q4_1", "Q5_0", "Q5_1") else 1e-8) * bound.max()
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=atol)
    assert np.all(np.abs(np.asarray(y, np.float64) - want) <= 1e-5 * bound)

    x16 = jnp.asarray(x, jnp.bfloat16)
    y16 = quant.matmul_reference(x16, q)
    assert y16.dtype == jnp.bfloat16
    exact = np.asarray(x16, np.float64) @ w.astype(np.float64).T
    # bf16 tolerance: the weight is rounded to bf16 (relative 2^-8 per product) and so is the
    # output (relative 2^-8 of |y| <= sum |x w|); f32 accumulation adds ~512 * 2^-24.
    tol = (2.0**-7 + 512 * 2.0**-24) * np.abs(np.asarray(x16, np.float64)) @ np.abs(w).T
    assert np.all(np.abs(np.asarray(y16, np.float64) - exact) <= tol + 1e-30)


def test_matmul_reference_rejects_bad_shapes():
    q3, _ = make("Q8_0", (2, 4, 64))
    with pytest.raises(ValueError, match="2-D"):
        quant.matmul_reference(jnp.ones((3, 64)), q3)
    q2, _ = make("Q8_0", (4, 64))
    with pytest.raises(ValueError, match="contract"):
        quant.matmul_reference(jnp.ones((3, 32)), q2)


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ggml_type", ["Q2_K", "IQ4_NL", "Q8_1", "IQ4_XS", "TQ1_0"])
def test_unsupported_type(ggml_type):
    raw = np.zeros((4, 64), np.uint8)
    with pytest.raises(quant.UnsupportedTensorType) as exc:
        quant.from_gguf(raw, GGMLQuantizationType[ggml_type], (4, 256), name="blk.0.ffn_up")
    assert isinstance(exc.value, ValueError) and isinstance(exc.value, GGUFError)
    msg = str(exc.value)
    assert ggml_type in msg and "blk.0.ffn_up" in msg
    for name in quant.SUPPORTED_TYPES:
        assert name in msg


def test_unknown_type_id():
    with pytest.raises(quant.UnsupportedTensorType, match="9999"):
        quant.from_gguf(np.zeros(4, np.uint8), 9999, (4,))


def test_size_mismatch():
    raw = random_raw("Q4_K", (2, 512))
    with pytest.raises(GGUFError, match="needs 576 bytes"):
        quant.from_gguf(raw[:, :-1], GGMLQuantizationType.Q4_K, (2, 512), name="t")
    with pytest.raises(GGUFError, match="not a multiple of its block size 256"):
        quant.from_gguf(raw, GGMLQuantizationType.Q4_K, (2, 288))
