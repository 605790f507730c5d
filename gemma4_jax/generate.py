"""Generation: KV cache, bucketed prefill, one-program decode loop, `generate`.

- The cache is a pytree stacked per scan segment like the params: sliding layers keep a ring
  of `window` slots (memory independent of the context), global layers `max_len` slots,
  KV-shared layers none. It is donated under jit on accelerators.
- `prefill` pads prompts (right-padded, per-row lengths) to a length bucket, so a new prompt
  length compiles only when it crosses into a new bucket. KV-shared layers run on the last
  position only.
- The decode loop is one jitted `lax.while_loop` over a state pytree (tokens, logprobs, cache,
  positions, key, done flags): N new tokens cost one dispatch. Streaming runs the same program
  in chunks.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import inputs, ops, sharding
from .config import Gemma4Config, segments
from .errors import InputError
from .executable_cache import CachedProgram
from .model import embed, lm_head, run_cached, run_sequence, with_kernels
from .params import Params
from .sampling import Greedy, chosen_logprobs

# Counts of traces (= compilations) per program, for tests and benchmarks.
TRACE_COUNTS: collections.Counter = collections.Counter()


# ---------------------------------------------------------------------------- cache


def cache_spec(config: Gemma4Config, batch: int, max_len: int, dtype) -> tuple:
    """Shapes of the KV cache: per segment a tuple over slots of {"k","v"} (None if shared)."""
    out = []
    for seg in segments(config):
        if not seg.has_kv:
            out.append(None)
            continue
        slots = []
        for s in seg.slots:
            size = min(config.window, max_len) if s.sliding else max_len
            shape = (seg.n_periods, batch, size, s.n_kv_heads, s.head_dim)
            slots.append(
                {"k": jax.ShapeDtypeStruct(shape, dtype), "v": jax.ShapeDtypeStruct(shape, dtype)}
            )
        out.append(tuple(slots))
    return tuple(out)


def init_cache(params: Params, batch: int, max_len: int) -> tuple:
    """An empty cache for `batch` rows and up to `max_len` positions."""
    inputs.check_params(params, "init_cache")
    batch = inputs.positive_int(batch, "init_cache batch")
    max_len = inputs.positive_int(max_len, "init_cache max_len")
    if max_len > params.config.context_length:
        raise InputError(
            f"init_cache max_len={max_len} exceeds the model's context "
            f"({params.config.context_length})"
        )
    mesh = sharding.params_mesh(params)
    if mesh is None:  # one program (kept by the executable cache), not an eager op per shape
        empty = _program("empty_cache")
        dtype = jnp.dtype(params.compute_dtype).name
        return empty(config=params.config, batch=batch, max_len=max_len, dtype=dtype)
    spec = cache_spec(params.config, batch, max_len, params.compute_dtype)
    # Params on a mesh: each device allocates only its shards of the cache.
    shardings = sharding.cache_shardings(params.config, spec, mesh)
    return jax.tree.map(lambda s, d: jnp.zeros(s.shape, s.dtype, device=d), spec, shardings)


def check_cache(params: Params, cache) -> tuple[int, int]:
    """(batch, max_len) of a cache laid out as `init_cache(params, batch, max_len)` lays it
    out; an InputError naming the difference for anything else (another model's cache, or one
    of another dtype)."""
    c, dt = params.config, params.compute_dtype
    if jax.tree.structure(cache) != _cache_treedef(c):
        raise InputError(
            f"the cache is laid out as {_cache_outline(cache)}, but init_cache(params, batch, "
            f"max_len) makes {_cache_outline(cache_spec(c, 1, 1, dt))} (per scan segment: its "
            f"layers' K/V slots, or None where the layers share K/V): was it made for another "
            f"model?"
        )
    leaves = jax.tree.leaves(cache)
    batch, max_len = leaves[0].shape[1], cache_max_len(params, cache)
    for i, (a, want) in enumerate(zip(leaves, _cache_leaves(c, batch, max_len, dt), strict=True)):
        if (a.shape, a.dtype) != want:
            raise InputError(
                f"cache array {i} is {a.dtype} {a.shape}, but init_cache(params, batch={batch}, "
                f"max_len={max_len}) makes {want[1]} {want[0]}: was it made for another model "
                f"or dtype?"
            )
    return batch, max_len


@functools.cache
def _cache_treedef(config: Gemma4Config):
    return jax.tree.structure(cache_spec(config, 1, 1, jnp.float32))


def _cache_outline(cache) -> str:
    if not isinstance(cache, (tuple, list)):
        return type(cache).__name__
    parts = [
        "None" if s is None else f"{len(s)} slots" if isinstance(s, (tuple, list)) else "?"
        for s in cache
    ]
    return f"({', '.join(parts)})"


@functools.lru_cache(maxsize=64)
def _cache_leaves(config: Gemma4Config, batch: int, max_len: int, dtype) -> tuple:
    spec = cache_spec(config, batch, max_len, dtype)
    return tuple((tuple(s.shape), np.dtype(s.dtype)) for s in jax.tree.leaves(spec))


def cache_max_len(params: Params, cache) -> int:
    """Global slot count of a cache (its max_len)."""
    for seg, sc in zip(segments(params.config), cache, strict=True):
        if sc is None:
            continue
        for s, slot in zip(seg.slots, sc, strict=True):
            if not s.sliding:
                return slot["k"].shape[2]
    # a model without global layers keeps only rings
    return params.config.context_length


# ---------------------------------------------------------------------------- programs


def _prefill_impl(params: Params, tokens, lengths, cache):
    TRACE_COUNTS["prefill"] += 1
    c = params.config
    segs = segments(c)
    max_len = cache_max_len(params, cache)
    h, ple = embed(params, tokens)
    own = [i for i, s in enumerate(segs) if s.has_kv]
    shared = [i for i, s in enumerate(segs) if not s.has_kv]
    h, _, filled = run_sequence(params, h, ple, seg_ids=own, cache_size=max_len, lengths=lengths)
    new_cache = tuple(filled.get(i, cache[i]) for i in range(len(segs)))
    last = lengths - 1
    h = jnp.take_along_axis(h, last[:, None, None], axis=1)  # [B, 1, D]
    if ple is not None:
        ple = jnp.take_along_axis(ple, last[:, None, None, None], axis=1)
    # KV-shared layers write nothing and only the last position's output is used: run them on
    # that position alone, as a decode step against their donors' fresh caches.
    h, _ = run_cached(params, h, ple, last, new_cache, seg_ids=shared, write=False)
    return lm_head(params, h)[:, 0], new_cache


def _decode_impl(params: Params, token, cache, pos):
    TRACE_COUNTS["decode_step"] += 1
    h, ple = embed(params, token[:, None])
    h, cache = run_cached(params, h, ple, pos, cache, seg_ids=range(len(params.segments)))
    return lm_head(params, h)[:, 0], cache


def _on_mesh(params: Params, *xs):
    """Batch-major inputs onto the params' mesh (rows on "data"), so jit splits the batch and
    the caches it returns keep `sharding.cache_shardings`. Identity without a mesh."""
    mesh = sharding.params_mesh(params)
    return xs if mesh is None else tuple(sharding.shard_batch(x, mesh) for x in xs)


def _donate() -> bool:
    # CPU cannot reuse donated buffers and warns on every call; donate where it helps.
    return jax.default_backend() != "cpu"


def _jit_options(static=(), donate=()) -> dict:
    return {"static_argnames": static, "donate_argnames": donate if _donate() else ()}


_PROGRAMS: dict[str, Any] = {}


def _program(name: str):
    """Jitted programs, built on first use (the donation choice needs the backend). Those a
    `generate` call runs go through `executable_cache.CachedProgram`: with JAX's persistent
    cache configured, a new process loads them compiled instead of tracing and lowering them
    again (the per-step `decode_step` stays a plain jit: its call must stay cheap)."""
    if name not in _PROGRAMS:
        if name == "prefill":
            f = lambda params, tokens, lengths, cache, kernels: with_kernels(
                kernels, _prefill_impl, params, tokens, lengths, cache
            )
            f.__name__ = "prefill"
            opts = _jit_options(static=("kernels",), donate=("cache",))
            _PROGRAMS[name] = CachedProgram(name, f, **opts)
        elif name == "decode_step":
            f = lambda params, token, cache, pos, kernels: with_kernels(
                kernels, _decode_impl, params, token, cache, pos
            )
            f.__name__ = "decode_step"
            _PROGRAMS[name] = jax.jit(f, **_jit_options(static=("kernels",), donate=("cache",)))
        elif name == "first_token":
            static = ("sampler", "pad_id", "max_new_tokens")
            opts = _jit_options(static=static, donate=("cache",))
            _PROGRAMS[name] = CachedProgram(name, _first_token_entry, **opts)
        elif name == "empty_cache":
            static = ("config", "batch", "max_len", "dtype")
            _PROGRAMS[name] = CachedProgram(name, _empty_cache_entry, static_argnames=static)
        elif name == "prng_key":
            static = ("seed", "fold")
            _PROGRAMS[name] = CachedProgram(name, _prng_key_entry, static_argnames=static)
        elif name == "decode_loop":
            opts = _jit_options(static=("kernels", "sampler", "n_steps"), donate=("state",))
            _PROGRAMS[name] = CachedProgram(name, _decode_loop_entry, **opts)
    return _PROGRAMS[name]


def prefill(params: Params, tokens, cache, lengths=None):
    """Run prompts through the model, filling `cache`. Returns (last logits [B, V], cache).

    tokens: int [B, T] (right-padded; `lengths[B]` gives each row's prompt length, default T).
    Compiled once per (T, batch, cache shape): pad T to a bucket (see `bucket_length`).
    """
    inputs.check_params(params, "prefill")
    tokens = inputs.token_array(params, tokens, ndim=2, what="prefill tokens")
    b, t = tokens.shape
    batch, max_len = check_cache(params, cache)
    if b != batch:
        raise InputError(f"prefill tokens have {b} rows, the cache {batch}")
    if t > max_len:
        raise InputError(
            f"prompt block of {t} positions does not fit a cache of {max_len} positions"
        )
    if lengths is None:
        lengths = inputs.int32_array(t, (b,))
    else:
        lengths = inputs.row_values(lengths, b, "prefill lengths")
        if not isinstance(lengths, jax.core.Tracer):
            lo, hi = int(lengths.min()), int(lengths.max())
            if lo < 1 or hi > t:
                raise InputError(
                    f"prefill length {lo if lo < 1 else hi} is outside [1, {t}] (a row's "
                    f"prompt length within the block of {t} positions)"
                )
        lengths = inputs.int32_array(lengths, (b,))
    return _prefill(params, tokens, lengths, cache)


def _prefill(params: Params, tokens: jax.Array, lengths: jax.Array, cache):
    """`prefill` of inputs already checked (`generate` checks its prompts itself)."""
    tokens, lengths = _on_mesh(params, tokens, lengths)
    return _program("prefill")(params, tokens, lengths, cache, kernels=ops.kernel_mode())


def decode_step(params: Params, token, cache, pos):
    """One token per row at positions pos[B]: returns (logits [B, V], updated cache).

    token: int [B], B the cache's batch; pos: int [B] or one int for all rows.
    Positions must lie inside the cache (an `InputError` otherwise); pass them as host values
    (numpy / ints) to keep the step asynchronous, as checking a device array reads it back.
    Host token ids are checked against the vocabulary; a device token is not read back (it is
    usually the last step's output) and, outside the vocabulary, gives NaN logits in its row.
    """
    inputs.check_params(params, "decode_step")
    token = inputs.token_array(params, token, ndim=1, what="decode_step token", read_device=False)
    batch, size = check_cache(params, cache)
    if token.shape[0] != batch:
        raise InputError(f"decode_step token has {token.shape[0]} rows, the cache {batch}")
    pos = inputs.row_values(pos, batch, "decode_step pos")
    if not isinstance(pos, jax.core.Tracer):
        # Out of bounds, the cache write would be dropped and the step silently wrong. Host
        # positions are checked for free; a device array costs one device -> host read.
        p = np.asarray(pos)
        lo, hi = int(p.min()), int(p.max())
        if lo < 0 or hi >= size:
            raise InputError(
                f"position {lo if lo < 0 else hi} is outside a cache of {size} positions"
            )
    pos = inputs.int32_array(pos, token.shape)
    token, pos = _on_mesh(params, token, pos)
    return _program("decode_step")(params, token, cache, pos, kernels=ops.kernel_mode())


# ---------------------------------------------------------------------------- decode loop


def _decode_loop_entry(params, state, stop_ids, kernels, sampler, n_steps):
    TRACE_COUNTS["decode_loop"] += 1
    with ops.use_kernels(kernels):
        return _decode_loop(params, state, stop_ids, sampler, n_steps)


def _emit(state: dict, logits, stop_ids, sampler, pad_id: int) -> dict:
    """Sample the next token of every live row from `logits` and record it at `step`."""
    key, sub = jax.random.split(state["key"])
    tok = sampler(logits, sub).astype(jnp.int32)
    lp = chosen_logprobs(logits, tok)
    live = ~state["done"]
    tok = jnp.where(live, tok, pad_id)
    i = state["step"]
    hit = jnp.any(tok[:, None] == stop_ids[None, :], axis=1) & live
    return dict(
        state,
        last=tok,
        tokens=state["tokens"].at[:, i].set(tok),
        logprobs=state["logprobs"].at[:, i].set(jnp.where(live, lp, 0.0)),
        n=state["n"] + live.astype(jnp.int32),
        step=i + 1,
        key=key,
        done=state["done"] | hit,
        stopped=state["stopped"] | hit,
    )


def _empty_cache_entry(config, batch, max_len, dtype):
    spec = cache_spec(config, batch, max_len, jnp.dtype(dtype))
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), spec)


def _prng_key_entry(index, seed, fold):
    key = jax.random.PRNGKey(seed)
    return jax.random.fold_in(key, index) if fold else key


def prng_key(seed: int, index: int | None = None) -> jax.Array:
    """`jax.random.PRNGKey(seed)`, folded with `index` (`jax.random.fold_in`) when given: the
    same key, made by one program that the executable cache keeps (eagerly, the seeding and
    the fold are three programs to compile in every new process)."""
    fold = index is not None
    if fold and not 0 <= int(index) < 2**32:
        raise InputError(f"prng_key index {index} is not a uint32 (0 <= index < 2**32)")
    data = jax.device_put(np.uint32(index if fold else 0))
    return _program("prng_key")(data, seed=int(seed), fold=fold)


def _first_token_entry(cache, logits, lengths, key, stop_ids, sampler, pad_id, max_new_tokens):
    """The decode state (see `_decode_loop`) with its first token sampled from the prefill
    logits. The state is made here, not by eager ops (each a compilation in a new process)."""
    TRACE_COUNTS["first_token"] += 1
    b = logits.shape[0]
    state = dict(
        last=jnp.zeros((b,), jnp.int32),
        tokens=jnp.zeros((b, max_new_tokens), jnp.int32),
        logprobs=jnp.zeros((b, max_new_tokens), jnp.float32),
        n=jnp.zeros((b,), jnp.int32),
        step=jnp.int32(0),
        cache=cache,
        pos=lengths,
        key=key,
        done=jnp.zeros((b,), bool),
        stopped=jnp.zeros((b,), bool),
        limit=jnp.int32(max_new_tokens),
    )
    return _emit(state, logits, stop_ids, sampler, pad_id)


def _decode_loop(params: Params, state: dict, stop_ids, sampler, n_steps: int):
    """Up to `n_steps` decode-then-sample iterations as one `lax.while_loop`.

    state: last[B] (the token sampled last, not yet fed), tokens/logprobs [B, N] outputs, n[B]
    tokens emitted per row, step (scalar: tokens emitted so far), cache, pos[B] (position of
    `last`), key, done[B], limit (scalar: total new tokens allowed). The first token comes from
    the prefill logits (`_first_token_entry`), so N tokens cost N - 1 decode steps: no step is
    spent on logits nobody samples.
    """
    end = state["step"] + n_steps  # this call emits up to n_steps tokens

    def cond(st):
        return (st["step"] < end) & (st["step"] < st["limit"]) & ~jnp.all(st["done"])

    def body(st):
        logits, cache = _decode_impl(params, st["last"], st["cache"], st["pos"])
        st = dict(st, cache=cache, pos=st["pos"] + 1)
        return _emit(st, logits, stop_ids, sampler, params.config.pad_id)

    return jax.lax.while_loop(cond, body, state)


# ---------------------------------------------------------------------------- generate


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    """Per row: the new token ids, their log-probabilities and why generation ended.

    `stop_reason[i]` is "stop" (a stop token was produced; it is the last entry of
    `tokens[i]`) or "length" (max_new_tokens reached). `logprobs` are log-softmax values of the
    model's (unfiltered, temperature 1) distribution at the chosen tokens.
    """

    tokens: list[np.ndarray]
    logprobs: list[np.ndarray]
    stop_reason: list[str]
    prompt_lengths: list[int]
    timings: dict[str, float] = dataclasses.field(default_factory=dict)


def default_buckets(max_len: int, minimum: int = 64) -> tuple[int, ...]:
    """Powers of two from `minimum` up to (and including) max_len."""
    out, b = [], minimum
    while b < max_len:
        out.append(b)
        b *= 2
    out.append(max_len)
    return tuple(out)


def bucket_length(n: int, buckets: Sequence[int]) -> int:
    for b in sorted(buckets):
        if b >= n:
            return b
    raise InputError(
        f"prompt of {n} tokens is longer than the largest prefill bucket ({max(buckets)})"
    )


def _as_rows(params: Params, tokens) -> list[np.ndarray]:
    if isinstance(tokens, (str, bytes)):
        raise InputError("tokens must be token ids, not text: encode it with model.tokenizer")
    if isinstance(tokens, (np.ndarray, jax.Array)):
        arr = np.asarray(tokens)
        if arr.ndim == 1:
            arr = arr[None]
        if arr.ndim != 2:
            raise InputError(
                f"tokens must be [batch, time] or a list of prompts, got shape {arr.shape}"
            )
        rows = list(arr)
    else:
        rows = [np.asarray(r) for r in tokens]
        if rows and all(r.ndim == 0 for r in rows):  # a single flat list of ids
            rows = [np.asarray(tokens)]
    if not rows:
        raise InputError("no prompts given")
    for i, r in enumerate(rows):
        if r.ndim != 1 or r.size == 0:
            raise InputError(f"prompt {i} is empty or not a flat list of token ids")
        if not np.issubdtype(r.dtype, np.integer):
            raise InputError(f"prompt {i} holds {r.dtype} values, expected integer token ids")
        inputs.check_ids_in_vocab(params, r, f"prompt {i}")
    return [r.astype(np.int32) for r in rows]


def _default_max_len(config: Gemma4Config, need: int) -> int:
    m = 256
    while m < need:
        m *= 2
    return min(m, config.context_length)


def _prepare(params, tokens, max_new_tokens, max_len, buckets, stop_tokens):
    inputs.check_params(params, "generate")
    c = params.config
    rows = _as_rows(params, tokens)
    max_new_tokens = inputs.positive_int(max_new_tokens, "max_new_tokens")
    longest = max(len(r) for r in rows)
    need = longest + max_new_tokens
    if need > c.context_length:
        raise InputError(
            f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) = "
            f"{need} exceeds the model's context of {c.context_length} tokens"
        )
    if max_len is None:
        max_len = _default_max_len(c, need)
    else:
        max_len = inputs.positive_int(max_len, "max_len")
    if need > max_len:
        raise InputError(
            f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) = "
            f"{need} exceeds max_len={max_len}"
        )
    if max_len > c.context_length:
        raise InputError(f"max_len={max_len} exceeds the model's context ({c.context_length})")
    if buckets is None:
        buckets = default_buckets(max_len)
    else:
        buckets = [inputs.positive_int(b, "prefill bucket") for b in buckets]
        buckets = tuple(b for b in buckets if b <= max_len) + (max_len,)
    t = bucket_length(longest, buckets)
    padded = np.full((len(rows), t), c.pad_id, np.int32)
    for i, r in enumerate(rows):
        padded[i, : len(r)] = r
    lengths = np.array([len(r) for r in rows], np.int32)
    stops = inputs.stop_ids(c.stop_ids if stop_tokens is None else stop_tokens, c.vocab_size)
    return padded, lengths, max_len, stops


def generate_stream(
    params: Params,
    tokens,
    *,
    max_new_tokens: int = 128,
    sampler=None,
    key=None,
    stop_tokens=None,
    max_len: int | None = None,
    buckets: Sequence[int] | None = None,
    chunk: int | None = None,
) -> Iterator[dict[str, Any]]:
    """Like `generate`, yielding the first token as soon as it is sampled from the prefill
    logits, then after every `chunk` further tokens (one decode-loop program call each).

    Each item: {"tokens": np.ndarray [B, k] the new tokens of this chunk (pad for finished
    rows), "done": np.ndarray [B], "state": final state after the last chunk}.
    """
    import time

    padded, lengths, max_len, stops = _prepare(
        params, tokens, max_new_tokens, max_len, buckets, stop_tokens
    )
    sampler = Greedy() if sampler is None else sampler
    inputs.check_sampler(sampler)
    if key is None:
        key = prng_key(0)
    else:
        inputs.check_prng_key(key)
    b = padded.shape[0]
    chunk = max_new_tokens if chunk is None else inputs.positive_int(chunk, "chunk")
    t0 = time.perf_counter()
    cache = init_cache(params, b, max_len)
    # _prepare checked the prompts; the lengths go to the device once for both programs.
    (on_device,) = _on_mesh(params, jax.device_put(lengths))
    logits, cache = _prefill(params, jax.device_put(padded), on_device, cache)
    logits.block_until_ready()
    t_prefill = time.perf_counter() - t0
    stop_arr = jax.device_put(np.asarray(stops if stops else (-1,), np.int32))
    # The first token is sampled from the prefill logits by a small program of its own and
    # yielded before the decode loop is called (and, on a first call, compiled): the time to
    # the first token is prefill + one sample.
    state = _program("first_token")(
        cache,
        logits,
        on_device,
        key,
        stop_arr,
        sampler=sampler,
        pad_id=params.config.pad_id,
        max_new_tokens=max_new_tokens,
    )
    loop = _program("decode_loop")
    kernels = ops.kernel_mode()
    seen = 0
    while True:
        step = int(state["step"])
        new = np.asarray(state["tokens"])[:, seen:step]  # sliced on the host: no eager op
        seen = step
        finished = step >= max_new_tokens or bool(np.all(np.asarray(state["done"])))
        timings = {"prefill_s": t_prefill, "elapsed_s": time.perf_counter() - t0}
        yield {
            "tokens": new,
            "done": np.asarray(state["done"]),
            "state": state,
            "finished": finished,
            "lengths": lengths,
            "timings": timings,
        }
        if finished:
            return
        state = loop(params, state, stop_arr, kernels=kernels, sampler=sampler, n_steps=chunk)


def generate(
    params: Params,
    tokens,
    *,
    max_new_tokens: int = 128,
    sampler=None,
    key=None,
    stop_tokens=None,
    max_len: int | None = None,
    buckets: Sequence[int] | None = None,
) -> GenerationResult:
    """Generate continuations of one prompt or a batch of (ragged) prompts.

    tokens: int [B, T] array, one flat list of ids, or a list of prompts of different lengths.
    sampler: a `gemma4_jax.sampling` sampler (default greedy); key: `jax.random` key.
    stop_tokens: None = EOS and `<turn|>` when the vocabulary has them; a list of ids; () never
    stops early. max_len: cache length (default: smallest power of two >= prompt + new tokens,
    at least 256). buckets: prefill length buckets (default powers of two from 64).
    The whole generation after prefill is ONE device program (`lax.while_loop`).
    """
    item = None
    for chunk_item in generate_stream(
        params,
        tokens,
        max_new_tokens=max_new_tokens,
        sampler=sampler,
        key=key,
        stop_tokens=stop_tokens,
        max_len=max_len,
        buckets=buckets,
        chunk=None,
    ):
        item = chunk_item
    state, lengths = item["state"], item["lengths"]
    n = np.asarray(state["n"])
    toks = np.asarray(state["tokens"])
    lps = np.asarray(state["logprobs"])
    stopped = np.asarray(state["stopped"])
    timings = dict(item["timings"], generated_tokens=int(n.sum()))
    return GenerationResult(
        tokens=[toks[i, : n[i]] for i in range(len(n))],
        logprobs=[lps[i, : n[i]] for i in range(len(n))],
        stop_reason=["stop" if s else "length" for s in stopped],
        prompt_lengths=[int(x) for x in lengths],
        timings=timings,
    )
