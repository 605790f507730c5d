"""The model against the fixtures' reference logits (transformers float32)."""

import jax
import numpy as np
import pytest
from conftest import MODEL_FIXTURES, QUANT_FILES, load_fixture

import gemma4_jax as g4
from gemma4_jax.config import segments

# The bar; an exact float32 engine lands at 1e-4..4e-4 (fixture float32 noise).
TOL = 2e-3


@pytest.mark.parametrize("name", MODEL_FIXTURES)
def test_prompt_logits_match_reference(fixtures_dir, name):
    model, ref = load_fixture(fixtures_dir, name)
    for k in (0, 1):
        logits = np.asarray(g4.forward(model.params, ref[f"prompt_{k}"][None]))[0]
        err = np.abs(logits - ref[f"logits_{k}"]).max()
        assert err < TOL, f"{name} prompt {k}: max |logits - reference| = {err:.2e}"


@pytest.mark.parametrize("name", MODEL_FIXTURES)
def test_teacher_forced_greedy_matches_reference(fixtures_dir, name):
    model, ref = load_fixture(fixtures_dir, name)
    for k in (0, 1):
        prompt, greedy = ref[f"prompt_{k}"], ref[f"greedy_{k}"]
        full = np.concatenate([prompt, greedy])
        logits = np.asarray(g4.forward(model.params, full[None]))[0]
        along = logits[len(prompt) - 1 : len(prompt) - 1 + len(greedy)]
        err = np.abs(along - ref[f"greedy_logits_{k}"]).max()
        assert err < TOL, f"{name} greedy {k}: max err {err:.2e}"
        np.testing.assert_array_equal(along.argmax(-1), greedy)


@pytest.mark.parametrize("qtype", QUANT_FILES)
def test_quantized_files_match_dequantized_reference(fixtures_dir, qtype):
    model, ref = load_fixture(fixtures_dir, "quant_small", f"model-{qtype}.gguf")
    for k in (0, 1):
        logits = np.asarray(g4.forward(model.params, ref[f"prompt_{k}"][None]))[0]
        err = np.abs(logits - ref[f"logits_{k}"]).max()
        assert err < TOL, f"{qtype} prompt {k}: max err {err:.2e}"


# Measured bf16-compute top-1 agreement with the f32 reference over all prompt positions
# (activations, attention operands and KV cache in bf16, f32 residual stream and softmax,
# weights at the file's precision). The tiny random fixtures are chaotic: rounding ONLY the
# weights of dense_tiny to bf16 already moves its logits by up to 4.6 and drops agreement to
# 71%, so the 95% is reachable only on the realistic-scale quant_small model
# (init std 0.03), where it measured 94.5% overall and 100% at margins > 0.1.
BF16_FLOOR = {
    "e4b_tiny": 0.85,
    "e2b_tiny": 0.8,
    "dense_tiny": 0.6,
    "moe_tiny": 0.7,
    "quant_small": 0.9,
}


@pytest.mark.parametrize("name", MODEL_FIXTURES + ("quant_small",))
def test_bf16_top1_agrees_with_f32_reference(fixtures_dir, name):
    file = "model.gguf" if name != "quant_small" else "model-Q8_0.gguf"
    model, ref = load_fixture(fixtures_dir, name, file, dtype="bfloat16")
    agree = total = wide = wide_agree = 0
    for k in (0, 1):
        logits = np.asarray(g4.forward(model.params, ref[f"prompt_{k}"][None]))[0]
        assert logits.dtype == np.float32 and np.isfinite(logits).all()
        r = ref[f"logits_{k}"]
        top2 = np.sort(r, axis=-1)[:, -2:]
        same = logits.argmax(-1) == r.argmax(-1)
        agree += int(same.sum())
        total += len(same)
        clear = (top2[:, 1] - top2[:, 0]) > 0.1
        wide += int(clear.sum())
        wide_agree += int(same[clear].sum())
    assert agree / total >= BF16_FLOOR[name], f"{name}: bf16 top-1 agreement {agree}/{total}"
    if name == "quant_small":
        assert wide_agree == wide, f"bf16 disagrees where the top-2 gap > 0.1: {wide_agree}/{wide}"


def test_batch_rows_are_independent(fixtures_dir):
    model, ref = load_fixture(fixtures_dir, "e4b_tiny")
    p0 = ref["prompt_0"][:40]
    p1 = ref["prompt_1"][:40]
    both = np.asarray(g4.forward(model.params, np.stack([p0, p1])))
    one = np.asarray(g4.forward(model.params, p1[None]))[0]
    np.testing.assert_allclose(both[1], one, atol=3e-4)  # f32 noise of a batched dot


