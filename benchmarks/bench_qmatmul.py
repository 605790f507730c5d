"""Quantized matmul kernels vs XLA at the Gemma 4 E4B shapes (GPU).

For every (format, N x K, M) it times, on the same random data:
- the Pallas kernel ``pallas_kernels.qmatmul.qmatmul`` (bf16 activations);
- (a) XLA dequantize-then-dot (``qmatmul_reference``: jnp dequantization, XLA picks fusions);
- (b) a dense bf16 ``x @ W^T`` of the same shape (the tensor-core ceiling for prefill);
- (c) once, a device copy of a 512 MiB array: (read + write bytes) / time = copy ceiling.

Decode rows (M <= 64) are judged by weight GB/s against 80% of the copy ceiling, prefill rows
by TFLOP/s against 60% of the dense bf16 rate (docs/design.md targets).

Method: each timed executable is one jit holding R back-to-back calls on R different x and on
C copies of the weights (C * weight bytes >= 256 MiB, more than the 50 MiB L2, so every call
streams its weights from HBM as decode does across layers; XLA's and the dense rows take
R = C, a copy per call, because XLA fuses sibling reductions that share a weight into one
kernel reading it once); time = median over --reps runs / R. No Python dispatch in the loop,
launch gaps inside the executable included. All executables are compiled up front on a thread
pool (Triton compiles are the slow part).

    python benchmarks/bench_qmatmul.py --out results.json            # ~2-3 min on an H100
    python benchmarks/bench_qmatmul.py --quick                       # 2 shapes, M = 1 and 2048
    python benchmarks/bench_qmatmul.py --sweep --ms 1,8 --formats Q8_0,Q4_K   # tile search
    python benchmarks/bench_qmatmul.py --trace --ms 1 --xla-ms 1   # + GPU-busy time per call

`--trace` also runs each executable once under the profiler and reports the sum of its GPU
kernel durations per call (benchmarks/trace_stats.py): wall time per call carries the host's
start-up share of the executable, which is not small against a few-microsecond matvec.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import dataclasses
import datetime
import itertools
import json
import math
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from jax import lax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pallas_kernels import qmatmul as qm  # noqa: E402
from pallas_kernels import qtiles  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from trace_stats import kernel_times  # noqa: E402

E4B_SHAPES = [(2048, 2560), (512, 2560), (2560, 2048), (10240, 2560), (2560, 10240), (262144, 2560)]
SHAPE_NAMES = {
    (2048, 2560): "attn q",
    (512, 2560): "attn k/v",
    (2560, 2048): "attn o",
    (10240, 2560): "ffn gate/up",
    (2560, 10240): "ffn down",
    (262144, 2560): "lm head",
}
FLUSH_BYTES = 256 << 20  # weight copies per executable: more than L2 (50 MiB)
MAX_CALLS = 32  # calls per executable (the smallest weights stay partly L2-resident)
COPY_BYTES = 512 << 20
DECODE_MAX_M = 64


@dataclasses.dataclass(frozen=True)
class Job:
    kind: str  # "kernel" | "scan" (kernel inside lax.scan) | "xla" | "dense" | "copy"
    fmt: str = ""
    n: int = 0
    k: int = 0
    m: int = 0
    block_sizes: qm.BlockSizes | None = None

    @property
    def weight_bytes(self) -> int:
        if self.kind == "copy":
            return COPY_BYTES
        if self.kind == "dense":
            return self.n * self.k * 2
        return qtiles.weight_bytes(self.fmt, self.n, self.k)

    @property
    def flops(self) -> int:
        return 2 * self.m * self.n * self.k

    def plan(self) -> tuple[int, int]:
        """(R calls per executable, C weight copies)."""
        if self.kind == "copy":
            # One copy per executable: R copies of one input would be fused by XLA into one
            # kernel that reads it once (a 4-copy executable "measured" 3.8 TB/s, above HBM peak).
            return 1, 1
        c = min(MAX_CALLS, max(1, math.ceil(FLUSH_BYTES / self.weight_bytes)))
        est = max(self.weight_bytes / 2.0e12, self.flops / 4.0e14) + 3e-6  # seconds
        r = min(MAX_CALLS, max(4, math.ceil(2e-3 / est)))
        if self.kind in ("scan", "xla", "dense"):
            # One call per weight copy (a scan step per stacked copy). XLA fuses sibling
            # reductions that share a weight operand into one kernel that reads it once for
            # all of them (run s: one reduction for 6 LM-head calls), so its calls must not
            # share weights; a Pallas call is opaque and reads its weight every time.
            return c, c
        return max(r, c), c


# ---------------------------------------------------------------------------------------------
# Data and executables
# ---------------------------------------------------------------------------------------------
def _abstract_fields(fmt: str, n: int, k: int) -> dict:
    spec = qtiles.get_format(fmt)
    nb = k // spec.block
    return {
        name: jax.ShapeDtypeStruct((n, nb * per), dt) for name, (dt, per, _) in spec.fields.items()
    }


def _random_fields(fmt: str, n: int, k: int, key) -> dict:
    """Random packed bits; f16 scales ~ +-2**-7 (random data is fine for speed)."""
    out = {}
    for i, (name, a) in enumerate(_abstract_fields(fmt, n, k).items()):
        kk = jax.random.fold_in(key, i)
        if a.dtype == jnp.float16:
            v = jax.random.uniform(kk, a.shape, jnp.float32, -1.0, 1.0) * 2.0**-7
            out[name] = v.astype(jnp.float16)
        elif name in ("sc", "m") and fmt in ("Q4_K", "Q5_K"):
            out[name] = jax.random.randint(kk, a.shape, 0, 64, jnp.int32).astype(jnp.uint8)
        else:
            # Bits of the field's own width (Q5_0 / Q5_1 keep their high bits as uint32).
            bits = jax.random.bits(kk, a.shape, jnp.dtype(f"uint{8 * a.dtype.itemsize}"))
            out[name] = lax.bitcast_convert_type(bits, a.dtype)
    return out


def _make(job: Job, interpret: bool):
    """(function, abstract args, concrete-args factory) of a job's executable."""
    r, c = job.plan()
    bf16 = jnp.bfloat16
    if job.kind == "copy":
        n_words = COPY_BYTES // 4

        def fn(a):
            return a + jnp.uint32(1)

        abstract = (jax.ShapeDtypeStruct((n_words,), jnp.uint32),)
        return fn, abstract, lambda key: (jax.random.bits(key, (n_words,), jnp.uint32),)

    x_abs = [jax.ShapeDtypeStruct((job.m, job.k), bf16)] * r
    if job.kind == "scan":
        # As the model runs it: layers stacked on a leading axis, lax.scan slices one per step.
        # Shows whether XLA copies each slice out before the custom call (extra weight traffic).
        w_abs = {
            k: jax.ShapeDtypeStruct((c, *a.shape), a.dtype)
            for k, a in _abstract_fields(job.fmt, job.n, job.k).items()
        }

        def scan_fn(xs, ws):
            def step(carry, xw):
                x, w = xw
                return carry, qm.qmatmul(x, job.fmt, w, interpret=interpret)

            return lax.scan(step, 0, (jnp.stack(xs), ws))[1]

        def scan_concrete(key):
            xs = [
                jax.random.normal(jax.random.fold_in(key, 1000 + i), (job.m, job.k)).astype(bf16)
                for i in range(r)
            ]
            copies = [
                _random_fields(job.fmt, job.n, job.k, jax.random.fold_in(key, i)) for i in range(c)
            ]
            return xs, {k: jnp.stack([w[k] for w in copies]) for k in copies[0]}

        return scan_fn, (x_abs, w_abs), scan_concrete
    if job.kind == "dense":
        w_abs = [jax.ShapeDtypeStruct((job.n, job.k), bf16)] * c

        def call(x, w):
            return lax.dot_general(
                x, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
            ).astype(bf16)

        def weights(key):
            return [
                (jax.random.normal(jax.random.fold_in(key, i), (job.n, job.k)) * 0.02).astype(bf16)
                for i in range(c)
            ]
    else:
        w_abs = [_abstract_fields(job.fmt, job.n, job.k)] * c
        if job.kind == "kernel":

            def call(x, w):
                return qm.qmatmul(x, job.fmt, w, interpret=interpret, block_sizes=job.block_sizes)
        else:

            def call(x, w):
                return qm.qmatmul_reference(x, job.fmt, w)

        def weights(key):
            return [
                _random_fields(job.fmt, job.n, job.k, jax.random.fold_in(key, i)) for i in range(c)
            ]

    def fn(xs, ws):
        return tuple(call(xs[i], ws[i % c]) for i in range(r))

    def concrete(key):
        xs = [
            jax.random.normal(jax.random.fold_in(key, 1000 + i), (job.m, job.k)).astype(bf16)
            for i in range(r)
        ]
        return xs, weights(key)

    return fn, (x_abs, w_abs), concrete


