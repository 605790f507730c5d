"""Several GPUs: the sharded fixture check and tensor-parallel scaling, in ONE device call.

    python benchmarks/bench_sharded.py --out sharded.json --md sharded.md   # all GPUs, 560 s
    python benchmarks/bench_sharded.py --models 31b/q4_k_m --devices 1,2 --budget-s 300
    python benchmarks/bench_sharded.py --smoke --out /tmp/sharded.json      # CPU, < 1 min

What it measures:
  fixtures  `tests/sharding_check.py`'s `check_fixture` on the real devices: each fixture loaded
            with `load(..., mesh=...)` on the meshes 1xN, Nx1 and (N >= 4) 2x(N/2), under
            `jax.set_mesh`, against the same model on one device: every leaf and cache on its
            shards, forward logits (max |diff|) and greedy `generate` tokens. Fixtures:
            e2b_tiny, moe_tiny, dense_tiny, quant_small/model-Q4_K_M.gguf (`--fixture-names`).
            `match`: no placement problem, equal tokens, logits within 2.5e-4 on a CPU (the bar
            of tests/test_sharding.py) or 2e-3 on a GPU (the fixtures' bar against their
            reference; `--fixture-tol`).
  scaling   per model of `--models` (random weights of the REAL shapes, benchmarks/
            random_model.py, built once on the first GPU) and device count n of `--devices`
            (default 1 and every power of two up to the device count): the params placed with
            `sharding.shard_params(params, make_mesh(1, n))` (pure tensor parallelism; n = 1 is
            the plain single-device run), timed under `jax.set_mesh` as bench_e2e.py times
            one GPU (its `_measure_decode` / `_measure_prefill`): decode tok/s at batch 1 and
            32 (prompt 128, 64 new tokens in one `generate`, decode time only, median of
            `--repeats`), prefill tok/s of 2K tokens at batch 1; last, batch 32 data parallel
            (`make_mesh(n, 1)`, a full copy per GPU). Per row: tok/s, speed-up over one
            device, scaling efficiency (speed-up / n), params and peak bytes per device,
            first-call (compile) seconds.

Budget order (`--budget-s`, default 560, under the device tool's 10 minutes):
  1. the fixture checks start first, one process per fixture side by side (each capped at
     `--fixtures-timeout-s`, default 120), while the first model builds and compiles; model
     workers wait for them to end before they time anything, so no timing shares the GPUs;
  2. the models in `--models` order (default 31b/q4_k_m, 26b-a4b/q4_k_m, 31b/bf16), one
     subprocess each (a fresh JAX and memory; a crash, OOM or hang costs one model), each
     capped at 1.3x its fair share of what is left. Inside a model, measurement-major:
     decode b1 on 1, 2, ... devices, then prefill 2K, then decode b32, then data parallel,
     so a cut leaves whole scaling pairs. An item is skipped (with the reason in the JSON)
     when its estimated time (the same measurement on fewer devices, +25 %) exceeds the
     model's time left, or when its params + KV cache would not fit the free device memory.
     A Pallas failure on n devices is retried with the reference kernels (noted per row).
Everything is written as it goes: workers rewrite their result file after every item and
the run rewrites `--out` every few seconds, so a run cut from outside keeps what it measured.
Expect the defaults NOT to finish in one call on 2 GPUs: each (measurement, device count)
compiles its own programs (bench_e2e on one H100: 15-30 s per E4B measurement, 45 s for a 31B
decode), so the order above decides what is cut (most likely each model keeps at least its
decode b1 pair); `--models`, `--devices`, `--batches`, `--prefill`, `--no-fixtures` split the
work over several calls.

Memory: every worker grows its GPU memory on demand (XLA_PYTHON_CLIENT_PREALLOCATE=false;
bench_e2e preallocates), a model worker up to `--mem-fraction` 0.90 of each GPU, a fixture
check up to 0.04. Placed copies (1 GPU, 2 GPUs, ...) stay side by side on the first GPU when
they all fit (no re-placement between measurements), else the run goes device-count-major with
one copy at a time, and a copy that cannot be placed beside the last one is staged through host
memory. "Peak GB per GPU" is XLA's high-water mark since the worker started (GPU 0 also held
the single-device copy); a first call made while the fixture checks ran shared the CPU with them.

NCCL: NVLink multicast must stay off on the lent machines (device README, KINDS.md): this
script sets NCCL_NVLS_ENABLE=0 (and TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1)
in os.environ before anything imports JAX; its workers inherit them.

Next GPU session, one call of the device tool (kind "nvidia-h200-x2"; x4 / x8 work the same,
with more device counts and a 2x(N/2) fixture mesh), carry [".whl", ".fixtures"]:

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl; export PYTHONPATH=/tmp/site:$PWD \
        GEMMA4_JAX_FIXTURES=$PWD/.fixtures PYTHONUNBUFFERED=1; python3 \
        benchmarks/bench_sharded.py --out $OUT/bench_sharded.json --md $OUT/bench_sharded.md \
        --log $OUT/bench_sharded.log

(one line in the tool's `command`, timeout_s 600). The markdown table (stdout and `--md`) is
ready to paste into benchmarks/RESULTS.md. Not yet run on GPUs.
"""

