"""Every kernel of a decode step, with its duration and the gap before it (GPU machine).

    python3 benchmarks/kernel_profile.py --quant q8_0 --out profile_q8.md

Builds random E4B params (benchmarks/random_model.py), prefills a prompt, compiles and warms
`decode_step`, times 20 steps (one dispatch each), then records 3 more under
`jax.profiler.trace` and reads the trace back with `jax.profiler.ProfileData`: for the last
step, every GPU kernel in launch order (name, the HLO op it belongs to, duration, idle gap
before it), and totals: the step's span, its kernel-busy time and its idle time. That splits
a step into "kernels too slow" and "GPU waiting between kernels". `--prefill` reports one
prefill of the `--ctx`-token prompt the same way; `--batch` rows; `--hlo` also writes the
compiled decode_step HLO (fusion names match the profile's kernel names).

`--ncu` instead opens a cudaProfilerStart/Stop window around one step for Nsight Compute
(slow under ncu: the random model build alone takes minutes there):

    ncu --profile-from-start off --clock-control none --metrics gpu__time_duration.sum \
        --csv --log-file ncu.csv python3 benchmarks/kernel_profile.py --ncu
    python3 benchmarks/kernel_profile.py --summarize ncu.csv
"""

from __future__ import annotations

import argparse
import collections
import csv
import ctypes
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _profiler(on: bool) -> None:
    """cudaProfilerStart/Stop through whichever CUDA runtime this process can reach."""
    try:
        import cupy

        (cupy.cuda.runtime.profilerStart if on else cupy.cuda.runtime.profilerStop)()
        return
    except Exception:
        pass
    for lib in ("libcudart.so.13", "libcudart.so.12", "libcudart.so"):
        try:
            rt = ctypes.CDLL(lib)
        except OSError:
            continue
        (rt.cudaProfilerStart if on else rt.cudaProfilerStop)()
        return
    try:
        drv = ctypes.CDLL("libcuda.so.1")
    except OSError:
        print("no CUDA runtime or driver library found: profiler window not opened")
        return
    (drv.cuProfilerStart if on else drv.cuProfilerStop)()


def profile(args) -> None:
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import jax
    import numpy as np
    from random_model import random_params

    import gemma4_jax as g4

    params = random_params(args.family, args.quant)
    prompt = np.random.default_rng(0).integers(
        3, params.config.vocab_size, (args.batch, args.ctx), dtype=np.int32
    )
    if args.prefill:
        return profile_prefill(args, params, prompt)
    cache = g4.init_cache(params, args.batch, args.ctx + 64)
    logits, cache = g4.prefill(params, prompt, cache)
    tok = jax.numpy.argmax(logits, -1).astype(jax.numpy.int32)
    pos = np.full((args.batch,), args.ctx, np.int32)
    for _ in range(2):
        logits, cache = g4.decode_step(params, tok, cache, pos)
        pos = pos + 1  # a new array: the last step's may still be in flight
    jax.block_until_ready(logits)
    t0 = time.perf_counter()
    n = 20
    for _ in range(n):
        logits, cache = g4.decode_step(params, tok, cache, pos)
        pos = pos + 1  # a new array: the last step's may still be in flight
    jax.block_until_ready(logits)
    ms = 1e3 * (time.perf_counter() - t0) / n
    print(f"decode_step wall (one dispatch per step): {ms:.3f} ms")
    if args.hlo:  # the optimised HLO of the step, to name what the profile's kernels are
        prog = sys.modules["gemma4_jax.generate"]._program("decode_step")
        lowered = prog.lower(params, tok, cache, pos, kernels=g4.kernel_mode())
        Path(args.hlo).write_text(lowered.compile().as_text())
    if args.ncu:
        _profiler(True)
        logits, cache = g4.decode_step(params, tok, cache, pos)
        jax.block_until_ready(logits)
        _profiler(False)
        return
    import tempfile

    trace_dir = tempfile.mkdtemp(prefix="g4trace")
    jax.profiler.start_trace(trace_dir)
    for _ in range(3):
        logits, cache = g4.decode_step(params, tok, cache, pos)
        jax.block_until_ready(logits)
        pos = pos + 1  # a new array: the last step's may still be in flight
    jax.profiler.stop_trace()
    report = trace_report(trace_dir, args.first)
    header = (
        f"# decode_step kernels: {args.family} {args.quant}, batch {args.batch}, "
        f"context {args.ctx}, "
        f"kernels={g4.kernel_mode()}\n\n"
        f"wall per step, 20 steps of one dispatch each: {ms:.3f} ms\n\n"
    )
    text = header + report
    print(text[:4000])
    if args.out:
        Path(args.out).write_text(text)


