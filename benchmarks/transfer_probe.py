"""How fast do a GGUF's bytes reach the GPU, and which way of calling `jax.device_put` is best?
(GPU machine; E4B real-size random GGUF, page cache hot.)

    python3 benchmarks/transfer_probe.py --out transfer_probe.json

The loader sends each tensor's raw bytes (memmap views of the file) with `jax.device_put`.
Each variant below runs in a fresh process (the first transfers of a process pay for the
runtime's pinned staging memory) and moves every tensor's bytes twice (pass 1, pass 2), to
the device, blocking until all are there:

  tensor      one `device_put` per tensor, on `--threads` threads (the loader's way before
              pieces)
  pieces      64 MiB pieces of the tensors, on `--threads` threads
  touched     pieces, each first copied into a per-thread host buffer that was touched before
              (no page faults in the runtime's copy), then `device_put`; timing only: the
              buffer is reused without waiting for its transfer, so data are not checked
  serial      pieces, one thread
  pread       pieces through `gemma4_jax.file_transfer.FileTransfers` (the loader's way since
              run v: `os.preadv` into a reused per-thread buffer, then `device_put`); also
              checks that every piece arrived intact; its buffers registered with the runtime
              (`dma_map`), or not (`pread_nodma`)

Also reads every byte once through the memmap (sum on 16 threads) for the page-cache rate.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PIECE = 64 << 20
VARIANTS = ("tensor", "pieces", "touched", "serial", "pread", "pread_nodma")


def _pieces(arrs, piece=PIECE):
    return [a[i : i + piece] for a in arrs for i in range(0, a.size, piece)]


def child(path: str, variant: str, threads: int) -> dict:
    import jax
    import numpy as np

    sys.path.insert(0, str(ROOT))
    from gemma4_jax.gguf_file import read_gguf

    t = time.perf_counter()
    jax.devices()
    out = {"backend_s": time.perf_counter() - t}
    f = read_gguf(Path(path))
    arrs = [np.asarray(x.data).reshape(-1).view(np.uint8) for x in f.tensors]
    gb = sum(a.nbytes for a in arrs) / 1e9
    out["gb"] = gb
    if variant == "tensor":
        items, fn = arrs, jax.device_put
    elif variant in ("pieces", "serial"):
        items, fn = _pieces(arrs), jax.device_put
        if variant == "serial":
            threads = 1
    elif variant == "touched":
        import threading

        local = threading.local()

        def fn(piece):
            buf = getattr(local, "buf", None)
            if buf is None:
                buf = local.buf = np.ones(PIECE, np.uint8)
            view = buf[: piece.size]
            np.copyto(view, piece)
            return jax.device_put(view)

        items = _pieces(arrs)
    elif variant in ("pread", "pread_nodma"):
        from gemma4_jax.file_transfer import FileTransfers

        items = _pieces(arrs)
    else:
        raise SystemExit(f"unknown variant {variant}")
    for p in (1, 2):
        t = time.perf_counter()
        if variant.startswith("pread"):
            dma = variant == "pread"
            with FileTransfers.for_gguf(f, threads, dma_map=dma) as transfers:
                res = [fut.result() for fut in [transfers(x) for x in items]]
        else:
            with cf.ThreadPoolExecutor(threads) as pool:
                res = list(pool.map(fn, items))
        jax.block_until_ready(res)
        dt = time.perf_counter() - t
        out[f"pass{p}_s"] = dt
        out[f"pass{p}_gb_s"] = gb / dt
        if variant.startswith("pread") and p == 2:
            out["intact"] = all(
                np.array_equal(np.asarray(r), x) for r, x in zip(res, items, strict=True)
            )
        del res
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--path", default="/tmp/first_token_e4b_q8_0.gguf")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--threads", type=int, default=16)
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.path, args.child[0], int(args.child[1]))))
        return
    path = Path(args.path)
    if not path.exists():
        sys.path.insert(0, str(ROOT / "benchmarks"))
        sys.path.insert(0, str(ROOT))
        from random_model import write_real_size_gguf

        write_real_size_gguf(path, "e4b", "q8_0")
    import numpy as np

    sys.path.insert(0, str(ROOT))
    from gemma4_jax.gguf_file import read_gguf

    arrs = [np.asarray(x.data).reshape(-1).view(np.uint8) for x in read_gguf(path).tensors]
    t = time.perf_counter()
    with cf.ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda a: int(a[::4096].sum()) + int(a.sum(dtype=np.uint64)), arrs))
    gb = sum(a.nbytes for a in arrs) / 1e9
    results = {"memmap_read_gb_s": gb / (time.perf_counter() - t)}
    print(f"{path}: {gb:.2f} GB; memmap read (16 threads) {results['memmap_read_gb_s']:.1f} GB/s")
    for v in args.variants.split(","):
        cmd = [sys.executable, __file__, "--path", str(path), "--child", v, str(args.threads)]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            print(f"{v}: FAILED\n{(p.stdout + p.stderr)[-1500:]}")
            continue
        r = results[v] = json.loads(line[7:])
        print(
            f"{v:8s} pass 1 {r['pass1_s']:.2f} s ({r['pass1_gb_s']:.1f} GB/s), "
            f"pass 2 {r['pass2_s']:.2f} s ({r['pass2_gb_s']:.1f} GB/s); "
            f"backend {r['backend_s']:.2f} s" + (f"; intact {r['intact']}" if "intact" in r else "")
        )
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