def _compile(job: Job, interpret: bool):
    fn, abstract, concrete = _make(job, interpret)
    t0 = time.perf_counter()
    exe = jax.jit(fn).lower(*abstract).compile()
    return exe, concrete, time.perf_counter() - t0


def _time(exe, args, reps: int, calls: int) -> float:
    jax.block_until_ready(exe(*args))  # warm-up (and first-touch of the outputs)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(exe(*args))
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) / calls


def run_jobs(
    jobs: list[Job], *, reps: int, workers: int, interpret: bool, trace: bool = False
) -> list[dict]:
    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(workers) as pool:
        futures = [pool.submit(_compile, j, interpret) for j in jobs]
        compiled = []
        for job, f in zip(jobs, futures, strict=True):
            try:
                compiled.append(f.result())
            except Exception as e:  # report, keep going: one bad tile must not sink the run
                print(f"compile failed: {job}: {type(e).__name__}: {str(e)[:400]}", flush=True)
                compiled.append(None)
    print(f"compiled {len(jobs)} executables in {time.perf_counter() - t0:.1f}s", flush=True)
    results = []
    key = jax.random.PRNGKey(0)
    for i, (job, comp) in enumerate(zip(jobs, compiled, strict=True)):
        row = {"kind": job.kind, "fmt": job.fmt, "n": job.n, "k": job.k, "m": job.m}
        if job.block_sizes is not None:
            row["block_sizes"] = dataclasses.asdict(job.block_sizes)
        if comp is None:
            row["error"] = "compile failed"
            results.append(row)
            continue
        exe, concrete, t_compile = comp
        r, c = job.plan()
        try:
            args = concrete(jax.random.fold_in(key, i))
            t = _time(exe, args, reps, r)
            if trace:
                tr = kernel_times(exe, *args)  # benchmarks/trace_stats.py
                if "busy_us" in tr:
                    moved = job.weight_bytes * (2 if job.kind == "copy" else 1)
                    row.update(kernel_us=tr["busy_us"] / r, trace=tr)
                    row["kernel_gbps"] = moved / (tr["busy_us"] / r) / 1e3
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
            print(f"run failed: {job}: {row['error']}", flush=True)
            results.append(row)
            continue
        finally:
            args = None
        row.update(
            us=t * 1e6,
            gbps=job.weight_bytes / t / 1e9 * (2 if job.kind == "copy" else 1),
            tflops=job.flops / t / 1e12,
            weight_bytes=job.weight_bytes,
            calls=r,
            weight_copies=c,
            compile_s=round(t_compile, 2),
        )
        results.append(row)
    return results


