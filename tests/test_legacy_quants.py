"""Q4_1, Q5_0 and Q5_1 through the whole model.

llama-quantize writes these where a K-quant does not fit a tensor's rows (a real 26B-A4B
Q4_K_M file has ffn_down and ffn_down_exps in Q5_0). No fixture holds them, so the reference
is built the way the fixtures' own `reference-<TYPE>.npz` are: the same model with every
quantized tensor replaced by its `gguf.quants.dequantize` values in F32. The F32 model is
checked against transformers by the fixture tests; here the quantized file must give the
same logits (the weights are the same numbers) and the same greedy tokens, on the MoE
fixture, in every kernel mode: `reference` (the gather path in decode, all experts in
prefill), `auto` (the grouped kernel for the prompt's experts, matvec.py's packed reductions
at batch 1, the batched-decode kernel for 8 rows) and `pallas` (the kernels everywhere).
Interpret mode on the CPU, compiled on a GPU.
"""

from __future__ import annotations

import functools

import gguf
import numpy as np
import pytest
from conftest import load_fixture
from gguf_edit import rewrite

import gemma4_jax as g4

TYPES = ("Q4_1", "Q5_0", "Q5_1")


def _quantized(name: str, ne) -> bool:
    # Every matrix but the MoE router, which llama-quantize leaves in F32.
    return len(ne) >= 2 and name.endswith(".weight") and "ffn_gate_inp" not in name


@functools.cache
def _pair(fixtures_dir, tmp_dir, type_name: str):
    """(quantized model, its F32-dequantized twin), both loaded in float32."""
    qtype = gguf.GGMLQuantizationType[type_name]
    src = fixtures_dir / "moe_tiny" / "model.gguf"

    def quantize(name, data, ttype, ne):
        if not _quantized(name, ne):
            return data, ttype, ne
        return gguf.quants.quantize(data.reshape(list(reversed(ne))), qtype), qtype, ne

    def dequantize(name, data, ttype, ne):
        if ttype != qtype:
            return data, ttype, ne
        return gguf.quants.dequantize(data, qtype), gguf.GGMLQuantizationType.F32, ne

    q_path = rewrite(src, tmp_dir / f"moe-{type_name}.gguf", edit_tensor=quantize)
    f_path = rewrite(q_path, tmp_dir / f"moe-{type_name}-dequantized.gguf", edit_tensor=dequantize)
    return g4.load(q_path, dtype="float32"), g4.load(f_path, dtype="float32")


@pytest.fixture(scope="module")
def pair(fixtures_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("legacy_quants")
    return lambda type_name: _pair(fixtures_dir, tmp, type_name)


@pytest.mark.parametrize("type_name", TYPES)
def test_file_holds_the_type(pair, type_name):
    q, f = pair(type_name)
    assert q.tensor_types.get(type_name, 0) > 0 and set(f.tensor_types) == {"F32"}
    experts = q.params.segments[0][0]["experts_down"]
    assert experts.ggml_type == type_name


CASES = [(t, m) for t in TYPES for m in ("reference", "auto", "pallas")]


@pytest.mark.parametrize(("type_name", "mode"), CASES)
def test_logits_and_greedy_tokens_equal_the_dequantized_model(pair, fixtures_dir, type_name, mode):
    q, f = pair(type_name)
    _, ref = load_fixture(fixtures_dir, "moe_tiny")
    prompt = ref["prompt_0"][:24]
    with g4.use_kernels(mode):
        lq = np.asarray(g4.forward(q.params, prompt[None]))[0]
        lf = np.asarray(g4.forward(f.params, prompt[None]))[0]
        gq = g4.generate(q.params, [prompt], max_new_tokens=8, stop_tokens=())
        gf = g4.generate(f.params, [prompt], max_new_tokens=8, stop_tokens=())
    # The same weight values in f32: only summation orders differ (XLA fuses the dequantize
    # into its dots, matvec.py sums in another order), and 12 layers carry that along: seen up
    # to 1.6e-5 x max |logit|, against the fixtures' bar of 2e-3 (2.2e-4 x) for f32 vs HF.
    scale = np.abs(lf).max()
    assert np.abs(lq - lf).max() <= 1e-4 * scale, f"{type_name} [{mode}]"
    np.testing.assert_array_equal(gq.tokens[0], gf.tokens[0])
    np.testing.assert_allclose(gq.logprobs[0], gf.logprobs[0], atol=1e-4)
    # The quantization itself moved the logits (the test compares something non-trivial).
    assert np.abs(lf - ref["logits_0"][:24]).max() > 1e-3


def test_batched_decode_equals_the_dequantized_model(pair, fixtures_dir):
    # 8 rows in `auto`: the batched-decode kernel reads the layer's stack in place
    # (ops.LayerSlice).
    q, f = pair("Q5_0")
    _, ref = load_fixture(fixtures_dir, "moe_tiny")
    prompts = [ref["prompt_0"][: 10 + i] for i in range(8)]
    with g4.use_kernels("auto"):
        gq = g4.generate(q.params, prompts, max_new_tokens=4, stop_tokens=())
        gf = g4.generate(f.params, prompts, max_new_tokens=4, stop_tokens=())
    np.testing.assert_array_equal(np.stack(gq.tokens), np.stack(gf.tokens))


@pytest.mark.parametrize("mode", ["auto", "pallas"])
def test_decode_reads_the_expert_stacks_in_place(pair, fixtures_dir, monkeypatch, mode):
    # Batch-1 decode with the grouped kernel (`auto` under GEMMA4_JAX_GROUPED_DECODE=1, and
    # `pallas`): the layer scan hands each expert stack over whole (ops.keep_experts_stacked)
    # and the kernel reads it as [layers * experts, N, K] (a slice before the custom call
    # copied every layer's experts each step). The tokens must not change.
    import sys

    import jax

    from pallas_kernels import qmatmul as qk

    q, f = pair("Q5_0")
    stack = q.params.segments[0][0]["experts_down"]
    flat_rows = stack.shape[0] * stack.shape[1]
    _, ref = load_fixture(fixtures_dir, "moe_tiny")
    prompt = ref["prompt_0"][:12]
    seen = []
    real = qk.grouped_qmatmul
    monkeypatch.setattr(
        qk, "grouped_qmatmul", lambda *a, **kw: seen.append(a[2]["d"].shape[0]) or real(*a, **kw)
    )
    monkeypatch.setenv("GEMMA4_JAX_GROUPED_DECODE", "1")
    generate = sys.modules["gemma4_jax.generate"]

    def fresh_programs():  # traced again, through the patch and the variable
        jax.clear_caches()
        generate._PROGRAMS.clear()

    fresh_programs()
    try:
        with g4.use_kernels(mode):
            gq = g4.generate(q.params, [prompt], max_new_tokens=4, stop_tokens=())
    finally:
        monkeypatch.undo()
        fresh_programs()
    assert flat_rows in seen, (flat_rows, seen)
    with g4.use_kernels("reference"):
        gf = g4.generate(f.params, [prompt], max_new_tokens=4, stop_tokens=())
    np.testing.assert_array_equal(gq.tokens[0], gf.tokens[0])
