"""Where does batch-1 decode time go? E4B Q8_0 decode under kernel modes and XLA flags.

Each variant runs in a fresh subprocess (XLA flags are read at backend start): random E4B
params of the real shapes (benchmarks/random_model.py), one `generate` at context 128 to
compile, then the median of 3 timed generations of `--steps` tokens (decode time only), plus
the kernel launches per decode step counted in the compiled HLO of the generation loop's body.

    python benchmarks/decode_probe.py --out probe.json
    python benchmarks/decode_probe.py --variants reference,auto+cmdbuf
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
VARIANTS = {
    "reference": ("reference", ""),
    "auto": ("auto", ""),
    "pallas": ("pallas", ""),
    "reference+cmdbuf": ("reference", CMDBUF),
    "auto+cmdbuf": ("auto", CMDBUF),
}


def worker(args) -> dict:
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import numpy as np
    from random_model import random_params

    import gemma4_jax as g4

    t0 = time.perf_counter()
    params = random_params(args.family, args.quant)
    build = time.perf_counter() - t0
    prompt = np.random.default_rng(0).integers(
        3, params.config.vocab_size, (1, args.ctx), dtype=np.int32
    )
    t0 = time.perf_counter()
    g4.generate(params, prompt, max_new_tokens=args.steps, stop_tokens=())
    first = time.perf_counter() - t0
    dec = []
    for _ in range(3):
        r = g4.generate(params, prompt, max_new_tokens=args.steps, stop_tokens=())
        dec.append(r.timings["elapsed_s"] - r.timings["prefill_s"])
    dec.sort()
    med = dec[1]
    out = {
        "build_s": build,
        "first_call_s": first,
        "decode_s": dec,
        "tok_s": args.steps / med,
        "ms_per_step": 1e3 * med / args.steps,
    }
    try:  # kernel launches per decode step, from the compiled decode_step
        import jax
        from hlo_stats import kernel_stats

        cache = g4.init_cache(params, 1, 256)
        gen = sys.modules["gemma4_jax.generate"]
        prog = gen._program("decode_step")
        lowered = prog.lower(
            params,
            np.zeros((1,), np.int32),
            cache,
            np.zeros((1,), np.int32),
            kernels=g4.kernel_mode(),
        )
        stats = kernel_stats(lowered.compile().as_text())
        out["kernels_per_step"] = {
            k: v for k, v in stats.items() if isinstance(v, (int, float, str))
        }
        del jax
    except Exception as e:  # the count is a diagnostic; the timing stands without it
        out["kernels_error"] = repr(e)[:300]
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", default="reference,auto,reference+cmdbuf,auto+cmdbuf")
    ap.add_argument("--family", default="e4b")
    ap.add_argument("--quant", default="q8_0")
    ap.add_argument("--ctx", type=int, default=128)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--timeout", type=int, default=150)
    ap.add_argument("--out", default=None)
    ap.add_argument("--worker", action="store_true")
    args = ap.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return
    rows = []
    for name in args.variants.split(","):
        mode, flags = VARIANTS[name]
        env = dict(
            os.environ,
            GEMMA4_JAX_KERNELS=mode,
            XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + flags).strip(),
        )
        cmd = [
            sys.executable,
            __file__,
            "--worker",
            "--family",
            args.family,
            "--quant",
            args.quant,
            "--ctx",
            str(args.ctx),
            "--steps",
            str(args.steps),
        ]
        t0 = time.perf_counter()
        try:
            p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
            line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
            row = json.loads(line[-1][7:]) if line else {"error": p.stderr[-600:]}
        except subprocess.TimeoutExpired:
            row = {"error": f"timeout after {args.timeout}s"}
        row.update(variant=name, mode=mode, xla_flags=flags, wall_s=time.perf_counter() - t0)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| variant | tok/s | ms/step | first call s | kernels/step |\n|---|---|---|---|---|")
    for r in rows:
        k = r.get("kernels_per_step", {})
        kk = k.get("launches_per_call", "")
        print(
            f"| {r['variant']} | {r.get('tok_s', 0):.1f} | {r.get('ms_per_step', 0):.2f} | "
            f"{r.get('first_call_s', 0):.1f} | {kk} | {r.get('error', '')[:60]}"
        )
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
