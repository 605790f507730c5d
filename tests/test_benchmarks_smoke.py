"""The benchmark tooling on CPU at toy sizes: random params of every family structure, the
roofline and HLO counters, and `bench_e2e.py --smoke` and `bench_sharded.py --smoke` end to end
(their JSON keys)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import gemma4_jax as g4
from benchmarks import random_model as rm
from benchmarks.hlo_stats import kernel_stats
from benchmarks.roofline import decode_bytes, prefill_flops_per_token
from gemma4_jax.builtin import REAL_SPECS
from gemma4_jax.config import layer_plan

REPO = Path(__file__).resolve().parents[1]

REQUIRED = (
    "date",
    "device",
    "jax_version",
    "command",
    "e4b_q8_0_decode_b1_tok_s",
    "e4b_q4_k_m_decode_b1_tok_s",
    "e4b_prefill_2k_tok_s",
    "e4b_decode_b32_tok_s",
    "load_s",
    "first_token_cold_s",
    "first_token_warm_s",
    "copy_tb_s",
    "peer_decode_b1_tok_s",
    "peer_prefill_2k_tok_s",
)


@pytest.mark.parametrize("quant", rm.QUANTS)
def test_random_params_tiny_runs_and_stays_finite(quant):
    p = rm.random_params("tiny-e4b", quant, seed=1)
    types = {
        type(x).__name__ for x in jax.tree.leaves(p, is_leaf=lambda x: hasattr(x, "ggml_type"))
    }
    want = {"bf16": {"BF16"}, "q8_0": {"Q8_0"}, "q4_k_m": {"Q4_K", "Q6_K"}}[quant]
    assert want <= types, types
    logits = np.asarray(g4.forward(p, np.arange(1, 13)[None]))
    assert logits.shape == (1, 12, p.config.vocab_size)
    assert np.isfinite(logits).all() and 0.5 < logits.std() < 10


def test_26b_a4b_q4_k_m_has_llama_quantize_fallback_types():
    # 26B-A4B's down projections have rows of 2112 (shared MLP) and 704 (experts): too short
    # for Q4_K / Q6_K, llama-quantize writes Q5_0 / Q8_0, and so does the random model.
    types = rm.tensor_types(rm.family_config("26b-a4b"), "q4_k_m")
    downs = {t for (*_, name), t in types.items() if name in ("ffn_down", "experts_down")}
    assert downs == {"Q5_0", "Q8_0"}
    p = rm.random_params("tiny-26b-a4b", "q4_k_m", seed=2)  # experts_down K = 64: Q5_0
    assert p.segments[0][0]["experts_down"].ggml_type == "Q5_0"
    logits = np.asarray(g4.forward(p, np.arange(1, 9)[None]))
    assert np.isfinite(logits).all() and 0.5 < logits.std() < 10


def test_random_params_follow_the_declaration_at_real_sizes():
    # jax.eval_shape traces the device path without drawing anything: real shapes, no memory.
    from gemma4_jax.params import global_decls, segment_layer_decls

    for fam in ("e2b", "e4b", "31b", "26b-a4b"):
        c = rm.family_config(fam)
        p = jax.eval_shape(lambda f=fam: rm.random_params(f, "q4_k_m", on_device=True))
        assert p.config == c
        for name, d in global_decls(c).items():
            assert tuple(p.globals[name].shape) == d.shape, (fam, name)
        for si, (seg, slots) in enumerate(segment_layer_decls(c)):
            for j, (_, decls) in enumerate(slots):
                for name, d in decls.items():
                    got = tuple(p.segments[si][j][name].shape)
                    assert got == (seg.n_periods, *d.shape), (fam, si, j, name)
        mb = rm.mix_bytes(c, "q4_k_m")
        assert 0.97 < mb["stacked"] / mb["llama_cpp_exact"] < 1.03  # majority type per segment
    assert rm.mix_bytes(rm.family_config("e4b"), "q8_0")["stacked"] == pytest.approx(
        8.0097e9, rel=1e-3
    )
    # the tiny miniatures keep their family's structure
    assert rm.family_config("tiny-e2b").ffn_dim[-1] == 2 * rm.family_config("tiny-e2b").ffn_dim[0]
    assert any(rm.family_config("tiny-31b").k_eq_v)
    assert rm.family_config("tiny-26b-a4b").n_experts == 8


def _plan(config):
    return [layer.structure for layer in layer_plan(config)]


@pytest.mark.parametrize("fam", ["e2b", "e4b", "31b", "26b-a4b"])
def test_family_configs_come_from_the_builtin_presets(fam):
    spec = REAL_SPECS[fam]  # the one table of the family's numbers
    c = rm.family_config(fam)
    assert rm.FAMILIES[fam] == spec and c == rm.spec_config(spec)
    want = [
        (
            spec.is_sliding(i),
            spec.head_dim_of(i),
            spec.kv_heads(i),
            spec.ffn_of(i),
            spec.has_kv(i),
            spec.has_kv(i) and not spec.has_v(i),
            spec.n_experts > 0,
        )
        for i in range(spec.n_layers)
    ]
    got = [(s[0], s[1], s[2], s[3], s[4], s[6], s[7]) for s in _plan(c)]
    assert got == want
    assert (c.d_model, c.n_heads, c.vocab_size, c.window, c.ple_dim) == (
        spec.d_model,
        spec.n_heads,
        spec.vocab_size,
        spec.window,
        spec.ple_dim,
    )
    assert (c.n_experts, c.n_experts_used, c.expert_ffn_dim) == (
        spec.n_experts,
        spec.n_experts_used,
        spec.expert_ffn,
    )
    # a few of the released numbers, pinned
    n_layers, d_model, ffn0, ffn_last = {
        "e2b": (35, 1536, 6144, 12288),  # double-wide MLP on the KV-shared layers
        "e4b": (42, 2560, 10240, 10240),
        "31b": (60, 5376, 21504, 21504),
        "26b-a4b": (30, 2816, 2112, 2112),
    }[fam]
    assert (c.n_layers, c.d_model, c.ffn_dim[0], c.ffn_dim[-1]) == (
        n_layers,
        d_model,
        ffn0,
        ffn_last,
    )


def test_family_config_matches_the_written_gguf(tmp_path):
    # random params and the GGUF written from the same preset have the same layer plan
    from gemma4_jax.config import config_from_gguf
    from gemma4_jax.gguf_file import read_gguf

    for fam in ("smoke", "tiny-31b", "tiny-26b-a4b"):
        path = rm.write_real_size_gguf(tmp_path / f"{fam}.gguf", fam, "q8_0")
        reader = read_gguf(path)
        tensors = {t.name: t for t in reader.tensors}
        vocab = tensors["token_embd.weight"].numpy_shape[0]
        loaded = config_from_gguf(reader.fields, set(tensors), str(path), vocab_size=vocab)
        want = rm.family_config(fam)
        assert _plan(loaded) == _plan(want), fam
        for f in ("d_model", "n_heads", "vocab_size", "window", "ple_dim", "n_experts"):
            assert getattr(loaded, f) == getattr(want, f), (fam, f)


def test_roofline_e4b_numbers():
    c = rm.family_config("e4b")
    b = decode_bytes(c, "q8_0", 128)
    assert b["lm_head"] == pytest.approx(262144 * 2560 * 34 / 32)
    assert 2.69e12 / b["total"] == pytest.approx(535, rel=0.01)  # design.md: "~545"
    f = prefill_flops_per_token(c, 2048)
    assert 4.5e9 < f["total"] < 5.0e9


def test_hlo_stats_counts_while_bodies_by_trip_count():
    text = """HloModule m

