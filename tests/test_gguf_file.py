"""`read_gguf` reads what `gguf.GGUFReader` reads (every fixture, every value and tensor type),
and every broken file becomes a GGUFError naming the file and the problem."""

from __future__ import annotations

import struct

import gguf
import numpy as np
import pytest

from gemma4_jax.errors import GGUFError
from gemma4_jax.gguf_file import read_gguf

V = gguf.GGUFValueType
T = gguf.GGMLQuantizationType


def _fixture_files(fixtures_dir):
    files = sorted(fixtures_dir.rglob("*.gguf"))
    assert files, f"no .gguf under {fixtures_dir}"
    return files


def assert_same_as_gguf_reader(path):
    ours = read_gguf(path)
    ref = gguf.GGUFReader(str(path))
    ref_fields = {k: f.contents() for k, f in ref.fields.items() if not k.startswith("GGUF.")}
    assert list(ours.fields) == list(ref_fields)
    for key, value in ref_fields.items():
        assert ours.fields[key] == value, key
        assert type(ours.fields[key]) is type(value), key
        if isinstance(value, list) and value:
            assert {type(x) for x in ours.fields[key]} == {type(x) for x in value}, key
    assert ours.version == ref.fields["GGUF.version"].contents()
    assert ours.alignment == ref.alignment and ours.data_start == ref.data_offset
    assert [t.name for t in ours.tensors] == [t.name for t in ref.tensors]
    for a, b in zip(ours.tensors, ref.tensors, strict=True):
        assert a.tensor_type == b.tensor_type, a.name
        assert a.shape == tuple(b.shape.tolist()), a.name
        assert a.numpy_shape == tuple(reversed(b.shape.tolist())), a.name
        assert (a.data_offset, a.n_bytes, a.n_elements) == (b.data_offset, b.n_bytes, b.n_elements)
        assert a.data.dtype == b.data.dtype and a.data.shape == b.data.shape, a.name
        assert np.array_equal(a.data.view(np.uint8), b.data.view(np.uint8)), a.name
        assert not a.data.flags.writeable
    return ours


def test_every_fixture_matches_gguf_reader(fixtures_dir):
    for path in _fixture_files(fixtures_dir):
        assert_same_as_gguf_reader(path)


