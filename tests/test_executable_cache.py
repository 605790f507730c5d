"""The executable cache: a second process loads a model and runs `generate` without tracing,
with the same tokens; the key follows GEMMA4_JAX_* settings; a damaged entry is rebuilt."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

_SCRIPT = """
import json, sys
import numpy as np
import jax
jax.config.update("jax_compilation_cache_dir", sys.argv[2])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
import gemma4_jax as g4
from gemma4_jax import executable_cache
if len(sys.argv) > 3 and sys.argv[3] == "store-served":
    executable_cache.STORE_SERVED_ON.add(jax.default_backend())
gen = sys.modules["gemma4_jax.generate"]
# Every program this process compiles or takes from JAX's cache, eager ops included.
compiled = []
COMPILE, HIT = "/jax/core/compile/backend_compile_duration", "/jax/compilation_cache/cache_hits"
jax.monitoring.register_event_duration_secs_listener(
    lambda e, d, **k: compiled.append(e) if e == COMPILE else None
)
jax.monitoring.register_event_listener(lambda e, **k: compiled.append(e) if e == HIT else None)
model = g4.load(sys.argv[1])
out = g4.generate(model.params, [[5, 9, 17, 33, 65]], max_new_tokens=6, stop_tokens=())
scores = np.asarray(g4.forward(model.params, [[5, 9, 17, 33, 65]]))[0, :, :4]  # host slice
print("RESULT " + json.dumps({
    "tokens": [int(t) for t in out.tokens[0]],
    "logprobs": [float(x) for x in out.logprobs[0]],
    "forward": [float(x) for x in scores.reshape(-1)],
    "traces": dict(gen.TRACE_COUNTS),
    "stats": executable_cache.STATS,
    "compiled": len(compiled),
}))
"""


def _run(fixtures_dir, cache, *extra, check=True, **env):
    path = fixtures_dir / "quant_small" / "model-Q4_K_M.gguf"  # Q4_K and Q6_K blocks
    if not path.exists():
        pytest.skip("fixture quant_small/model-Q4_K_M.gguf not present")
    # Device repack on: the loader's block-split programs go through the cache too. No GPU
    # memory preallocation: the test process itself may hold most of it.
    environ = {
        **os.environ,
        "GEMMA4_JAX_EXECUTABLE_CACHE": "1",
        "GEMMA4_JAX_DEVICE_REPACK": "1",
        "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
        **env,
    }
    environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), environ.get("PYTHONPATH", "")])
    p = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(path), str(cache), *extra],
        env=environ, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
    if not check and line is None:
        return None, p.stderr
    assert line is not None, p.stdout[-2000:] + p.stderr[-3000:]
    return json.loads(line[7:]), p.stderr


def test_second_process_skips_tracing(fixtures_dir, tmp_path):
    cold, _ = _run(fixtures_dir, tmp_path)
    assert cold["stats"]["misses"] >= 2 and cold["stats"]["hits"] == 0
    assert cold["traces"].get("prefill") == 1
    entries = sorted((tmp_path / "gemma4_jax_executables").glob("*.bin"))
    assert len(entries) == cold["stats"]["misses"]
    assert any(e.name.startswith("split_Q4_K") for e in entries)  # the loader's programs

    warm, _ = _run(fixtures_dir, tmp_path)
    assert warm["stats"]["hits"] == cold["stats"]["misses"] and warm["stats"]["misses"] == 0
    assert warm["traces"] == {}  # nothing traced: every program came from the cache
    assert warm["compiled"] == 0  # and no eager op compiled (each costs a new process time)
    assert warm["tokens"] == cold["tokens"] and warm["logprobs"] == cold["logprobs"]
    assert warm["forward"] == cold["forward"]

    off, _ = _run(fixtures_dir, tmp_path, GEMMA4_JAX_EXECUTABLE_CACHE="0")
    assert off["stats"]["hits"] == 0 and off["stats"]["bypassed"] >= 2
    assert off["tokens"] == cold["tokens"]

    # A setting the programs may read at trace time is part of the key.
    other, _ = _run(fixtures_dir, tmp_path, GEMMA4_JAX_KERNELS="reference")
    assert other["stats"]["misses"] >= 2 and other["traces"].get("prefill") == 1

    # A damaged entry is reported and rebuilt, and the answer does not change.
    for e in entries:
        e.write_bytes(b"not an executable")
    again, err = _run(fixtures_dir, tmp_path)
    assert "unusable" in err and again["stats"]["misses"] == cold["stats"]["misses"]
    assert again["tokens"] == cold["tokens"]


def test_entries_made_while_jax_cache_is_warm_run(fixtures_dir, tmp_path):
    """Our entries are missing but JAX's persistent cache holds the programs (the package's
    sources changed and the programs did not, or our directory was cleared). An executable
    JAX loaded from its cache serializes without its code on the CPU ('Function ... not
    found' when the next process runs it), so such executables are not stored."""
    import shutil

    cold, _ = _run(fixtures_dir, tmp_path)
    shutil.rmtree(tmp_path / "gemma4_jax_executables")
    rebuilt, _ = _run(fixtures_dir, tmp_path)
    assert rebuilt["stats"]["misses"] == cold["stats"]["misses"]
    assert rebuilt["stats"]["not_stored"] == rebuilt["stats"]["misses"]  # JAX served them all
    assert not any((tmp_path / "gemma4_jax_executables").glob("*.bin"))
    again, _ = _run(fixtures_dir, tmp_path)
    assert again["tokens"] == cold["tokens"] and again["logprobs"] == cold["logprobs"]

    # Without JAX's entries, ours are compiled afresh and stored again.
    for entry in tmp_path.iterdir():
        if entry.is_file():
            entry.unlink()
    refilled, _ = _run(fixtures_dir, tmp_path)
    assert refilled["stats"]["not_stored"] == 0
    warm, _ = _run(fixtures_dir, tmp_path)
    assert warm["stats"]["hits"] == cold["stats"]["misses"] and warm["traces"] == {}
    assert warm["tokens"] == cold["tokens"] and warm["logprobs"] == cold["logprobs"]


def test_a_new_key_compiles_afresh_while_jax_cache_is_warm(fixtures_dir, tmp_path):
    """After the sources or a setting change (here a GEMMA4_JAX_* variable no program reads),
    the programs are the same but the key is new: they are compiled under the new key's name,
    which JAX's cache has never seen, so they are fresh and stored, and the next process
    compiles nothing."""
    cold, _ = _run(fixtures_dir, tmp_path)
    salted, _ = _run(fixtures_dir, tmp_path, GEMMA4_JAX_TEST_SALT="1")
    assert salted["stats"]["misses"] == cold["stats"]["misses"]
    assert salted["stats"]["not_stored"] == 0
    warm, _ = _run(fixtures_dir, tmp_path, GEMMA4_JAX_TEST_SALT="1")
    assert warm["stats"]["hits"] == cold["stats"]["misses"] and warm["compiled"] == 0
    assert warm["tokens"] == cold["tokens"] and warm["logprobs"] == cold["logprobs"]


def test_served_executables_round_trip(fixtures_dir, tmp_path):
    """Why `STORE_SERVED_ON` is empty: stored anyway, an executable that JAX served from its
    cache does not run in the next process on XLA:CPU (jax 0.10.2). On a GPU the round trip is
    expected to work; once this passes there, the GPU may join `STORE_SERVED_ON`."""
    import shutil

    import jax

    cold, _ = _run(fixtures_dir, tmp_path)
    shutil.rmtree(tmp_path / "gemma4_jax_executables")
    stored, _ = _run(fixtures_dir, tmp_path, "store-served")
    assert stored["stats"]["not_stored"] == 0
    again, err = _run(fixtures_dir, tmp_path, check=False)
    if jax.default_backend() == "cpu":
        assert again is None and "not found" in err, err[-2000:]
    else:
        assert again is not None, err[-3000:]
        assert again["stats"]["hits"] == cold["stats"]["misses"]
        assert again["tokens"] == cold["tokens"] and again["logprobs"] == cold["logprobs"]


def test_signature_leaves_traced_and_host_arguments_to_jit():
    """Inside someone else's jit the arguments are tracers, and numpy inputs have no device
    placement: both go to the plain jitted call (None), concrete arrays get a signature."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from gemma4_jax.executable_cache import _signature

    x = jnp.ones((2, 3))
    assert _signature((x, {"a": x}), {"k": 1}) is not None
    assert _signature((np.ones(3),), {}) is None
    seen = []
    jax.jit(lambda y: seen.append(_signature((y,), {})) or y)(x)
    assert seen == [None]


def test_a_bad_switch_value_is_named(monkeypatch):
    from gemma4_jax.executable_cache import cache_dir

    monkeypatch.setenv("GEMMA4_JAX_EXECUTABLE_CACHE", "false")
    with pytest.raises(ValueError, match="GEMMA4_JAX_EXECUTABLE_CACHE='false'"):
        cache_dir()
    monkeypatch.setenv("GEMMA4_JAX_EXECUTABLE_CACHE", "0")
    assert cache_dir() is None
