"""Batch-1 MoE decode: the grouped kernel's vector path at the 26B-A4B expert shapes (GPU).

One token, its top-8 of 128 experts: gate|up (Q4_K, 1408 x 2816, x shared by the choices) and
down (Q5_0, 2816 x 704, one x per choice), as a real Q4_K_M file stores them. For each tile
variant (`--variants`, `BlockSizes` fields) it times R back-to-back calls inside one jit, each
on fresh random expert ids (so the chosen experts' bytes come from HBM, not the 50 MiB L2),
and reports microseconds per call, GB/s of the chosen experts' bytes, the first call's largest
error against XLA's f32 result (relative to its largest output), and the same against
XLA's gather + dequantize + dot (the `reference` path of `ops.expert_matmul`). The times
include the loop's own per-call slicing of x and the ids (a few small kernels), so compare
variants with each other, not with the kernel's GPU-busy time in a profile. Each variant
is one Triton compile (~15 s on the H100).

    python3 benchmarks/bench_grouped_decode.py --out grouped.json
    python3 benchmarks/bench_grouped_decode.py --smoke    # CPU: toy shapes, interpret mode
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_qmatmul import _random_fields  # noqa: E402

from gemma4_jax import ops, quant  # noqa: E402
from pallas_kernels import qmatmul as qm  # noqa: E402
from pallas_kernels import qtiles  # noqa: E402

# (name, format, N, K, x per choice): 26B-A4B Q4_K_M's expert matrices, 8 of 128 chosen.
SHAPES = [("gate_up", "Q4_K", 1408, 2816, False), ("down", "Q5_0", 2816, 704, True)]
N_EXPERTS, TOP_K = 128, 8
# --smoke (CPU, interpret mode): the same formats at toy sizes, 2 of 8 experts.
SMOKE_SHAPES = [("gate_up", "Q4_K", 32, 512, False), ("down", "Q5_0", 48, 96, True)]
SMOKE_EXPERTS, SMOKE_TOP_K = 8, 2
SMOKE_VARIANTS = "xla;default;block_n=32,split_k=2"


def _variants(spec: str) -> list[tuple[str, qm.BlockSizes | None]]:
    """`default;block_n=32,split_k=2;...` -> named BlockSizes (`xla`: the gather path)."""
    out = []
    for item in spec.split(";"):
        item = item.strip()
        if item in ("default", "xla"):
            out.append((item, None))
            continue
        kw = {k: int(v) for k, v in (p.split("=") for p in item.split(","))}
        out.append((item, qm.BlockSizes(**kw)))
    return out


def _xla_gather(x, fmt, fields, ids):
    """`ops.expert_matmul`'s XLA path (what `auto` ran before the grouped kernel took decode)."""
    with ops.use_kernels("reference"):
        return ops.expert_matmul(x, getattr(quant, fmt)(**fields), ids)


def run(args) -> list[dict]:
    rows = []
    key = jax.random.PRNGKey(0)
    shapes, n_experts, top_k = (
        (SMOKE_SHAPES, SMOKE_EXPERTS, SMOKE_TOP_K) if args.smoke else (SHAPES, N_EXPERTS, TOP_K)
    )
    for name, fmt, n, k, per_choice in shapes:
        fields = jax.vmap(lambda kk, fmt=fmt, n=n, k=k: _random_fields(fmt, n, k, kk))(
            jax.random.split(key, n_experts)
        )
        spec = qtiles.get_format(fmt)
        chosen_bytes = top_k * n * k * spec.bits_per_weight / 8
        r = args.calls
        rng = np.random.default_rng(1)
        ids = jnp.asarray(
            np.stack([rng.choice(n_experts, top_k, replace=False) for _ in range(r)])[:, None],
            jnp.int32,
        )  # [R, 1, k]
        xs = jax.random.normal(key, (r, 1, *((top_k,) if per_choice else ()), k), jnp.bfloat16)
        # What every variant's first call must give (XLA's gather path, f32 weights).
        want = np.asarray(_xla_gather(xs[0].astype(jnp.float32), fmt, fields, ids[0]))
        for vname, bs in _variants(args.variants):

            def one(x, i, bs=bs, fmt=fmt, fields=fields, vname=vname):
                if vname == "xla":
                    return _xla_gather(x, fmt, fields, i)
                return qm.grouped_qmatmul(x, fmt, fields, i, block_sizes=bs, interpret=args.smoke)

            @jax.jit
            def many(xs, ids, one=one):
                return jax.lax.map(lambda a: one(*a), (xs, ids))

            row = {"shape": name, "fmt": fmt, "n": n, "k": k, "variant": vname}
            try:
                t0 = time.perf_counter()
                got = jax.block_until_ready(many(xs, ids))
                row["compile_s"] = time.perf_counter() - t0
                err = np.abs(np.asarray(got[0], np.float32) - want).max()
                row["max_rel_err"] = float(err / max(np.abs(want).max(), 1e-30))
                times = []
                for _ in range(args.reps):
                    t0 = time.perf_counter()
                    jax.block_until_ready(many(xs, ids))
                    times.append(time.perf_counter() - t0)
                us = 1e6 * statistics.median(times) / r
                row |= {"us_per_call": us, "gb_s": chosen_bytes / us / 1e3}
                if bs is not None:
                    row["resolved"] = repr(
                        bs.resolve(fmt, m=1, n=n, k=k, dtype=jnp.bfloat16, pairs=top_k)
                    )
            except Exception as e:  # one failing variant must not sink the others
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            print(json.dumps(row), flush=True)
            rows.append(row)
            if args.out:
                args.out.write_text(json.dumps(rows, indent=1))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default="xla;default;split_k=2;block_n=32;block_n=32,split_k=2")
    ap.add_argument("--calls", type=int, default=64, help="calls per timed executable")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--smoke", action="store_true", help="CPU: toy shapes, interpret mode")
    args = ap.parse_args(argv)
    if args.smoke:
        args.variants, args.calls, args.reps = SMOKE_VARIANTS, 2, 1
    rows = run(args)
    print(f"\n{jax.devices()[0].device_kind}, jax {jax.__version__}")
    print("| shape | variant | us / call | GB/s of chosen experts | max rel err |")
    print("|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['shape']} | {r['variant']} | {r['error'][:80]} | | |")
        else:
            us, gbs, err = r["us_per_call"], r["gb_s"], r["max_rel_err"]
            print(f"| {r['shape']} | {r['variant']} | {us:.1f} | {gbs:.0f} | {err:.1e} |")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
