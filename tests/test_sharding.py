"""Sharding over a ("data", "model") mesh.

The spec derivation is tested in-process from axis sizes alone (no devices needed). The sharded
runs need 8 devices, which XLA:CPU simulates only if told before JAX initialises; other test
modules import jax first, so those checks run `sharding_check.py` in a subprocess and assert on
its JSON report.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest
from conftest import load_fixture
from jax.sharding import PartitionSpec as P

from gemma4_jax import quant
from gemma4_jax import sharding as sh
from gemma4_jax.config import segments
from gemma4_jax.generate import cache_spec

MESH_2x4 = {"data": 2, "model": 4}

# ---------------------------------------------------------------------------- spec derivation


def _specs(params, mesh):
    return sh.param_specs(params, mesh)


def _slot(params, specs, *, sliding: bool, has_kv: bool = True):
    """(param slot, spec slot) of the first layer slot of the given kind."""
    for si, seg in enumerate(segments(params.config)):
        for j, s in enumerate(seg.slots):
            if s.sliding == sliding and s.has_kv == has_kv:
                return params.segments[si][j], specs.segments[si][j]
    raise AssertionError("no such slot")


def _flat(specs) -> list:
    return jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))


def _field_specs(t):
    return set(t.arrays())


def test_every_leaf_gets_a_full_length_spec(fixtures_dir):
    for name in ("e4b_tiny", "e2b_tiny", "dense_tiny", "moe_tiny"):
        params = load_fixture(fixtures_dir, name)[0].params
        for mesh in (MESH_2x4, {"data": 1, "model": 8}, {"data": 8, "model": 1}):
            specs = _flat(_specs(params, mesh))
            leaves = jax.tree.leaves(params)
            assert len(specs) == len(leaves)
            for spec, leaf in zip(specs, leaves, strict=True):
                assert isinstance(spec, P) and len(spec) in (0, leaf.ndim), (name, spec, leaf.shape)
                assert "data" not in spec  # params are replicated over "data"


def test_tensor_parallel_specs_e2b(fixtures_dir):
    """4 query heads, 1 KV head (MQA): q/o and MLP split on "model", K/V replicated."""
    params = load_fixture(fixtures_dir, "e2b_tiny")[0].params
    specs = _specs(params, MESH_2x4)
    g = specs.globals
    assert g["embed"].w == P("model", None)  # vocab
    assert g["ple_embed"].w == P("model", None)
    assert g["ple_model_proj"].w == P(None, None)
    assert g["output_norm"] == P(None)
    assert specs.rope == {"sliding": P(), "global": P()}
    for sliding in (True, False):
        _, s = _slot(params, specs, sliding=sliding)
        assert s["attn_q"].w == P(None, "model", None)  # [n, H*dh, D]: N = heads
        assert s["attn_output"].w == P(None, None, "model")  # [n, D, H*dh]: K = heads
        assert s["attn_k"].w == s["attn_v"].w == P(None, None, None)  # 1 KV head < 4
        assert s["ffn_gate"].w == s["ffn_up"].w == P(None, "model", None)
        assert s["ffn_down"].w == P(None, None, "model")
        assert s["ple_gate"].w == s["ple_proj"].w == P(None, None, None)
        assert s["attn_q_norm"] == s["attn_norm"] == P(None, None)
    # 4 heads do not split over 8 devices (never inside a head, though H*dh = 128 would):
    # attention stays whole, the MLP (128 wide) and the vocabulary still split.
    s8 = _slot(params, _specs(params, {"data": 1, "model": 8}), sliding=True)[1]
    assert s8["attn_q"].w == P(None, None, None) and s8["attn_output"].w == P(None, None, None)
    assert s8["ffn_gate"].w == P(None, "model", None)
    # A size-1 axis never appears in a spec.
    s1 = _slot(params, _specs(params, {"data": 8, "model": 1}), sliding=True)[1]
    assert s1["attn_q"].w == P(None, None, None)


def test_kv_heads_split_only_when_whole(fixtures_dir):
    """dense_tiny: 2 KV heads on sliding layers, 1 on global ones."""
    params = load_fixture(fixtures_dir, "dense_tiny")[0].params
    specs = _specs(params, {"data": 1, "model": 2})
    sliding = _slot(params, specs, sliding=True)[1]
    glob = _slot(params, specs, sliding=False)[1]
    assert sliding["attn_k"].w == P(None, "model", None)
    assert glob["attn_k"].w == P(None, None, None)
    assert "attn_v" not in glob  # K = V on global layers


def test_expert_parallel_specs(fixtures_dir):
    params = load_fixture(fixtures_dir, "moe_tiny")[0].params
    _, s = _slot(params, _specs(params, MESH_2x4), sliding=True)
    # Experts take "model"; a mesh axis serves one dim per tensor, so the MLP dims stay whole.
    assert s["experts_gate_up"].w == P(None, "model", None, None)
    assert s["experts_down"].w == P(None, "model", None, None)
    assert s["expert_scale"] == P(None, "model")
    assert s["router"].w == P(None, None, None)
    # 8 experts over 16 devices: the experts stay whole and the next axis (MLP) splits.
    _, s16 = _slot(params, _specs(params, {"data": 1, "model": 16}), sliding=True)
    assert s16["experts_gate_up"].w == P(None, None, "model", None)
    assert s16["expert_scale"] == P(None, None)


def test_quantized_fields_split_on_whole_blocks(fixtures_dir):
    """K splits only on whole quantization blocks; N splits every field alike."""
    q8 = load_fixture(fixtures_dir, "quant_small", "model-Q8_0.gguf")[0].params
    p, s = _slot(q8, _specs(q8, MESH_2x4), sliding=True)
    assert isinstance(p["attn_output"], quant.Q8_0)
    # K = 4 heads x 64 = 8 blocks of 32: 2 blocks (one head) per device, qs and d alike.
    assert _field_specs(s["attn_output"]) == {P(None, None, "model")}
    q4 = load_fixture(fixtures_dir, "quant_small", "model-Q4_K_M.gguf")[0].params
    p, s = _slot(q4, _specs(q4, MESH_2x4), sliding=True)
    assert isinstance(p["attn_output"], quant.Q4_K) and isinstance(p["attn_q"], quant.Q4_K)
    # K = 256 is one Q4_K super-block: it cannot split, so every field stays whole.
    assert _field_specs(s["attn_output"]) == {P(None, None, None)}
    assert _field_specs(s["attn_q"]) == {P(None, "model", None)}  # qs, d, dmin, sc, m
    embed = _specs(q4, MESH_2x4).globals["embed"]
    assert isinstance(q4.globals["embed"], quant.Q6_K)
    assert _field_specs(embed) == {P("model", None)}


def test_cache_specs(fixtures_dir):
    params = load_fixture(fixtures_dir, "dense_tiny")[0].params
    spec = cache_spec(params.config, 4, 64, "float32")
    sizes = {"data": 2, "model": 2}
    got = sh.cache_specs(params.config, spec, sizes)
    for seg, seg_specs in zip(segments(params.config), got, strict=True):
        for s, slot in zip(seg.slots, seg_specs, strict=True):
            kv = "model" if s.n_kv_heads == 2 else None  # 1 global KV head: replicated
            assert slot == {
                "k": P(None, "data", None, kv, None),
                "v": P(None, "data", None, kv, None),
            }
    # A batch that does not split over "data" stays whole.
    spec3 = cache_spec(params.config, 3, 64, "float32")
    for slot in sh.cache_specs(params.config, spec3, sizes)[0]:
        assert slot["k"][1] is None


def test_abstract_mesh_gives_the_same_specs(fixtures_dir):
    params = load_fixture(fixtures_dir, "moe_tiny")[0].params
    abstract = jax.sharding.AbstractMesh((2, 4), ("data", "model"))
    assert _flat(_specs(params, abstract)) == _flat(_specs(params, MESH_2x4))


def test_mesh_helpers():
    assert sh.mesh_from_shape(None) is None
    mesh = sh.mesh_from_shape((1, 1))
    assert dict(mesh.shape) == {"data": 1, "model": 1}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    with pytest.raises(ValueError, match="needs"):
        sh.make_mesh(2, jax.device_count())
    with pytest.raises(ValueError, match="data, model"):
        sh.mesh_from_shape((1, 1, 1))


# ---------------------------------------------------------------------------- 8 simulated devices

# The single-device engine itself moves f32 logits by up to 1.3e-4 (e2b_tiny; 1.2e-4 on
# moe_tiny) between a batch of 8 and the same rows one at a time: XLA:CPU picks other dot
# tilings per shape. A sharded run changes the per-device shapes and, with "model" > 1, the order
# of the split reductions, the same way. Measured sharded-vs-single max diffs: 0.5e-4 .. 1.4e-4
# on logits of magnitude ~9; the bar leaves room for that noise, not for a wrong shard.
FORWARD_TOL = 2.5e-4
CASES = {"e2b_tiny": ("1x8", "2x4", "8x1"), "moe_tiny": ("1x8", "2x4", "8x1", "4x2")}


@pytest.fixture(scope="module")
def report(fixtures_dir):
    env = {k: v for k, v in os.environ.items() if k != "GEMMA4_JAX_KERNELS"}
    # 8 simulated devices; LLVM at -O0 cuts the compile time of these tiny programs by ~1/4.
    flags = "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {flags}".strip()
    env["JAX_PLATFORMS"] = "cpu"
    here = Path(__file__).resolve().parent
    env["PYTHONPATH"] = os.pathsep.join(
        [str(here.parent), str(here), *filter(None, [env.get("PYTHONPATH")])]
    )
    args = [f"{name}={','.join(meshes)}" for name, meshes in CASES.items()]
    proc = subprocess.run(
        [sys.executable, str(here / "sharding_check.py"), str(fixtures_dir), *args, "--pallas"],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["device_count"] == 8
    return out


def _result(report, name, mesh):
    shape = [int(x) for x in mesh.split("x")]
    (r,) = [r for r in report["results"] if r["fixture"] == name and r["mesh"] == shape]
    return r


@pytest.mark.parametrize(
    "name,mesh", [(name, mesh) for name, meshes in CASES.items() for mesh in meshes]
)
def test_sharded_matches_single_device(report, name, mesh):
    r = _result(report, name, mesh)
    # Leaves on their shards, caches (fresh, after prefill, after the decode loop) likewise.
    assert r["problems"] == []
    assert r["forward_max_diff"] < FORWARD_TOL, r
    assert r["tokens_equal"], r


def test_pallas_attention_under_shard_map(report):
    got = report["pallas_ops"]
    assert len(got) >= 4
    for r in got:
        assert r["shard_maps"] == 3, r  # flash, decode, qk_norm_rope each wrapped
        assert r["max_diff"] < 1e-5, r
