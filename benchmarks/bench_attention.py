"""Attention kernels on the GPU: prefill TFLOP/s, decode cache GB/s, fused norm+RoPE vs jnp.

Rows (batch 1, bf16, H = 8 query heads, Hk = 2 kv heads, the E4B attention shapes):
- prefill ``flash_attention`` at T = 2K / 8K / 32K (q_start 0, S = T) for the sliding layer
  (D = 256, window 512) and the global layer (D = 512, no window). FLOPs are counted honestly:
  ``4 * H * D * sum_p visible(p)`` with ``visible(p) = min(p + 1, window)`` (QK^T and PV, only
  the visible keys of the causal / windowed mask), not the dense ``4 H D T^2``.
  The jnp reference is timed too where it fits (T <= 8K), with its max |error| at 2K.
- decode ``decode_attention`` against a global cache at context 4K and 32K (D = 512), a 32K
  cache at position 4K (must read only the live 4K), and the sliding ring (D = 256, 512 slots,
  position 100K). GB/s = cache bytes the attention must read (``2 * n * Hk * D * 2``, n the live
  slots) / time, set against a measured device copy (``a + 1`` of 512 MiB: read + write bytes /
  time); the jnp reference is timed on the same data.
- ``qk_norm_rope`` (one launch for q, k, v) vs its unfused jnp reference at T = 1 / 2K / 8K,
  in us and in GB/s of bytes in + out.

Method (as benchmarks/bench_qmatmul.py): each executable holds R independent back-to-back calls,
each on its own copy of the inputs (R * bytes >= 256 MiB where it matters, more than the 50 MiB
L2, so decode streams its cache from HBM as a real decode step does; never two calls on the same
inputs, which XLA would merge into one); time = median over --reps runs / R.
jax.block_until_ready around every run; no Python dispatch inside the timed region.

    python benchmarks/bench_attention.py --out attention.json        # a few minutes on an H100
    python benchmarks/bench_attention.py --sweep --out sweep.json    # + block-size candidates
    python benchmarks/bench_attention.py --smoke                     # CPU, interpret, tiny shapes
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import dataclasses
import datetime
import functools
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pallas_kernels import decode_attention as da  # noqa: E402
from pallas_kernels import flash_attention as fa  # noqa: E402
from pallas_kernels import qk_norm_rope as nr  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from trace_stats import kernel_times  # noqa: E402

FLUSH_BYTES = 256 << 20
MAX_RESIDENT_BYTES = 8 << 30  # all copies of one job's inputs
COPY_BYTES = 512 << 20
BF16 = jnp.bfloat16


@dataclasses.dataclass
class Job:
    """One timed executable: ``fn(*args_i)`` R times on C rotating copies of the inputs."""

    group: str  # "prefill" | "decode" | "norm_rope" | "copy"
    name: str
    impl: str  # "kernel" | "reference" | "copy"
    make_args: Callable[[jax.Array], tuple]  # key -> one copy of the inputs
    call: Callable[..., object]
    bytes_per_call: int  # input bytes of one call (for C) and the GB/s numerator
    flops: int = 0
    est_s: float = 1e-4  # rough time of one call, to choose R
    block_sizes: object = None
    extra: dict = dataclasses.field(default_factory=dict)
    flush_bytes: int = 0  # bytes resident per copy, for C (default: bytes_per_call)
    # Stacked jobs: make_args(key, R) builds ONE set of inputs holding R caches on a leading
    # axis and call i gets `layer=i` (the kernel reads its cache in place, as in the model).
    # A few arguments instead of 4 R: each argument of an executable costs the host a few us
    # before the GPU starts, which a per-call time of a few us must not include.
    stacked: bool = False

    def plan(self, smoke: bool) -> tuple[int, int]:
        """(R calls per executable, C input copies), with R == C: every call gets inputs of
        its own. Two calls on the same inputs are the same HLO instruction, which XLA's CSE
        merges (a custom call without side effects included), so R > C timed R / C times too
        little work (the first version did: a 32K decode "read" 134 MB in 13.8 us)."""
        if smoke:
            return 1, 1
        flush = max(1, self.flush_bytes or self.bytes_per_call)
        if self.stacked:  # decode: enough caches that they stream from HBM, not L2
            r = max(2, min(64, math.ceil(3e-3 / self.est_s)), math.ceil(FLUSH_BYTES / flush))
        else:
            # Every call is its own custom call to compile: up to 64 of them per executable
            # did not finish compiling prefill 2K-32K in 330 s on the H100 (run n). Inputs of
            # >= 12 MB a call make 16 copies exceed the 50 MiB L2 anyway.
            r = max(2, min(16, math.ceil(3e-3 / self.est_s)))
        r = max(1, min(r, MAX_RESIDENT_BYTES // flush))
        return r, (1 if self.stacked else r)


def _make_copies(job: Job, r: int, c: int, key) -> list:
    if job.stacked:
        return [job.make_args(key, r)]
    return [job.make_args(jax.random.fold_in(key, i)) for i in range(c)]


def _compile(job: Job, smoke: bool):
    """Compile one job's executable from abstract inputs (runs on a thread pool)."""
    r, c = job.plan(smoke)
    abstract = jax.eval_shape(lambda: _make_copies(job, r, c, jax.random.PRNGKey(0)))

    def fn(copies):
        if job.stacked:  # one output array, not R buffers for the host to hand back
            return jnp.stack([job.call(*copies[0], layer=i) for i in range(r)])
        return tuple(job.call(*copies[i]) for i in range(r))  # R == C: one copy each

    t0 = time.perf_counter()
    exe = jax.jit(fn).lower(abstract).compile()
    return exe, time.perf_counter() - t0