# ---------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------
def _index(results):
    return {(r["kind"], r["fmt"], r["n"], r["k"], r["m"]): r for r in results}


def markdown(results, copy_gbps: float | None, copy_busy_gbps: float | None = None) -> str:
    """The table; "% copy" against the copy's wall-time rate, "busy % copy" against its
    GPU-busy rate (``--trace``; the wall time of one 512 MiB copy per executable measured
    1.70 TB/s in run s where the end-to-end run's copy gave 2.58)."""
    idx = _index(results)
    lines = []
    if copy_gbps:
        busy = f", GPU-busy **{copy_busy_gbps:.0f} GB/s**" if copy_busy_gbps else ""
        lines.append(f"Copy ceiling (read + write): wall **{copy_gbps:.0f} GB/s**{busy}\n")
    lines.append(
        "| fmt | shape | N x K | M | kernel us | weight GB/s | % copy | TFLOP/s | in scan us | "
        "XLA deq+dot us | x vs XLA | bf16 dense us | dense TFLOP/s | % dense | "
        "GPU-busy us (trace) | busy GB/s | busy % copy | XLA busy us |"
    )
    lines.append("|" + "---|" * 18)
    for r in results:
        if r["kind"] != "kernel":
            continue
        key = (r["fmt"], r["n"], r["k"], r["m"])
        shape = f"{r['n']} x {r['k']}"
        if "error" in r:
            lines.append(f"| {r['fmt']} | | {shape} | {r['m']} | {r['error']} |" + " |" * 13)
            continue
        xla = idx.get(("xla", *key))
        scan = idx.get(("scan", *key))
        scan_us = f"{scan['us']:.1f}" if scan and "us" in scan else ""
        dense = idx.get(("dense", "", r["n"], r["k"], r["m"]))
        pct_copy = f"{100 * r['gbps'] / copy_gbps:.0f}%" if copy_gbps else ""
        xla_us = f"{xla['us']:.1f}" if xla and "us" in xla else ""
        vs = f"{xla['us'] / r['us']:.2f}" if xla and "us" in xla else ""
        d_us = f"{dense['us']:.1f}" if dense and "us" in dense else ""
        d_tf = f"{dense['tflops']:.0f}" if dense and "us" in dense else ""
        pct_d = f"{100 * dense['us'] / r['us']:.0f}%" if dense and "us" in dense else ""
        busy = busy_gbps = busy_pct = ""
        if "kernel_us" in r:
            busy, busy_gbps = f"{r['kernel_us']:.1f}", f"{r['kernel_gbps']:.0f}"
            busy_ref = copy_busy_gbps or copy_gbps
            busy_pct = f"{100 * r['kernel_gbps'] / busy_ref:.0f}%" if busy_ref else ""
        xla_busy = f"{xla['kernel_us']:.1f}" if xla and "kernel_us" in xla else ""
        label = r["fmt"]
        int_dot = r.get("block_sizes", {}).get("int_dot")
        if int_dot is not None:
            label += " int dot" if int_dot else " float"
        lines.append(
            f"| {label} | {SHAPE_NAMES.get((r['n'], r['k']), '')} | {shape} | {r['m']} | "
            f"{r['us']:.1f} | {r['gbps']:.0f} | {pct_copy} | {r['tflops']:.1f} | {scan_us} | "
            f"{xla_us} | "
            f"{vs} | {d_us} | {d_tf} | {pct_d} | {busy} | {busy_gbps} | {busy_pct} | {xla_busy} |"
        )
    return "\n".join(lines)