from __future__ import annotations

import os

# Before anything can import JAX (and through it NCCL): NVLink multicast off.
os.environ["NCCL_NVLS_ENABLE"] = "0"
os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"
os.environ["NVSHMEM_DISABLE_NVLS"] = "1"

import argparse  # noqa: E402
import contextlib  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# bench_e2e imports no JAX at module level: the orchestrator here never initialises a backend.
from benchmarks.bench_e2e import (  # noqa: E402
    _device_info,
    _fmt,
    _measure_decode,
    _measure_prefill,
    _Recorder,
    _Stopped,
    _write_json,
    add_worker_args,
    run_worker_main,
    spawn_worker,
    worker_env,
)

FIXTURES = ("e2b_tiny", "moe_tiny", "dense_tiny", "quant_small/model-Q4_K_M.gguf")
MODELS = "31b/q4_k_m,26b-a4b/q4_k_m,31b/bf16"
FORWARD_TOL = {"cpu": 2.5e-4, "gpu": 2e-3}  # see the module docstring ("match")
GB = 1e9


def _gb(n: float) -> str:
    return f"{n / GB:.3g} GB"


def _ints(s: str | None) -> list[int] | None:
    if not s:
        return None
    return [int(x) for x in s.split(",") if x.strip()]


def _meshes(s: str | None) -> list[list[int]] | None:
    if not s:
        return None
    return [[int(v) for v in m.split("x")] for m in s.split(",") if m.strip()]


def default_devices(n: int) -> list[int]:
    """1 and every power of two up to n."""
    out, k = [], 1
    while k <= n:
        out.append(k)
        k *= 2
    return out


