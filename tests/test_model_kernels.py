"""The fixtures with the Pallas kernels on (interpret mode on the CPU, compiled on a GPU).

Each kernel has its own sweep against its jnp reference (tests/test_kernels_*.py); this checks
the whole model through the dispatch point: the logits still match the reference files and
greedy generation (prefill + the decode loop: flash, decode attention, norm+RoPE and, for the
quantized file, the quantized matmuls) still reproduces the reference tokens.
"""

import sys

import numpy as np
import pytest
from conftest import load_fixture

import gemma4_jax as g4

CASES = [
    ("e4b_tiny", "model.gguf"),  # PLE, KV sharing, GQA 4:2, proportional RoPE
    ("moe_tiny", "model.gguf"),  # K=V global layer, MoE
    ("quant_small", "model-Q4_K_M.gguf"),  # Q4_K + Q6_K matmul kernels
    ("quant_small", "model-Q8_0.gguf"),  # Q8_0 matmul kernels
]


@pytest.mark.parametrize("mode", ["pallas", "auto"])
@pytest.mark.parametrize(("name", "file"), CASES)
def test_fixture_with_kernels(fixtures_dir, name, file, mode):
    model, ref = load_fixture(fixtures_dir, name, file)
    prompt = ref["prompt_0"]
    with g4.use_kernels(mode):
        logits = np.asarray(g4.forward(model.params, prompt[None]))[0]
        out = g4.generate(model.params, [prompt], max_new_tokens=6, stop_tokens=())
    err = np.abs(logits - ref["logits_0"]).max()
    assert err < 2e-3, f"{name}/{file} [{mode}]: max |logits - reference| = {err:.2e}"
    np.testing.assert_array_equal(out.tokens[0], ref["greedy_0"][:6])


STACKED_CASES = [
    # Batch 8, `auto`: the batched decode matmuls take the mma kernel on the layer scan's
    # stacked weights (ops.LayerSlice -> stacked_qmatmul).
    ("model-Q4_K_M.gguf", 8, "auto", "stacked_qmatmul"),
    ("model-Q8_0.gguf", 8, "auto", "stacked_qmatmul"),
    # Batch 1, `auto`: Q4_K / Q6_K take the vector kernel on the stack (ops.PALLAS_MATVEC_DEFAULT).
    ("model-Q4_K_M.gguf", 1, "auto", "stacked_qmatmul"),
    # Batch 1, `pallas`: the vector kernel on the stack (stacked_qmatmul's few-row path).
    ("model-Q4_K_M.gguf", 1, "pallas", "stacked_qmatmul"),
    ("model-Q8_0.gguf", 1, "pallas", "stacked_qmatmul"),
    # Batch 1: q|k and gate|up of one format in one launch (ops.matmuls).
    ("model-Q4_K_M.gguf", 1, "auto", "stacked_qmatmul_many"),
    ("model-Q8_0.gguf", 1, "pallas", "stacked_qmatmul_many"),
]


@pytest.mark.parametrize(("file", "batch", "mode", "kernel"), STACKED_CASES)
def test_decode_reads_stacked_weights(fixtures_dir, monkeypatch, file, batch, mode, kernel):
    # Every row is the fixture's prompt, so every row must reproduce the reference greedy
    # tokens; the patched kernel entry proves the stacked path was taken.
    import jax

    from pallas_kernels import qmatmul as qk

    model, ref = load_fixture(fixtures_dir, "quant_small", file)
    calls = []
    real = getattr(qk, kernel)
    monkeypatch.setattr(qk, kernel, lambda *a, **kw: calls.append(1) or real(*a, **kw))

    def fresh_programs():  # traced again, through the patch
        jax.clear_caches()
        sys.modules["gemma4_jax.generate"]._PROGRAMS.clear()

    fresh_programs()
    prompt = ref["prompt_0"]
    try:
        with g4.use_kernels(mode):
            out = g4.generate(model.params, [prompt] * batch, max_new_tokens=4, stop_tokens=())
    finally:
        monkeypatch.undo()
        fresh_programs()
    assert calls, f"decode did not reach {kernel}"
    for row in out.tokens:
        np.testing.assert_array_equal(row, ref["greedy_0"][:4])


@pytest.mark.parametrize(("name", "file"), CASES[:2])
def test_layer_end_fusion_matches_the_unfused_step(fixtures_dir, monkeypatch, name, file):
    # ops.fuse_layer_end: each decode layer ends with residual_norm (last residual add, layer
    # scale, the NEXT layer's attention norm) and the scan carries the normalised row across
    # slots, periods and segments. Its decode logits must equal the unfused step's (same
    # kernels otherwise), and it must run one residual_norm per layer more.
    import jax

    from pallas_kernels import residual_norm as rn

    model, ref = load_fixture(fixtures_dir, name, file)
    params, prompt = model.params, ref["prompt_0"]
    calls = []
    real = rn.residual_norm
    # Only the layer-end site passes a layer scale.
    counted = lambda *a, **kw: calls.append(kw.get("scale") is not None) or real(*a, **kw)
    monkeypatch.setattr(rn, "residual_norm", counted)
    generate = sys.modules["gemma4_jax.generate"]
    steps = {}
    try:
        for fuse in ("0", "1"):
            monkeypatch.setenv("GEMMA4_JAX_RESIDUAL_NORM", "1" if fuse == "1" else "attn")
            jax.clear_caches()
            generate._PROGRAMS.clear()
            calls.clear()
            with g4.use_kernels("pallas"):
                cache = g4.init_cache(params, 1, 64)
                logits, cache = g4.prefill(params, prompt[None], cache)
                token = np.argmax(np.asarray(logits), -1)
                out, _ = g4.decode_step(params, token, cache, np.array([len(prompt)]))
            steps[fuse] = (np.asarray(out), sum(calls))
    finally:
        monkeypatch.undo()
        jax.clear_caches()
        generate._PROGRAMS.clear()
    (off, n_off), (on, n_on) = steps["0"], steps["1"]
    # The layer-end call is traced once per scan slot with the fusion, never without.
    assert n_off == 0 and n_on > 0, f"layer-end residual_norm traced {n_on} / {n_off} times"
    err = np.abs(on - off).max()
    assert err < 1e-3 * max(1.0, np.abs(off).max()), f"{name}: fused vs unfused step {err:.2e}"
    assert np.argmax(on) == np.argmax(off)
