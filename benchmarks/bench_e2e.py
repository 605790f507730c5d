"""End-to-end speed of gemma4-jax on one GPU, side by side with the ceilings and a peer.

    python benchmarks/bench_e2e.py --out e2e.json                 # default set, ~8 min on an H100
    python benchmarks/bench_e2e.py --only decode,prefill --budget-s 300
    python benchmarks/bench_e2e.py --smoke --out /tmp/smoke.json  # CPU, toy sizes, < 1 min

Parts (`--only` / `--skip`, comma lists):
  ceilings     device copy bandwidth (read + write of a 2 GB array) and bf16 matmul 8192^3
  decode       batch-1 decode tok/s at contexts `--contexts` (default 128, 4K, 32K): a random
               prompt of that length, then `--steps` new tokens in ONE `generate` call
               (`stop_tokens=()`); tok/s = steps / (generate time - its prefill time)
  prefill      prefill tok/s at `--prefill` lengths (512, 2K, 8K): `prefill` on a fresh cache
  batch        decode throughput at batch `--batches` (8, 32), prompt 128: rows * steps / time
  kernels      kernels per decode step, counted in the compiled HLO of `decode_step`
  quant2       the other quant mixes (`--quants` after the first): decode at `--quant2-contexts`
  extra        `--extra` families (e.g. `31b:q4_k_m,26b-a4b:q4_k_m`): decode 128 + prefill 2K
  peer         transformers on the same GPU: a random-weight E4B-like Gemma4ForCausalLM in
               bf16, decode at context 128 (static cache + torch.compile, else eager) and
               prefill 2K
  load         write a real-size random GGUF (gemma4_jax.builtin) and time `gemma4_jax.load`
  first_token  fresh process, persistent compilation cache: time to the first token, cold
               (empty cache) then warm (same cache), from process spawn

Every model measurement runs in its own subprocess (a fresh JAX, its own peak-memory counter,
a hard timeout: a hang or an OOM costs one part, not the run). Workers write their results
after every measurement, so a part cut by its timeout keeps what it measured. The whole run
respects `--budget-s`; parts run most-important-first and are skipped (with a reason) when
the budget is spent. Timings: warm-up first (the first call compiles and is reported as
`first_call_s`), device sync (`block_until_ready`, `torch.cuda.synchronize`), median of
`--repeats`. The JSON (`--out`) holds every number; a markdown table is printed last.
"""

from __future__ import annotations

import time

T_IMPORT = time.time()  # first thing: a worker's clock for "since spawn" starts before imports

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

PARTS = (
    "ceilings",
    "decode",
    "prefill",
    "batch",
    "kernels",
    "quant2",
    "extra",
    "peer",
    "load",
    "first_token",
)

# shared/docs/design.md, "Speed targets" (H100, batch 1 unless stated)
TARGETS = {
    "e4b_q8_0_decode_b1_tok_s": (">=", 400.0),
    "e4b_q4_k_m_decode_b1_tok_s": (">=", 600.0),
    "e4b_prefill_2k_tok_s": (">=", 60000.0),
    "e4b_decode_b32_tok_s": (">=", 3000.0),
    "load_s": ("<=", 10.0),
    "first_token_cold_s": ("<=", 30.0),
    "first_token_warm_s": ("<=", 5.0),
}

# Peers measured elsewhere on an H100 (design.md), for the table only.
PEERS_DOC = {
    "e4b_q8_0_decode_b1_tok_s": "llama.cpp 186, mistral.rs 229, vLLM bf16 177, HF 96",
    "e4b_q4_k_m_decode_b1_tok_s": "llama.cpp 206",
    "e4b_prefill_2k_tok_s": "llama.cpp 13.4K, vLLM 51K, HF 17K",
}


# ============================================================================ helpers


def _median(xs):
    return statistics.median(xs) if xs else None


def _write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    os.replace(tmp, path)


def _tail(text: str, n: int = 1500) -> str:
    return text[-n:]


def _ints(s: str) -> list[int]:
    out = []
    for x in s.split(","):
        x = x.strip().lower()
        if not x:
            continue
        mult = 1
        if x.endswith("k"):
            x, mult = x[:-1], 1024
        out.append(int(float(x) * mult))
    return out


# ============================================================================ workers
# Each worker: `bench_e2e.py --worker NAME --spec JSON --result FILE`. It imports JAX (or
# torch) itself, measures, and rewrites FILE after every measurement.


class _Recorder:
    def __init__(self, path: Path, base: dict):
        self.path, self.data = path, dict(base)
        self.save()

    def save(self):
        _write_json(self.path, self.data)

    def set(self, key, value):
        self.data[key] = value
        self.save()

    def error(self, where: str, exc: BaseException):
        errs = self.data.setdefault("errors", {})
        errs[where] = f"{type(exc).__name__}: {exc}"[:2000]
        tb = traceback.format_exc()
        print(f"[worker] {where} failed:\n{tb}", file=sys.stderr, flush=True)
        self.save()


def _jax_setup(spec: dict):
    import jax

    if spec.get("cache_dir"):
        jax.config.update("jax_compilation_cache_dir", spec["cache_dir"])
        for k, v in (
            ("jax_persistent_cache_min_compile_time_secs", 0.0),
            ("jax_persistent_cache_min_entry_size_bytes", 0),
        ):
            try:
                jax.config.update(k, v)
            except Exception:  # an older/newer JAX without the option
                pass
    return jax


def _device_info() -> dict:
    import jax

    d = jax.devices()[0]
    info = {
        "platform": d.platform,
        "device_kind": getattr(d, "device_kind", str(d)),
        "n_devices": len(jax.devices()),
        "jax_version": jax.__version__,
    }
    try:
        import jaxlib

        info["jaxlib_version"] = jaxlib.__version__
    except Exception:
        pass
    return info


def _memory(kind="peak_bytes_in_use"):
    import jax

    try:
        stats = jax.devices()[0].memory_stats() or {}
    except Exception:
        stats = {}
    return stats.get(kind)


def _time_jax(fn, *args, warmup=2, repeats=10):
    import jax

    first = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - first
    for _ in range(max(0, warmup - 1)):
        jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t)
    return _median(ts), ts, first