def profile_prefill(args, params, prompt) -> None:
    """`--prefill`: the same report for one prefill of the `--ctx`-token prompt."""
    import tempfile

    import jax

    import gemma4_jax as g4

    def once():
        cache = jax.block_until_ready(g4.init_cache(params, args.batch, args.ctx))
        return jax.block_until_ready(g4.prefill(params, prompt, cache)[0])

    for _ in range(2):
        once()
    t0 = time.perf_counter()
    for _ in range(5):
        once()
    ms = 1e3 * (time.perf_counter() - t0) / 5
    trace_dir = tempfile.mkdtemp(prefix="g4trace")
    jax.profiler.start_trace(trace_dir)
    for _ in range(2):
        once()
    jax.profiler.stop_trace()
    text = (
        f"# prefill kernels: {args.family} {args.quant}, batch {args.batch}, prompt {args.ctx}, "
        f"kernels={g4.kernel_mode()}\n\nwall per prefill (cache init included): {ms:.3f} ms, "
        f"{args.batch * args.ctx / ms * 1e3:,.0f} tok/s\n\n" + trace_report(trace_dir, args.first)
    )
    print(text[:4000])
    if args.out:
        Path(args.out).write_text(text)


def trace_report(trace_dir: str, first: int) -> str:
    """The last program run (decode step or prefill) of a `jax.profiler` trace: kernels, gaps,
    totals (markdown)."""
    import glob

    from jax.profiler import ProfileData

    path = sorted(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True))[-1]
    pd = ProfileData.from_file(path)
    kernels, modules, ops = [], [], []
    line_names = []
    for plane in pd.planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        for line in plane.lines:
            evs = [(e.start_ns, e.duration_ns, e.name) for e in line.events]
            line_names.append(f"{line.name} ({len(evs)})")
            if line.name == "XLA Modules":
                modules += evs
            elif line.name == "XLA Ops":
                ops += evs
            elif "Stream" in line.name or "stream" in line.name:
                kernels += evs
    out = ["GPU trace lines: " + ", ".join(line_names) + "\n"]
    if not kernels:
        return "\n".join(out + ["no kernel events found in the trace"])
    kernels.sort()
    ops.sort()
    # The last step: kernels inside the last "XLA Modules" event (else: the last third).
    if modules:
        m0, md, _ = max(modules)
        step = [k for k in kernels if m0 <= k[0] <= m0 + md]
    else:
        step = kernels[len(kernels) * 2 // 3 :]
    if not step:
        step = kernels

    def op_of(t):  # the HLO op whose span holds kernel start t
        import bisect

        i = bisect.bisect_right(ops, (t, float("inf"), "")) - 1
        return ops[i][2] if i >= 0 and ops[i][0] + ops[i][1] >= t else ""

    span = (step[-1][0] + step[-1][1] - step[0][0]) / 1e3
    busy = sum(d for _, d, _ in step) / 1e3
    rows, prev_end = [], step[0][0]
    by = collections.defaultdict(lambda: [0, 0.0, 0.0])
    for start, dur, name in step:
        gap = max(0.0, (start - prev_end) / 1e3)
        prev_end = max(prev_end, start + dur)
        op = op_of(start)
        rows.append((name, op, dur / 1e3, gap))
        key = _kind(name, op)
        by[key][0] += 1
        by[key][1] += dur / 1e3
        by[key][2] += gap
    out.append(
        f"last step: {len(step)} kernels, span {span:.1f} us, kernel-busy {busy:.1f} us "
        f"({100 * busy / span:.0f}%), idle gaps {span - busy:.1f} us\n"
    )
    out.append("| kind | count | busy us | gap us before | mean us |\n|---|---|---|---|---|")
    for key, (n, us, gap) in sorted(by.items(), key=lambda kv: -kv[1][1] - kv[1][2]):
        out.append(f"| `{key}` | {n} | {us:.1f} | {gap:.1f} | {us / n:.2f} |")
    out.append(f"\nFirst {first} kernels in launch order:\n")
    out.append("| # | kernel | HLO op | us | gap us |\n|---|---|---|---|---|")
    for i, (name, op, us, gap) in enumerate(rows[:first]):
        out.append(f"| {i} | `{name[:60]}` | `{op[:50]}` | {us:.2f} | {gap:.2f} |")
    return "\n".join(out)


def _kind(name: str, op: str) -> str:
    """A grouping key: the HLO op name without its numeric suffix, else the kernel name."""
    import re

    base = op or name
    return re.sub(r"[._]\d+$", "", re.sub(r"\.\d+", "", base))[:60]


def summarize(path: Path, first: int) -> str:
    rows = []
    with open(path, newline="") as f:
        lines = [ln for ln in f if ln.startswith('"')]  # skip ncu's ==PROF== lines
    for r in csv.DictReader(lines):
        if r.get("Metric Name") != "gpu__time_duration.sum":
            continue
        v = float(r["Metric Value"].replace(",", ""))
        unit = r.get("Metric Unit", "ns")
        us = v / 1e3 if unit in ("nsecond", "ns") else (v if unit in ("usecond", "us") else v * 1e3)
        rows.append((r["Kernel Name"], us, r.get("Grid Size", ""), r.get("Block Size", "")))
    total = sum(us for _, us, _, _ in rows)
    out = [f"{len(rows)} kernels, {total:.1f} us of kernel time in one decode step\n"]
    by = collections.defaultdict(lambda: [0, 0.0])
    for name, us, _, _ in rows:
        short = name.split("(")[0][:70]
        by[short][0] += 1
        by[short][1] += us
    out.append("| kernel | count | total us | mean us | share |\n|---|---|---|---|---|")
    for name, (cnt, us) in sorted(by.items(), key=lambda kv: -kv[1][1])[:40]:
        out.append(f"| `{name}` | {cnt} | {us:.1f} | {us / cnt:.2f} | {100 * us / total:.1f}% |")
    out.append(f"\nFirst {first} kernels in launch order:\n")
    out.append("| # | kernel | us | grid | block |\n|---|---|---|---|---|")
    for i, (name, us, grid, block) in enumerate(rows[:first]):
        out.append(f"| {i} | `{name.split('(')[0][:70]}` | {us:.2f} | {grid} | {block} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--family", default="e4b")
    ap.add_argument("--quant", default="q8_0")
    ap.add_argument("--ctx", type=int, default=128)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prefill", action="store_true", help="profile a prefill of --ctx tokens")
    ap.add_argument("--hlo", type=Path, help="also write the compiled decode_step HLO here")
    ap.add_argument("--ncu", action="store_true", help="profiler window for ncu, no trace")
    ap.add_argument("--out", type=Path, help="write the trace report (markdown) here")
    ap.add_argument("--summarize", type=Path, help="an ncu --csv log to summarise")
    ap.add_argument("--first", type=int, default=80)
    args = ap.parse_args()
    if args.summarize:
        print(summarize(args.summarize, args.first))
    else:
        profile(args)


if __name__ == "__main__":
    main()
