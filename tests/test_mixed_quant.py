"""Real quant mixes: llama.cpp's Q4_K_M gives some layers' attn_v / ffn_down Q6_K and others
Q4_K, so layers of one repeating period differ in storage type. They must still load (into
separate scan segments) and run."""

import numpy as np

import gemma4_jax as g4
from gemma4_jax.builtin import BUILTINS, write_gemma4_gguf
from gemma4_jax.config import segments


def test_q4_k_m_mix_across_layers_loads_and_runs(tmp_path):
    spec, seed, _ = BUILTINS["tiny"]
    path = write_gemma4_gguf(tmp_path / "mix.gguf", spec, seed=seed, quant="Q4_K_M")
    model = g4.load(path)
    types = {tuple(sorted(dict(s.types).items())) for s in g4.layer_plan(model.config)}
    assert len(types) > 1, "the writer should have mixed Q4_K and Q6_K across layers"
    for seg in segments(model.config):  # every segment stacks layers of one type signature
        for period in range(seg.n_periods):
            for j, s in enumerate(seg.slots):
                spec = g4.layer_plan(model.config)[seg.layer_index(period, j)]
                assert spec.types == s.types
    tokens = np.array([[2, 10, 20, 30, 40, 50]])
    logits = np.asarray(g4.forward(model.params, tokens))
    assert np.isfinite(logits).all()
    out = g4.generate(model.params, [tokens[0]], max_new_tokens=4, stop_tokens=())
    full = np.asarray(g4.forward(model.params, np.concatenate([tokens[0], out.tokens[0]])[None]))
    np.testing.assert_array_equal(full[0, 5:9].argmax(-1), out.tokens[0])