def worker_ceilings(spec: dict, rec: _Recorder):
    jax = _jax_setup(spec)
    import jax.numpy as jnp

    rec.set("device", _device_info())
    n_bytes = int(spec["copy_bytes"])
    try:
        x = jax.random.bits(jax.random.key(0), (n_bytes // 4,), jnp.uint32)
        f = jax.jit(lambda a: a ^ jnp.uint32(0x5A5A5A5A))  # reads and writes every byte once
        med, ts, _ = _time_jax(f, x, warmup=3, repeats=int(spec["repeats"]))
        rec.set(
            "copy",
            {
                "array_bytes": n_bytes,
                "median_s": med,
                "samples_s": ts,
                "tb_s": 2 * n_bytes / med / 1e12,
                "method": "jit(x ^ c) on a uint32 array: read + write counted",
            },
        )
        del x
    except Exception as e:
        rec.error("copy", e)
    n = int(spec["matmul_n"])
    try:
        k1, k2 = jax.random.split(jax.random.key(1))
        a = jax.random.normal(k1, (n, n), jnp.bfloat16)
        b = jax.random.normal(k2, (n, n), jnp.bfloat16)
        f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32).astype(a.dtype))
        med, ts, _ = _time_jax(f, a, b, warmup=3, repeats=int(spec["repeats"]))
        rec.set(
            "matmul",
            {
                "n": n,
                "median_s": med,
                "samples_s": ts,
                "tflops": 2 * n**3 / med / 1e12,
                "method": "bf16 x bf16 -> f32 accumulate -> bf16, random normal data",
            },
        )
    except Exception as e:
        rec.error("matmul", e)


def _trace_counts():  # gemma4_jax.generate.TRACE_COUNTS: compilations per program
    from gemma4_jax.generate import TRACE_COUNTS as counts

    return counts


def _measure_decode(params, batch: int, ctx: int, steps: int, repeats: int, seed: int) -> dict:
    import numpy as np

    import gemma4_jax as g4

    v = params.config.vocab_size
    prompt = np.random.default_rng(seed).integers(3, v, size=(batch, ctx), dtype=np.int32)

    def run():
        return g4.generate(params, prompt, max_new_tokens=steps, stop_tokens=())

    t = time.perf_counter()
    r = run()
    first = time.perf_counter() - t
    got = [len(x) for x in r.tokens]
    if got != [steps] * batch:
        raise RuntimeError(f"generate returned {got} tokens per row, expected {steps}")
    traces = dict(_trace_counts())
    dec, pre, wall = [], [], []
    for _ in range(repeats):
        t = time.perf_counter()
        r = run()
        wall.append(time.perf_counter() - t)
        dec.append(r.timings["elapsed_s"] - r.timings["prefill_s"])
        pre.append(r.timings["prefill_s"])
    med = _median(dec)
    return {
        "batch": batch,
        "context": ctx,
        "steps": steps,
        "tok_s": batch * steps / med,
        "ms_per_step": 1e3 * med / steps,
        "decode_s": dec,
        "prefill_s": pre,
        "wall_s": wall,
        "first_call_s": first,
        "first_call_note": "includes compiling the prefill bucket and the decode loop",
        "recompiled_while_timing": dict(_trace_counts()) != traces,
    }


def _measure_prefill(params, t_len: int, repeats: int, seed: int) -> dict:
    import jax.numpy as jnp
    import numpy as np

    import gemma4_jax as g4

    v = params.config.vocab_size
    tokens = jnp.asarray(np.random.default_rng(seed).integers(3, v, size=(1, t_len)), jnp.int32)
    # generate's smallest cache (256): short prompts share the prefill program of `decode`
    cache = g4.init_cache(params, 1, max(256, t_len))
    t = time.perf_counter()
    logits, cache = g4.prefill(params, tokens, cache)
    logits.block_until_ready()
    first = time.perf_counter() - t
    traces = dict(_trace_counts())
    ts = []
    for _ in range(max(2, repeats)):
        t = time.perf_counter()
        logits, cache = g4.prefill(params, tokens, cache)  # the cache is donated: pass it on
        logits.block_until_ready()
        ts.append(time.perf_counter() - t)
    ts = ts[1:]  # one more warm-up
    ok = bool(np.isfinite(np.asarray(logits)).all())
    med = _median(ts)
    return {
        "tokens": t_len,
        "tok_s": t_len / med,
        "median_s": med,
        "samples_s": ts,
        "first_call_s": first,
        "logits_finite": ok,
        "recompiled_while_timing": dict(_trace_counts()) != traces,
    }


def _count_kernels(params, ctx: int) -> dict:
    import jax
    import jax.numpy as jnp

    import gemma4_jax as g4
    from benchmarks.hlo_stats import kernel_stats

    cache = g4.init_cache(params, 1, max(256, 2 * ctx))
    tok = jnp.zeros((1,), jnp.int32)
    pos = jnp.full((1,), ctx, jnp.int32)
    fn = jax.jit(lambda p, t, c, q: g4.decode_step(p, t, c, q))
    t = time.perf_counter()
    text = fn.lower(params, tok, cache, pos).compile().as_text()
    out = kernel_stats(text)
    out["compile_s"] = time.perf_counter() - t
    out["program"] = "jit(decode_step) batch 1"
    return out


def worker_model(spec: dict, rec: _Recorder):
    jax = _jax_setup(spec)
    from benchmarks.random_model import mix_bytes, params_bytes, random_params, type_summary
    from gemma4_jax import ops

    rec.set("device", _device_info())
    mode = ops.default_mode()
    rec.set("kernels_mode", mode)
    t = time.perf_counter()
    params = random_params(spec["family"], spec["quant"], spec.get("dtype", "bfloat16"))
    jax.block_until_ready(params)
    rec.set("build_s", time.perf_counter() - t)
    rec.set("params_bytes", params_bytes(params))
    rec.set("bytes_by_type", type_summary(params))
    rec.set("mix_bytes", mix_bytes(params.config, spec["quant"]))
    rec.set("peak_bytes_after_build", _memory())
    steps, repeats = int(spec["steps"]), int(spec["repeats"])
    state = {"mode": mode}

    def part(section: str, key, fn):
        """Run one measurement; on a Pallas failure fall back to the reference kernels for
        this and every later part of this worker (and say so)."""
        try:
            with ops.use_kernels(state["mode"]):
                out = fn()
            out["kernels"] = state["mode"]
        except Exception as e:
            rec.error(f"{section}[{key}]", e)
            oom = any(x in str(e) for x in ("RESOURCE_EXHAUSTED", "out of memory", "OOM"))
            if oom or state["mode"] != "pallas" or not spec.get("fallback_reference", True):
                return  # (an OOM is no kernel bug: the reference path would only OOM too)
            state["mode"] = "reference"
            rec.set("kernels_fallback", f"pallas failed in {section}[{key}]: {type(e).__name__}")
            try:
                with ops.use_kernels("reference"):
                    out = fn()
                out["kernels"] = "reference (pallas failed)"
            except Exception as e2:
                rec.error(f"{section}[{key}] (reference)", e2)
                return
        rec.data.setdefault(section, {})[str(key)] = out
        rec.set("peak_bytes_in_use", _memory())

    for item in spec["plan"]:
        kind, arg = item
        if kind == "decode":
            part(
                "decode",
                arg,
                lambda a=arg: _measure_decode(params, 1, a, steps, repeats, seed=a),
            )
        elif kind == "prefill":
            part("prefill", arg, lambda a=arg: _measure_prefill(params, a, repeats, seed=a + 1))
        elif kind == "batch":
            part(
                "batch",
                arg,
                lambda a=arg: _measure_decode(
                    params, a, int(spec["batch_prompt"]), steps, repeats, seed=a + 2
                ),
            )
        elif kind == "kernels":
            part("kernels", "decode_step", lambda a=arg: _count_kernels(params, a))
    rec.set("peak_bytes_in_use", _memory())
    rec.set("done", True)


