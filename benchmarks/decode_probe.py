"""Where does decode time go? E4B decode (batch 1 or `--batch`) under kernel modes, XLA flags
and dispatch switches.

Each variant runs in a fresh subprocess (XLA flags are read at backend start): random E4B
params of the real shapes (benchmarks/random_model.py), one `generate` at context 128 to
compile, then the median of 3 timed generations of `--steps` tokens (decode time only), plus
the kernel launches per decode step counted in the compiled HLO of the generation loop's body.

    python benchmarks/decode_probe.py --out probe.json
    python benchmarks/decode_probe.py --variants auto,auto+cmdbuf --quant q4_k_m
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CMDBUF = (
    "--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,"
    "CONDITIONAL --xla_gpu_graph_min_graph_size=1"
)
CMDBUF_NO_WHILE = (
    "--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN "
    "--xla_gpu_graph_min_graph_size=1"
)
# Programmatic dependent launch: a kernel may start while its predecessor drains (its
# prologue overlaps the other's tail), for XLA's own fusions.
PDL = "--xla_gpu_enable_pdl=true"
# ... and the launch attribute that lets the runtime start the next kernel early (XLA has the two
# as separate debug options; which one does what is what the A/B shows).
PDL_LAUNCH = PDL + " --xla_gpu_enable_pdl_launch=true"
# Command buffers with the layer loops unrolled into them: one CUDA graph per decode step
# rather than a conditional node per layer (run d: WHILE in command buffers was 12% slower).
CMDBUF_UNROLL = CMDBUF + " --xla_gpu_command_buffer_unroll_loops=true"
# name -> (kernel mode, XLA flags, environment read at trace time)
VARIANTS = {
    "reference": ("reference", "", {}),
    "auto": ("auto", "", {}),
    "auto-packed": ("auto", "", {"GEMMA4_JAX_PACKED_MATVEC": "0"}),
    "auto-batchq": ("auto", "", {"GEMMA4_JAX_BATCH_QMATMUL": "0"}),
    "auto-stacked": ("auto", "", {"GEMMA4_JAX_STACKED_QMATMUL": "0"}),
    "auto-rn": ("auto", "", {"GEMMA4_JAX_RESIDUAL_NORM": "0"}),
    "auto-le": ("auto", "", {"GEMMA4_JAX_RESIDUAL_NORM": "attn"}),
    "auto-combine": ("auto", "", {"GEMMA4_JAX_ATTN_COMBINE": "jnp"}),
    "auto-pv": ("auto", "", {"GEMMA4_JAX_PALLAS_MATVEC": "none"}),
    "auto+pv_q8": ("auto", "", {"GEMMA4_JAX_PALLAS_MATVEC": "Q8_0,Q4_K,Q6_K"}),
    "auto+pv_q4k": ("auto", "", {"GEMMA4_JAX_PALLAS_MATVEC": "Q4_K"}),
    "auto-merge": ("auto", "", {"GEMMA4_JAX_MERGE_MATVEC": "0"}),
    "auto-parts": ("auto", "", {"GEMMA4_JAX_SPLIT_PARTS": "0"}),
    "auto+idot": ("auto", "", {"GEMMA4_JAX_INT_DOT": "1"}),
    "auto-idot": ("auto", "", {"GEMMA4_JAX_INT_DOT": "0"}),
    "auto+grouped": ("auto", "", {"GEMMA4_JAX_GROUPED_DECODE": "1"}),
    "auto-grouped": ("auto", "", {"GEMMA4_JAX_GROUPED_DECODE": "0"}),
    "auto+grouped_split2": ("auto", "", {"GEMMA4_JAX_GROUPED_SPLIT": "2"}),
    "auto+grouped_split3": ("auto", "", {"GEMMA4_JAX_GROUPED_SPLIT": "3"}),
    "auto+pv_q5_0": ("auto", "", {"GEMMA4_JAX_PALLAS_MATVEC": "Q4_K,Q6_K,Q5_0"}),
    "pallas": ("pallas", "", {}),
    "reference+cmdbuf": ("reference", CMDBUF, {}),
    "auto+cmdbuf": ("auto", CMDBUF, {}),
    "auto+cmdbuf_nowhile": ("auto", CMDBUF_NO_WHILE, {}),
    "auto+pdl": ("auto", PDL, {}),
    "auto+pdl_launch": ("auto", PDL_LAUNCH, {}),
    "auto+cmdbuf_unroll": ("auto", CMDBUF_UNROLL, {}),
    "auto+pdl+cmdbuf_unroll": ("auto", PDL + " " + CMDBUF_UNROLL, {}),
}


def worker(args) -> list[dict]:
    """Runs the variants named in args.variants (all with the same XLA flags) on one set of
    params: each with fresh jit caches."""
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import jax
    import numpy as np
    from random_model import random_params

    import gemma4_jax as g4

    gen = sys.modules["gemma4_jax.generate"]
    t0 = time.perf_counter()
    params = random_params(args.family, args.quant)
    build = time.perf_counter() - t0
    prompt = np.random.default_rng(0).integers(
        3, params.config.vocab_size, (args.batch, args.ctx), dtype=np.int32
    )
    rows = []
    base_env = dict(os.environ)
    for name in args.variants.split(","):
        mode, _, env = VARIANTS[name]
        os.environ.clear()
        os.environ.update(base_env, GEMMA4_JAX_KERNELS=mode, **env)
        jax.clear_caches()
        gen._PROGRAMS.clear()
        try:
            t0 = time.perf_counter()
            g4.generate(params, prompt, max_new_tokens=args.steps, stop_tokens=())
            first = time.perf_counter() - t0
            dec, pre = [], []
            for _ in range(3):
                r = g4.generate(params, prompt, max_new_tokens=args.steps, stop_tokens=())
                dec.append(r.timings["elapsed_s"] - r.timings["prefill_s"])
                pre.append(r.timings["prefill_s"])
            dec.sort()
            pre.sort()
            med = dec[1]
            out = {
                "variant": name,
                "build_s": build,
                "first_call_s": first,
                "decode_s": dec,
                "tok_s": args.batch * args.steps / med,
                "ms_per_step": 1e3 * med / args.steps,
                "prefill_s": pre,
                "prefill_tok_s": args.batch * args.ctx / pre[1],
            }
        except Exception as e:  # one failing variant must not sink the others
            out = {"variant": name, "error": f"{type(e).__name__}: {str(e)[:300]}"}
        if args.count and "error" not in out:
            try:  # kernel launches per decode step, from the compiled decode_step
                from hlo_stats import kernel_stats

                cache = g4.init_cache(params, args.batch, 256)
                prog = gen._program("decode_step")
                lowered = prog.lower(
                    params,
                    np.zeros((args.batch,), np.int32),
                    cache,
                    np.zeros((args.batch,), np.int32),
                    kernels=g4.kernel_mode(),
                )
                stats = kernel_stats(lowered.compile().as_text())
                out["kernels_per_step"] = {
                    k: v for k, v in stats.items() if isinstance(v, (int, float, str))
                }
            except Exception as e:  # the count is a diagnostic; the timing stands without it
                out["kernels_error"] = repr(e)[:300]
        print("RESULT " + json.dumps(out), flush=True)
        rows.append(out)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", default="reference,auto,auto+cmdbuf,auto+cmdbuf_nowhile")
    ap.add_argument("--family", default="e4b")
    ap.add_argument("--quant", default="q8_0")
    ap.add_argument("--ctx", type=int, default=128)
    ap.add_argument("--batch", type=int, default=1, help="rows decoded together (tok/s: all rows)")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--timeout", type=int, default=300, help="per process (one XLA flag set)")
    ap.add_argument("--count", action="store_true", help="count launches (one more compile)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--worker", action="store_true")
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    # One process per distinct XLA flag set (flags are read at backend start); variants with
    # the same flags share a process and the params it builds.
    groups: dict[str, list[str]] = {}
    for name in args.variants.split(","):
        groups.setdefault(VARIANTS[name][1], []).append(name)
    rows = []
    for flags, names in groups.items():
        env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + flags).strip())
        cmd = [sys.executable, __file__, "--worker", "--variants", ",".join(names)]
        for opt in ("family", "quant", "ctx", "batch", "steps"):
            cmd += [f"--{opt}", str(getattr(args, opt))]
        if args.count:
            cmd.append("--count")
        t0 = time.perf_counter()
        try:
            p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
            got = [json.loads(x[7:]) for x in p.stdout.splitlines() if x.startswith("RESULT ")]
            err = "" if len(got) == len(names) else p.stderr[-600:]
        except subprocess.TimeoutExpired as e:
            out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            got = [json.loads(x[7:]) for x in out.splitlines() if x.startswith("RESULT ")]
            err = f"timeout after {args.timeout}s"
        done = {r["variant"] for r in got}
        got += [{"variant": n, "error": err} for n in names if n not in done]
        for row in got:
            row.update(quant=args.quant, xla_flags=flags, process_wall_s=time.perf_counter() - t0)
            print(json.dumps(row), flush=True)
        rows += got
        if args.out:  # after every process: a call cut short still leaves what it measured
            Path(args.out).write_text(json.dumps(rows, indent=1))
    print(
        f"\n{args.family} {args.quant}, batch {args.batch}, context {args.ctx}, "
        f"{args.steps} steps\n"
        "| variant | tok/s | ms/step | prefill tok/s | first call s | kernels/step |\n"
        "|---|---|---|---|---|---|"
    )
    for r in rows:
        kk = r.get("kernels_per_step", {}).get("launches_per_call", "")
        print(
            f"| {r['variant']} | {r.get('tok_s', 0):.1f} | {r.get('ms_per_step', 0):.2f} | "
            f"{r.get('prefill_tok_s', 0):,.0f} | "
            f"{r.get('first_call_s', 0):.1f} | {kk} | {r.get('error', '')[:60]}"
        )


if __name__ == "__main__":
    main()
