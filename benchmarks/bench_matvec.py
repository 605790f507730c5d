"""Batch-1 quantized matvecs written for XLA: formulations side by side (GPU).

`gemma4_jax/matvec.py` writes each batch-1 matmul as a reduction over the packed bytes and
lets XLA fuse it. How XLA fuses it depends on how the arithmetic is written: the profile of an
E4B Q4_K_M decode step (benchmarks/RESULTS.md run f) shows the Q4_K reductions at ~0.9 TB/s
and six extra `loop_multiply_fusion` kernels per layer that materialise the scale products
`d * sc`, `dmin * m`. This script times alternative formulations of the same product on the
same random data, at the E4B shapes, so a change to matvec.py is chosen by measurement:

- `current`: matvec.py as it is;
- `reorder`: the same values with no product of two broadcast fields (`d * (sc * q)` instead
  of `(d * sc) * q`), so XLA's simplifier has no `broadcast(a) * broadcast(b)` to hoist into a
  kernel of its own;
- `minsum` (Q4_K/Q5_K): `reorder`'s scale term, and the min term as a reduction over the
  sub-block sums of x (K/32 terms per row) instead of over every element;
- `f32pre` (Q4_K): scale and min products precomputed in f32 per sub-block, as a load-time
  layout would store them (8 more bytes per 32 weights), to price that layout.

Every variant is checked against `quant.matmul_reference` (f32) before it is timed. Method:
one executable holds R calls on R different x and R weight copies (R * bytes >= 256 MiB, more
than the 50 MiB L2), passed as one stacked array per field and indexed statically inside (so
the host's per-argument cost is paid once, not R times; the static slices fuse into the
reductions: "timed" kernels per call says so), each call's x made to depend on the previous
call's output (else XLA merges the independent calls); time = median over reps / R. Kernels per call
are counted in the compiled HLO of a one-call executable (hlo_stats.py).

    python3 benchmarks/bench_matvec.py                      # all formats, E4B shapes
    python3 benchmarks/bench_matvec.py --formats Q4_K --shapes 10240x2560
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_qmatmul import _random_fields  # noqa: E402
from hlo_stats import kernel_stats  # noqa: E402

from gemma4_jax import matvec, quant  # noqa: E402

SHAPES = [(2048, 2560), (512, 2560), (10240, 2560), (2560, 10240), (262144, 2560)]
FLUSH_BYTES = 256 << 20
MAX_CALLS = 32  # the smallest weights stay partly L2-resident (as in bench_qmatmul)


def _f32(a):
    return jnp.asarray(a).astype(jnp.float32)


def _rows(a, *shape):
    return jnp.asarray(a).reshape(a.shape[0], *shape)


def _sum(t):
    return jnp.sum(t.reshape(t.shape[0], -1), axis=-1)


# ------------------------------------------------------------------------------ formulations
def q8_reorder(x, w):
    nb = w.shape[1] // 32
    q = _f32(_rows(w.qs, nb, 32))
    d = _f32(_rows(w.d, nb, 1))
    return _sum((q * x.reshape(nb, 32)) * d)


def _k_fields(w, nb):
    d = _f32(_rows(w.d, nb, 1, 1))  # [N, nb, 1, 1]
    dmin = _f32(_rows(w.dmin, nb, 1, 1))
    sc = _f32(_rows(w.sc, nb, 4, 2))  # [N, nb, chunk, nibble]
    m = _f32(_rows(w.m, nb, 4, 2))
    return d, dmin, sc, m


def _q45_low_high(w, nb):
    qs = _rows(w.qs, nb, 4, 32)
    if w.ggml_type == "Q4_K":
        return _f32(qs & 0x0F), _f32(qs >> 4)
    qh = _rows(w.qh, nb, 1, 32)
    shift = 2 * jnp.arange(4, dtype=jnp.uint8)[:, None]
    lo = (qs & 0x0F) | (((qh >> shift) & 1) << 4)
    hi = (qs >> 4) | (((qh >> (shift + 1)) & 1) << 4)
    return _f32(lo), _f32(hi)


def k_reorder(x, w):
    nb = w.shape[1] // 256
    lo, hi = _q45_low_high(w, nb)
    d, dmin, sc, m = _k_fields(w, nb)
    xs = x.reshape(nb, 4, 2, 32)
    x0, x1 = xs[:, :, 0], xs[:, :, 1]
    t = d * (sc[..., 0:1] * lo) * x0 - dmin * (m[..., 0:1] * x0)
    t = t + d * (sc[..., 1:2] * hi) * x1 - dmin * (m[..., 1:2] * x1)
    return _sum(t)


def k_minsum(x, w):
    nb = w.shape[1] // 256
    lo, hi = _q45_low_high(w, nb)
    d, dmin, sc, m = _k_fields(w, nb)
    xs = x.reshape(nb, 4, 2, 32)
    x0, x1 = xs[:, :, 0], xs[:, :, 1]
    main = _sum(d * (sc[..., 0:1] * lo) * x0 + d * (sc[..., 1:2] * hi) * x1)
    xsum = jnp.sum(xs, axis=-1)  # [nb, 4, 2]: K/32 numbers, once per call
    mins = _sum(dmin * (m * xsum))
    return main - mins


def q4k_f32pre_fields(w):
    """The load-time layout this variant prices: f32 `d * sc`, `dmin * m` per sub-block."""
    nb = w.shape[1] // 256
    d, dmin, sc, m = _k_fields(w, nb)
    n = w.shape[0]
    return {"qs": w.qs, "s": (d * sc).reshape(n, -1), "mn": (dmin * m).reshape(n, -1)}


def q4k_f32pre(x, f):
    n = f["qs"].shape[0]
    nb = f["qs"].shape[1] // 128
    qs = f["qs"].reshape(n, nb, 4, 32)
    s = f["s"].reshape(n, nb, 4, 2)
    mn = f["mn"].reshape(n, nb, 4, 2)
    xs = x.reshape(nb, 4, 2, 32)
    x0, x1 = xs[:, :, 0], xs[:, :, 1]
    t = s[..., 0:1] * _f32(qs & 0x0F) * x0 - mn[..., 0:1] * x0
    t = t + s[..., 1:2] * _f32(qs >> 4) * x1 - mn[..., 1:2] * x1
    return _sum(t)


def q6_reorder(x, w):
    nb = w.shape[1] // 256
    ql = _rows(w.ql, nb, 2, 2, 2, 16)
    qh = _rows(w.qh, nb, 2, 2, 16)
    sc = _f32(_rows(w.sc, nb, 2, 4, 2, 1))
    d = _f32(_rows(w.d, nb, 1, 1, 1))
    xs = x.reshape(nb, 2, 4, 2, 16)
    low = (ql[:, :, :, 0] & 0x0F, ql[:, :, :, 1] & 0x0F, ql[:, :, :, 0] >> 4, ql[:, :, :, 1] >> 4)
    acc = None
    for s in range(4):
        q = _f32(low[s] | (((qh >> (2 * s)) & 3) << 4)) - 32.0
        term = d * (sc[:, :, :, s] * q) * xs[:, :, s]
        acc = term if acc is None else acc + term
    return _sum(acc)


def _current(x, w):
    return matvec._KERNELS[w.ggml_type](x, w)


VARIANTS = {
    "Q8_0": {"current": _current, "reorder": q8_reorder},
    "Q4_K": {
        "current": _current,
        "reorder": k_reorder,
        "minsum": k_minsum,
        "f32pre": q4k_f32pre,
    },
    "Q5_K": {"current": _current, "reorder": k_reorder, "minsum": k_minsum},
    "Q6_K": {"current": _current, "reorder": q6_reorder},
}
PREP = {("Q4_K", "f32pre"): q4k_f32pre_fields}


def _weight(fmt, n, k, key):
    fields = _random_fields(fmt, n, k, key)
    cls = {"Q8_0": quant.Q8_0, "Q4_K": quant.Q4_K, "Q5_K": quant.Q5_K, "Q6_K": quant.Q6_K}[fmt]
    return cls(**fields)


def _nbytes(tree) -> int:
    return sum(a.size * a.dtype.itemsize for a in jax.tree_util.tree_leaves(tree))


def _time(exe, args, reps):
    jax.block_until_ready(exe(*args))
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(exe(*args))
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _stack(trees):
    return jax.tree_util.tree_map(lambda *a: jnp.stack(a), *trees)


def run(fmt, n, k, reps, copy_gbps):
    key = jax.random.PRNGKey(n * 7 + k)
    w0 = _weight(fmt, n, k, key)
    std_bytes = w0.nbytes
    copies = min(MAX_CALLS, max(1, math.ceil(FLUSH_BYTES / std_bytes)))
    ws = [w0] + [_weight(fmt, n, k, jax.random.fold_in(key, i)) for i in range(1, copies)]
    xs = jax.random.normal(jax.random.fold_in(key, 100), (copies, k), jnp.float32)
    want = np.asarray(quant.matmul_reference(xs[:1], w0))[0]
    rows = []
    for name, fn in VARIANTS[fmt].items():
        prep = PREP.get((fmt, name), lambda w: w)
        # One stacked array per field, indexed statically inside the executable: a handful of
        # arguments whatever the copy count (each argument costs the host a few us per call,
        # which a tuple of R weight copies would have added to every timed call).
        wstack = _stack([prep(w) for w in ws])
        w_first = jax.tree_util.tree_map(lambda a: a[0], wstack)
        got = np.asarray(jax.jit(fn)(xs[0], w_first))
        err = float(np.max(np.abs(got - want)) / (np.max(np.abs(want)) + 1e-30))
        one = jax.jit(fn).lower(xs[0], w_first).compile()
        stats = kernel_stats(one.as_text())

        def many(xs, ws, fn=fn):
            # Each call's x depends on the previous call's output (a scalar, fused into the
            # reduction's input): independent calls on one input shape would be merged by XLA's
            # horizontal / multi-output fusion into fewer, different kernels.
            at = lambda i: jax.tree_util.tree_map(lambda a: a[i], ws)
            ys, prev = [], None
            for i in range(copies):
                x = xs[i] if prev is None else xs[i] + 1e-30 * prev[0]
                prev = fn(x, at(i))
                ys.append(prev)
            return tuple(ys)

        exe = jax.jit(many).lower(xs, wstack).compile()
        many_stats = kernel_stats(exe.as_text())
        t = _time(exe, (xs, wstack), reps) / copies
        read = _nbytes(w_first)
        row = {
            "fmt": fmt,
            "n": n,
            "k": k,
            "variant": name,
            "us": t * 1e6,
            "gbps_std": std_bytes / t / 1e9,
            "gbps_read": read / t / 1e9,
            "read_bytes": read,
            "kernels": stats["launches_per_call"],
            "kernels_in_timed": many_stats["launches_per_call"] / copies,
            "rel_err": err,
        }
        if copy_gbps:
            row["of_copy"] = row["gbps_read"] / copy_gbps
        rows.append(row)
        print(
            f"{fmt} {n}x{k} {name:8s} {t * 1e6:8.1f} us  {row['gbps_std']:7.0f} GB/s(std) "
            f"{row['gbps_read']:7.0f} GB/s(read)  kernels {row['kernels']} "
            f"({row['kernels_in_timed']:.1f} timed)  rel err {err:.1e}",
            flush=True,
        )
        del wstack, w_first
    return rows


def copy_ceiling(reps):
    """Read + write GB/s of one `a + 1` over 1 GiB per executable call. (Several copies of one
    input in one executable are fused by XLA into a single kernel that reads it once: that
    is how a 4-copy executable once "measured" 3.8 TB/s, above the HBM's peak.)"""
    n = (1 << 30) // 4
    a = jax.random.bits(jax.random.PRNGKey(1), (n,), jnp.uint32)
    exe = jax.jit(lambda a: a + jnp.uint32(1)).lower(a).compile()
    t = _time(exe, (a,), reps)
    return 2 * a.nbytes / t / 1e9


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--formats", default="Q8_0,Q4_K,Q5_K,Q6_K")
    ap.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in SHAPES))
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}", flush=True)
    copy_gbps = copy_ceiling(args.reps)
    print(f"copy ceiling {copy_gbps:.0f} GB/s (read + write)", flush=True)
    rows = []
    for fmt in args.formats.split(","):
        for shape in args.shapes.split(","):
            n, k = (int(v) for v in shape.split("x"))
            rows += run(fmt, n, k, args.reps, copy_gbps)
    if args.out:
        Path(args.out).write_text(json.dumps({"copy_gbps": copy_gbps, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