def _run(job: Job, compiled, *, reps: int, smoke: bool, key, trace: bool = False) -> dict:
    r, c = job.plan(smoke)
    row = {"group": job.group, "name": job.name, "impl": job.impl, **job.extra}
    if job.block_sizes is not None:
        row["block_sizes"] = dataclasses.asdict(job.block_sizes)
    if isinstance(compiled, Exception):  # a tile that does not fit is a result, not a crash
        row["error"] = f"compile: {type(compiled).__name__}: {str(compiled)[:300]}"
        print(f"failed: {job.group} {job.name} {job.impl} {job.block_sizes}: {row['error']}")
        return row
    exe, t_compile = compiled
    copies = None
    try:
        copies = _make_copies(job, r, c, key)
        jax.block_until_ready(exe(copies))  # warm-up
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            jax.block_until_ready(exe(copies))
            ts.append(time.perf_counter() - t0)
        t = statistics.median(ts) / r
        if trace:
            row["trace"] = kernel_times(exe, copies)  # benchmarks/trace_stats.py
    except Exception as e:
        row["error"] = f"run: {type(e).__name__}: {str(e)[:300]}"
        print(f"failed: {job.group} {job.name} {job.impl} {job.block_sizes}: {row['error']}")
        return row
    finally:
        copies = None
    row.update(us=t * 1e6, calls=r, copies=c, compile_s=round(t_compile, 2))
    if job.flops:
        row["tflops"] = job.flops / t / 1e12
    if job.bytes_per_call:
        row["gbps"] = job.bytes_per_call / t / 1e9 * (2 if job.group == "copy" else 1)
    return row


def run_jobs(
    jobs: list[Job], *, reps: int, smoke: bool, workers: int, trace: bool = False
) -> list[dict]:
    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(workers) as pool:
        futures = [pool.submit(_compile, j, smoke) for j in jobs]
        compiled = []
        for f in futures:
            try:
                compiled.append(f.result())
            except Exception as e:
                compiled.append(e)
    print(f"compiled {len(jobs)} executables in {time.perf_counter() - t0:.0f}s", flush=True)
    key = jax.random.PRNGKey(0)
    rows = []
    for i, (job, comp) in enumerate(zip(jobs, compiled, strict=True)):
        traced = trace and job.group == "decode" and job.impl == "kernel"
        key_i = jax.random.fold_in(key, i)
        rows.append(_run(job, comp, reps=reps, smoke=smoke, key=key_i, trace=traced))
        r = rows[-1]
        if "us" in r:
            print(
                f"{job.group:9s} {job.name:36s} {job.impl:9s} {r['us']:10.1f} us  {_bs(r)}",
                flush=True,
            )
        if "trace" in r and "kernels" in r["trace"]:
            tr, calls = r["trace"], r["calls"]
            parts = ", ".join(
                f"{k} x{v['n']} {v['mean_us']:.2f} us" for k, v in tr["kernels"].items()
            )
            print(
                f"  trace: per call {tr['span_us'] / calls:.2f} us span, "
                f"{tr['busy_us'] / calls:.2f} us in kernels; {parts}",
                flush=True,
            )
    return rows