def test_quantized_and_bf16_data_are_bytes(fixtures_dir):
    path = fixtures_dir / "quant_small" / "model-Q4_K_M.gguf"
    if not path.exists():
        pytest.skip("quant_small fixture not present")
    types = {t.tensor_type: t for t in read_gguf(path).tensors}
    q = types[T.Q4_K]
    assert q.data.dtype == np.uint8
    block, size = gguf.GGML_QUANT_SIZES[T.Q4_K]
    assert q.data.shape == (*q.numpy_shape[:-1], q.numpy_shape[-1] // block * size)
    ref = gguf.quants.dequantize(np.array(q.data), q.tensor_type)
    assert ref.shape == q.numpy_shape


def test_every_value_and_plain_tensor_type(tmp_path):
    path = tmp_path / "all.gguf"
    w = gguf.GGUFWriter(str(path), "test")
    scalars = {
        "u8": (200, V.UINT8),
        "i8": (-5, V.INT8),
        "u16": (60000, V.UINT16),
        "i16": (-30000, V.INT16),
        "u32": (4_000_000_000, V.UINT32),
        "i32": (-2_000_000_000, V.INT32),
        "f32": (0.1, V.FLOAT32),
        "bool": (True, V.BOOL),
        "str": ("héllo ▁ wörld", V.STRING),
        "u64": (2**63 + 5, V.UINT64),
        "i64": (-(2**62), V.INT64),
        "f64": (0.1, V.FLOAT64),
    }
    for key, (value, vtype) in scalars.items():
        w.add_key_value(f"s.{key}", value, vtype)
    arrays = {
        "u8": ([0, 1, 255], V.UINT8),
        "i16": ([-1, 2], V.INT16),
        "i32": ([1, -2, 3], V.INT32),
        "f32": ([0.5, -1.25, 0.1], V.FLOAT32),
        "f64": ([0.1, 2.0], V.FLOAT64),
        "bool": ([True, False, True], V.BOOL),
        "u64": ([2**64 - 1], V.UINT64),
        "str": (["a", "", "ü▁", "<0x0A>"], V.STRING),
    }
    for key, (value, sub) in arrays.items():
        w.add_key_value(f"a.{key}", value, V.ARRAY, sub_type=sub)
    w.add_key_value("general.alignment", 64, V.UINT32)
    rng = np.random.default_rng(0)
    for dtype in (np.float32, np.float16, np.float64, np.int8, np.int16, np.int32, np.int64):
        w.add_tensor(f"t.{np.dtype(dtype).name}", (rng.normal(size=(3, 5)) * 50).astype(dtype))
    q8 = rng.integers(0, 255, (4, 2 * 34), np.uint8)  # 4 rows of 64 Q8_0 weights
    w.add_tensor("t.q8_0", q8, raw_dtype=T.Q8_0)
    w.add_tensor("t.bf16", rng.integers(0, 255, (2, 6), np.uint8), raw_dtype=T.BF16)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    f = assert_same_as_gguf_reader(path)
    assert f.alignment == 64 and f.data_start % 64 == 0
    assert f.fields["s.u64"] == 2**63 + 5 and f.fields["a.str"][2] == "ü▁"
    t = {t.name: t for t in f.tensors}
    assert t["t.q8_0"].shape == (64, 4) and t["t.q8_0"].data.shape == (4, 68)
    assert t["t.bf16"].shape == (3, 2) and t["t.bf16"].data.dtype == np.uint8
    assert t["t.int16"].data.dtype == np.int16 and t["t.int16"].data.shape == (3, 5)


def test_nested_arrays_stay_nested(tmp_path):
    # GGUFReader flattens an array of arrays; read_gguf keeps the structure.
    path = tmp_path / "nested.gguf"
    w = gguf.GGUFWriter(str(path), "test")
    w.add_key_value("n.ints", [[1, 2], [3]], V.ARRAY)
    w.add_key_value("n.strs", [["a", "b"], ["c"]], V.ARRAY)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    fields = read_gguf(path).fields
    assert fields["n.ints"] == [[1, 2], [3]] and fields["n.strs"] == [["a", "b"], ["c"]]


# ---------------------------------------------------------------------------- broken files


def _str(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def _gguf(kvs=(), tensors=(), *, version=3, data=b"") -> bytes:
    """A GGUF written by hand: kvs are (key, type code, payload bytes), tensors are
    (name, ne, ggml type id, offset); the data section follows at 32-byte alignment."""
    out = b"GGUF" + struct.pack("<IQQ", version, len(tensors), len(kvs))
    for key, vtype, payload in kvs:
        out += _str(key) + struct.pack("<I", vtype) + payload
    for name, ne, ttype, offset in tensors:
        out += _str(name) + struct.pack(f"<I{len(ne)}QIQ", len(ne), *ne, ttype, offset)
    return out + b"\0" * (-len(out) % 32) + data


def _write(tmp_path, name, blob: bytes):
    path = tmp_path / name
    path.write_bytes(blob)
    return path


def test_hand_written_file_reads(tmp_path):
    kvs = [
        ("k.s", 8, _str("v")),
        ("k.a", 9, struct.pack("<IQ", 4, 2) + struct.pack("<2I", 7, 9)),
        ("k.empty", 9, struct.pack("<IQ", 8, 0)),  # GGUFWriter cannot write an empty array
    ]
    data = np.arange(6, dtype=np.float32).tobytes()
    path = _write(tmp_path, "ok.gguf", _gguf(kvs, [("w", (3, 2), 0, 0)], data=data))
    f = assert_same_as_gguf_reader(path)
    assert f.fields == {"k.s": "v", "k.a": [7, 9], "k.empty": []}
    assert f.tensors[0].data.tolist() == [[0, 1, 2], [3, 4, 5]]


def test_missing_file(tmp_path):
    with pytest.raises(GGUFError, match="no such file"):
        read_gguf(tmp_path / "nope.gguf")


@pytest.mark.parametrize("blob", [b"", b"GGU", b"hello, I am not a model", b"ggufxxxxxxxx"])
def test_bad_magic(tmp_path, blob):
    path = _write(tmp_path, "bad.gguf", blob)
    with pytest.raises(GGUFError, match=r"not a GGUF file \(magic .*, expected b'GGUF'\)") as e:
        read_gguf(path)
    assert str(path) in str(e.value)


def test_big_endian_and_unknown_versions(tmp_path):
    big = _write(tmp_path, "be.gguf", b"GGUF" + struct.pack(">IQQ", 3, 0, 0))
    with pytest.raises(GGUFError, match="big-endian"):
        read_gguf(big)
    for version, msg in [(1, "version 1 is not supported"), (99, "unsupported GGUF version 99")]:
        path = _write(tmp_path, f"v{version}.gguf", _gguf(version=version))
        with pytest.raises(GGUFError, match=msg) as e:
            read_gguf(path)
        assert str(path) in str(e.value)


def test_truncated_header(fixtures_dir, tmp_path):
    data = (fixtures_dir / "dense_tiny" / "model.gguf").read_bytes()
    end_of_header = read_gguf(fixtures_dir / "dense_tiny" / "model.gguf").data_start
    # Inside the counts, inside the metadata (the tokenizer), inside the tensor table.
    for cut in (10, 100, end_of_header // 2, end_of_header - 40):
        path = _write(tmp_path, f"cut{cut}.gguf", data[:cut])
        with pytest.raises(GGUFError, match="unreadable or truncated GGUF") as e:
            read_gguf(path)
        assert str(path) in str(e.value) and f"the file has {cut}" in str(e.value)


def test_truncated_string_array(tmp_path):
    # A string array whose count promises more strings than the file holds.
    kvs = [("tok", 9, struct.pack("<IQ", 8, 1000) + _str("a") * 3)]
    path = _write(tmp_path, "strs.gguf", _gguf(kvs))
    with pytest.raises(GGUFError, match="unreadable or truncated.*'tok'"):
        read_gguf(path)


def test_truncated_tensor_data(fixtures_dir, tmp_path):
    src = fixtures_dir / "dense_tiny" / "model.gguf"
    data = src.read_bytes()
    path = _write(tmp_path, "half.gguf", data[: len(data) // 2])
    first_cut = next(
        t for t in read_gguf(src).tensors if t.data_offset + t.n_bytes > len(data) // 2
    )
    end = first_cut.data_offset + first_cut.n_bytes
    with pytest.raises(GGUFError) as e:
        read_gguf(path)
    assert str(e.value) == (
        f"{path}: truncated: tensor {first_cut.name!r} ends at byte {end} but the file has "
        f"{len(data) // 2} bytes"
    )


def test_unknown_value_type(tmp_path):
    path = _write(tmp_path, "vt.gguf", _gguf([("odd.key", 13, b"\0" * 8)]))
    with pytest.raises(GGUFError, match="'odd.key' has unknown value type 13") as e:
        read_gguf(path)
    assert str(path) in str(e.value)
    path = _write(tmp_path, "avt.gguf", _gguf([("odd.arr", 9, struct.pack("<IQ", 42, 1))]))
    with pytest.raises(GGUFError, match="'odd.arr' has unknown value type 42"):
        read_gguf(path)


def test_unknown_ggml_type(tmp_path):
    path = _write(tmp_path, "gt.gguf", _gguf(tensors=[("blk.0.w", (4,), 999, 0)], data=b"\0" * 64))
    with pytest.raises(GGUFError, match="tensor 'blk.0.w' has unknown or unsupported ggml type id"):
        read_gguf(path)


def test_invalid_utf8_value_names_the_key(tmp_path):
    path = _write(tmp_path, "utf.gguf", _gguf([("tokenizer.ggml.model", 8, _str(b"\xff\xfe"))]))
    with pytest.raises(GGUFError, match="metadata 'tokenizer.ggml.model' is not valid UTF-8"):
        read_gguf(path)


def test_invalid_utf8_outside_the_tokenizer_is_replaced(tmp_path):
    """llama.cpp writes names and descriptions unchecked: a bad byte there must not make the
    file unreadable (the old loader skipped such fields); the text keeps its other characters."""
    path = _write(tmp_path, "name.gguf", _gguf([("general.name", 8, _str(b"ab\xffc"))]))
    assert read_gguf(path).fields["general.name"] == "ab\ufffdc"


def test_deeply_nested_arrays_are_a_gguf_error(tmp_path):
    depth = 200  # arrays of arrays, each holding one array, then an empty uint8 array
    value = struct.pack("<IQ", 4, 0)
    for _ in range(depth):
        value = struct.pack("<IQ", 9, 1) + value
    path = _write(tmp_path, "deep.gguf", _gguf([("x", 9, value)]))
    with pytest.raises(GGUFError, match="nests arrays deeper"):
        read_gguf(path)


def test_bad_alignment_and_duplicates(tmp_path):
    bad_align = _gguf([("general.alignment", 4, struct.pack("<I", 24))])
    with pytest.raises(GGUFError, match="general.alignment"):
        read_gguf(_write(tmp_path, "al.gguf", bad_align))
    dup_key = _gguf([("a", 4, b"\0" * 4), ("a", 4, b"\0" * 4)])
    with pytest.raises(GGUFError, match="'a' appears twice"):
        read_gguf(_write(tmp_path, "dk.gguf", dup_key))
    dup_tensor = _gguf(tensors=[("w", (1,), 0, 0), ("w", (1,), 0, 0)], data=b"\0" * 32)
    with pytest.raises(GGUFError, match="tensor 'w' appears twice"):
        read_gguf(_write(tmp_path, "dt.gguf", dup_tensor))
