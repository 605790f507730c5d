"""Correctness of the whole model on the GPU: every fixture, both kernel modes.

For each fixture and mode: max |forward logits - reference| over the prompts, teacher-forced
greedy argmax equality, greedy `generate` tokens vs the reference, and compile/run times.
Prints a table; writes JSON to --out. Run by benchmarks/gpu_suite.sh on the GPU machine.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gemma4_jax as g4  # noqa: E402

FILES = [
    ("e4b_tiny", "model.gguf"),
    ("e2b_tiny", "model.gguf"),
    ("dense_tiny", "model.gguf"),
    ("moe_tiny", "model.gguf"),
    ("quant_small", "model-Q8_0.gguf"),
    ("quant_small", "model-Q4_K_M.gguf"),
    ("quant_small", "model-Q6_K.gguf"),
]


def check(fx: Path, name: str, file: str, mode: str, dtype: str) -> dict:
    path = fx / name / file
    ref_file = (
        "reference.npz"
        if file == "model.gguf"
        else file.replace("model-", "reference-").replace(".gguf", ".npz")
    )
    model = g4.load(path, dtype=dtype)
    ref = np.load(fx / name / ref_file)
    row = {"fixture": f"{name}/{file}", "mode": mode, "dtype": dtype}
    with g4.use_kernels(mode):
        os.environ["GEMMA4_JAX_KERNELS"] = mode
        t0 = time.perf_counter()
        errs, agree = [], True
        for k in (0, 1):
            p, gr = ref[f"prompt_{k}"], ref[f"greedy_{k}"]
            lg = np.asarray(g4.forward(model.params, p[None]))[0]
            errs.append(float(np.abs(lg - ref[f"logits_{k}"]).max()))
            full = np.asarray(g4.forward(model.params, np.concatenate([p, gr])[None]))[0]
            agree &= bool(np.array_equal(full[len(p) - 1 : len(p) - 1 + len(gr)].argmax(-1), gr))
        row["forward_s"] = time.perf_counter() - t0
        row["logits_max_err"] = max(errs)
        row["teacher_forced_argmax_equal"] = agree
        t0 = time.perf_counter()
        out = g4.generate(
            model.params, [ref["prompt_0"], ref["prompt_1"]], max_new_tokens=24, stop_tokens=()
        )
        row["generate_s"] = time.perf_counter() - t0
        row["greedy_equal"] = all(np.array_equal(out.tokens[k], ref[f"greedy_{k}"]) for k in (0, 1))
        # Each prompt alone: batch-1 decode, the path chat and most research runs take (its
        # one-row kernels differ from the batched ones: e.g. Q4_K's integer dot products).
        b1 = [
            g4.generate(model.params, [ref[f"prompt_{k}"]], max_new_tokens=24, stop_tokens=())
            for k in (0, 1)
        ]
        row["greedy_b1_equal"] = all(
            np.array_equal(o.tokens[0], ref[f"greedy_{k}"]) for k, o in enumerate(b1)
        )
        row["b1_tokens"] = [np.asarray(o.tokens[0]).tolist() for o in b1]
        row["b1_logprobs"] = [np.asarray(o.logprobs[0], np.float64).tolist() for o in b1]
    return row


def _in_subprocess(args, name: str, file: str, mode: str) -> dict:
    """One (fixture, mode) in its own process: Triton compiles are CPU-bound and serial within
    a process, so `--jobs` processes side by side cut the wall time by about that factor."""
    cmd = [sys.executable, __file__, "--fixtures", args.fixtures, "--modes", mode]
    cmd += ["--dtype", args.dtype, "--only", f"{name}/{file}"]
    # Without this, each process would reserve 75% of the GPU's memory at start.
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
        got = [json.loads(x) for x in p.stdout.splitlines() if x.startswith("{")]
        if got:
            return got[-1]
        return {"fixture": f"{name}/{file}", "mode": mode, "error": p.stderr[-300:]}
    except subprocess.TimeoutExpired:
        return {"fixture": f"{name}/{file}", "mode": mode, "error": f"timeout {args.timeout}s"}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fixtures", default=os.environ.get("GEMMA4_JAX_FIXTURES", ".fixtures"))
    ap.add_argument("--modes", default="pallas,reference")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--only", default=None, help="one fixture, e.g. e4b_tiny/model.gguf")
    ap.add_argument("--jobs", type=int, default=1, help="fixtures checked side by side")
    ap.add_argument("--timeout", type=int, default=400, help="per fixture with --jobs")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    fx = Path(args.fixtures)
    todo = [
        (name, file, mode)
        for mode in args.modes.split(",")
        for name, file in FILES
        if (fx / name / file).exists() and (args.only in (None, f"{name}/{file}"))
    ]
    rows = []
    if args.jobs > 1:
        with cf.ThreadPoolExecutor(args.jobs) as pool:
            for row in pool.map(lambda t: _in_subprocess(args, *t), todo):
                rows.append(row)
                print(json.dumps(row), flush=True)
    else:
        for name, file, mode in todo:
            try:
                rows.append(check(fx, name, file, mode, args.dtype))
            except Exception as e:  # report and go on: one failure must not hide the rest
                rows.append({"fixture": f"{name}/{file}", "mode": mode, "error": repr(e)[:300]})
            print(json.dumps(rows[-1]), flush=True)
    print(
        "\n| fixture | mode | logits max err | TF argmax | greedy | greedy batch 1 | forward s | "
        "generate s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['fixture']} | {r['mode']} | ERROR {r['error'][:80]} | | | | | |")
            continue
        print(
            f"| {r['fixture']} | {r['mode']} | {r['logits_max_err']:.2e} | "
            f"{r['teacher_forced_argmax_equal']} | {r['greedy_equal']} | "
            f"{r.get('greedy_b1_equal', '')} | {r['forward_s']:.1f} | {r['generate_s']:.1f} |"
        )
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