# ---------------------------------------------------------------------------------------------
# Jobs
# ---------------------------------------------------------------------------------------------
def _visible_pairs(t: int, window: int | None) -> int:
    """sum over query positions 0..t-1 of the visible keys (S = t, q_start = 0)."""
    if window is None or window >= t:
        return t * (t + 1) // 2
    return window * (window + 1) // 2 + (t - window) * window


def copy_job() -> Job:
    n = COPY_BYTES // 4
    return Job(
        "copy",
        "a + 1, 512 MiB",
        "copy",
        lambda key: (jax.random.bits(key, (n,), jnp.uint32),),
        lambda a: a + jnp.uint32(1),
        COPY_BYTES,
        est_s=4e-4,
    )


def prefill_jobs(
    seqs, *, interpret: bool, sweep: bool, heads=8, kv_heads=2, dims=((256, 512), (512, None))
) -> list[Job]:
    jobs = []
    for d, window in dims:
        for t in seqs:
            pairs = _visible_pairs(t, window)
            flops = 4 * heads * d * pairs
            name = f"D={d} {'window ' + str(window) if window else 'global'} T={t}"

            def make(key, t=t, d=d):
                kq, kk, kv = jax.random.split(key, 3)
                return (
                    jax.random.normal(kq, (1, t, heads, d), BF16),
                    jax.random.normal(kk, (1, t, kv_heads, d), BF16),
                    jax.random.normal(kv, (1, t, kv_heads, d), BF16),
                    jnp.zeros((1,), jnp.int32),
                )

            nbytes = 2 * t * d * (heads + 2 * kv_heads)
            extra = {"T": t, "D": d, "window": window, "H": heads, "Hk": kv_heads}
            cands = [None] + (_flash_candidates(d, heads // kv_heads) if sweep else [])
            for bs in cands:
                call = functools.partial(
                    fa.flash_attention, window=window, interpret=interpret, block_sizes=bs
                )
                jobs.append(
                    Job(
                        "prefill",
                        name,
                        "kernel",
                        make,
                        call,
                        nbytes,
                        flops,
                        flops / 3e14,
                        bs,
                        extra,
                    )
                )
            if t <= 8192 and not sweep:
                call = functools.partial(fa.flash_attention_reference, window=window)
                jobs.append(
                    Job(
                        "prefill",
                        name,
                        "reference",
                        make,
                        call,
                        nbytes,
                        flops,
                        flops / 1e14,
                        None,
                        extra,
                    )
                )
    return jobs


def _fits(rows: int, bk: int, d: int, stages: int, itemsize: int = 2) -> bool:
    """Drop tiles whose q tile + num_stages x K/V tiles already exceed the H100's shared
    memory (the kernels reject them; see flash_attention.smem_lower_bound)."""
    need = fa.smem_lower_bound(
        rows=rows, block_k=bk, head_dim=d, itemsize=itemsize, num_stages=stages
    )
    return need <= fa.SMEM_LIMIT


def _flash_candidates(d: int, group: int) -> list[fa.BlockSizes]:
    out = []
    rows_bk = (
        [(64, 64), (128, 64), (64, 32), (128, 32), (32, 64)]
        if d <= 256
        else [(64, 32), (32, 32), (64, 16), (32, 64), (128, 16), (32, 16)]
    )
    for rows, bk in rows_bk:
        for warps, stages in ((4, 2), (8, 2), (8, 3), (8, 1)):
            bq = max(1, rows // group)
            if _fits(bq * group, bk, d, stages):
                out.append(fa.BlockSizes(bq, bk, warps, stages))
    return out


def decode_jobs(cases, *, interpret: bool, sweep: bool, heads=8, kv_heads=2) -> list[Job]:
    jobs = []
    for s, pos, d, ring in cases:
        n = min(pos + 1, s)
        live_bytes = 2 * n * kv_heads * d * 2
        cache_bytes = 2 * s * kv_heads * d * 2
        kind = "ring" if ring else "global"
        name = f"D={d} {kind} cache {s} pos {pos}"

        def make(key, r, s=s, pos=pos, d=d):  # R caches stacked, one shared query
            kq, kk, kv = jax.random.split(key, 3)
            return (
                jax.random.normal(kq, (1, heads, d), BF16),
                jax.random.normal(kk, (r, 1, s, kv_heads, d), BF16),
                jax.random.normal(kv, (r, 1, s, kv_heads, d), BF16),
                jnp.full((1,), pos, jnp.int32),
            )

        extra = {"S": s, "pos": pos, "D": d, "ring": ring, "live_bytes": live_bytes}
        cands = [None] + (_decode_candidates(d) if sweep else [])
        for bs in cands:
            call = functools.partial(
                da.decode_attention, ring=ring, interpret=interpret, block_sizes=bs
            )
            # R is chosen from the whole cache (what sits in memory), GB/s from the live bytes.
            jobs.append(
                Job(
                    "decode",
                    name,
                    "kernel",
                    make,
                    call,
                    live_bytes,
                    0,
                    live_bytes / 2e12 + 5e-6,
                    bs,
                    extra,
                    cache_bytes,
                    stacked=True,
                )
            )
        if not sweep:
            call = functools.partial(da.decode_attention_reference, ring=ring)
            jobs.append(
                Job(
                    "decode",
                    name,
                    "reference",
                    make,
                    call,
                    live_bytes,
                    0,
                    cache_bytes / 1e12 + 1e-5,
                    None,
                    extra,
                    cache_bytes,
                    stacked=True,
                )
            )
    return jobs


def _decode_candidates(d: int, rows: int = 16) -> list[da.BlockSizes]:
    out = []
    for bk in (16, 32, 64):
        for splits in (16, 32, 64, 128):
            out.append(da.BlockSizes(bk, splits, 4, 2))
    out += [da.BlockSizes(32, 64, 4, 3), da.BlockSizes(32, 64, 8, 2), da.BlockSizes(16, 64, 4, 4)]
    out += [da.BlockSizes(32, 64, 4, 1), da.BlockSizes(64, 64, 4, 1)]
    # Short caches (4K: 256 blocks of 16) leave each of 128 programs a few steps: more splits,
    # deeper pipelines and other warp counts.
    for bk in (16, 32):
        for splits in (64, 128, 256):
            for warps, stages in ((4, 4), (8, 4), (2, 4), (8, 2), (4, 3)):
                out.append(da.BlockSizes(bk, splits, warps, stages))
    out = list(dict.fromkeys(out))
    return [c for c in out if _fits(rows, c.block_k, d, c.num_stages)]


def norm_rope_jobs(seqs, *, interpret: bool, sweep: bool, heads=8, kv_heads=2) -> list[Job]:
    jobs = []
    for d, rotated in ((256, None), (512, 64)):
        base = 10_000.0 if rotated is None else 1_000_000.0
        i = jnp.arange(d // 2, dtype=jnp.float32)
        inv = base ** (-2.0 * i / d)
        if rotated is not None:
            inv = jnp.where(i < rotated, inv, 0.0)
        for t in seqs:
            name = f"D={d} T={t}"

            def make(key, t=t, d=d, inv=inv):
                ks = jax.random.split(key, 6)
                return (
                    jax.random.normal(ks[0], (1, t, heads, d), BF16),
                    jax.random.normal(ks[1], (1, t, kv_heads, d), BF16),
                    jax.random.normal(ks[2], (1, t, kv_heads, d), BF16),
                    jax.random.normal(ks[3], (d,), jnp.float32),
                    jax.random.normal(ks[4], (d,), jnp.float32),
                    jax.random.randint(ks[5], (1, t), 0, 100_000, jnp.int32),
                    inv,
                )

            nbytes = 2 * 2 * t * d * (heads + 2 * kv_heads)  # in + out, bf16
            extra = {"T": t, "D": d}
            cands = [None]
            if sweep:
                cands += [nr.BlockSizes(bt, w) for bt in (4, 8, 16, 32, 64) for w in (2, 4, 8)]
            for bs in cands:
                call = functools.partial(
                    nr.qk_norm_rope, eps=1e-6, interpret=interpret, block_sizes=bs
                )
                jobs.append(
                    Job(
                        "norm_rope",
                        name,
                        "kernel",
                        make,
                        call,
                        nbytes,
                        0,
                        nbytes / 2e12 + 4e-6,
                        bs,
                        extra,
                    )
                )
            if not sweep:
                call = functools.partial(nr.qk_norm_rope_reference, eps=1e-6)
                jobs.append(
                    Job(
                        "norm_rope",
                        name,
                        "reference",
                        make,
                        call,
                        nbytes,
                        0,
                        nbytes / 1e12 + 1e-5,
                        None,
                        extra,
                    )
                )
    return jobs


def prefill_error(t: int, d: int, window, interpret: bool, heads=8, kv_heads=2) -> float:
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(7), 3)
    q = jax.random.normal(kq, (1, t, heads, d), BF16)
    k = jax.random.normal(kk, (1, t, kv_heads, d), BF16)
    v = jax.random.normal(kv, (1, t, kv_heads, d), BF16)
    z = jnp.zeros((1,), jnp.int32)
    out = fa.flash_attention(q, k, v, z, window=window, interpret=interpret)
    ref = fa.flash_attention_reference(q, k, v, z, window=window)
    return float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref.astype(jnp.float32))))