%body (p: (s32[], f32[4])) -> (s32[], f32[4]) {
  %p = (s32[], f32[4]) parameter(0)
  %f = f32[4]{0} fusion(%p), kind=kLoop, calls=%fc
  %cc = f32[4]{0} custom-call(%f), custom_call_target="__gpu$xla.gpu.triton"
  ROOT %t = (s32[], f32[4]) tuple(%p, %cc)
}

%cond (p: (s32[], f32[4])) -> pred[] {
  %p = (s32[], f32[4]) parameter(0)
  ROOT %c = pred[] fusion(%p), kind=kLoop, calls=%fc2
}

ENTRY %main (a: f32[4]) -> f32[4] {
  %a = f32[4]{0} parameter(0)
  %w = (s32[], f32[4]) while(%a), condition=%cond, body=%body, backend_config={BC}
  %x = f32[4]{0} copy(%a)
  ROOT %g = f32[4]{0} get-tuple-element(%w), index=1
}
""".replace("{BC}", '{"known_trip_count":{"n":"7"}}')
    s = kernel_stats(text)
    assert s["fusion_per_call"] == 7 + 8  # body 7 times, condition 8 times
    assert s["custom_call_per_call"] == 7
    assert s["custom_call_targets_per_call"] == {"__gpu$xla.gpu.triton": 7}
    assert s["launches_per_call"] == 7 + 8 + 7 + 1
    assert s["static_while"] == 1


def _bench_e2e_smoke(tmp_path, *args: str) -> dict:
    """Runs `bench_e2e.py --smoke ARGS` in a subprocess; its JSON summary."""
    out = tmp_path / "e2e.json"
    script = str(REPO / "benchmarks" / "bench_e2e.py")
    cmd = [sys.executable, script, "--smoke", *args, "--out", str(out)]
    cmd += ["--workdir", str(tmp_path / "work")]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads(out.read_text())


def test_bench_e2e_smoke_writes_the_required_keys(tmp_path):
    s = _bench_e2e_smoke(tmp_path, "--skip", "quant2")
    missing = [k for k in REQUIRED if k not in s]
    assert not missing, missing
    for k in REQUIRED:
        if s[k] is None:
            assert s.get(k + "_reason"), f"{k} is null without a reason"
    # the parts that run on a CPU did measure
    for k in ("e4b_q8_0_decode_b1_tok_s", "e4b_prefill_2k_tok_s", "e4b_decode_b32_tok_s"):
        assert s[k] and s[k] > 0, (k, s.get(k + "_reason"))
    for k in ("load_s", "first_token_cold_s", "first_token_warm_s", "copy_tb_s"):
        assert s[k] and s[k] > 0, (k, s.get(k + "_reason"))
    m = s["raw"]["models"]["smoke/q8_0"]
    assert m["kernels"]["decode_step"]["launches_per_call"] > 0
    assert "| metric |" in s["markdown"]


def test_bench_e2e_other_family_leaves_the_e4b_keys_empty(tmp_path):
    # The headline keys are E4B's targets: a run of another family must not file its numbers
    # under them (a 26B-A4B run once did); they stay in the model table.
    s = _bench_e2e_smoke(tmp_path, "--family", "e2b", "--only", "decode")
    assert s["family"] == "e2b"
    assert s["e4b_q8_0_decode_b1_tok_s"] is None
    assert "primary family is e2b" in s["e4b_q8_0_decode_b1_tok_s_reason"]
    assert s["raw"]["models"]["e2b/q8_0"]["decode"]


def test_bench_sharded_smoke(tmp_path, fixtures_dir):
    # 4 simulated CPU devices: the sharded fixture check and the scaling table on 1 and 2
    out = tmp_path / "sharded.json"
    cmd = [
        sys.executable,
        str(REPO / "benchmarks" / "bench_sharded.py"),
        "--smoke",
        "--out",
        str(out),
        "--fixtures",
        str(fixtures_dir),
        "--workdir",
        str(tmp_path / "work"),
    ]
    env = {k: v for k, v in os.environ.items() if k != "GEMMA4_JAX_KERNELS"}
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    s = json.loads(out.read_text())
    assert s["nccl_nvls_enable"] == "0" and s["n_devices"] == 4
    fx = s["fixtures"]
    assert fx["all_match"] and fx["complete"], fx
    assert {tuple(x["mesh"]) for x in fx["results"]} == {(1, 4), (4, 1), (2, 2)}
    assert {x["fixture"] for x in fx["results"]} == {"e2b_tiny", "moe_tiny"}
    rows = {(x["measurement"], x["devices"]): x for x in s["scaling"]["rows"]}
    for meas in ("decode_b1", "prefill_64", "decode_b4"):
        assert rows[(meas, 1)]["tok_s"] > 0 and rows[(meas, 1)]["speedup"] == pytest.approx(1)
        two = rows[(meas, 2)]
        assert two["mesh"] == "1x2" and two["tok_s"] > 0
        assert two["efficiency"] == pytest.approx(two["speedup"] / 2)
    assert rows[("decode_b4_dp", 2)]["mesh"] == "2x1"
    assert "| model | measurement |" in s["markdown"]


def test_bench_attention_never_times_merged_calls():
    # Two calls on the same inputs are one HLO instruction to XLA's CSE, so a timed executable
    # must give every call inputs of its own: R copies for R calls, or (decode) one set holding
    # R stacked caches with a distinct layer per call. (Run (a) timed R / C times too little.)
    from benchmarks import bench_attention as ba

    cases = [(4096, 4095, 512, False), (32768, 32767, 512, False), (512, 100000, 256, True)]
    jobs = (
        ba.decode_jobs(cases, interpret=False, sweep=False)
        + ba.prefill_jobs([2048, 32768], interpret=False, sweep=False)
        + ba.norm_rope_jobs([1, 2048], interpret=False, sweep=False)
    )
    for job in jobs:
        r, c = job.plan(smoke=False)
        if job.stacked:
            assert c == 1 and r >= 2, (job.name, r, c)
            k = jax.eval_shape(lambda job=job, r=r: job.make_args(jax.random.PRNGKey(0), r))[1]
            assert k.shape[0] == r, (job.name, k.shape)  # one cache per call
            # and R of them stream from HBM, not the 50 MiB L2
            assert r * job.flush_bytes >= min(ba.FLUSH_BYTES, ba.MAX_RESIDENT_BYTES), job.name
        else:
            assert r == c and 2 <= r <= 16, (job.name, r, c)


def test_bench_attention_smoke_runs():
    from benchmarks import bench_attention as ba

    assert ba.main(["--smoke"]) == 0


def test_bench_grouped_decode_smoke(tmp_path):
    # The MoE decode tile bench at toy sizes in interpret mode: every variant runs and
    # computes what XLA's gather path does in f32 (bf16 x and outputs: ~1e-2 relative).
    from benchmarks import bench_grouped_decode as bg

    out = tmp_path / "grouped.json"
    assert bg.main(["--smoke", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert {(r["shape"], r["variant"]) for r in rows} == {
        (s, v) for s in ("gate_up", "down") for v in bg.SMOKE_VARIANTS.split(";")
    }
    assert all(r["us_per_call"] > 0 and r["max_rel_err"] < 2e-2 for r in rows), rows


def test_first_token_probe_smoke(fixtures_dir):
    # A tiny fixture GGUF on the CPU: one cold and one warm fresh process on one cache, each
    # with its phases and JAX's compile-log totals.
    cmd = [
        sys.executable,
        str(REPO / "benchmarks" / "first_token_probe.py"),
        "--gguf",
        str(fixtures_dir / "e4b_tiny" / "model.gguf"),
    ]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for label in ("cold", "warm"):
        line = next(x for x in r.stdout.splitlines() if x.startswith(f"{label}:"))
        assert "import" in line and "generate" in line and "compile" in line, line


def test_trace_stats_without_gpu_kernels_says_so():
    # benchmarks/trace_stats.py (bench_qmatmul / bench_attention --trace): on the CPU the trace
    # holds no GPU kernel lines, which must come back as an error entry, not a crash.
    import jax
    import jax.numpy as jnp

    from benchmarks import trace_stats

    exe = jax.jit(lambda a: a + 1).lower(jnp.zeros(8)).compile()
    out = trace_stats.kernel_times(exe, jnp.zeros(8))
    assert set(out) == {"error"}