def default_meshes(n: int) -> list[list[int]]:
    """(data, model) meshes of the fixture check: 1xN, Nx1, and 2x(N/2) from N = 4."""
    if n < 2:
        return []
    out = [[1, n], [n, 1]]
    if n >= 4 and n % 2 == 0:
        out.append([2, n // 2])
    return out


def _devices_info() -> dict:
    import jax

    info = _device_info()
    info["device_kinds"] = sorted({getattr(d, "device_kind", str(d)) for d in jax.devices()})
    return info


# ============================================================================ workers
# `bench_sharded.py --worker NAME --spec JSON --result FILE`; each rewrites FILE after every
# item (bench_e2e's `_Recorder`).


def worker_fixtures(spec: dict, rec: _Recorder) -> None:
    import jax

    sys.path.insert(0, str(REPO / "tests"))
    from sharding_check import check_fixture

    rec.set("device", _devices_info())
    n = jax.device_count()
    meshes = spec.get("meshes") or default_meshes(n)
    tol = spec.get("tol") or FORWARD_TOL.get(jax.default_backend(), FORWARD_TOL["gpu"])
    rec.data.update(meshes=meshes, tol=tol, results=[])
    name, _, file = spec["fixture"].partition("/")
    for data, model in meshes:
        if data * model > n:
            rec.data.setdefault("skipped", []).append(f"{data}x{model}: only {n} devices")
            continue
        try:
            fx = Path(spec["fixtures"])
            file = file or "model.gguf"
            (r,) = check_fixture(fx, name, [(data, model)], file=file, set_mesh=True)
        except Exception as e:
            rec.error(f"{spec['fixture']} {data}x{model}", e)
            continue
        r["match"] = bool(not r["problems"] and r["tokens_equal"] and r["forward_max_diff"] < tol)
        rec.data["results"].append(r)
        rec.save()
    rec.set("done", True)


def _dev_bytes(tree, specs, sizes: dict) -> int:
    """Bytes one device holds of `tree` (arrays or ShapeDtypeStructs) laid out by `specs`."""
    import jax
    import numpy as np
    from jax.sharding import PartitionSpec

    leaves = jax.tree.leaves(tree)
    spec_leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
    total = 0
    for a, spec in zip(leaves, spec_leaves, strict=True):
        shape = list(a.shape)
        for i, ax in enumerate(spec):
            for name in ax if isinstance(ax, tuple) else (ax,):
                if name is not None:
                    shape[i] //= sizes[name]
        total += math.prod(shape) * np.dtype(a.dtype).itemsize
    return int(total)


class _Memory:
    """Free-memory checks on the first device (where the params are built and every mesh
    starts); no limits on a CPU."""

    def __init__(self, jax, margin_gb: float):
        self.dev = jax.devices()[0]
        self.limit = self._stats().get("bytes_limit")
        # activations, workspace, autotuning buffers: a fixed part and 5 % of the device
        self.margin = int(margin_gb * GB + 0.05 * (self.limit or 0))

    def _stats(self) -> dict:
        try:
            return self.dev.memory_stats() or {}
        except Exception:
            return {}

    def free(self) -> int | None:
        s = self._stats()
        return None if self.limit is None else self.limit - s.get("bytes_in_use", 0)

    def check(self, need: int, what: str) -> str | None:
        """None if `need` more bytes (+ the margin) fit now, else the reason they do not."""
        free = self.free()
        if free is None or need + self.margin <= free:
            return None
        return (
            f"does not fit: {what} {_gb(need)} + margin {_gb(self.margin)} > {_gb(free)} free "
            f"on {self.dev}"
        )


def _per_device(jax, mesh, key: str) -> list[int | None]:
    devs = list(mesh.devices.flat) if mesh is not None else jax.devices()[:1]
    out = []
    for d in devs:
        try:
            out.append((d.memory_stats() or {}).get(key))
        except Exception:
            out.append(None)
    return out


def _warm(g4, jax, params, item: dict) -> None:
    """The measurement's programs, compiled by one untimed call of the same shapes."""
    import numpy as np

    v = params.config.vocab_size
    if item["kind"] == "decode":
        prompt = np.random.default_rng(0).integers(
            3, v, size=(item["batch"], item["context"]), dtype=np.int32
        )
        g4.generate(params, prompt, max_new_tokens=item["steps"], stop_tokens=())
    else:
        tokens = np.random.default_rng(0).integers(3, v, size=(1, item["tokens"]), dtype=np.int32)
        cache = g4.init_cache(params, 1, max(256, item["tokens"]))
        jax.block_until_ready(g4.prefill(params, jax.numpy.asarray(tokens), cache)[0])


def _is_oom(e: BaseException) -> bool:
    return any(x in str(e) for x in ("RESOURCE_EXHAUSTED", "out of memory", "Out of memory"))


class _Copies:
    """The params placed per mesh shape ((1, 1): as built, on the first device). Kept side by
    side where they all fit (`keep_all`), else one at a time; when even one more does not fit
    beside the last, that one is staged to host memory first (placing from host arrays sends
    each device only its slices)."""

    def __init__(self, built, keep_all: bool):
        self.by = {(1, 1): built}
        self.keep_all = keep_all
        self.host = None

    def room(self, shape, need: int, mem: _Memory, what: str) -> str | None:
        """Make room for `need` bytes on the first device; None, or why they do not fit."""
        import gc

        import jax

        why = mem.check(need, what)
        if why and len(self.by) > 1:  # drop every copy but this shape's (or the smallest)
            keep = shape if shape in self.by else min(self.by, key=math.prod)
            self.by = {keep: self.by[keep]}
            gc.collect()
            why = mem.check(need, what)
        if why and self.by and shape not in self.by:
            if self.host is None:
                self.host = jax.device_get(next(iter(self.by.values())))
            self.by.clear()
            gc.collect()
            why = mem.check(need, what)
        return why

    def get(self, shape):
        import gc

        import jax

        from gemma4_jax import sharding as sh

        if shape in self.by:
            return self.by[shape]
        src = self.by[min(self.by, key=math.prod)] if self.by else self.host
        placed = sh.shard_params(src, sh.make_mesh(*shape))
        jax.block_until_ready(placed)
        if not self.keep_all or shape[0] > 1:  # one copy at a time (data parallel comes last)
            self.by.clear()
            gc.collect()
        self.by[shape] = placed
        return placed


def worker_scaling(spec: dict, rec: _Recorder) -> None:
    import jax

    import gemma4_jax as g4
    from benchmarks.random_model import params_bytes, random_params
    from gemma4_jax import ops
    from gemma4_jax import sharding as sh
    from gemma4_jax.generate import cache_spec

    deadline = float(spec["deadline"])
    fam, quant, dtype = spec["family"], spec["quant"], spec["dtype"]
    n_all = jax.device_count()
    devices = spec.get("devices") or default_devices(n_all)
    rec.set("device", _devices_info())
    rec.set("kernels_mode", ops.default_mode())
    skipped = rec.data.setdefault("skipped", {})
    results = rec.data.setdefault("results", {})
    for n in devices:
        if n > n_all:
            skipped[f"n={n}"] = f"only {n_all} devices"
    devices = [n for n in devices if n <= n_all]
    tp = {n: (1, n) for n in devices}
    dp = {n: (n, 1) for n in devices if n > 1} if spec.get("data_parallel") else {}

    # -- what each placement costs the first device, before anything is built
    abstract = jax.eval_shape(lambda: random_params(fam, quant, dtype, on_device=True))
    full = params_bytes(abstract)

    def params_on_dev0(shape) -> int:
        sizes = {"data": shape[0], "model": shape[1]}
        return _dev_bytes(abstract, sh.param_specs(abstract, sizes), sizes)

    def cache_on_dev0(item, shape) -> int:
        sizes = {"data": shape[0], "model": shape[1]}
        c = abstract.config
        if item["kind"] == "decode":
            b, need = item["batch"], item["context"] + item["steps"]
            size = 256
            while size < need:
                size *= 2
        else:
            b, size = 1, max(256, item["tokens"])
        cs = cache_spec(c, b, min(size, c.context_length), abstract.compute_dtype)
        return _dev_bytes(cs, sh.cache_specs(c, cs, sizes), sizes)

    need_params = {s: params_on_dev0(s) for s in {*tp.values(), *dp.values()}}
    rec.data.update(
        params_bytes=full,
        params_bytes_per_device={f"{d}x{m}": v for (d, m), v in need_params.items()},
    )
    mem = _Memory(jax, float(spec["margin_gb"]))
    rec.set("device_bytes_limit", mem.limit)

    # -- items, measurement-major: every scaling pair of the first measurement first
    items = []
    for meas in spec["measurements"]:
        for n, shape in tp.items():
            items.append((meas, n, shape))
    batched = [m for m in spec["measurements"] if m["kind"] == "decode" and m["batch"] > 1]
    if batched:  # data parallel: the largest batch only
        meas = max(batched, key=lambda m: m["batch"])
        items += [(dict(meas, key=meas["key"] + "_dp"), n, s) for n, s in dp.items()]

    # Keep every tensor-parallel copy (measurement-major costs no re-placement) only where
    # they all fit the first device at once; else go device-count-major, one copy at a time.
    biggest_cache = max((cache_on_dev0(m, (1, 1)) for m in spec["measurements"]), default=0)
    keep_all = mem.check(sum(need_params[s] for s in tp.values()) + biggest_cache, "") is None
    if not keep_all:
        items.sort(key=lambda it: (it[0]["key"].endswith("_dp"), it[1]))
    rec.set("order", "measurement-major" if keep_all else "device-count-major (memory)")
    rec.set("plan", [f"{m['key']}/{n}" for m, n, _ in items])

    why = mem.check(full, "the whole model (built on one device)")
    if why:
        rec.set("skipped_model", why)
        rec.set("done", True)
        return
    t = time.perf_counter()
    params = random_params(fam, quant, dtype)
    jax.block_until_ready(params)
    rec.set("build_s", time.perf_counter() - t)
    copies = _Copies(params, keep_all)
    del params
    modes = {}  # device count -> kernel mode (a Pallas failure switches that count)
    spent: dict[str, list[float]] = {}
    quiet = Path(spec["quiet_flag"]) if spec.get("quiet_flag") else None

    for meas, n, shape in items:
        key, where = meas["key"], f"{meas['key']}/{n}"
        left = deadline - time.time()
        seen = spent.get(key) or spent.get(key.removesuffix("_dp"))
        est = 1.25 * max(seen) if seen else float(spec["min_item_s"])
        if est > left:
            skipped[where] = f"budget: ~{est:.0f} s needed, {max(0.0, left):.0f} s left"
            rec.save()
            print(f"[{fam}/{quant}] {where}: skipped: {skipped[where]}", flush=True)
            continue
        t_item = time.perf_counter()
        placed = shape in copies.by
        need = (0 if placed else need_params[shape]) + cache_on_dev0(meas, shape)
        try:
            why = copies.room(shape, need, mem, "KV cache" if placed else "params + KV cache")
            if why:
                skipped[where] = why
                rec.save()
                print(f"[{fam}/{quant}] {where}: skipped: {why}", flush=True)
                continue
            t = time.perf_counter()
            params = copies.get(shape)
            place_s = time.perf_counter() - t
        except Exception as e:
            rec.error(f"place {where}", e)
            continue
        mesh = None if shape == (1, 1) else sh.make_mesh(*shape)
        out = None
        for attempt in ("default", "reference"):
            mode = modes.get(n, ops.default_mode()) if attempt == "default" else "reference"
            try:
                out = _run_item(g4, jax, ops, params, meas, mesh, mode, quiet, deadline)
                out["kernels"] = mode if attempt == "default" else "reference (pallas failed)"
                break
            except Exception as e:
                rec.error(f"{where}" + ("" if attempt == "default" else " (reference)"), e)
                if attempt != "default" or mode == "reference" or _is_oom(e):
                    break
                modes[n] = "reference"
        del params
        if out is None:
            continue
        out.update(
            devices=n,
            mesh=list(shape),
            place_s=place_s,
            item_s=time.perf_counter() - t_item,
            params_bytes_per_device=need_params[shape],
            peak_bytes_per_device=_per_device(jax, mesh, "peak_bytes_in_use"),
            bytes_in_use_per_device=_per_device(jax, mesh, "bytes_in_use"),
        )
        spent.setdefault(key, []).append(out["item_s"] - (out.get("waited_s") or 0.0))
        results.setdefault(key, {})[str(n)] = out
        rec.save()
        print(f"[{fam}/{quant}] {where}: {out['tok_s']:.1f} tok/s", flush=True)
    rec.set("done", True)


def _run_item(g4, jax, ops, params, meas, mesh, mode, quiet, deadline) -> dict:
    """One measurement under `jax.set_mesh(mesh)` (none for one device). While the fixture
    checks still run (no `quiet` flag yet), compile with an untimed call, then wait for them."""
    first = waited = None
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        with ops.use_kernels(mode):
            if quiet is not None and not quiet.exists():
                t = time.perf_counter()
                _warm(g4, jax, params, meas)
                first = time.perf_counter() - t
                t = time.perf_counter()
                while not quiet.exists() and time.time() < deadline:
                    time.sleep(0.2)
                waited = time.perf_counter() - t
            if meas["kind"] == "decode":
                r = _measure_decode(
                    params, meas["batch"], meas["context"], meas["steps"], meas["repeats"], seed=1
                )
            else:
                r = _measure_prefill(params, meas["tokens"], meas["repeats"], seed=2)
    if first is not None:
        r.update(first_call_s=first, waited_s=waited, first_call_note="untimed compile call")
    if quiet is not None and not quiet.exists():  # the model's time ran out while waiting
        r["timed_beside_fixture_checks"] = True
    return r


WORKERS = {"fixtures": worker_fixtures, "scaling": worker_scaling}


# ============================================================================ orchestrator


class _Job:
    def __init__(self, label: str, proc: subprocess.Popen, result: Path, deadline: float):
        self.label, self.proc, self.result, self.deadline = label, proc, result, deadline
        self.t0, self.status = time.time(), None

    def read(self) -> dict:
        try:
            out = json.loads(self.result.read_text())
        except Exception:
            out = {}
        if self.status is not None:
            out["status"] = self.status
        return out

    def poll(self) -> bool:
        """True once it has ended (killed at its deadline if need be)."""
        if self.status is not None:
            return True
        rc = self.proc.poll()
        if rc is None and time.time() < self.deadline:
            return False
        if rc is None:
            self.kill()
            self.status = f"timeout after {time.time() - self.t0:.0f} s (partial results kept)"
        else:
            self.status = "ok" if rc == 0 else f"exit code {rc}"
        return True

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # the worker's own process group
        self.proc.wait()


class Runner:
    def __init__(self, args):
        self.args = args
        self.t0 = time.time()
        self.workdir = Path(args.workdir or tempfile.mkdtemp(prefix="gemma4_sharded_"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log = Path(args.log) if args.log else self.workdir / "workers.log"
        self.jobs: list[_Job] = []
        self.steps: list[dict] = []
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._stop)

    def _stop(self, signum, frame):
        for j in self.jobs:
            if j.status is None:
                j.kill()
                j.status = f"stopped by {signal.Signals(signum).name}"
        raise _Stopped(signal.Signals(signum).name)

    def remaining(self) -> float:
        return self.args.budget_s - (time.time() - self.t0)

    def env(self, extra: dict) -> dict:
        env = worker_env(self.args)
        # Grow on demand: fixture checks and a model share the GPUs for a while.
        env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
        if self.args.smoke:
            flags = "--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0"
            env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {flags}".strip()
        env.update(extra)
        return env

    def start(self, name: str, spec: dict, label: str, timeout: float, env: dict) -> _Job:
        result = self.workdir / f"{label.replace('/', '_').replace(' ', '_')}.json"
        print(f"[sharded] {label}: start (timeout {timeout:.0f} s)", flush=True)
        script = Path(__file__).resolve()
        proc = spawn_worker(script, name, spec, result, self.log, self.env(env), label)
        job = _Job(label, proc, result, time.time() + timeout)
        self.jobs.append(job)
        return job

    def finished(self, job: _Job) -> None:
        out = job.read()
        status = job.status + (
            f"; errors in {', '.join(out['errors'])}" if out.get("errors") else ""
        )
        self.steps.append(
            {"step": job.label, "status": status, "wall_s": round(time.time() - job.t0, 1)}
        )
        print(f"[sharded] {job.label}: {status} ({time.time() - job.t0:.1f} s)", flush=True)


def _measurements(args) -> list[dict]:
    """Decode at the first batch, prefill, decode at the other batches: most important first."""

    def decode(b):
        return {"key": f"decode_b{b}", "kind": "decode", "batch": b, "context": args.context}

    out = [decode(b) for b in args.batches[:1]]
    out += [{"key": f"prefill_{_tok(t)}", "kind": "prefill", "tokens": t} for t in args.prefill]
    out += [decode(b) for b in args.batches[1:]]
    return [dict(m, steps=args.steps, repeats=args.repeats) for m in out]


def _tok(t: int) -> str:
    return f"{t // 1024}k" if t % 1024 == 0 else str(t)


def orchestrate(args) -> dict:
    r = Runner(args)
    raw: dict = {"fixtures": {}, "models": {}, "steps": r.steps, "workdir": str(r.workdir)}
    quiet = r.workdir / "fixtures_done"
    quiet.unlink(missing_ok=True)
    last_write = [0.0]

    def refresh(force=False):
        """Fold the workers' partial files into `raw` and rewrite --out now and then."""
        for j in r.jobs:
            (raw["fixtures"] if j.label.startswith("fixture") else raw["models"])[
                j.label.split(" ", 1)[1]
            ] = j.read()
        if args.out and (force or time.time() - last_write[0] > 5):
            last_write[0] = time.time()
            s = summarize(args, raw, partial=True)
            _write_json(Path(args.out), s)

    def tick(fixture_jobs):
        done = all(j.poll() for j in fixture_jobs)
        for j in fixture_jobs:
            if j.status is not None and not any(st["step"] == j.label for st in r.steps):
                r.finished(j)
        if done and not quiet.exists():
            quiet.touch()
        refresh()

    fixture_jobs: list[_Job] = []
    try:
        fx = Path(args.fixtures)
        if args.no_fixtures:
            raw["fixtures_skipped"] = "--no-fixtures"
        elif not fx.is_dir():
            raw["fixtures_skipped"] = f"no fixtures at {fx} (--fixtures / GEMMA4_JAX_FIXTURES)"
        else:
            for name in args.fixture_names:
                base, _, file = name.partition("/")
                if not (fx / base / (file or "model.gguf")).exists():
                    raw["fixtures"][name] = {
                        "skipped": f"{fx / base / (file or 'model.gguf')} absent"
                    }
                    continue
                spec = {"fixtures": str(fx), "fixture": name, "meshes": args.fixture_meshes}
                spec["tol"] = args.fixture_tol
                timeout = min(args.fixtures_timeout_s, r.remaining() - args.reserve_s)
                fixture_jobs.append(
                    r.start(
                        "fixtures",
                        spec,
                        f"fixture {name}",
                        timeout,
                        # each a small share of every GPU, beside the first model
                        {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.04"},
                    )
                )
        tick(fixture_jobs)
        models = [m.strip() for m in args.models.split(",") if m.strip()]
        for i, key in enumerate(models):
            fam, _, quant = key.partition("/")
            left = r.remaining() - args.reserve_s
            share = min(left, args.share * left / (len(models) - i))
            if args.model_timeout_s:
                share = min(share, args.model_timeout_s)
            if share < args.min_model_s:
                raw["models"][key] = {"skipped_model": f"budget: {max(0, left):.0f} s left"}
                r.steps.append({"step": f"model {key}", "status": "skipped: budget"})
                continue
            spec = {
                "family": fam,
                "quant": quant or "q4_k_m",
                "dtype": "bfloat16",
                "devices": args.devices,
                "measurements": _measurements(args),
                "data_parallel": not args.no_data_parallel,
                "deadline": time.time() + share - 5,
                "quiet_flag": str(quiet),
                "min_item_s": args.min_item_s,
                "margin_gb": args.margin_gb,
            }
            job = r.start(
                "scaling",
                spec,
                f"model {key}",
                share,
                {"XLA_PYTHON_CLIENT_MEM_FRACTION": args.mem_fraction},
            )
            while not job.poll():
                tick(fixture_jobs)
                time.sleep(0.25)
            tick(fixture_jobs)
            r.finished(job)
        while not all(j.poll() for j in fixture_jobs):  # models done before the fixtures
            time.sleep(0.25)
        tick(fixture_jobs)
    except _Stopped as e:
        raw["stopped"] = f"stopped by {e} after {time.time() - r.t0:.0f} s"
        r.steps.append({"step": "run", "status": raw["stopped"]})
    for j in r.jobs:
        if j.status is not None and not any(st["step"] == j.label for st in r.steps):
            r.finished(j)
    refresh()
    raw["worker_log"] = str(r.log)
    raw["total_s"] = time.time() - r.t0
    return raw


# ============================================================================ report


def summarize(args, raw: dict, partial: bool = False) -> dict:
    dev = {}
    for d in [*raw["models"].values(), *raw["fixtures"].values()]:
        if d.get("device"):
            dev = d["device"]
            break
    s: dict = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "smoke": bool(args.smoke),
        "partial": partial,
        "device": dev.get("device_kind"),
        "device_kinds": dev.get("device_kinds"),
        "n_devices": dev.get("n_devices"),
        "platform": dev.get("platform"),
        "jax_version": dev.get("jax_version"),
        "jaxlib_version": dev.get("jaxlib_version"),
        "nccl_nvls_enable": os.environ.get("NCCL_NVLS_ENABLE"),
        "budget_s": args.budget_s,
        "settings": {
            "models": args.models,
            "devices": args.devices or "1 and powers of two up to the device count",
            "context": args.context,
            "steps": args.steps,
            "batches": args.batches,
            "prefill": args.prefill,
            "repeats": args.repeats,
        },
    }
    # -- fixtures
    fx_rows, fx_notes = [], []
    for name, d in raw["fixtures"].items():
        fx_rows += d.get("results") or []
        if d.get("skipped"):
            fx_notes.append(f"{name}: skipped {d['skipped']}")
        for where, e in (d.get("errors") or {}).items():
            fx_notes.append(f"{name}: {where}: {e[:300]}")
        if d.get("status") and d["status"] != "ok":
            fx_notes.append(f"{name}: {d['status']}")
    jobs = [d for d in raw["fixtures"].values() if "worker" in d]
    s["fixtures"] = {
        "results": fx_rows,
        # every fixture worker ended by itself, every mesh checked
        "complete": bool(jobs)
        and all(d.get("done") and d.get("status") == "ok" and not d.get("skipped") for d in jobs),
        "all_match": bool(fx_rows)
        and all(r.get("match") for r in fx_rows)
        and not any(d.get("errors") for d in raw["fixtures"].values()),
        "notes": fx_notes,
        "skipped": raw.get("fixtures_skipped"),
    }
    # -- scaling: speed-up and efficiency against the same measurement on one device
    rows = []
    for model, m in raw["models"].items():
        res = m.get("results") or {}
        for key, by_n in res.items():
            one = (res.get(key.removesuffix("_dp")) or {}).get("1", {}).get("tok_s")
            for n, r in sorted(by_n.items(), key=lambda kv: int(kv[0])):
                n_i = int(n)
                tok = r.get("tok_s")
                sp = tok / one if tok and one else None
                peaks = [p for p in r.get("peak_bytes_per_device") or [] if p is not None]
                rows.append(
                    {
                        "model": model,
                        "measurement": key,
                        "devices": n_i,
                        "mesh": "x".join(map(str, r.get("mesh", [1, n_i]))),
                        "tok_s": tok,
                        "speedup": sp,
                        "efficiency": sp / n_i if sp else None,
                        "params_gb_per_device": (r.get("params_bytes_per_device") or 0) / GB,
                        "peak_gb_per_device": [round(p / GB, 2) for p in peaks],
                        "first_call_s": r.get("first_call_s"),
                        "kernels": r.get("kernels"),
                        "beside_fixtures": bool(r.get("timed_beside_fixture_checks")),
                    }
                )
    s["scaling"] = {"rows": rows, "models": raw["models"]}
    s["steps"] = raw["steps"]
    s["stopped"] = raw.get("stopped")
    s["total_s"] = raw.get("total_s")
    s["worker_log"] = raw.get("worker_log")
    s["markdown"] = markdown(s)
    return s


def markdown(s: dict) -> str:
    L = []
    kinds = ", ".join(s.get("device_kinds") or [str(s.get("device"))])
    L.append(
        f"### Run {s['date'][:10]}: sharded fixtures and tensor-parallel scaling "
        f"({s.get('n_devices')} x {kinds}, {s.get('platform')}, jax {s.get('jax_version')})"
        f"{' — SMOKE (toy sizes, simulated CPU devices)' if s['smoke'] else ''}"
    )
    L.append(f"\nCommand: `{s['command']}` (NCCL_NVLS_ENABLE={s.get('nccl_nvls_enable')})\n")
    fx = s["fixtures"]
    if fx["results"]:
        L.append(
            f"Fixtures, sharded vs one device (all match: **{fx['all_match']}**, every mesh "
            f"checked: {fx['complete']}):\n"
        )
        L.append("| fixture | mesh | max logit diff | tokens equal | problems | match | s |")
        L.append("|---|---|---|---|---|---|---|")
        for r in fx["results"]:
            L.append(
                f"| {r['fixture']} | {'x'.join(map(str, r['mesh']))} | "
                f"{r['forward_max_diff']:.2e} | {r['tokens_equal']} | {len(r['problems'])} | "
                f"{r['match']} | {_fmt(r.get('seconds'), 1)} |"
            )
    elif fx.get("skipped"):
        L.append(f"Fixtures: skipped ({fx['skipped']})")
    for note in fx["notes"]:
        L.append(f"- fixtures: {note}")
    L.append(
        "\n| model | measurement | GPUs | mesh | tok/s | speed-up | efficiency | params GB/GPU "
        "| peak GB per GPU | first call s | kernels |"
    )
    L.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in s["scaling"]["rows"]:
        L.append(
            f"| {r['model']} | {r['measurement']} | {r['devices']} | {r['mesh']} | "
            f"{_fmt(r['tok_s'])} | {_fmt(r['speedup'], 2)} | {_fmt(r['efficiency'], 2)} | "
            f"{r['params_gb_per_device']:.3g} | "
            f"{'/'.join(f'{p:.1f}' for p in r['peak_gb_per_device']) or '-'} | "
            f"{_fmt(r['first_call_s'], 1)} | {r['kernels']}"
            f"{' (timed beside the fixture checks)' if r.get('beside_fixtures') else ''} |"
        )
    L.append("")
    for model, m in s["scaling"]["models"].items():
        done = {f"{k}/{n}" for k, by_n in (m.get("results") or {}).items() for n in by_n}
        done |= set(m.get("skipped") or {}) | set(m.get("errors") or {})
        left = [x for x in m.get("plan") or [] if x not in done]
        if left:
            L.append(f"- {model}: not reached: {', '.join(left)}")
        if m.get("skipped_model"):
            L.append(f"- {model}: skipped: {m['skipped_model']}")
        for where, why in (m.get("skipped") or {}).items():
            L.append(f"- {model} {where}: skipped: {why}")
        for where, e in (m.get("errors") or {}).items():
            L.append(f"- {model} {where}: ERROR {e[:200]}")
        if m.get("build_s") is not None:
            L.append(
                f"- {model}: {(m.get('params_bytes') or 0) / GB:.1f} GB of params, built in "
                f"{m['build_s']:.1f} s; order {m.get('order')}; status {m.get('status')}"
            )
    L.append(
        "\nPeak GB per GPU: XLA's high-water mark since the worker started (GPU 0 also held the "
        "single-device copy). Speed-up: tok/s over the same measurement on one GPU "
        "(`_dp` rows, data parallel: over the same batch on one GPU)."
    )
    L.append("\nsteps: " + "; ".join(f"{x['step']}: {x['status']}" for x in s["steps"]))
    return "\n".join(L)


# ============================================================================ CLI


def build_parser():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--smoke", action="store_true", help="CPU, 4 simulated devices, toy sizes")
    ap.add_argument("--budget-s", type=float, default=None, help="whole run (default 560)")
    ap.add_argument("--reserve-s", type=float, default=5.0)
    ap.add_argument("--models", default=None, help=f"family/quant list (default {MODELS})")
    ap.add_argument(
        "--devices", default=None, help="device counts, e.g. 1,2 (default: powers of 2)"
    )
    ap.add_argument("--context", type=int, default=None, help="decode prompt (default 128)")
    ap.add_argument("--steps", type=int, default=None, help="new tokens per generate (default 64)")
    ap.add_argument("--batches", default=None, help="decode batches, first and rest (default 1,32)")
    ap.add_argument("--prefill", default=None, help="prefill lengths (default 2048)")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs, median (default 3)")
    ap.add_argument("--no-data-parallel", action="store_true", help="skip the make_mesh(n, 1) rows")
    ap.add_argument("--kernels", choices=("pallas", "reference", "auto"), default=None)
    ap.add_argument(
        "--fixtures",
        default=os.environ.get("GEMMA4_JAX_FIXTURES") or str(REPO / ".fixtures"),
        help="fixtures folder (default $GEMMA4_JAX_FIXTURES or .fixtures)",
    )
    ap.add_argument("--fixture-names", default=None, help=f"default {','.join(FIXTURES)}")
    ap.add_argument("--fixture-meshes", default=None, help="e.g. 1x2,2x1 (default 1xN,Nx1,2x(N/2))")
    ap.add_argument(
        "--fixture-tol", type=float, default=None, help="logit bar (CPU 2.5e-4, GPU 2e-3)"
    )
    ap.add_argument("--fixtures-timeout-s", type=float, default=None, help="default 120")
    ap.add_argument("--no-fixtures", action="store_true")
    ap.add_argument("--share", type=float, default=1.3, help="a model's cap: share x fair share")
    ap.add_argument("--model-timeout-s", type=float, default=None)
    ap.add_argument("--min-model-s", type=float, default=None, help="skip a model below this")
    ap.add_argument("--min-item-s", type=float, default=None, help="first item of a kind needs")
    ap.add_argument("--margin-gb", type=float, default=3.0, help="free memory kept per device")
    ap.add_argument("--mem-fraction", default="0.90", help="XLA_PYTHON_CLIENT_MEM_FRACTION, models")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--out", default=None, help="JSON results (rewritten as the run goes)")
    ap.add_argument("--md", default=None, help="also write the markdown table here")
    ap.add_argument("--log", default=None, help="worker logs (default: in the workdir)")
    add_worker_args(ap)  # internal
    return ap


def _defaults(args):
    smoke = args.smoke
    d = {
        "budget_s": 120 if smoke else 560,
        "models": "tiny-31b/q4_k_m" if smoke else MODELS,
        "devices": "1,2" if smoke else None,
        "context": 16 if smoke else 128,
        "steps": 4 if smoke else 64,
        "batches": "1,4" if smoke else "1,32",
        "prefill": "64" if smoke else "2048",
        "repeats": 1 if smoke else 3,
        "fixture_names": "e2b_tiny,moe_tiny" if smoke else ",".join(FIXTURES),
        "fixtures_timeout_s": 90 if smoke else 120,
        "min_model_s": 10 if smoke else 45,
        "min_item_s": 2 if smoke else 20,
    }
    for k, v in d.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.devices = _ints(args.devices)
    args.batches = _ints(args.batches)
    args.prefill = _ints(args.prefill) or []
    args.fixture_names = [x.strip() for x in args.fixture_names.split(",") if x.strip()]
    args.fixture_meshes = _meshes(args.fixture_meshes)
    return args


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        return run_worker_main(args.worker, json.loads(args.spec), Path(args.result), WORKERS)
    args = _defaults(args)
    for path in (args.out, args.md, args.log):
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
    raw = orchestrate(args)
    s = summarize(args, raw)
    if args.out:
        _write_json(Path(args.out), s)
    if args.md:
        Path(args.md).write_text(s["markdown"] + "\n")
    print()
    print(s["markdown"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