def _top_level_scans(jaxpr) -> list:
    """Scan equations of a jaxpr, looking through jit wrappers but not into scans."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "scan":
            found.append(eqn)
        elif "jaxpr" in eqn.params and hasattr(eqn.params["jaxpr"], "jaxpr"):
            found.extend(_top_level_scans(eqn.params["jaxpr"].jaxpr))
    return found


def test_forward_scans_once_per_segment(fixtures_dir):
    """dense_tiny repeats its 6-layer period twice: one scan of length 2, not 12 layer copies."""
    from gemma4_jax.model import forward_impl

    model, ref = load_fixture(fixtures_dir, "dense_tiny")
    segs = segments(model.config)
    assert [s.n_periods for s in segs] == [2]
    jaxpr = jax.make_jaxpr(forward_impl)(model.params, ref["prompt_0"][None]).jaxpr
    scans = _top_level_scans(jaxpr)
    assert [e.params["length"] for e in scans] == [s.n_periods for s in segs]
    body_dots = str(scans[0].params["jaxpr"]).count("dot_general")
    total_dots = str(jaxpr).count("dot_general")
    assert body_dots >= 6 * 6  # one period: 6 layers x (q, k, o, gate, up, down) at least
    # outside the scan only the embedding / LM head remain: the layers were not unrolled
    assert total_dots - body_dots <= 4, (total_dots, body_dots)


def test_invalid_tokens_rejected(fixtures_dir):
    model, _ = load_fixture(fixtures_dir, "e4b_tiny")
    v = model.config.vocab_size
    with pytest.raises(g4.InputError, match="outside the vocabulary"):
        g4.forward(model.params, np.array([[1, 2, v]]))
    with pytest.raises(g4.InputError, match="outside the vocabulary"):
        g4.forward(model.params, np.array([[-1, 2]]))
    with pytest.raises(g4.InputError, match=r"\[batch, time\]"):
        g4.forward(model.params, np.array([1, 2, 3]))


def _split_experts(fixtures_dir, tmp_path, up_type=None):
    """moe_tiny with ffn_gate_up_exps written as ffn_gate_exps + ffn_up_exps (older
    converters), up optionally requantized to `up_type`."""
    import gguf
    from gguf_edit import rewrite

    def split(name, data, ttype, ne):
        if not name.endswith("ffn_gate_up_exps.weight"):
            return None
        e, two_f, d = reversed(ne)
        w = data.reshape(e, two_f, d)
        half = [ne[0], two_f // 2, e]
        gate, up = (np.ascontiguousarray(a) for a in np.split(w, 2, axis=1))
        up_t = ttype
        if up_type is not None:
            up_t = gguf.GGMLQuantizationType[up_type]
            up = gguf.quants.quantize(up, up_t)
        return [
            (name.replace("gate_up", "gate"), gate, ttype, half),
            (name.replace("gate_up", "up"), up, up_t, half),
        ]

    src = fixtures_dir / "moe_tiny" / "model.gguf"
    return rewrite(src, tmp_path / "split.gguf", split_tensor=split)


def test_separate_gate_and_up_experts_load_fused(fixtures_dir, tmp_path):
    model, ref = load_fixture(fixtures_dir, "moe_tiny")
    split = g4.load(_split_experts(fixtures_dir, tmp_path))
    prompt = ref["prompt_0"][None]
    np.testing.assert_array_equal(
        np.asarray(g4.forward(split.params, prompt)), np.asarray(g4.forward(model.params, prompt))
    )
    with pytest.raises(g4.GGUFError, match="ffn_up_exps.weight' have different types"):
        g4.load(_split_experts(fixtures_dir, tmp_path, up_type="Q8_0"))


def test_moe_reference_chunks_long_prompts(fixtures_dir, monkeypatch):
    """The reference all-experts path runs long prompts in token chunks (bounded memory): the
    logits are those of the one-piece computation."""
    from gemma4_jax import ops

    model, ref = load_fixture(fixtures_dir, "moe_tiny")
    prompt = ref["prompt_0"][None]
    whole = np.asarray(g4.forward(model.params, prompt))
    c = model.config
    per_token = c.n_experts * (2 * c.expert_ffn_dim + c.d_model) * 4
    monkeypatch.setattr(ops, "EXPERT_CHUNK_BYTES", 3 * per_token)  # 3-token chunks, padded tail
    jax.clear_caches()
    chunked = np.asarray(g4.forward(model.params, prompt))
    # Same products; XLA blocks the f32 sums differently for the smaller matmuls, and the
    # router amplifies that slightly (measured up to 1.4e-4; the decode-vs-forward bar).
    np.testing.assert_allclose(chunked, whole, atol=2.5e-4, rtol=0)
    assert np.abs(chunked[0] - ref["logits_0"]).max() < TOL
