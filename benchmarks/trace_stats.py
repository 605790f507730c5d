"""GPU kernel times of one executable run, from a `jax.profiler` trace (GPU machine).

A benchmark's wall time per call includes what the host spends starting the executable,
spread over its R calls; for calls of a few microseconds that share is not small (run r:
a 4K decode-attention call read 15.4 us by wall time and 11.6 us by trace span). `kernel_times`
runs the executable once under the profiler and sums the GPU kernels it launched.
"""

from __future__ import annotations

import collections
import glob
import tempfile

import jax


def kernel_times(exe, *args) -> dict:
    """One `exe(*args)` under `jax.profiler`: kernels by name (count, total and mean us), the
    sum of kernel durations (`busy_us`) and the span from first kernel start to last end."""
    from jax.profiler import ProfileData

    trace_dir = tempfile.mkdtemp(prefix="bench_trace")
    jax.profiler.start_trace(trace_dir)
    jax.block_until_ready(exe(*args))
    jax.profiler.stop_trace()
    paths = sorted(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True))
    if not paths:
        return {"error": "no trace written"}
    kernels = []
    for plane in ProfileData.from_file(paths[-1]).planes:
        if plane.name.startswith("/device:GPU"):
            for line in plane.lines:
                if "tream" in line.name:  # "Stream #14(Compute)"
                    kernels += [(e.start_ns, e.duration_ns, e.name) for e in line.events]
    if not kernels:
        return {"error": "no kernel events in the trace"}
    kernels.sort()
    by = collections.defaultdict(lambda: [0, 0.0])
    for _, dur, name in kernels:
        short = name.split("(")[0][:60]
        by[short][0] += 1
        by[short][1] += dur / 1e3
    return {
        "span_us": (kernels[-1][0] + kernels[-1][1] - kernels[0][0]) / 1e3,
        "busy_us": sum(d for _, d, _ in kernels) / 1e3,
        "kernels": {k: {"n": n, "us": us, "mean_us": us / n} for k, (n, us) in by.items()},
    }
