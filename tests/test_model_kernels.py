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
    # Batch 1, `pallas`: the vector kernel on the stack (stacked_qmatmul's few-row path).
    ("model-Q4_K_M.gguf", 1, "pallas", "stacked_qmatmul"),
    ("model-Q8_0.gguf", 1, "pallas", "stacked_qmatmul"),
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