def sweep_candidates(fmt: str, m: int, int_dot: bool = False) -> list[qm.BlockSizes]:
    """Tile variants around the heuristic for the decode kernels (``int_dot``: the integer-dot
    vector kernel's one-row tiles)."""
    kernel = "vector" if m <= qm.VECTOR_MAX_M else "mma"
    if int_dot and kernel == "vector" and fmt in qtiles.INT_DOT_FORMATS:
        out = [qm.BlockSizes(int_dot=True)]
        for bn, bk, warps in itertools.product((8, 16, 32), (256, 512, 1024), (2, 4, 8)):
            out.append(
                qm.BlockSizes(block_n=bn, block_k=bk, num_warps=warps, num_stages=1, int_dot=True)
            )
        return out
    big = qtiles.get_format(fmt).block == 256
    bks = (256, 512) if big else (128, 256, 512)
    out = [qm.BlockSizes()]
    for bn, bk, warps, split in itertools.product((32, 64, 128), bks, (4, 8), (None, 1)):
        out.append(
            qm.BlockSizes(kernel=kernel, block_n=bn, block_k=bk, num_warps=warps, split_k=split)
        )
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    p.add_argument("--formats", default="Q8_0,Q4_K,Q6_K")
    p.add_argument("--ms", default="1,8,32,512,2048")
    p.add_argument("--shapes", help="NxK,NxK,... (default: the E4B shapes)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--workers", type=int, default=12, help="parallel compiles")
    p.add_argument("--xla-ms", default="1,512", help="M values that also time XLA deq+dot")
    p.add_argument(
        "--scan-ms", default="1", help="M values that also time the kernel inside lax.scan"
    )
    p.add_argument("--quick", action="store_true", help="2 shapes, M = 1 and 2048")
    p.add_argument("--sweep", action="store_true", help="search decode tiles (M <= 64)")
    p.add_argument("--interpret", action="store_true", help="CPU smoke test (tiny shapes!)")
    p.add_argument(
        "--int-dot",
        action="store_true",
        help="time the vector kernel's integer dot products (M <= 4) beside its float path",
    )
    p.add_argument(
        "--trace",
        action="store_true",
        help="also sum each executable's GPU kernel times from a profiler trace (no host share)",
    )
    a = p.parse_args(argv)

    backend = jax.default_backend()
    if backend != "gpu" and not a.interpret:
        print(f"no GPU (backend={backend}); use --interpret with small --shapes to smoke-test")
        return 2
    formats = a.formats.split(",")
    ms = [int(v) for v in a.ms.split(",")]
    xla_ms = {int(v) for v in a.xla_ms.split(",") if v}
    scan_ms = {int(v) for v in a.scan_ms.split(",") if v}
    shapes = E4B_SHAPES
    if a.shapes:
        shapes = [tuple(int(v) for v in s.split("x")) for s in a.shapes.split(",")]
    if a.quick:
        shapes, ms = [(2048, 2560), (10240, 2560)], [1, 2048]

    jobs: list[Job] = [] if a.interpret else [Job("copy")]
    if a.sweep:
        for fmt, (n, k), m in itertools.product(formats, shapes, ms):
            if m <= DECODE_MAX_M:
                cands = sweep_candidates(fmt, m, a.int_dot)
                jobs += [Job("kernel", fmt, n, k, m, bs) for bs in cands]
    else:
        for (n, k), m in itertools.product(shapes, ms):
            for fmt in formats:
                if a.int_dot and m <= qm.VECTOR_MAX_M and fmt in qtiles.INT_DOT_FORMATS:
                    for v in (False, True):
                        jobs.append(Job("kernel", fmt, n, k, m, qm.BlockSizes(int_dot=v)))
                else:
                    jobs.append(Job("kernel", fmt, n, k, m))
                if m in xla_ms:
                    jobs.append(Job("xla", fmt, n, k, m))
                if m in scan_ms:
                    jobs.append(Job("scan", fmt, n, k, m))
            if not a.interpret:
                jobs.append(Job("dense", "", n, k, m))

    t0 = time.perf_counter()
    results = run_jobs(jobs, reps=a.reps, workers=a.workers, interpret=a.interpret, trace=a.trace)
    copy = next((r for r in results if r["kind"] == "copy" and "gbps" in r), None)
    copy_gbps = copy["gbps"] if copy else None
    copy_busy_gbps = copy.get("kernel_gbps") if copy else None

    if a.sweep:
        best = {}
        for r in results:
            if "us" in r:
                key = (r["fmt"], r["n"], r["k"], r["m"])
                t = r.get("kernel_us", r["us"])  # GPU-busy time when traced
                if key not in best or t < best[key].get("kernel_us", best[key]["us"]):
                    best[key] = r
        print("| fmt | N x K | M | best us | GB/s | busy us | block sizes |\n" + "|---" * 7 + "|")
        for (fmt, n, k, m), r in sorted(best.items()):
            bs = {kk: v for kk, v in r.get("block_sizes", {}).items() if v is not None}
            busy = f"{r['kernel_us']:.1f}" if "kernel_us" in r else ""
            print(f"| {fmt} | {n} x {k} | {m} | {r['us']:.1f} | {r['gbps']:.0f} | {busy} | {bs} |")
    else:
        print(markdown(results, copy_gbps, copy_busy_gbps))

    elapsed = time.perf_counter() - t0
    print(f"\ntotal {elapsed:.0f}s", flush=True)
    if a.out:
        dev = jax.devices()[0]
        meta = {
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "device": getattr(dev, "device_kind", str(dev)),
            "jax": jax.__version__,
            "command": " ".join(sys.argv),
            "copy_gbps": copy_gbps,
            "copy_busy_gbps": copy_busy_gbps,
            "seconds": round(elapsed, 1),
        }
        a.out.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