def worker_first_token(spec: dict, rec: _Recorder):
    spawn = float(spec["spawn_time"])
    jax = _jax_setup(spec)
    import numpy as np

    import gemma4_jax as g4

    t_imported = time.time()
    rec.set("device", _device_info())
    if spec.get("gguf"):
        model = g4.load(spec["gguf"], dtype=spec.get("dtype", "bfloat16"))
        params = model.params
        source = "gguf"
    else:
        from benchmarks.random_model import random_params

        params = random_params(spec["family"], spec["quant"], spec.get("dtype", "bfloat16"))
        source = "random_params (no GGUF written)"
    jax.block_until_ready(params)
    t_loaded = time.time()
    prompt = np.random.default_rng(7).integers(
        3, params.config.vocab_size, size=int(spec["prompt"])
    )
    r = g4.generate(params, [prompt], max_new_tokens=1, stop_tokens=())
    t_first = time.time()
    rec.data.update(
        {
            "source": source,
            "since_spawn_s": t_first - spawn,
            "import_s": t_imported - spawn,
            "load_s": t_loaded - t_imported,
            "compile_and_first_token_s": t_first - t_loaded,
            "prompt_tokens": int(spec["prompt"]),
            "tokens": [int(x) for x in r.tokens[0]],
            "cache_dir": spec.get("cache_dir"),
            "cache_entries": len(list(Path(spec["cache_dir"]).glob("*")))
            if spec.get("cache_dir")
            else None,
        }
    )
    rec.set("done", True)


def worker_write_gguf(spec: dict, rec: _Recorder):
    from benchmarks.random_model import write_real_size_gguf

    t = time.perf_counter()
    path = write_real_size_gguf(spec["path"], spec["family"], spec["quant"])
    rec.set("write_s", time.perf_counter() - t)
    rec.set("path", str(path))
    rec.set("file_bytes", Path(path).stat().st_size)
    rec.set("threads", os.cpu_count())


def worker_load(spec: dict, rec: _Recorder):
    jax = _jax_setup(spec)

    import gemma4_jax as g4

    rec.set("device", _device_info())
    t = time.perf_counter()
    model = g4.load(spec["path"], dtype=spec.get("dtype", "bfloat16"))
    jax.block_until_ready(model.params)
    dt = time.perf_counter() - t
    size = Path(spec["path"]).stat().st_size
    rec.data.update(
        {
            "load_s": dt,
            "file_bytes": size,
            "gb_s": size / dt / 1e9,
            "tensor_types": model.tensor_types,
            "page_cache": "hot (the file was just written; no cache drop)",
            "peak_bytes_in_use": _memory(),
        }
    )
    rec.set("done", True)


# ---------------------------------------------------------------------------- the peer


