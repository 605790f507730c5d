"""Where does the first token's time go? (GPU machine; E4B real-size random GGUF.)

    python3 benchmarks/first_token_probe.py                         # cold, then warm
    python3 benchmarks/first_token_probe.py --xla-flags=--xla_gpu_autotune_level=0

Writes the GGUF once (random_model.write_real_size_gguf) unless `--gguf` names one, then runs
`--runs` fresh processes on one new persistent compilation cache (the first is cold, the rest
warm), each timing its phases from process start: import (jax + gemma4_jax), backend start
(`jax.devices()`), `load`, and `generate` of one token from a 32-token prompt (trace, compile
or cache load, run). With `jax_log_compiles` on, it also sums JAX's own "Finished ..." log
lines (tracing, lowering to MLIR, XLA compilation) and lists the slowest programs. `--sample`
stack-samples the warm runs (`stack_sampler.py`: where each thread's wall time goes, the
loader's pool included). bench_e2e's first_token part measures the same path without the
breakdown.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_CHILD = """
import sys, time
t0 = time.time()
sampler = None
if sys.argv[3] == "1":
    from stack_sampler import StackSampler
    sampler = StackSampler().start()
import jax
jax.config.update("jax_compilation_cache_dir", sys.argv[2])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
jax.config.update("jax_log_compiles", True)
import numpy as np
import gemma4_jax as g4
t1 = time.time(); jax.devices(); t2 = time.time()
model = g4.load(sys.argv[1], dtype="bfloat16"); jax.block_until_ready(model.params)
t3 = time.time()
prompt = np.random.default_rng(7).integers(3, model.params.config.vocab_size, size=32)
g4.generate(model.params, [prompt], max_new_tokens=1, stop_tokens=())
t4 = time.time()
print(f"PHASES {t1 - t0:.3f} {t2 - t1:.3f} {t3 - t2:.3f} {t4 - t3:.3f}", flush=True)
if sampler is not None:
    report = sampler.stop().report(top=int(sys.argv[4]))
    print("SAMPLES", report, "END SAMPLES", sep=chr(10), flush=True)
"""

_FINISHED = re.compile(r"Finished (.*) in ([0-9.e+-]+) sec")


def _kind(what: str) -> str:
    if what.startswith("tracing"):
        return "trace"
    if "MLIR" in what:
        return "lower"
    if "XLA compilation" in what:
        return "compile"
    return "other"


def run_once(
    gguf: str,
    cache: str,
    xla_flags: str,
    timeout: float,
    sample: bool = False,
    top: int = 40,
    extra_env: dict | None = None,
) -> dict:
    path = os.pathsep.join([str(ROOT), str(ROOT / "benchmarks"), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, PYTHONPATH=path, **(extra_env or {}))
    if xla_flags:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + xla_flags).strip()
    t = time.time()
    p = subprocess.run(
        [sys.executable, "-c", _CHILD, gguf, cache, str(int(sample)), str(top)],
        env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    out = p.stdout + p.stderr
    phases = next((ln.split()[1:] for ln in out.splitlines() if ln.startswith("PHASES")), None)
    if phases is None:
        return {"error": out[-2000:], "wall_s": time.time() - t}
    programs = [(float(m.group(2)), m.group(1)) for m in _FINISHED.finditer(out)]
    totals: dict[str, float] = {}
    for sec, what in programs:
        totals[_kind(what)] = totals.get(_kind(what), 0.0) + sec
    names = ("import_s", "backend_s", "load_s", "first_token_s")
    samples = re.search(r"SAMPLES\n(.*)\nEND SAMPLES", out, re.S)
    return {
        "samples": samples.group(1) if samples else None,
        **dict(zip(names, map(float, phases), strict=True)),
        "log_totals_s": totals,
        "slowest": sorted(programs, reverse=True)[:8],
        "wall_s": time.time() - t,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", default=None, help="an existing GGUF (default: write E4B Q8_0)")
    ap.add_argument("--family", default="e4b")
    ap.add_argument("--quant", default="q8_0")
    ap.add_argument("--runs", type=int, default=2, help="fresh processes: 1 cold + warm ones")
    ap.add_argument("--xla-flags", default="", help="extra XLA_FLAGS for the children")
    ap.add_argument("--timeout", type=float, default=200.0)
    ap.add_argument(
        "--sample", action="store_true", help="stack-sample the warm runs (stack_sampler.py)"
    )
    ap.add_argument("--top", type=int, default=40, help="functions listed per thread group")
    ap.add_argument(
        "--alt-env",
        default="",
        help="KEY=VAL[,KEY=VAL]: every other warm run sets these (an A/B in one cache)",
    )
    args = ap.parse_args()

    gguf = args.gguf
    if gguf is None:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        sys.path.insert(0, str(ROOT))
        from random_model import write_real_size_gguf

        gguf = str(Path(tempfile.gettempdir()) / f"first_token_{args.family}_{args.quant}.gguf")
        if not Path(gguf).exists():
            write_real_size_gguf(gguf, args.family, args.quant)
    cache = tempfile.mkdtemp(prefix="jaxcache_")
    print(f"{gguf}, cache {cache}, XLA_FLAGS+={args.xla_flags!r}")
    alt = dict(kv.split("=", 1) for kv in args.alt_env.split(",") if kv)
    for i in range(args.runs):
        use_alt = bool(alt) and i > 0 and i % 2 == 0
        sample = args.sample and i > 0
        r = run_once(
            gguf, cache, args.xla_flags, args.timeout, sample, args.top, alt if use_alt else None
        )
        label = "cold" if i == 0 else ("warm " + args.alt_env if use_alt else "warm")
        if "error" in r:
            print(f"{label}: FAILED\n{r['error']}")
            continue
        total = r["import_s"] + r["backend_s"] + r["load_s"] + r["first_token_s"]
        print(
            f"{label}: {total:.2f} s = import {r['import_s']:.2f} + backend {r['backend_s']:.2f}"
            f" + load {r['load_s']:.2f} + generate {r['first_token_s']:.2f}; JAX log totals "
            + ", ".join(f"{k} {v:.2f}" for k, v in sorted(r["log_totals_s"].items()))
        )
        for sec, what in r["slowest"][:5]:
            print(f"    {sec:7.3f} s  {what[:100]}")
        if r["samples"]:
            print(r["samples"])


if __name__ == "__main__":
    main()
