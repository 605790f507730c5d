"""Sharded vs single-device `forward` / `generate` on simulated CPU devices.

Run by tests/test_sharding.py in a subprocess, because the device count must be fixed before
JAX initialises (and other test modules import jax first):

    XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
        python tests/sharding_check.py FIXTURES_DIR e2b_tiny=1x8,2x4,8x1 moe_tiny=2x4 [--pallas]

For every fixture and (data x model) mesh it loads the model with `load(..., mesh=mesh)`, checks
that every leaf sits on its `param_shardings` (and that sharded leaves really are split), runs
`forward` on a batch placed on "data" and greedy `generate` on a ragged batch, and compares with
the single-device run. `--pallas` adds an ops-level check of the shard_map-wrapped attention
kernels (interpret mode) under `jax.set_mesh`. Prints one JSON object on stdout.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path

import jax
import numpy as np

import gemma4_jax as g4
from gemma4_jax import sharding as sh

BATCH = 8  # divisible by every "data" size tested, so data parallelism really splits rows
FWD_LEN = 16
GEN_LENS = (5, 9, 12, 7, 16, 3, 11, 14)  # ragged rows
NEW_TOKENS = 8


def _prompts(ref) -> tuple[np.ndarray, list[np.ndarray]]:
    p = [np.asarray(ref["prompt_0"]), np.asarray(ref["prompt_1"])]
    fwd = np.stack([p[i % 2][i : i + FWD_LEN] for i in range(BATCH)]).astype(np.int32)
    rag = [p[i % 2][i : i + n].astype(np.int32) for i, n in enumerate(GEN_LENS)]
    return fwd, rag


def _spec(a: jax.Array) -> str:
    return str(getattr(a.sharding, "spec", a.sharding))


def _leaf_problems(params, mesh) -> list[str]:
    """Leaves not placed as `param_shardings` says, or not actually split where they should be."""
    want = jax.tree_util.tree_flatten_with_path(sh.param_shardings(params, mesh))[0]
    have = jax.tree.leaves(params)
    bad = []
    for (path, w), a in zip(want, have, strict=True):
        name = jax.tree_util.keystr(path, simple=True, separator=".")
        if not a.sharding.is_equivalent_to(w, a.ndim):
            bad.append(f"{name}: {_spec(a)} != {w.spec}")
            continue
        n_split = int(np.prod([mesh.shape[ax] for ax in w.spec if ax is not None], dtype=int))
        local = a.addressable_shards[0].data.shape
        if int(np.prod(local)) * n_split != int(np.prod(a.shape)):
            bad.append(f"{name}: shard {local} of {a.shape} under {w.spec}")
    return bad


def _cache_problems(params, cache, mesh) -> list[str]:
    spec = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), cache)
    want = jax.tree.leaves(sh.cache_shardings(params.config, spec, mesh))
    return [
        f"{a.shape}: {_spec(a)} != {w.spec}"
        for a, w in zip(jax.tree.leaves(cache), want, strict=True)
        if not a.sharding.is_equivalent_to(w, a.ndim)
    ]


class _Lap:
    def __init__(self, out: dict):
        self.out, self.t = out, time.perf_counter()

    def __call__(self, what: str):
        now = time.perf_counter()
        self.out[what] = round(now - self.t, 2)
        self.t = now


def check_fixture(
    fixtures: Path,
    name: str,
    meshes: list[tuple[int, int]],
    *,
    file: str = "model.gguf",
    set_mesh: bool = False,
) -> list[dict]:
    """Sharded vs single-device runs of one fixture (also on real devices: benchmarks/
    bench_sharded.py). `file` picks another GGUF of the fixture (`model-Q4_K_M.gguf` with its
    `reference-Q4_K_M.npz`); `set_mesh` runs each sharded model under `jax.set_mesh(mesh)`, as
    the CLI does, so that in Pallas mode the attention kernels run per shard."""
    path = fixtures / name / file
    ref_file = "reference.npz" if file == "model.gguf" else file.replace("model-", "reference-")
    ref = np.load(fixtures / name / ref_file.replace(".gguf", ".npz"))
    label = name if file == "model.gguf" else f"{name}/{file}"
    fwd_tokens, rag = _prompts(ref)
    base = g4.load(path)
    want_logits = np.asarray(g4.forward(base.params, fwd_tokens))
    want_gen = g4.generate(base.params, rag, max_new_tokens=NEW_TOKENS, stop_tokens=())
    out = []
    for data, model in meshes:
        t0 = time.perf_counter()
        mesh = sh.make_mesh(data, model)
        with jax.set_mesh(mesh) if set_mesh else contextlib.nullcontext():
            out.append(_check_mesh(path, mesh, fwd_tokens, rag, want_logits, want_gen))
        out[-1].update(fixture=label, seconds=round(time.perf_counter() - t0, 2))
    return out


def _check_mesh(path, mesh, fwd_tokens, rag, want_logits, want_gen) -> dict:
    """One mesh of `check_fixture`: placement, forward, caches, greedy generate."""
    m = g4.load(path, mesh=mesh)
    r = {"fixture": None, "mesh": list(mesh.devices.shape), "problems": [], "t": {}}
    lap = _Lap(r["t"])
    lap("load")
    r["problems"] += _leaf_problems(m.params, mesh)
    logits = g4.forward(m.params, sh.shard_batch(fwd_tokens, mesh))
    r["forward_max_diff"] = float(np.abs(np.asarray(logits) - want_logits).max())
    lap("forward")
    cache = g4.init_cache(m.params, BATCH, 256)
    r["problems"] += [f"init_cache {p}" for p in _cache_problems(m.params, cache, mesh)]
    padded = np.zeros((BATCH, 64), np.int32)
    for i, row in enumerate(rag):
        padded[i, : len(row)] = row
    lengths = np.array([len(x) for x in rag], np.int32)
    _, cache = g4.prefill(m.params, padded, cache, lengths)
    r["problems"] += [f"prefill cache {p}" for p in _cache_problems(m.params, cache, mesh)]
    lap("prefill")
    # `generate` is this stream in one chunk; the final state also shows the loop's cache.
    *_, last = g4.generate_stream(m.params, rag, max_new_tokens=NEW_TOKENS, stop_tokens=())
    got = np.asarray(last["state"]["tokens"])
    r["tokens_equal"] = bool(np.array_equal(got, np.stack(want_gen.tokens)))
    cache = last["state"]["cache"]
    r["problems"] += [f"decode cache {p}" for p in _cache_problems(m.params, cache, mesh)]
    lap("generate")
    return r


def _attention_ops(q, k, v, pos, w, positions, inv_freq):
    from gemma4_jax import ops

    t = q.shape[1]
    fa = ops.flash_attention(q, k[:, :t], v[:, :t], pos * 0, window=4)
    da = ops.decode_attention(q[:, 0], k, v, pos, ring=False)
    nr = ops.qk_norm_rope(q, k[:, :t], v[:, :t], w, w, positions, inv_freq, eps=1e-6)
    return fa, da, nr


# (mesh, (H, Hk)): KV heads split with the q heads; replicated KV heads sliced per device
# (2 and 4 devices per KV head); heads not divisible by the "model" size kept whole.
PALLAS_CASES = (((2, 4), (8, 8)), ((2, 4), (8, 2)), ((2, 4), (4, 1)), ((1, 8), (4, 2)))


def check_pallas_ops() -> list[dict]:
    """shard_map-wrapped Pallas attention kernels (interpret mode) vs their jnp references."""
    from gemma4_jax import ops

    rng = np.random.default_rng(0)
    b, t, s, d = 8, 8, 16, 32
    out = []
    for (data, model), (h, hk) in PALLAS_CASES:
        x = lambda *shape: rng.standard_normal(shape).astype(np.float32)
        args = (
            x(b, t, h, d),  # q
            x(b, s, hk, d),  # k
            x(b, s, hk, d),  # v
            np.arange(b, dtype=np.int32) + 3,  # pos
            x(d),  # norm weight
            np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)),  # positions
            (1e-2 ** (np.arange(d // 2) / (d // 2))).astype(np.float32),  # inv_freq
        )
        mesh = sh.make_mesh(data, model)
        placed = [sh.shard_batch(a, mesh) for a in args[:4]] + list(args[4:])
        with ops.use_kernels("reference"):  # cheaper to compile than interpreted kernels
            want = jax.jit(_attention_ops)(*args)
        with ops.use_kernels("pallas"):
            with jax.set_mesh(mesh):
                traced = jax.jit(_attention_ops).trace(*placed)
                got = traced.lower().compile()(*placed)
        diff = max(
            float(np.abs(np.asarray(g) - np.asarray(w)).max())
            for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True)
        )
        out.append(
            {
                "mesh": [data, model],
                "heads": [h, hk],
                "max_diff": diff,
                "shard_maps": str(traced.jaxpr).count("shard_map"),
            }
        )
    return out


def main(argv: list[str]) -> int:
    fixtures = Path(argv[0])
    report = {"device_count": jax.device_count(), "jax": jax.__version__, "results": []}
    t0 = time.perf_counter()
    for arg in argv[1:]:
        if arg == "--pallas":
            report["pallas_ops"] = check_pallas_ops()
            continue
        name, meshes = arg.split("=")
        shapes = [tuple(int(x) for x in m.split("x")) for m in meshes.split(",")]
        report["results"] += check_fixture(fixtures, name, shapes)
    report["seconds"] = round(time.perf_counter() - t0, 2)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