def _hf_config(transformers, family: str):
    from benchmarks.random_model import FAMILIES, _family_key

    f = FAMILIES[_family_key(family)]
    L = f.n_layers
    layer_types = ["sliding_attention" if s else "full_attention" for s in f.sliding_pattern]
    kw = dict(
        vocab_size=f.vocab_size,
        hidden_size=f.d_model,
        intermediate_size=f.ffn if isinstance(f.ffn, int) else f.ffn[0],
        num_hidden_layers=L,
        num_attention_heads=f.n_heads,
        num_key_value_heads=f.n_kv_heads,
        num_global_key_value_heads=f.kv_heads(L - 1),  # the last layer is global
        head_dim=f.head_dim,
        global_head_dim=f.head_dim_global,
        sliding_window=f.window,
        layer_types=layer_types,
        num_kv_shared_layers=f.shared_kv_layers,
        hidden_size_per_layer_input=f.ple_dim,
        vocab_size_per_layer_input=f.vocab_size,
        final_logit_softcapping=30.0,
        max_position_embeddings=f.context_length,
        tie_word_embeddings=True,
        attention_k_eq_v=f.k_eq_v,
        use_double_wide_mlp=not isinstance(f.ffn, int),
        enable_moe_block=f.n_experts > 0,
        num_experts=f.n_experts or None,
        top_k_experts=f.n_experts_used or None,
        moe_intermediate_size=f.expert_ffn or None,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    dropped = []
    for _ in range(len(kw)):
        try:
            return transformers.Gemma4TextConfig(**kw), dropped
        except TypeError as e:  # a keyword this transformers does not know: drop it, retry
            bad = [k for k in kw if f"'{k}'" in str(e)]
            if not bad:
                raise
            for k in bad:
                kw.pop(k)
                dropped.append(k)
    raise RuntimeError("could not build Gemma4TextConfig")


def worker_peer(spec: dict, rec: _Recorder):
    try:
        import torch
        import transformers
    except ImportError as e:
        rec.set("skipped", f"torch/transformers not importable: {e}")
        return
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    rec.data.update(
        {
            "torch_version": torch.__version__,
            "transformers_version": transformers.__version__,
            "device": torch.cuda.get_device_name(0) if dev == "cuda" else "cpu",
        }
    )
    rec.save()

    def sync():
        if dev == "cuda":
            torch.cuda.synchronize()

    # -- copy bandwidth through torch (a cross-check of the JAX ceiling)
    try:
        n = int(spec["copy_bytes"])
        a = torch.empty(n, dtype=torch.uint8, device=dev).random_(0, 255)
        b = torch.empty_like(a)
        for _ in range(3):
            b.copy_(a)
        sync()
        ts = []
        for _ in range(10):
            t = time.perf_counter()
            b.copy_(a)
            sync()
            ts.append(time.perf_counter() - t)
        rec.set("torch_copy_tb_s", 2 * n / _median(ts) / 1e12)
        del a, b
    except Exception as e:
        rec.error("copy", e)

    cfg, dropped = _hf_config(transformers, spec["family"])
    rec.set("config_dropped_keys", dropped)
    cls = getattr(transformers, "Gemma4ForCausalLM", None)
    t = time.perf_counter()
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(dev):
            model = (
                cls(cfg) if cls is not None else transformers.AutoModelForCausalLM.from_config(cfg)
            )
    finally:
        torch.set_default_dtype(old)
    model = model.to(dev, torch.bfloat16).eval()
    sync()
    n_params = sum(p.numel() for p in model.parameters())
    rec.data.update(
        {
            "model_class": type(model).__name__,
            "build_s": time.perf_counter() - t,
            "n_params": n_params,
            "attn_implementation": getattr(model.config, "_attn_implementation", None),
            "weights": "random (transformers init), bf16",
        }
    )
    try:
        g = model.model.layers[cfg.layer_types.index("full_attention")].self_attn
        rec.data["global_layer_head_dim"] = getattr(g, "head_dim", None)
    except Exception:
        pass
    rec.save()
    v = cfg.vocab_size
    gen = torch.Generator().manual_seed(0)

    # -- prefill (eager: what generate runs for the prompt), logits of the last position only
    for t_len in spec["prefill"]:
        try:
            ids = torch.randint(3, v, (1, t_len), generator=gen).to(dev)

            def fwd(ids=ids):
                with torch.inference_mode():
                    try:
                        return model(input_ids=ids, use_cache=False, logits_to_keep=1).logits
                    except TypeError:
                        return model(input_ids=ids, use_cache=False).logits

            for _ in range(2):
                fwd()
            sync()
            ts = []
            for _ in range(int(spec["repeats"]) + 2):
                t = time.perf_counter()
                fwd()
                sync()
                ts.append(time.perf_counter() - t)
            rec.data.setdefault("prefill", {})[str(t_len)] = {
                "tok_s": t_len / _median(ts),
                "samples_s": ts,
                "mode": "eager",
            }
            rec.save()
        except Exception as e:
            rec.error(f"prefill[{t_len}]", e)

    class StepClock(transformers.LogitsProcessor):
        """Called once per generated token (after its forward): syncs and stamps the time."""

        def __init__(self):
            self.t = []

        def __call__(self, input_ids, scores):
            sync()
            self.t.append(time.perf_counter())
            return scores

    def decode(ctx: int, steps: int, **kw) -> dict:
        ids = torch.randint(3, v, (1, ctx), generator=gen).to(dev)
        clock = StepClock()
        t = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=steps,
                min_new_tokens=steps,
                do_sample=False,
                pad_token_id=0,
                logits_processor=transformers.LogitsProcessorList([clock]),
                **kw,
            )
        wall = time.perf_counter() - t
        n = out.shape[1] - ctx
        steps_t = clock.t
        per = (steps_t[-1] - steps_t[0]) / (len(steps_t) - 1)
        return {
            "tok_s": 1 / per,
            "new_tokens": int(n),
            "wall_s": wall,
            "steps_timed": len(steps_t) - 1,
        }

    for ctx in spec["contexts"]:
        # eager, dynamic cache
        try:
            decode(ctx, 8)
            r = decode(ctx, int(spec["eager_steps"]))
            r["mode"] = "eager, dynamic cache"
            rec.data.setdefault("decode_eager", {})[str(ctx)] = r
            rec.save()
        except Exception as e:
            rec.error(f"decode_eager[{ctx}]", e)
        if not spec.get("compile", True):
            continue
        # static cache + torch.compile (generate compiles the decode forward for a static cache)
        try:
            kw = {"cache_implementation": "static"}
            cc = getattr(transformers, "CompileConfig", None)
            if cc is not None:
                kw["compile_config"] = cc(fullgraph=True, mode="reduce-overhead")
            steps = int(spec["steps"])
            t = time.perf_counter()
            r0 = decode(ctx, steps, **kw)  # compiles
            first = time.perf_counter() - t
            rs = [decode(ctx, steps, **kw) for _ in range(int(spec["repeats"]))]
            best = sorted(rs, key=lambda x: x["tok_s"])[len(rs) // 2]
            compiled = getattr(model, "_compiled_call", None) is not None
            best.update(
                {
                    "mode": "static cache + torch.compile (generate's compile_config)"
                    if compiled
                    else "static cache, eager (generate did not compile)",
                    "first_call_s": first,
                    "first_call_tok_s": r0["tok_s"],
                    "samples_tok_s": [x["tok_s"] for x in rs],
                    "compiled": compiled,
                }
            )
            rec.data.setdefault("decode_compiled", {})[str(ctx)] = best
            rec.save()
        except Exception as e:
            rec.error(f"decode_compiled[{ctx}]", e)
    if dev == "cuda":
        rec.set("peak_bytes", torch.cuda.max_memory_allocated())
    rec.set("done", True)


WORKERS = {
    "ceilings": worker_ceilings,
    "model": worker_model,
    "first_token": worker_first_token,
    "write_gguf": worker_write_gguf,
    "load": worker_load,
    "peer": worker_peer,
}


def run_worker_main(name: str, spec: dict, result: Path, workers: dict | None = None) -> int:
    """A worker process's body (`--worker NAME`): runs `workers[name]` (default: this file's
    WORKERS; bench_sharded.py passes its own) with a recorder that saves as it goes."""
    rec = _Recorder(result, {"worker": name, "spec": spec, "started": time.time()})
    try:
        (WORKERS if workers is None else workers)[name](spec, rec)
    except BaseException as e:
        rec.error("fatal", e)
        return 1
    finally:
        rec.data["wall_s"] = time.time() - rec.data["started"]
        rec.save()
    return 0


# ============================================================================ orchestrator


class _Stopped(Exception):
    pass


def add_worker_args(ap: argparse.ArgumentParser) -> None:
    """The internal arguments a worker process is started with (see `spawn_worker`)."""
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)


def worker_env(args, extra: dict | None = None) -> dict:
    """A worker's environment: unbuffered, the repo importable, CPU-only for `--smoke`, the
    run's `--kernels`, then `extra`."""
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    if args.smoke:
        env["JAX_PLATFORMS"] = "cpu"
    if args.kernels:
        env["GEMMA4_JAX_KERNELS"] = args.kernels
    env.update(extra or {})
    return env