# ---------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------
def _best(rows, group, name, impl):
    ok = [
        r
        for r in rows
        if r["group"] == group and r["name"] == name and r["impl"] == impl and "us" in r
    ]
    return min(ok, key=lambda r: r["us"]) if ok else None


def _names(rows, group):
    seen = []
    for r in rows:
        if r["group"] == group and r["name"] not in seen:
            seen.append(r["name"])
    return seen


def _bs(r):
    if r is None or "block_sizes" not in r:
        return "default"
    return ",".join(f"{k}={v}" for k, v in r["block_sizes"].items() if v is not None)


def markdown(rows, copy_gbps, errors) -> str:
    out = []
    if copy_gbps:
        out.append(f"Copy ceiling (read + write): **{copy_gbps:.0f} GB/s**\n")
    out.append("### Prefill flash_attention (B=1, H=8, Hk=2, bf16)\n")
    out.append(
        "| layer | kernel us | TFLOP/s | best tiles | jnp ref us | ref TFLOP/s | "
        "max abs err vs ref |"
    )
    out.append("|---|---|---|---|---|---|---|")
    for name in _names(rows, "prefill"):
        k = _best(rows, "prefill", name, "kernel")
        ref = _best(rows, "prefill", name, "reference")
        err = errors.get(name, "")
        out.append(
            f"| {name} | {k['us']:.0f} | {k['tflops']:.0f} | {_bs(k)} | "
            if k
            else f"| {name} | failed | | | "
        )
        out[-1] += f"{ref['us']:.0f} | {ref['tflops']:.0f} | " if ref else " | | "
        out[-1] += f"{err if isinstance(err, str) else f'{err:.3g}'} |"
    out.append("\n### Decode decode_attention (B=1, H=8, Hk=2, bf16)\n")
    out.append(
        "| cache | kernel us | live-cache GB/s | % copy | best tiles | jnp ref us | ref GB/s |"
    )
    out.append("|---|---|---|---|---|---|---|")
    for name in _names(rows, "decode"):
        k = _best(rows, "decode", name, "kernel")
        ref = _best(rows, "decode", name, "reference")
        pct = f"{100 * k['gbps'] / copy_gbps:.0f}%" if k and copy_gbps else ""
        line = (
            f"| {name} | {k['us']:.1f} | {k['gbps']:.0f} | {pct} | {_bs(k)} | "
            if k
            else f"| {name} | failed | | | | "
        )
        line += f"{ref['us']:.1f} | {ref['gbps']:.0f} |" if ref else " | |"
        out.append(line)
    out.append("\n### qk_norm_rope, one launch for q/k/v (B=1, H=8, Hk=2, bf16)\n")
    out.append(
        "| shape | kernel us | GB/s (in+out) | best tiles | jnp ref us | ref GB/s | speed-up |"
    )
    out.append("|---|---|---|---|---|---|---|")
    for name in _names(rows, "norm_rope"):
        k = _best(rows, "norm_rope", name, "kernel")
        ref = _best(rows, "norm_rope", name, "reference")
        line = (
            f"| {name} | {k['us']:.1f} | {k['gbps']:.0f} | {_bs(k)} | "
            if k
            else f"| {name} | failed | | | "
        )
        line += f"{ref['us']:.1f} | {ref['gbps']:.0f} | " if ref else " | | "
        line += f"{ref['us'] / k['us']:.2f}x |" if (k and ref) else " |"
        out.append(line)
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--sweep", action="store_true", help="also time block-size candidates")
    p.add_argument("--only", default="prefill,decode,norm_rope", help="groups to run")
    p.add_argument("--seqs", help="prefill T values, comma-separated (default 2048,8192,32768)")
    p.add_argument("--workers", type=int, default=8, help="parallel compiles")
    p.add_argument("--smoke", action="store_true", help="CPU, interpret mode, tiny shapes")
    p.add_argument(
        "--trace", action="store_true", help="decode: per-kernel times from a profiler trace"
    )
    p.add_argument("--decode-cases", help="decode cases to run, e.g. 4096:4095 (S:pos, D=512)")
    a = p.parse_args(argv)

    backend = jax.default_backend()
    if backend != "gpu" and not a.smoke:
        print(f"no GPU (backend={backend}); --smoke runs a tiny interpret-mode check instead")
        return 2
    only = set(a.only.split(","))
    interpret = a.smoke
    if a.smoke:
        seqs, dec = [40], [(64, 63, 512, False), (32, 100, 256, True)]
        nr_seqs, reps = [1, 9], 1
    else:
        seqs = [int(x) for x in a.seqs.split(",")] if a.seqs else [2048, 8192, 32768]
        dec = [
            (4096, 4095, 512, False),
            (32768, 32767, 512, False),
            (32768, 4095, 512, False),
            (512, 100_000, 256, True),
        ]
        nr_seqs, reps = [1, 2048, 8192], a.reps
        if a.decode_cases:
            try:
                pairs = [tuple(map(int, c.split(":"))) for c in a.decode_cases.split(",")]
                dec = [(s, pos, 512, False) for s, pos in pairs]
            except ValueError:
                p.error(f"--decode-cases {a.decode_cases!r}: want S:pos[,S:pos...], e.g. 4096:4095")

    jobs = [] if a.smoke else [copy_job()]
    if "prefill" in only:
        jobs += prefill_jobs(seqs, interpret=interpret, sweep=a.sweep)
    if "decode" in only:
        jobs += decode_jobs(dec, interpret=interpret, sweep=a.sweep)
    if "norm_rope" in only:
        jobs += norm_rope_jobs(nr_seqs, interpret=interpret, sweep=a.sweep)

    t0 = time.perf_counter()
    rows = run_jobs(jobs, reps=reps, smoke=a.smoke, workers=a.workers, trace=a.trace)
    errors = {}
    if "prefill" in only:
        t_err = seqs[0]
        for d, window in ((256, 512), (512, None)):
            name = f"D={d} {'window ' + str(window) if window else 'global'} T={t_err}"
            errors[name] = prefill_error(t_err, d, window, interpret)
    copy = next((r for r in rows if r["group"] == "copy" and "gbps" in r), None)
    copy_gbps = copy["gbps"] if copy else None
    print()
    print(markdown(rows, copy_gbps, errors))
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
            "prefill_max_abs_err": errors,
            "seconds": round(elapsed, 1),
        }
        a.out.write_text(json.dumps({"meta": meta, "results": rows}, indent=1, default=str))
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
