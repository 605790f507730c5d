"""builtin:tiny and write_gemma4_gguf: real gemma4 GGUFs that mirror the fixtures' layout.

Expected shapes are derived here from docs/gemma4.md independently of builtin.tensor_plan, and
names/keys are compared with the llama.cpp-converted fixtures.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path

import gguf
import numpy as np
import pytest

from gemma4_jax import builtin
from gemma4_jax.builtin import BUILTINS, REAL_SPECS, TinySpec, tensor_plan, write_gemma4_gguf
from gemma4_jax.errors import ConfigError

# builtin name -> the fixture with the same structure
FIXTURE_OF = {
    "tiny": "e4b_tiny",
    "tiny-e2b": "e2b_tiny",
    "tiny-dense": "dense_tiny",
    "tiny-moe": "moe_tiny",
}
# Keys whose values legitimately differ from the fixture (name, size, context, window, type).
DIFFERENT_VALUES = {
    "general.name",
    "general.size_label",
    "general.file_type",
    "gemma4.context_length",
    "gemma4.attention.sliding_window",
}


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("g4cache")
    old = os.environ.get("GEMMA4_JAX_CACHE")
    os.environ["GEMMA4_JAX_CACHE"] = str(path)
    yield path
    if old is None:
        del os.environ["GEMMA4_JAX_CACHE"]
    else:
        os.environ["GEMMA4_JAX_CACHE"] = old


@pytest.fixture(scope="module")
def tiny(cache) -> Path:
    return builtin.builtin_path("tiny")


def _reader(path) -> gguf.GGUFReader:
    return gguf.GGUFReader(str(path))


def _tensors(r: gguf.GGUFReader) -> dict:
    return {t.name: t for t in r.tensors}


def _np_shape(t) -> tuple[int, ...]:
    return tuple(int(x) for x in reversed(t.shape))  # reader shapes are ggml order


def expected_shapes(spec: TinySpec) -> dict[str, tuple[int, ...]]:
    """Numpy shapes from docs/gemma4.md's tensor list (ggml order reversed)."""
    L, D, V, P, H = spec.n_layers, spec.d_model, spec.vocab_size, spec.ple_dim, spec.n_heads
    out = {"rope_freqs.weight": (spec.head_dim_global // 2,), "token_embd.weight": (V, D)}
    out["output_norm.weight"] = (D,)
    if P:
        out["per_layer_token_embd.weight"] = (V, L * P)
        out["per_layer_model_proj.weight"] = (L * P, D)
        out["per_layer_proj_norm.weight"] = (P,)
    first_shared = L - spec.shared_kv_layers
    for l in range(L):
        sliding = (l + 1) % spec.sliding_period != 0
        dh = spec.head_dim if sliding else spec.head_dim_global
        hk = (
            spec.n_kv_heads if sliding or spec.n_kv_heads_global is None else spec.n_kv_heads_global
        )
        F = spec.ffn[l] if isinstance(spec.ffn, tuple) else spec.ffn
        b = f"blk.{l}."
        for n in ("attn_norm", "post_attention_norm", "ffn_norm", "post_ffw_norm"):
            out[b + n + ".weight"] = (D,)
        out[b + "layer_output_scale.weight"] = (1,)
        out[b + "attn_q.weight"] = (H * dh, D)
        out[b + "attn_q_norm.weight"] = (dh,)
        out[b + "attn_output.weight"] = (D, H * dh)
        if l < first_shared:
            out[b + "attn_k.weight"] = (hk * dh, D)
            out[b + "attn_k_norm.weight"] = (dh,)
            if sliding or not spec.k_eq_v:
                out[b + "attn_v.weight"] = (hk * dh, D)
        out[b + "ffn_gate.weight"] = (F, D)
        out[b + "ffn_up.weight"] = (F, D)
        out[b + "ffn_down.weight"] = (D, F)
        if P:
            out[b + "inp_gate.weight"] = (P, D)
            out[b + "proj.weight"] = (D, P)
            out[b + "post_norm.weight"] = (D,)
        if spec.n_experts:
            E, Fe = spec.n_experts, spec.expert_ffn
            out[b + "ffn_gate_inp.weight"] = (E, D)
            out[b + "ffn_gate_inp.scale"] = (D,)
            out[b + "ffn_gate_up_exps.weight"] = (E, 2 * Fe, D)
            out[b + "ffn_down_exps.weight"] = (E, D, Fe)
            out[b + "ffn_down_exps.scale"] = (E,)
            for n in ("pre_ffw_norm_2", "post_ffw_norm_1", "post_ffw_norm_2"):
                out[b + n + ".weight"] = (D,)
    return out


# ---------------------------------------------------------------------------------------------
# builtin:tiny


def test_tiny_has_every_key_and_tensor_of_e4b_tiny(tiny, fixtures_dir):
    r, f = _reader(tiny), _reader(fixtures_dir / "e4b_tiny" / "model.gguf")
    assert list(r.fields) == list(f.fields)  # same keys, same order
    for key, field in f.fields.items():
        assert r.fields[key].types == field.types, key
    rt, ft = _tensors(r), _tensors(f)
    assert set(rt) == set(ft)
    spec = BUILTINS["tiny"][0]
    for name, t in ft.items():
        want = _np_shape(t)
        if name in ("token_embd.weight", "per_layer_token_embd.weight"):
            want = (spec.vocab_size, *want[1:])  # only the vocabulary differs
        assert _np_shape(rt[name]) == want, name


def test_tiny_metadata_values(tiny, fixtures_dir):
    r = _reader(tiny)
    meta = {k: v.contents() for k, v in r.fields.items() if not k.startswith("GGUF.")}
    fixture = _reader(fixtures_dir / "e4b_tiny" / "model.gguf")
    for k, field in fixture.fields.items():
        if k.startswith(("GGUF.", "tokenizer.ggml.")) or k in DIFFERENT_VALUES:
            continue
        assert meta[k] == field.contents(), k
    assert meta["general.architecture"] == "gemma4"
    assert meta["general.name"] == "gemma4-jax builtin tiny (random weights)"
    assert meta["general.file_type"] == 7  # MOSTLY_Q8_0
    assert meta["gemma4.context_length"] == 2048
    assert meta["gemma4.attention.sliding_window"] == 16
    assert meta["gemma4.attention.sliding_window_pattern"] == [True] * 5 + [False] + [True] * 5 + [
        False
    ]
    assert meta["gemma4.final_logit_softcapping"] == 30.0
    assert meta["gemma4.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6)


def test_tiny_tensor_types_and_values(tiny):
    ts = _tensors(_reader(tiny))
    for name, t in ts.items():
        # llama-quantize leaves per_layer_model_proj as the converter wrote it (F32).
        small = len(t.shape) == 1 or name == "per_layer_model_proj.weight"
        want = "F32" if small else "Q8_0"
        assert t.tensor_type.name == want, name
    rope = np.asarray(ts["rope_freqs.weight"].data)
    assert rope.shape == (32,)
    np.testing.assert_array_equal(rope[:8], 1.0)  # dh_global / 8 rotated pairs
    np.testing.assert_array_equal(rope[8:], np.float32(1e30))
    scales = np.array(
        [np.asarray(ts[f"blk.{l}.layer_output_scale.weight"].data)[0] for l in range(12)]
    )
    assert np.all((scales >= 0.5) & (scales <= 1.5)) and scales.std() > 0.05
    norm = np.asarray(ts["blk.3.attn_norm.weight"].data)
    assert 0.9 < norm.mean() < 1.1 and 0.1 < norm.std() < 0.3
    emb = gguf.quants.dequantize(
        np.asarray(ts["token_embd.weight"].data), gguf.GGMLQuantizationType.Q8_0
    )
    assert np.all(emb[0] == 0)  # <pad> row, as HF's padding_idx
    assert emb[1:].std() == pytest.approx(2 / 128**0.5, rel=0.05)
    # Quantized from float draws by gguf.quants (not synthesized): every block reaches +-127.
    raw = np.asarray(ts["blk.0.attn_q.weight"].data).reshape(-1, 34)
    qs = raw[:, 2:].view(np.int8)
    assert np.all(np.abs(qs).max(axis=1) == 127)


def test_tiny_tokenizer_fields(tiny, fixtures_dir):
    r = _reader(tiny)
    tokens = r.fields["tokenizer.ggml.tokens"].contents()
    types = r.fields["tokenizer.ggml.token_type"].contents()
    scores = r.fields["tokenizer.ggml.scores"].contents()
    merges = r.fields["tokenizer.ggml.merges"].contents()
    assert len(tokens) == len(types) == len(scores) == BUILTINS["tiny"][0].vocab_size
    assert len(set(tokens)) == len(tokens)
    import json

    meta = json.loads((fixtures_dir / "tokenizer" / "meta.json").read_text())
    for tok, i in meta["tokenizer"]["special_tokens"].items():
        assert tokens[i] == tok
    fixture_types = _reader(fixtures_dir / "e4b_tiny" / "model.gguf").fields
    assert types[:273] == fixture_types["tokenizer.ggml.token_type"].contents()[:273]
    assert tokens[17:273] == [f"<0x{b:02X}>" for b in range(256)]
    assert set(types[273:]) <= {1, 5}  # NORMAL (and UNUSED padding)
    ids = {t: i for i, t in enumerate(tokens)}
    for rank, m in enumerate(merges):
        a, b = m.split(" ")
        assert a in ids and b in ids and a + b in ids, (rank, m)
        assert ids[a + b] > max(ids[a], ids[b]) >= 273
    assert len(merges) > 1000
    assert any(t.startswith("\u2581") for t in tokens) and " " not in "".join(tokens)
    f = r.fields
    assert f["tokenizer.ggml.model"].contents() == "gemma4"
    assert f["tokenizer.ggml.bos_token_id"].contents() == 2
    assert f["tokenizer.ggml.eos_token_id"].contents() == 1
    assert f["tokenizer.ggml.padding_token_id"].contents() == 0
    assert f["tokenizer.ggml.add_bos_token"].contents() is True
    assert f["tokenizer.ggml.add_space_prefix"].contents() is False
    template = fixture_types["tokenizer.chat_template"].contents()
    assert f["tokenizer.chat_template"].contents() == template == builtin.CHAT_TEMPLATE


def test_tiny_vocab_works_with_the_project_tokenizer(tiny):
    from gemma4_jax.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf(tiny)
    text = "The morning train left at 7:45, and nobody was in a hurry. Überraschung!"
    ids = tok.encode(text)
    assert ids[0] == 2 and len(ids) < len(text) // 2  # merges apply
    assert tok.decode(ids[1:]) == text  # byte fallback covers the rest


def test_built_once_per_cache_dir(cache, tiny):
    assert tiny.parent == cache
    assert f"-v{builtin.FORMAT_VERSION}-" in tiny.name
    before = tiny.stat().st_mtime_ns
    assert builtin.builtin_path("tiny") == tiny
    assert builtin.resolve_model("builtin:tiny") == tiny
    assert tiny.stat().st_mtime_ns == before  # not rewritten
    assert not [p for p in cache.iterdir() if p.name.endswith(".tmp")]


def test_builtin_rebuilds_in_a_new_cache_dir(tmp_path, monkeypatch, tiny):
    monkeypatch.setenv("GEMMA4_JAX_CACHE", str(tmp_path / "other"))
    path = builtin.builtin_path("tiny")
    assert path.parent == tmp_path / "other"
    assert path.read_bytes() == tiny.read_bytes()  # deterministic


def test_resolve_model_errors(tmp_path):
    missing = tmp_path / "nope.gguf"
    with pytest.raises(ConfigError, match="nope.gguf") as e:
        builtin.resolve_model(str(missing))
    assert isinstance(e.value, FileNotFoundError)
    with pytest.raises(ConfigError, match="directory"):
        builtin.resolve_model(tmp_path)
    with pytest.raises(ConfigError, match="builtin:tiny"):
        builtin.resolve_model("builtin:huge")
    real = tmp_path / "m.gguf"
    real.write_bytes(b"GGUF")
    assert builtin.resolve_model(str(real)) == real
    assert "random weights" in builtin.BUILTIN_NOTICE


# ---------------------------------------------------------------------------------------------
# Other shapes


@pytest.mark.parametrize("name", ["tiny-e2b", "tiny-dense", "tiny-moe"])
def test_variants_mirror_their_fixture(name, cache, fixtures_dir):
    spec = BUILTINS[name][0]
    r = _reader(builtin.builtin_path(name))
    f = _reader(fixtures_dir / FIXTURE_OF[name] / "model.gguf")
    assert list(r.fields) == list(f.fields)
    for key, field in f.fields.items():
        assert r.fields[key].types == field.types, key
        if not key.startswith(("GGUF.", "tokenizer.ggml.")) and key not in DIFFERENT_VALUES:
            assert r.fields[key].contents() == field.contents(), key
    rt, ft = _tensors(r), _tensors(f)
    assert set(rt) == set(ft)
    shapes = expected_shapes(spec)
    assert {n: _np_shape(t) for n, t in rt.items()} == shapes
    for n, t in ft.items():
        if n != "token_embd.weight" and not n.startswith("per_layer_token_embd"):
            assert _np_shape(t) == shapes[n], n


def test_e2b_variant_falls_back_where_q8_0_cannot_go(cache):
    ts = _tensors(_reader(builtin.builtin_path("tiny-e2b")))
    # proj rows are P = 16 long: not a whole Q8_0 block, so F16 as llama-quantize does.
    assert ts["blk.0.proj.weight"].tensor_type.name == "F16"
    assert ts["blk.0.inp_gate.weight"].tensor_type.name == "Q8_0"


def test_moe_values(cache):
    ts = _tensors(_reader(builtin.builtin_path("tiny-moe")))
    assert ts["blk.0.ffn_gate_inp.weight"].tensor_type.name == "F32"  # routers stay F32
    router = np.asarray(ts["blk.0.ffn_gate_inp.weight"].data)
    assert router.std() == pytest.approx(1.5, rel=0.1)
    for n in ("blk.0.ffn_gate_inp.scale", "blk.0.ffn_down_exps.scale"):
        s = np.asarray(ts[n].data)
        assert np.all((s >= 0.5) & (s <= 1.5))


@pytest.mark.parametrize("name", sorted(REAL_SPECS))
def test_real_size_plans(name):
    spec = REAL_SPECS[name]
    plan = tensor_plan(spec, "Q8_0")
    assert {t.name: t.shape for t in plan} == expected_shapes(spec)
    nbytes = sum(builtin._nbytes(t) for t in plan)
    params = sum(int(np.prod(t.shape)) for t in plan)
    # Q8_0: 34 bytes per 32 weights; norms and per_layer_model_proj F32
    assert 1.0 < nbytes / params < 1.1


def _fixture_types(fixtures_dir: Path, file: str) -> dict[str, str]:
    text = (fixtures_dir / "quant_small" / "tensors.txt").read_text()
    section = text.split(f"# file: {file}")[1].split("# file:")[0]
    return dict(re.findall(r"^(\S+\.(?:weight|scale))\s+(\S+)", section, re.M))


QUANT_SMALL = TinySpec(
    name="quant_small-like",
    vocab_size=1024,
    n_layers=2,
    d_model=256,
    head_dim=64,
    head_dim_global=128,
    ffn=256,
    ple_dim=256,
    sliding_period=2,
    shared_kv_layers=0,
    window=8,
)


@pytest.mark.parametrize("quant", ["F16", "BF16", "Q8_0", "Q4_0", "Q4_K_M", "Q5_K_M", "Q6_K"])
def test_quant_mix_matches_llama_quantize(quant, fixtures_dir):
    plan = {t.name: t.ggml_type for t in tensor_plan(QUANT_SMALL, quant)}
    assert plan == _fixture_types(fixtures_dir, f"model-{quant}.gguf")


def test_write_k_quants_synthesized_and_deterministic(tmp_path):
    a = write_gemma4_gguf(tmp_path / "a.gguf", QUANT_SMALL, seed=5, quant="Q4_K_M", threads=1)
    b = write_gemma4_gguf(tmp_path / "b.gguf", QUANT_SMALL, seed=5, quant="Q4_K_M", threads=2)
    assert a.read_bytes() == b.read_bytes()  # independent of the thread count
    ts = _tensors(_reader(a))
    assert Counter(t.tensor_type.name for t in ts.values()) == {"F32": 20, "Q4_K": 16, "Q6_K": 4}
    for name in ("blk.0.ffn_gate.weight", "blk.1.attn_v.weight", "per_layer_token_embd.weight"):
        t = ts[name]
        w = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
        assert w.shape == _np_shape(t)
        assert abs(w.mean()) < 0.01 and w.std() == pytest.approx(QUANT_SMALL.std, rel=0.1), name


@pytest.mark.parametrize("gtype", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"])
def test_synthesized_blocks_have_the_requested_std(gtype):
    qtype = gguf.GGMLQuantizationType[gtype]
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = builtin.synthesize_blocks(gtype, 2048, 0.05, np.random.default_rng(0))
    assert blocks.shape == (2048, size) and blocks.dtype == np.uint8
    w = gguf.quants.dequantize(blocks.reshape(1, -1), qtype).reshape(-1, 32)
    assert w.std() == pytest.approx(0.05, rel=0.05)
    assert abs(w.mean()) < 0.002
    # Sub-block means stay near 0: the K-quant mins and scales are packed where ggml reads them.
    assert np.abs(w.mean(axis=1)).max() < 0.05


def test_synthesize_flag_changes_values_not_layout(tmp_path):
    spec = BUILTINS["tiny-dense"][0]
    a = _reader(write_gemma4_gguf(tmp_path / "q.gguf", spec, seed=1))
    b = _reader(write_gemma4_gguf(tmp_path / "s.gguf", spec, seed=1, synthesize=True))
    assert [(t.name, t.tensor_type, list(t.shape)) for t in a.tensors] == [
        (t.name, t.tensor_type, list(t.shape)) for t in b.tensors
    ]
    qa = _tensors(a)["blk.0.ffn_up.weight"]
    qb = _tensors(b)["blk.0.ffn_up.weight"]
    assert not np.array_equal(np.asarray(qa.data), np.asarray(qb.data))


def test_train_bpe_is_deterministic_and_word_local():
    text = "the cat sat on the mat with 12345 other cats\nthe end"
    m1 = builtin.train_bpe(text, 50)
    assert m1 == builtin.train_bpe(text, 50)
    assert m1[0] == ("\u2581", "t") or m1[0][0] + m1[0][1] in "\u2581the"
    for a, b in m1:
        assert "\u2581" not in (a + b)[1:]  # never across a word boundary
        assert not any(c.isdigit() for c in a + b)  # digits stay single
        assert "\n" not in a + b


def test_spec_validation():
    with pytest.raises(ValueError, match="last layer must be global"):
        TinySpec(n_layers=11)
    with pytest.raises(ValueError, match="shared_kv_layers"):
        TinySpec(shared_kv_layers=4)  # first shared layer 8: layer 7 is sliding
    with pytest.raises(ValueError, match="n_heads"):
        TinySpec(n_heads=3)
    with pytest.raises(ValueError, match="quant"):
        tensor_plan(TinySpec(), "Q3_K")
