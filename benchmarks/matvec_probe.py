"""Why do batch-1 K-quant matvecs run below the memory bandwidth? (GPU machine, under ncu.)

One E4B gate|up-sized weight (20480 x 2560) per format, random, and one activation row; each
variant below (`--only` patterns pick some) runs `--reps` times after all were warmed up, in
the order the run prints first ("order of timed kernels"), so that an Nsight Compute log of the
process can be matched to them:

    ncu --clock-control none --csv --log-file ncu.csv -k regex:'reduce|qmatmul' \
        --metrics gpu__time_duration.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,... \
        python3 benchmarks/matvec_probe.py
    python3 benchmarks/matvec_probe.py --summarize ncu.csv

Variants (the first of each format is what the model runs; the others are diagnostics that
take pieces away, so the difference says what a piece costs; they are not correct matvecs):
- `q8_0`: `matvec.matvec` on Q8_0 (the format XLA runs near bandwidth);
- `q4_k`: `matvec.matvec` on Q4_K;
- `q4_k_f32_scales`: Q4_K with its sub-block scales and mins given as f32 arrays (no scale
  arithmetic per element; more bytes);
- `q4_k_no_min`: Q4_K without the min term;
- `q4_k_nibbles`: the nibbles times x only (no scales at all): the floor of the 4-bit reduction;
- `q6_k`: `matvec.matvec` on Q6_K;
- `pallas_<fmt>_<tiles>`: the Pallas kernels (vector, and mma with x padded to 16 rows) on the
  Q8_0 / Q4_K / Q6_K weight with each of
  `PALLAS_TILES` (`default`: the heuristic's tiles), and its split sum where it splits;
  `..._default_xf32`: the same row given as f32 (the kernel then converts nothing per step);
  `..._default_int`: integer dot products (``BlockSizes.int_dot``, Q4_K);
Without ncu it prints a wall time per variant (median of `--reps` synchronous calls, host
overhead included: only for orientation).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
K = 2560
# Pallas kernel tiles (kernel, block_m, block_n, block_k, split_k, num_warps, stages).
PALLAS_TILES = (
    (None,) * 7,  # the heuristic's choice
    ("vector", 1, 64, 256, 2, 4, 3),
    ("vector", 1, 16, 256, 1, 4, 3),
    ("vector", 1, 32, 512, 1, 4, 3),
    ("vector", 1, 16, 1024, 1, 4, 1),
    ("vector", 1, 32, 256, 1, 8, 3),
    ("vector", 1, 128, 256, 4, 4, 3),
    # One-row tiles around the heuristic's (16 rows, 512 / 256 K per step, 4 warps, split to
    # two programs per SM), for the kernel that carries x a step ahead (more registers).
    ("vector", 1, 16, 256, None, 4, 1),
    ("vector", 1, 32, 256, None, 4, 1),
    ("vector", 1, 16, 512, None, 8, 1),
    ("vector", 1, 32, 512, None, 8, 1),
    ("vector", 1, 16, 256, None, 2, 1),
    ("vector", 1, 16, 1024, None, 8, 1),
    # The tensor-core kernel with x padded to 16 rows (15 of them zero): dequantization
    # feeds a dot instead of a multiply-add per weight.
    ("mma", 16, 64, None, None, 4, 3),
    ("mma", 16, 32, None, None, 4, 3),
    ("mma", 16, 128, None, None, 4, 3),
    ("mma", 16, 64, None, None, 8, 3),
)


def _variants(N: int):
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import jax
    import jax.numpy as jnp
    from random_model import _HostRng, random_tensor

    from gemma4_jax import matvec
    from pallas_kernels import qmatmul as qk

    rng = _HostRng(0)
    w = {f: jax.device_put(random_tensor(rng, f, (N, K), 0.02)) for f in ("Q8_0", "Q4_K", "Q6_K")}
    x = jax.device_put(rng.normal((1, K)).astype(jnp.bfloat16))
    q4 = w["Q4_K"]
    nb = K // 256
    qs = q4.qs.reshape(N, nb, 4, 32)
    scale, mins = matvec._k_scales(q4, nb)  # [N, nb, 4, 2, 1] f32
    scale, mins = jax.device_put(scale), jax.device_put(mins)

    def f32_scales(x, qs, scale, mins):
        xs = x.reshape(nb, 4, 2, 32).astype(jnp.float32)
        lo = scale[..., 0, :] * (qs & 0x0F).astype(jnp.float32) - mins[..., 0, :]
        hi = scale[..., 1, :] * (qs >> 4).astype(jnp.float32) - mins[..., 1, :]
        return jnp.sum((lo * xs[:, :, 0] + hi * xs[:, :, 1]).reshape(N, -1), axis=-1)

    def no_min(x, w):
        xs = x.reshape(nb, 4, 2, 32).astype(jnp.float32)
        s, _ = matvec._k_scales(w, nb)
        q = w.qs.reshape(N, nb, 4, 32)
        lo = s[..., 0, :] * (q & 0x0F).astype(jnp.float32)
        hi = s[..., 1, :] * (q >> 4).astype(jnp.float32)
        return jnp.sum((lo * xs[:, :, 0] + hi * xs[:, :, 1]).reshape(N, -1), axis=-1)

    def nibbles(x, qs):
        xs = x.reshape(nb, 4, 2, 32).astype(jnp.float32)
        lo = (qs & 0x0F).astype(jnp.float32)
        hi = (qs >> 4).astype(jnp.float32)
        return jnp.sum((lo * xs[:, :, 0] + hi * xs[:, :, 1]).reshape(N, -1), axis=-1)

    interpret = jax.default_backend() != "gpu"  # a CPU smoke run
    mv = jax.jit(matvec.matvec)
    tiles = {}
    for fmt in ("Q8_0", "Q4_K", "Q6_K"):
        f = {fld.name: getattr(w[fmt], fld.name) for fld in dataclasses.fields(w[fmt])}
        for bs in PALLAS_TILES:
            fn = jax.jit(
                lambda x, f, fmt=fmt, bs=bs: qk.qmatmul(
                    x, fmt, f, interpret=interpret, block_sizes=qk.BlockSizes(*bs)
                )
            )
            label = "default" if bs[0] is None else "_".join(map(str, bs))
            tiles[f"pallas_{fmt.lower()}_{label}"] = (fn, (x, f))
            if bs[0] is None:  # the same values handed over in f32: no conversion in the loop
                tiles[f"pallas_{fmt.lower()}_{label}_xf32"] = (fn, (x.astype(jnp.float32), f))
        if fmt in qk.qtiles.INT_DOT_FORMATS:  # integer dot products (BlockSizes.int_dot)
            fn = jax.jit(
                lambda x, f, fmt=fmt: qk.qmatmul(
                    x, fmt, f, interpret=interpret, block_sizes=qk.BlockSizes(int_dot=True)
                )
            )
            tiles[f"pallas_{fmt.lower()}_default_int"] = (fn, (x, f))
    return tiles | {
        "q8_0": (mv, (x, w["Q8_0"])),
        "q4_k": (mv, (x, q4)),
        "q4_k_f32_scales": (jax.jit(f32_scales), (x, qs, scale, mins)),
        "q4_k_no_min": (jax.jit(no_min), (x, q4)),
        "q4_k_nibbles": (jax.jit(nibbles), (x, qs)),
        "q6_k": (mv, (x, w["Q6_K"])),
    }


def run(reps: int, n: int, only: str | None) -> None:
    import jax

    fns = _variants(n)
    import fnmatch

    names = [v for v in fns if only is None or any(fnmatch.fnmatch(v, o) for o in only.split(","))]
    for name in names:  # compile and warm everything first: ncu then sees only the reps
        fn, args = fns[name]
        jax.block_until_ready(fn(*args))
    print("order of timed kernels: " + ", ".join(f"{v} x{reps}" for v in names), flush=True)
    for name in names:
        fn, args = fns[name]
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            ts.append(time.perf_counter() - t0)
        print(f"{name:18s} wall {1e6 * statistics.median(ts):8.1f} us (host included)", flush=True)


def summarize(path: Path) -> str:
    """ncu --csv log (one row per kernel and metric) -> one markdown row per kernel launch."""
    with open(path, newline="") as f:
        lines = [ln for ln in f if ln.startswith('"')]
    launches: dict[str, dict] = {}
    for r in csv.DictReader(lines):
        row = launches.setdefault(r["ID"], {"kernel": r["Kernel Name"].split("(")[0][:40]})
        row[r["Metric Name"]] = r["Metric Value"]
    metrics = sorted({m for row in launches.values() for m in row if m != "kernel"})
    out = ["| id | kernel | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 2) + "|"]
    for i, row in launches.items():
        out.append(f"| {i} | `{row['kernel']}` | " + " | ".join(row.get(m, "") for m in metrics))
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--n", type=int, default=20480, help="weight rows (K is 2560)")
    ap.add_argument("--only", help="comma-separated name patterns, e.g. 'q8_0,pallas*'")
    ap.add_argument("--summarize", type=Path, help="an ncu --csv log of this script")
    a = ap.parse_args()
    if a.summarize:
        print(summarize(a.summarize))
    else:
        run(a.reps, a.n, a.only)


if __name__ == "__main__":
    main()
