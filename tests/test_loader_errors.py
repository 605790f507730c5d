"""Every load problem is a GGUFError naming the file and the problem (files made here)."""

import shutil

import gguf
import numpy as np
import pytest
from gguf_edit import rewrite

import gemma4_jax as g4

SRC = "dense_tiny/model.gguf"


def test_not_a_gguf(tmp_path):
    bad = tmp_path / "notes.gguf"
    bad.write_text("hello, I am not a model")
    with pytest.raises(g4.GGUFError, match="not a GGUF") as e:
        g4.load(bad)
    assert str(bad) in str(e.value)
    assert isinstance(e.value, ValueError)


def test_missing_file(tmp_path):
    with pytest.raises(g4.GGUFError, match="no such file"):
        g4.load(tmp_path / "nope.gguf")


def test_truncated(fixtures_dir, tmp_path):
    src = fixtures_dir / SRC
    cut = tmp_path / "cut.gguf"
    data = src.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(g4.GGUFError, match="truncated") as e:
        g4.load(cut)
    assert "cut.gguf" in str(e.value)
    head = tmp_path / "head.gguf"
    head.write_bytes(data[:100])  # cut inside the metadata
    with pytest.raises(g4.GGUFError, match="truncated|unreadable"):
        g4.load(head)


def test_wrong_architecture(fixtures_dir, tmp_path):
    out = rewrite(fixtures_dir / SRC, tmp_path / "llama.gguf", arch="llama")
    with pytest.raises(g4.GGUFError, match="architecture is 'llama'"):
        g4.load(out)


def test_unsupported_tensor_type(fixtures_dir, tmp_path):
    # IQ4_NL (blocks of 32, 18 bytes; a non-linear 4-bit codebook) is a ggml type this package
    # does not read.
    def to_iq4_nl(name, data, ttype, ne):
        if name == "blk.0.attn_q.weight":
            n_blocks = int(np.prod(ne)) // 32
            raw = np.random.default_rng(0).integers(0, 255, (ne[1], ne[0] // 32 * 18), np.uint8)
            assert raw.size == n_blocks * 18
            return raw, gguf.GGMLQuantizationType.IQ4_NL, ne
        return data, ttype, ne

    out = rewrite(fixtures_dir / SRC, tmp_path / "iq4nl.gguf", edit_tensor=to_iq4_nl)
    with pytest.raises(g4.GGUFError, match="IQ4_NL") as e:
        g4.load(out)
    msg = str(e.value)
    assert "blk.0.attn_q.weight" in msg and "Q8_0" in msg and "Q5_0" in msg  # lists supported


def test_missing_tensor(fixtures_dir, tmp_path):
    out = rewrite(fixtures_dir / SRC, tmp_path / "drop.gguf", drop_tensors={"blk.3.ffn_up.weight"})
    with pytest.raises(g4.GGUFError, match="missing tensor 'blk.3.ffn_up.weight'"):
        g4.load(out)


def test_wrong_shape(fixtures_dir, tmp_path):
    def shrink(name, data, ttype, ne):
        if name == "blk.2.ffn_gate.weight":
            ne = [ne[0], ne[1] // 2]
            return data.reshape(-1)[: ne[0] * ne[1]], ttype, ne
        return data, ttype, ne

    out = rewrite(fixtures_dir / SRC, tmp_path / "shape.gguf", edit_tensor=shrink)
    with pytest.raises(g4.GGUFError, match="blk.2.ffn_gate.weight.*shape"):
        g4.load(out)


def test_inconsistent_metadata(fixtures_dir, tmp_path):
    f = gguf.GGUFValueType
    out = rewrite(
        fixtures_dir / SRC,
        tmp_path / "meta.gguf",
        edit_fields={"gemma4.attention.sliding_window_pattern": ([True] * 5, f.ARRAY, f.BOOL)},
    )
    with pytest.raises(g4.GGUFError, match="inconsistent metadata.*sliding_window_pattern"):
        g4.load(out)
    out = rewrite(
        fixtures_dir / SRC, tmp_path / "meta2.gguf", drop_fields={"gemma4.attention.head_count"}
    )
    with pytest.raises(g4.GGUFError, match="head_count"):
        g4.load(out)
    out = rewrite(
        fixtures_dir / SRC,
        tmp_path / "meta3.gguf",
        edit_fields={"gemma4.attention.head_count_kv": (3, f.UINT32, None)},
    )
    with pytest.raises(g4.GGUFError, match="kv heads"):
        g4.load(out)


def test_rewrite_roundtrip_loads(fixtures_dir, tmp_path):
    """The editing helper itself must produce loadable files (else the tests above lie)."""
    out = rewrite(fixtures_dir / SRC, tmp_path / "same.gguf")
    model = g4.load(out)
    assert model.config.n_layers == 12
    shutil.rmtree(tmp_path)


@pytest.mark.parametrize(
    "name,file",
    [("e4b_tiny", "model.gguf"), ("moe_tiny", "model.gguf"), ("quant_small", "model-Q4_K_M.gguf")],
)
@pytest.mark.parametrize("piece_bytes", [None, 4096])
def test_device_repack_loads_identical_params(fixtures_dir, monkeypatch, name, file, piece_bytes):
    """The device-side block split (default on GPU hosts) and the host repack give the same
    params, bit for bit; also with the transfers cut into many small pieces."""
    import jax

    from gemma4_jax import load, quant

    if piece_bytes is not None:
        monkeypatch.setattr(quant, "TRANSFER_PIECE_BYTES", piece_bytes)

    path = fixtures_dir / name / file
    if not path.exists():
        pytest.skip(f"fixture {name}/{file} not present")
    monkeypatch.setenv("GEMMA4_JAX_DEVICE_REPACK", "0")
    host = load(path).params
    monkeypatch.setenv("GEMMA4_JAX_DEVICE_REPACK", "1")
    dev = load(path).params
    assert jax.tree.structure(host) == jax.tree.structure(dev)
    for a, b in zip(jax.tree.leaves(host), jax.tree.leaves(dev), strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8))