def spawn_worker(
    script: Path, name: str, spec: dict, result: Path, log: Path, env: dict, label: str
) -> subprocess.Popen:
    """Start `script --worker NAME` writing its results to `result` and its output to `log`,
    in its own process group (so a timeout kills it and nothing else) but the same session
    (whoever ends this run's session ends the workers too)."""
    result.unlink(missing_ok=True)
    cmd = [sys.executable, str(script), "--worker", name]
    cmd += ["--spec", json.dumps(spec), "--result", str(result)]
    with open(log, "a") as logf:
        logf.write(f"\n===== {label} ({name}) {datetime.datetime.now().isoformat()}\n")
        logf.flush()
        return subprocess.Popen(
            cmd,
            stdout=logf,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=str(REPO),
            process_group=0,
        )


class Runner:
    def __init__(self, args):
        self.args = args
        self.t0 = time.time()
        self.workdir = Path(args.workdir or tempfile.mkdtemp(prefix="gemma4_bench_"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log = Path(args.log) if args.log else self.workdir / "workers.log"
        self.steps: list[dict] = []
        self.current: subprocess.Popen | None = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._stop)

    def _stop(self, signum, frame):
        """Killed from outside (the suite's timeout): end the running worker, then report
        what was measured so far."""
        if self.current is not None:
            try:
                os.killpg(self.current.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        raise _Stopped(signal.Signals(signum).name)

    def remaining(self) -> float:
        return self.args.budget_s - (time.time() - self.t0)

    def worker(self, name: str, spec: dict, timeout: float, label: str, min_s: float = 10):
        """Run one worker; returns its result dict (partial if cut), never raises."""
        avail = self.remaining() - self.args.reserve_s
        if avail < min_s:
            reason = f"skipped: budget ({max(0, self.remaining()):.0f} s left)"
            self.steps.append({"step": label, "status": reason})
            print(f"[e2e] {label}: {reason}", flush=True)
            return {"skipped": reason}
        timeout = min(timeout, avail)
        result = self.workdir / f"{label.replace('/', '_').replace(' ', '_')}.json"
        t = time.time()
        print(f"[e2e] {label}: start (timeout {timeout:.0f} s)", flush=True)
        env = worker_env(self.args, spec.get("_env"))
        proc = spawn_worker(Path(__file__).resolve(), name, spec, result, self.log, env, label)
        self.current = proc
        status = "ok"
        try:
            rc = proc.wait(timeout=timeout)
            if rc != 0:
                status = f"exit code {rc}"
        except subprocess.TimeoutExpired:
            status = f"timeout after {timeout:.0f} s (partial results kept)"
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the worker's own process group
            except ProcessLookupError:
                pass
            proc.wait()
        finally:
            self.current = None
        wall = time.time() - t
        try:
            out = json.loads(result.read_text())
        except Exception:
            out = {}
        if out.get("errors"):
            status += f"; errors in {', '.join(out['errors'])}"
        out.setdefault("status", status)
        self.steps.append({"step": label, "status": status, "wall_s": round(wall, 1)})
        print(f"[e2e] {label}: {status} ({wall:.1f} s)", flush=True)
        return out


def _plan_primary(args, parts) -> tuple[list, list]:
    """(headline, details): the headline plan (decode at the first context, prefill 2K, the
    largest batch) runs early in its own worker so a short budget still gets the targets; the
    details (other contexts / lengths / batches, the kernel count) run last, in what is left."""
    c, p, b = args.contexts, args.prefill, args.batches
    head, rest = [], []
    two_k = [x for x in p if x == 2048] or p[:1]
    if "decode" in parts and c:
        head.append(("decode", c[0]))
        rest += [("decode", x) for x in c[1:]]
    if "prefill" in parts and p:
        head += [("prefill", x) for x in two_k]
        rest += [("prefill", x) for x in p if x not in two_k]
    if "batch" in parts and b:
        head.append(("batch", b[-1]))
        rest += [("batch", x) for x in b[:-1]]
    if "kernels" in parts:
        rest.append(("kernels", c[0] if c else 128))
    return head, rest


def _merge_model(into: dict, more: dict) -> None:
    """Fold a second worker's results for the same model into the first's."""
    for k, v in more.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            into[k] = {**into[k], **v}
        elif k in ("status", "wall_s", "skipped"):
            into[k + "_details"] = v
        elif k in ("peak_bytes_in_use",):
            into[k] = (
                max(x for x in (into.get(k), v) if x is not None) if v is not None else into.get(k)
            )
        elif k not in into:
            into[k] = v


def orchestrate(args) -> dict:
    parts = set(args.only.split(",")) if args.only else set(PARTS)
    parts -= set(x for x in (args.skip or "").split(",") if x)
    unknown = parts - set(PARTS)
    if unknown:
        raise SystemExit(f"unknown parts {sorted(unknown)}; known: {', '.join(PARTS)}")
    r = Runner(args)
    fam = args.family
    quants = [q.strip() for q in args.quants.split(",") if q.strip()]
    q1 = quants[0]
    common = {
        "steps": args.steps,
        "repeats": args.repeats,
        "batch_prompt": args.batch_prompt,
        "dtype": "bfloat16",
        "fallback_reference": not args.no_fallback,
    }
    out: dict = {"models": {}, "steps": r.steps}

    gguf = None
    try:
        if "ceilings" in parts:
            out["ceilings"] = r.worker(
                "ceilings",
                {"copy_bytes": args.copy_bytes, "matmul_n": args.matmul_n, "repeats": 10},
                args.t_ceilings,
                "ceilings",
            )
        head, details = _plan_primary(args, parts)
        models = out["models"]
        if head:
            spec = dict(common, family=fam, quant=q1, plan=head)
            models[f"{fam}/{q1}"] = r.worker("model", spec, args.t_primary, f"model {fam} {q1}")
        if "quant2" in parts:
            for q in quants[1:]:
                plan2 = [("decode", x) for x in args.quant2_contexts]
                spec = dict(common, family=fam, quant=q, plan=plan2)
                out["models"][f"{fam}/{q}"] = r.worker(
                    "model", spec, args.t_secondary, f"model {fam} {q}"
                )
        if "peer" in parts:
            spec = {
                "family": fam,
                "contexts": args.peer_contexts,
                "prefill": args.peer_prefill,
                "steps": args.steps,
                "eager_steps": min(args.steps, 64),
                "repeats": args.repeats,
                "compile": not args.peer_eager,
                "copy_bytes": args.copy_bytes,
            }
            out["peer"] = r.worker("peer", spec, args.t_peer, "peer transformers")
        if "load" in parts:
            path = r.workdir / f"random-{fam}-{args.load_quant}.gguf"
            w = r.worker(
                "write_gguf",
                {"path": str(path), "family": fam, "quant": args.load_quant},
                args.t_write,
                "write gguf",
            )
            out["write_gguf"] = w
            if path.exists() and "write_s" in w:
                gguf = path
                out["load"] = r.worker(
                    "load", {"path": str(path), "dtype": "bfloat16"}, args.t_load, "load gguf"
                )
        if "first_token" in parts:
            cache_dir = Path(tempfile.mkdtemp(prefix="jaxcache_", dir=r.workdir))
            ft = {}
            for phase, tmo in (("cold", args.t_first_cold), ("warm", args.t_first_warm)):
                spec = {
                    "family": fam,
                    "quant": args.load_quant,
                    "gguf": str(gguf) if gguf else None,
                    "cache_dir": str(cache_dir),
                    "spawn_time": time.time(),
                    "prompt": args.first_prompt,
                    "dtype": "bfloat16",
                }
                ft[phase] = r.worker("first_token", spec, tmo, f"first token {phase}")
            out["first_token"] = ft
        if details:
            spec = dict(common, family=fam, quant=q1, plan=details)
            more = r.worker("model", spec, args.t_details, f"model {fam} {q1} details")
            _merge_model(models.setdefault(f"{fam}/{q1}", {}), more)
        if "extra" in parts and args.extra:
            for item in args.extra.split(","):
                f2, _, q = item.partition(":")
                q = q or "q4_k_m"
                plan = [("decode", args.contexts[0] if args.contexts else 128), ("prefill", 2048)]
                if args.smoke:
                    plan = [("decode", args.contexts[0]), ("prefill", args.prefill[0])]
                spec = dict(common, family=f2, quant=q, plan=plan)
                out["models"][f"{f2}/{q}"] = r.worker(
                    "model", spec, args.t_extra, f"model {f2} {q}"
                )
    except _Stopped as e:
        out["stopped"] = f"stopped by {e} after {time.time() - r.t0:.0f} s"
        r.steps.append({"step": "run", "status": out["stopped"]})
    if gguf is not None and not args.keep_gguf:
        gguf.unlink(missing_ok=True)
    if not args.keep_workdir and not args.workdir:
        for p in r.workdir.glob("jaxcache_*"):
            shutil.rmtree(p, ignore_errors=True)
    out["workdir"] = str(r.workdir)
    out["worker_log"] = str(r.log)
    out["total_s"] = time.time() - r.t0
    return out


# ============================================================================ report


def _get(d, *keys):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def summarize(args, raw: dict) -> dict:
    fam = args.family
    quants = [q.strip() for q in args.quants.split(",") if q.strip()]
    m1 = raw["models"].get(f"{fam}/{quants[0]}", {})
    c0 = str(args.contexts[0]) if args.contexts else "128"
    dev = _get(raw, "ceilings", "device") or _get(m1, "device") or {}
    try:
        from importlib.metadata import version

        jax_version = version("jax")
    except Exception:
        jax_version = None
    s: dict = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": dev.get("device_kind"),
        "platform": dev.get("platform"),
        "jax_version": dev.get("jax_version") or jax_version,
        "jaxlib_version": dev.get("jaxlib_version"),
        "python": platform.python_version(),
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "smoke": bool(args.smoke),
        "family": fam,
        "kernels_mode": m1.get("kernels_mode"),
    }

    def put(key, value, reason):
        s[key] = value
        if value is None:
            s[key + "_reason"] = reason

    not_run = (
        f"not reached ({raw['stopped']})" if raw.get("stopped") else "not run (part not selected)"
    )

    def why(d):
        if not d:
            return not_run
        if d.get("skipped"):
            return d["skipped"]
        if d.get("errors"):
            return "; ".join(f"{k}: {v}" for k, v in d["errors"].items())[:500]
        return d.get("status") or "not measured"

    def model_reason(m, section, k):
        if not m:
            return not_run
        if m.get("skipped"):
            return m["skipped"]
        errs = m.get("errors") or {}
        for name, e in errs.items():
            if name.startswith(f"{section}[{k}]") or name == "fatal":
                return e
        return m.get("status") or "not measured"

    def model_val(m, section, k):
        return _get(m, section, str(k), "tok_s")

    v = model_val(m1, "decode", c0)
    put(f"e4b_{quants[0]}_decode_b1_tok_s", v, model_reason(m1, "decode", c0))
    for q in quants[1:]:
        m = raw["models"].get(f"{fam}/{q}", {})
        c = str(args.quant2_contexts[0]) if args.quant2_contexts else c0
        put(f"e4b_{q}_decode_b1_tok_s", model_val(m, "decode", c), model_reason(m, "decode", c))
    for key in ("e4b_q8_0_decode_b1_tok_s", "e4b_q4_k_m_decode_b1_tok_s"):
        if key not in s:
            put(key, None, "quant mix not selected (--quants)")
    p2 = "2048" if 2048 in args.prefill else str(args.prefill[0]) if args.prefill else "2048"
    put("e4b_prefill_2k_tok_s", model_val(m1, "prefill", p2), model_reason(m1, "prefill", p2))
    b32 = str(args.batches[-1]) if args.batches else "32"
    put("e4b_decode_b32_tok_s", model_val(m1, "batch", b32), model_reason(m1, "batch", b32))
    # The headline keys are E4B's targets: another family's numbers stay in the model table,
    # not under E4B's names (`smoke` is the toy E4B-like model of --smoke).
    if fam not in ("e4b", "smoke"):
        for key in [k for k in s if k.startswith("e4b_") and not k.endswith("_reason")]:
            s.pop(key + "_reason", None)
            put(key, None, f"primary family is {fam}, not e4b (see the model table)")
    ld = raw.get("load")
    put(
        "load_s",
        _get(ld, "load_s"),
        why(ld) if ld else why(raw.get("write_gguf")),
    )
    ft = raw.get("first_token") or {}
    for phase in ("cold", "warm"):
        x = ft.get(phase) or {}
        put(
            f"first_token_{phase}_s",
            x.get("since_spawn_s"),
            why(x),
        )
    ce = raw.get("ceilings") or {}
    put("copy_tb_s", _get(ce, "copy", "tb_s"), why(ce))
    put("matmul_tflops", _get(ce, "matmul", "tflops"), why(ce))
    peer = raw.get("peer") or {}
    pc = str(args.peer_contexts[0]) if args.peer_contexts else "128"
    # the peer's best showing: torch.compile when it compiled, else the faster eager variant
    cands = [x for x in (_get(peer, "decode_compiled", pc), _get(peer, "decode_eager", pc)) if x]
    compiled = [x for x in cands if x.get("compiled")]
    pd = compiled[0] if compiled else max(cands, key=lambda x: x["tok_s"], default=None)
    put(
        "peer_decode_b1_tok_s",
        _get(pd, "tok_s"),
        why(peer),
    )
    s["peer_decode_mode"] = _get(pd, "mode")
    pp = str(args.peer_prefill[0]) if args.peer_prefill else "2048"
    put(
        "peer_prefill_2k_tok_s",
        _get(peer, "prefill", pp, "tok_s"),
        why(peer),
    )
    s["peer_copy_tb_s"] = peer.get("torch_copy_tb_s")
    # targets
    s["targets"] = {}
    for key, (op, target) in TARGETS.items():
        val = s.get(key)
        if val is None:
            s["targets"][key] = {"target": f"{op} {target}", "value": None, "met": None}
            continue
        ratio = val / target if op == ">=" else target / val
        s["targets"][key] = {
            "target": f"{op} {target}",
            "value": val,
            "ratio": ratio,
            "met": ratio >= 1.0,
        }
    # roofline with the measured bandwidth / matmul rate
    s["roofline"] = _roofline(args, s, raw)
    s["raw"] = raw
    return s


def _roofline(args, s, raw) -> dict:
    try:
        from benchmarks.random_model import family_config
        from benchmarks.roofline import decode_bytes, prefill_flops_per_token
    except Exception as e:
        return {"error": str(e)}
    bw = (s.get("copy_tb_s") or 2.69) * 1e12
    fl = (s.get("matmul_tflops") or 652.0) * 1e12
    out = {
        "bandwidth_tb_s": bw / 1e12,
        "bandwidth_source": "measured" if s.get("copy_tb_s") else "design.md 2.69",
        "tflops": fl / 1e12,
    }
    for key, mkey in raw["models"].items():
        fam, q = key.split("/")
        try:
            c = family_config(fam)
        except Exception as e:
            out[key] = {"error": str(e)}
            continue
        for sect in ("decode", "batch"):
            for k, r in (mkey.get(sect) or {}).items():
                bsz = r.get("batch", 1)
                ctx = r.get("context", 128) + r.get("steps", 0) // 2
                b = decode_bytes(c, q, ctx, bsz, exact=False)
                pred = bsz * bw / b["total"]
                out[f"{key} {sect} {k}"] = {
                    "bytes_per_step": b["total"],
                    "predicted_tok_s": pred,
                    "measured_tok_s": r.get("tok_s"),
                    "fraction_of_roofline": (r.get("tok_s") or 0) / pred,
                    "achieved_tb_s": (r.get("tok_s") or 0) / bsz * b["total"] / 1e12,
                }
        for k, r in (mkey.get("prefill") or {}).items():
            f = prefill_flops_per_token(c, int(k))
            pred = fl / f["total"]
            out[f"{key} prefill {k}"] = {
                "flops_per_token": f["total"],
                "predicted_tok_s": pred,
                "measured_tok_s": r.get("tok_s"),
                "fraction_of_roofline": (r.get("tok_s") or 0) / pred,
                "achieved_tflops": (r.get("tok_s") or 0) * f["total"] / 1e12,
            }
    return out


def _fmt(x, digits=0):
    if x is None:
        return "-"
    if isinstance(x, float):
        if abs(x) >= 1000:
            return f"{x:,.0f}"
        return f"{x:.{digits}f}" if digits else (f"{x:.1f}" if abs(x) < 100 else f"{x:.0f}")
    return str(x)


def markdown(s: dict, args) -> str:
    L = []
    L.append(
        f"### gemma4-jax end to end: {s['device']} ({s['platform']}), jax {s['jax_version']}, "
        f"{s['date']}{' — SMOKE (toy sizes, CPU)' if s['smoke'] else ''}"
    )
    L.append(f"`{s['command']}`; kernels: {s.get('kernels_mode')}\n")
    L.append(
        "| metric | ours | peer (same run) | peers (design.md) | target | margin (>= 1: met) |"
    )
    L.append("|---|---|---|---|---|---|")
    peer_of = {
        "e4b_q8_0_decode_b1_tok_s": (s.get("peer_decode_b1_tok_s"), s.get("peer_decode_mode")),
        "e4b_prefill_2k_tok_s": (s.get("peer_prefill_2k_tok_s"), "eager"),
    }
    for key, (op, target) in TARGETS.items():
        t = s["targets"][key]
        pv, pm = peer_of.get(key, (None, None))
        peer = f"{_fmt(pv)} (HF {pm})" if pv is not None else "-"
        ratio = f"{t['ratio']:.2f}" if t.get("ratio") is not None else "-"
        val = _fmt(t["value"], 2 if "_s" == key[-2:] and "tok" not in key else 0)
        if t["value"] is None:
            val = f"- ({str(s.get(key + '_reason', ''))[:60]})"
        L.append(
            f"| {key} | {val} | {peer} | {PEERS_DOC.get(key, '')} | {op} {_fmt(target)} | {ratio} |"
        )
    L.append(
        f"| ceilings | copy {_fmt(s.get('copy_tb_s'), 2)} TB/s (torch "
        f"{_fmt(s.get('peer_copy_tb_s'), 2)}), bf16 matmul {_fmt(s.get('matmul_tflops'))} "
        f"TFLOP/s | | design.md: 2.69 TB/s, 652 TFLOP/s | | |"
    )
    raw = s["raw"]
    L.append(
        "\n| model | part | size | tok/s | roofline tok/s | of roofline | first call s | kernels |"
    )
    L.append("|---|---|---|---|---|---|---|---|")
    for key, m in raw["models"].items():
        for sect in ("decode", "batch", "prefill"):
            for k, r in (m.get(sect) or {}).items():
                rf = s["roofline"].get(f"{key} {sect} {k}", {})
                size = (
                    f"ctx {k}" if sect == "decode" else (f"b{k}" if sect == "batch" else f"T {k}")
                )
                L.append(
                    f"| {key} | {sect} | {size} | {_fmt(r.get('tok_s'))} | "
                    f"{_fmt(rf.get('predicted_tok_s'))} | "
                    f"{_fmt(100 * rf['fraction_of_roofline'], 0) + '%' if rf else '-'} | "
                    f"{_fmt(r.get('first_call_s'), 1)} | {r.get('kernels', '')} |"
                )
        for name, e in (m.get("errors") or {}).items():
            L.append(f"| {key} | ERROR {name} | | {e[:120]} | | | | |")
        for sk in ("skipped", "skipped_details"):
            if m.get(sk):
                L.append(f"| {key} | {sk}: {m[sk]} | | | | | | |")
    L.append(
        "\n| model | params GB | peak device GB | build s | launches / decode step | fusions "
        "| custom calls | while |"
    )
    L.append("|---|---|---|---|---|---|---|---|")
    for key, m in raw["models"].items():
        k = _get(m, "kernels", "decode_step") or {}
        gb = lambda x: _fmt(x / 1e9, 2) if isinstance(x, (int, float)) else "-"  # noqa: E731
        L.append(
            f"| {key} | {gb(m.get('params_bytes'))} | {gb(m.get('peak_bytes_in_use'))} | "
            f"{_fmt(m.get('build_s'), 1)} | {_fmt(k.get('launches_per_call'))} | "
            f"{_fmt(k.get('fusion_per_call'))} | {_fmt(k.get('custom_call_per_call'))} | "
            f"{_fmt(k.get('while_loops_entered'))} |"
        )
    peer = raw.get("peer") or {}
    if peer.get("skipped"):
        L.append(f"\npeer: skipped: {peer['skipped']}")
    elif peer:
        L.append(
            f"\npeer: {peer.get('model_class')} transformers {peer.get('transformers_version')} "
            f"torch {peer.get('torch_version')}, {_fmt((peer.get('n_params') or 0) / 1e9, 2)}B "
            f"params, attn {peer.get('attn_implementation')}; decode eager "
            f"{_fmt(_get(peer, 'decode_eager', str(args.peer_contexts[0]), 'tok_s'))} tok/s, "
            f"compiled {_fmt(_get(peer, 'decode_compiled', str(args.peer_contexts[0]), 'tok_s'))}"
            f" tok/s; errors: {list((peer.get('errors') or {}).keys()) or 'none'}"
        )
    ld, w = raw.get("load") or {}, raw.get("write_gguf") or {}
    if ld or w:
        L.append(
            f"load: file {_fmt((ld.get('file_bytes') or w.get('file_bytes') or 0) / 1e9, 2)} GB "
            f"written in {_fmt(w.get('write_s'), 1)} s, loaded in {_fmt(ld.get('load_s'), 2)} s "
            f"({_fmt(ld.get('gb_s'), 2)} GB/s, page cache hot)"
        )
    ft = raw.get("first_token") or {}
    for phase, x in ft.items():
        L.append(
            f"first token {phase}: {_fmt(x.get('since_spawn_s'), 1)} s since spawn (import "
            f"{_fmt(x.get('import_s'), 1)}, load {_fmt(x.get('load_s'), 1)}, compile + run "
            f"{_fmt(x.get('compile_and_first_token_s'), 1)}; {x.get('source', x.get('status'))})"
        )
    L.append("\nsteps: " + "; ".join(f"{x['step']}: {x['status']}" for x in raw["steps"]))
    return "\n".join(L)


# ============================================================================ CLI


def build_parser():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--smoke", action="store_true", help="CPU, toy sizes, a minute")
    ap.add_argument("--only", help=f"comma list of parts: {','.join(PARTS)}")
    ap.add_argument("--skip", help="comma list of parts to leave out")
    ap.add_argument("--family", default=None, help="primary family (default e4b)")
    ap.add_argument("--quants", default=None, help="comma list; the first gets every part")
    ap.add_argument("--contexts", default=None, help="decode contexts (default 128,4K,32K)")
    ap.add_argument("--quant2-contexts", default=None, help="decode contexts, other quants")
    ap.add_argument("--prefill", default=None, help="prefill lengths (default 512,2K,8K)")
    ap.add_argument("--batches", default=None, help="decode batch sizes (default 8,32)")
    ap.add_argument("--batch-prompt", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None, help="decode steps per generate call")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--extra", default="", help="more family:quant models, e.g. 31b:q4_k_m")
    ap.add_argument("--peer-eager", action="store_true", help="peer: skip torch.compile")
    ap.add_argument("--load-quant", default="q8_0")
    ap.add_argument("--first-prompt", type=int, default=None)
    ap.add_argument("--kernels", choices=("pallas", "reference", "auto"), default=None)
    ap.add_argument("--no-fallback", action="store_true", help="no reference retry")
    ap.add_argument("--budget-s", type=float, default=None, help="whole run (default 480)")
    ap.add_argument("--reserve-s", type=float, default=5.0)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--keep-workdir", action="store_true")
    ap.add_argument("--keep-gguf", action="store_true")
    ap.add_argument("--out", default=None, help="JSON results")
    ap.add_argument("--md", default=None, help="also write the markdown table here")
    ap.add_argument("--log", default=None, help="append worker logs here")
    add_worker_args(ap)  # internal
    return ap


def _defaults(args):
    smoke = args.smoke
    d = {
        "family": "smoke" if smoke else "e4b",
        "quants": "q8_0,q4_k_m",
        "contexts": "32" if smoke else "128,4096,32768",
        "quant2_contexts": "32" if smoke else "128",
        "prefill": "64" if smoke else "512,2048,8192",
        "batches": "2" if smoke else "8,32",
        "batch_prompt": 16 if smoke else 128,
        "steps": 4 if smoke else 128,
        "repeats": 1 if smoke else 3,
        "budget_s": 170 if smoke else 480,
        "first_prompt": 16 if smoke else 32,
    }
    for k, v in d.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.contexts = _ints(args.contexts) if isinstance(args.contexts, str) else args.contexts
    args.quant2_contexts = (
        _ints(args.quant2_contexts)
        if isinstance(args.quant2_contexts, str)
        else args.quant2_contexts
    )
    args.prefill = _ints(args.prefill) if isinstance(args.prefill, str) else args.prefill
    args.batches = _ints(args.batches) if isinstance(args.batches, str) else args.batches
    args.peer_contexts = [args.contexts[0]] if args.contexts else [128]
    args.peer_prefill = [2048] if not smoke else [args.prefill[0]]
    args.copy_bytes = (16 << 20) if smoke else (2 << 30)
    args.matmul_n = 256 if smoke else 8192
    # per-step timeouts (s); the budget cuts them further
    sc = 0.5 if smoke else 1.0
    args.t_ceilings = 90 * sc
    args.t_primary = 300 * sc
    args.t_secondary = 120 * sc
    args.t_details = 300 * sc
    args.t_extra = 180 * sc
    args.t_peer = 240 * sc
    args.t_write = 150 * sc
    args.t_load = 120 * sc
    args.t_first_cold = 150 * sc
    args.t_first_warm = 90 * sc
    return args


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        return run_worker_main(args.worker, json.loads(args.spec), Path(args.result))
    args = _defaults(args)
    raw = orchestrate(args)
    s = summarize(args, raw)
    md = markdown(s, args)
    s["markdown"] = md
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        _write_json(Path(args.out), s)
    if args.md:
        Path(args.md).write_text(md + "\n")
    print()
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
