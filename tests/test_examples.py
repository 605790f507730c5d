"""Every script in examples/ runs on builtin:tiny and exits 0; the activations hook is right.

The examples run in-process (their `main(argv)`), so programs of equal shapes compile once
for the file; one runs as a script to check that `python examples/NAME.py` works as such.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gemma4_jax as g4
from gemma4_jax.builtin import BUILTIN_NOTICE
from gemma4_jax.config import segments
from gemma4_jax.errors import InputError
from gemma4_jax.model import _inv_freq, embed, layer

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
NAMES = ("generate", "chat", "batch_sampling", "perplexity", "logprobs", "activations")
# Small settings so the file stays quick on two busy cores.
ARGS = {
    "generate": ["--max-new-tokens", "8"],
    "chat": ["--max-new-tokens", "8"],
    "batch_sampling": ["--max-new-tokens", "4"],
    "perplexity": ["--context", "64"],
    "logprobs": [],
    "activations": [],
}
EXPECT = {
    "generate": "stop: ",
    "chat": "model: ",
    "batch_sampling": "same key, same tokens: True",
    "perplexity": "perplexity ",
    "logprobs": "best: ",
    "activations": "layer  11 global",
}


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_every_example_is_tested():
    assert sorted(p.stem for p in EXAMPLES.glob("*.py")) == sorted(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_example_runs(name, capsys):
    rc = load_example(name).main(ARGS[name])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert out.startswith(f"note: {BUILTIN_NOTICE}")
    assert EXPECT[name] in out


def test_example_runs_as_a_script():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "logprobs.py"), "--candidate", " a", "--candidate", " b"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "best: " in proc.stdout


# ---------------------------------------------------------------------------- the hook


def test_hidden_layers_shapes_and_last_entry(tiny):
    c = tiny.config
    tokens = np.array([[2, 100, 200, 300, 400, 500, 600, 700, 800], [2, 9, 8, 7, 6, 5, 4, 3, 2]])
    hidden = g4.forward(tiny.params, tokens, return_hidden="layers")
    assert hidden.shape == (c.n_layers, 2, tokens.shape[1], c.d_model)
    assert hidden.dtype == jnp.float32
    final = g4.forward(tiny.params, tokens, return_hidden=True)
    np.testing.assert_array_equal(np.asarray(hidden[-1]), np.asarray(final))
    # every layer changes the residual stream: no entry is a copy of its neighbour
    assert all(not np.allclose(hidden[i], hidden[i + 1]) for i in range(c.n_layers - 1))


def test_hidden_layers_are_in_layer_order(tiny):
    """Entries 0 and 1 are what running layers 0 and 1 by hand gives."""
    params, c = tiny.params, tiny.config
    tokens = jnp.array([[2, 50, 60, 70, 80, 90]])
    hidden = g4.forward(params, tokens, return_hidden="layers")
    seg = segments(c)[0]
    assert seg.start == 0 and seg.period >= 2
    h, ple = embed(params, tokens)
    for i in range(2):
        spec = seg.slots[i]
        p = jax.tree.map(lambda a: a[0], params.segments[0][i])  # period 0 of slot i
        ctx = {"mode": "sequence", "donor_seq": {}, "dtype": params.compute_dtype}
        h, _, _ = layer(c, spec, p, h, ple[:, :, i], _inv_freq(params, spec), ctx)
        np.testing.assert_allclose(np.asarray(hidden[i]), np.asarray(h), rtol=1e-5, atol=1e-5)


def test_return_hidden_rejects_unknown_values(tiny):
    with pytest.raises(InputError, match="return_hidden"):
        g4.forward(tiny.params, np.array([[2, 3]]), return_hidden="heads")


@pytest.fixture(scope="module", autouse=True)
def _builtin_cache(g4_cache):
    """Every test here runs with the shared builtin cache set (see conftest.g4_cache)."""
    return g4_cache
