"""`gemma4-jax`: the command line.

    gemma4-jax run configs/tiny.yaml [key=value ...]     a YAML run config, batched
    gemma4-jax generate --model FILE --prompt TEXT       stream one completion
    gemma4-jax chat --model FILE                         interactive chat (stdin lines)
    gemma4-jax info FILE                                 what a GGUF holds
    gemma4-jax perplexity --model FILE --text FILE       sliding-window perplexity
    gemma4-jax bench [args ...]                          benchmarks/bench_e2e.py

`FILE` is a GGUF path or `builtin:tiny` (random weights: its text is random). Errors a user
can cause (bad config, missing file, bad flag value) end in one line
`gemma4-jax: error: ...` and exit status 1; `--debug` shows the traceback instead.

Compiled programs are kept in JAX's persistent compilation cache under
`$GEMMA4_JAX_CACHE/xla` (default `~/.cache/gemma4_jax/xla`), so a second run of the same
shapes skips XLA compilation; `--no-compile-cache` turns that off.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

PROG = "gemma4-jax"

# A new chat turn longer than this is not fed one decode step per token: the whole
# conversation is prefilled again instead (one batched pass beats hundreds of steps).
FEED_MAX_TOKENS = 64


class _UsageError(ValueError):
    """A flag value that argparse's types cannot check (reported like any bad input)."""


# ============================================================================ helpers


def _err(*parts: Any) -> None:
    print(*parts, file=sys.stderr, flush=True)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text or type(e).__name__


def _enable_compile_cache() -> None:
    """JAX's persistent compilation cache in `$GEMMA4_JAX_CACHE/xla`, unless the user set one
    (JAX_COMPILATION_CACHE_DIR) already. Must run before the first compilation."""
    import jax

    if os.environ.get("JAX_COMPILATION_CACHE_DIR") or jax.config.jax_compilation_cache_dir:
        return
    from .builtin import cache_dir

    jax.config.update("jax_compilation_cache_dir", str(cache_dir() / "xla"))
    # Cache everything that took a moment: the tiny model's programs compile in ~1-5 s each.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def _default_dtype() -> str:
    import jax

    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def _load_model(spec: str, dtype: str | None, *, mesh=None):
    """`spec` is a GGUF path or builtin:NAME. Prints the builtin notice (random weights)."""
    from . import builtin
    from .loader import load

    path = builtin.resolve_model(spec)
    if builtin.is_builtin(spec):
        print(f"note: {builtin.BUILTIN_NOTICE}", flush=True)
    model = load(path, dtype=dtype or _default_dtype(), progress=True, mesh=mesh)
    if model.tokenizer is None:
        from .errors import GGUFError

        raise GGUFError(f"{path}: the file has no tokenizer (tokenizer.ggml.tokens)")
    return model


def _encode_prompt(tok, text: str) -> list[int]:
    """Ids of an already rendered prompt: templates write BOS themselves (Gemma's do), so
    add one only when the file wants BOS and the text did not bring it."""
    ids = tok.encode(text, add_bos=False)
    if tok.add_bos and tok.bos_id is not None and (not ids or ids[0] != tok.bos_id):
        ids.insert(0, tok.bos_id)
    return ids


def _render_chat(tok, messages: Sequence[dict[str, str]], *, think: bool = False) -> str:
    from .chat import Conversation
    from .errors import InputError

    if not tok.chat_template:
        raise InputError(
            "this GGUF has no chat template (tokenizer.chat_template): "
            "give plain prompts (chat_template=false / no --chat)"
        )
    conv = Conversation.from_tokenizer(tok, enable_thinking=think)
    for m in messages:
        conv.add(m["role"], m["content"])
    return conv.render(add_generation_prompt=True)


def _sampler_from_flags(args) -> Any:
    """Greedy unless a sampling flag is given; temperature 0 is greedy."""
    from .sampling import Greedy, sampler_from_params

    knobs = (args.temperature, args.top_k, args.top_p, args.min_p)
    if all(k is None for k in knobs):
        return Greedy()
    t = 1.0 if args.temperature is None else args.temperature
    if t < 0 or not math.isfinite(t):
        raise _UsageError(f"--temperature {t} must be a finite number >= 0")
    if args.top_k is not None and args.top_k < 0:
        raise _UsageError(f"--top-k {args.top_k} must be >= 0 (0: off)")
    return sampler_from_params(t, args.top_k, args.top_p, args.min_p)


def _sampler_from_config(s) -> Any:
    from .sampling import Greedy, MinP, Temperature, TopK, TopP

    if s.kind == "greedy":
        return Greedy()
    if s.kind == "temperature":
        return Temperature(s.temperature)
    if s.kind == "top_k":
        return TopK(s.top_k, s.temperature)
    if s.kind == "top_p":
        return TopP(s.top_p, s.temperature)
    return MinP(s.min_p, s.temperature)


def _stop_ids(tok, stop_tokens) -> tuple[int, ...] | None:
    """Config `stop_tokens` (ids or token strings) -> ids; None keeps the model's."""
    from .errors import ConfigError

    if stop_tokens is None:
        return None
    out = []
    for s in stop_tokens:
        if isinstance(s, str):
            i = tok.token_to_id(s)
            if i is None:
                raise ConfigError(f"stop_tokens: {s!r} is not a token of this model")
            out.append(i)
        else:
            if not 0 <= s < tok.vocab_size:
                raise ConfigError(f"stop_tokens: id {s} is outside the vocabulary")
            out.append(int(s))
    return tuple(out)


def _visible(tok, ids, stops) -> str:
    """Completion text: up to (not including) the first stop token, specials dropped."""
    ids = [int(i) for i in ids]
    for n, i in enumerate(ids):
        if i in stops:
            ids = ids[:n]
            break
    return tok.decode(ids, skip_special=True)


def _rate(n: int, seconds: float) -> str:
    return f"{n / seconds:.1f} tok/s" if seconds > 0 else "n/a"


# ============================================================================ run


def cmd_run(args) -> int:
    from .generate import generate, prng_key
    from .runconfig import load_run_config

    cfg = load_run_config(args.config, args.overrides)
    cfg.model_path()  # a missing model fails before anything slow
    prompts = cfg.load_prompts()
    convs = cfg.conversations()
    mesh = None
    if cfg.mesh is not None and cfg.mesh.data * cfg.mesh.model > 1:
        from .sharding import mesh_from_shape

        mesh = mesh_from_shape((cfg.mesh.data, cfg.mesh.model))
    out_file = None
    if cfg.output is not None:  # fail on an unwritable path now, not after the run
        cfg.output.parent.mkdir(parents=True, exist_ok=True)
        out_file = open(cfg.output, "w", encoding="utf-8")  # noqa: SIM115 (closed below)

    with contextlib.ExitStack() as stack:
        if out_file is not None:
            stack.enter_context(out_file)
        if mesh is not None:
            import jax

            stack.enter_context(jax.set_mesh(mesh))
        model = _load_model(cfg.model, cfg.dtype, mesh=mesh)
        tok = model.tokenizer
        if convs is not None:
            texts = [_render_chat(tok, conv) for conv in convs]
            prompt_ids = [_encode_prompt(tok, t) for t in texts]
        else:
            prompt_ids = [tok.encode(p) for p in prompts]
        stops = _stop_ids(tok, cfg.stop_tokens)
        shown_stops = set(model.config.stop_ids if stops is None else stops)
        sampler = _sampler_from_config(cfg.sampler)
        n, bs = len(prompt_ids), cfg.batch_size
        ttfts, decode_s, gen_tokens, wall = [], 0.0, 0, time.perf_counter()
        for b, start in enumerate(range(0, n, bs)):
            rows = prompt_ids[start : start + bs]
            real = len(rows)
            # Pad the last batch with copies of its last prompt: same shape, no new compile.
            rows = rows + [rows[-1]] * (bs - real) if n > bs else rows
            res = generate(
                model.params,
                rows,
                max_new_tokens=cfg.max_new_tokens,
                sampler=sampler,
                key=prng_key(cfg.seed, b),  # fold_in(PRNGKey(seed), b), one cached program
                stop_tokens=stops,
                max_len=cfg.max_len,
                buckets=cfg.bucket_sizes(),
            )
            t = res.timings
            ttfts.append(t["prefill_s"])
            decode_s += t["elapsed_s"] - t["prefill_s"]
            gen_tokens += sum(len(res.tokens[i]) for i in range(real))
            for i in range(real):
                j = start + i
                text = _visible(tok, res.tokens[i], shown_stops)
                _print_result(j, n, prompts[j], text, len(res.tokens[i]), res.stop_reason[i])
                if out_file is not None:
                    rec = {
                        "prompt": prompts[j],
                        "text": text,
                        "tokens": [int(x) for x in res.tokens[i]],
                        "logprobs": [float(x) for x in res.logprobs[i]],
                        "stop_reason": res.stop_reason[i],
                        "prompt_tokens": len(prompt_ids[j]),
                        "timings": {
                            "batch": b,
                            "ttft_s": t["prefill_s"],
                            "elapsed_s": t["elapsed_s"],
                            "batch_generated_tokens": t["generated_tokens"],
                        },
                    }
                    out_file.write(json.dumps(rec, ensure_ascii=False) + "\n")
        wall = time.perf_counter() - wall
    if cfg.output is not None:
        import yaml

        side = cfg.output.with_name(cfg.output.name + ".config.yaml")
        side.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), encoding="utf-8")
        print(f"wrote {n} results to {cfg.output} (effective config: {side.name})")
    later = ""
    if len(ttfts) > 1:
        later = f", median of later batches {statistics.median(ttfts[1:]):.3f} s"
    print(
        f"time to first token: {ttfts[0]:.3f} s (first batch, includes any compilation){later}\n"
        f"decode: {gen_tokens} tokens in {decode_s:.2f} s = {_rate(gen_tokens, decode_s)}; "
        f"{n} prompts in {wall:.2f} s overall"
    )
    return 0


def _print_result(j: int, n: int, prompt, text: str, n_tokens: int, reason: str) -> None:
    if isinstance(prompt, str):
        shown = prompt
    else:  # a conversation: show its last message
        shown = f"[{len(prompt)} messages] {prompt[-1]['role']}: {prompt[-1]['content']}"
    print(f"=== [{j + 1}/{n}] {shown}")
    print(text)
    print(f"--- {n_tokens} tokens, stop: {reason}\n", flush=True)


# ============================================================================ generate


def cmd_generate(args) -> int:
    from .generate import generate_stream, prng_key

    sampler = _sampler_from_flags(args)  # bad flag values fail before the load
    model = _load_model(args.model, args.dtype)
    tok = model.tokenizer
    if args.chat:
        ids = _encode_prompt(tok, _render_chat(tok, [{"role": "user", "content": args.prompt}]))
    else:
        ids = tok.encode(args.prompt)
    stops = set(model.config.stop_ids)
    dec = tok.stream(skip_special=True)
    t0 = time.perf_counter()
    first = None
    n = 0
    stopped = False
    for item in generate_stream(
        model.params,
        [ids],
        max_new_tokens=args.max_new_tokens,
        sampler=sampler,
        key=prng_key(args.seed),
        max_len=args.max_len,
        chunk=args.chunk,
    ):
        if first is None:
            first = time.perf_counter() - t0
            prefill_s = item["timings"]["prefill_s"]
        for t in item["tokens"][0]:
            if stopped:
                break
            n += 1
            if int(t) in stops:
                stopped = True
                break
            sys.stdout.write(dec.push(int(t)))
        sys.stdout.flush()
    sys.stdout.write(dec.flush() + "\n")
    total = time.perf_counter() - t0
    _err(
        f"[{len(ids)} prompt tokens; prefill {prefill_s:.3f} s; first tokens on screen after "
        f"{first:.3f} s (chunks of {args.chunk}); {n} tokens in {total - prefill_s:.2f} s "
        f"= {_rate(n, total - prefill_s)}; {'stop token' if stopped else 'length'}]"
    )
    return 0


# ============================================================================ chat


class ChatSession:
    """One conversation against a KV cache that lives across turns.

    A turn feeds only the text the model has not seen (`Conversation.next_prompt`): the end of
    its last reply and the new user turn, one `decode_step` per token, at the positions after
    the cached ones. The first turn, a tail longer than FEED_MAX_TOKENS, or a history the
    template re-renders differently (it drops old thinking) prefill the whole conversation.
    Sampling is one token per jitted step so the reply streams.
    """

    def __init__(self, model, *, max_len: int, sampler, key, think: bool, system: str | None):
        from .chat import Conversation
        from .generate import default_buckets

        self.model, self.params, self.tok = model, model.params, model.tokenizer
        self.max_len = max_len
        self.buckets = default_buckets(max_len)
        self.sampler, self.key = sampler, key
        self.system = system
        self.stops = set(model.config.stop_ids)
        self.conv = Conversation.from_tokenizer(self.tok, enable_thinking=think, system=system)
        self.cache = None
        self.ids: list[int] = []  # the tokens the cache holds (self.pos of them)
        self.pos = 0
        self.logits = None  # of the next token
        self.prefills = 0  # for tests and the status line
        self.fed = 0

    def restart(self) -> None:
        from .chat import Conversation

        think = self.conv.enable_thinking
        self.conv = Conversation.from_tokenizer(self.tok, enable_thinking=think, system=self.system)
        self.cache, self.ids, self.pos, self.logits = None, [], 0, None

    def _prefill(self, ids: list[int]) -> None:
        import numpy as np

        from .generate import bucket_length, init_cache, prefill

        t = bucket_length(len(ids), self.buckets)
        padded = np.full((1, t), self.model.config.pad_id, np.int32)
        padded[0, : len(ids)] = ids
        cache = init_cache(self.params, 1, self.max_len)
        self.logits, self.cache = prefill(self.params, padded, cache, [len(ids)])
        self.ids, self.pos = list(ids), len(ids)
        self.prefills += 1

    def _feed(self, ids: Sequence[int]) -> None:
        from .generate import decode_step

        for i in ids:
            self.logits, self.cache = decode_step(self.params, [i], self.cache, [self.pos])
            self.ids.append(int(i))
            self.pos += 1
            self.fed += 1

    def turn(self, user: str, max_new_tokens: int) -> Iterator[int]:
        """Add the user's message; yield the reply's token ids as they are sampled (the last
        one is a stop token unless max_new_tokens ran out)."""
        from .errors import InputError

        self.conv.add_user(user)
        upd = self.conv.next_prompt()
        tail = self.tok.encode(upd.text, add_bos=False)
        if self.cache is None or upd.reset or len(tail) > FEED_MAX_TOKENS:
            ids = _encode_prompt(self.tok, self.conv.render())
            if len(ids) + max_new_tokens > self.max_len:
                raise InputError(
                    f"the conversation ({len(ids)} tokens) + max_new_tokens "
                    f"({max_new_tokens}) does not fit max_len={self.max_len}"
                )
            self._prefill(ids)
        else:
            if self.pos + len(tail) + max_new_tokens > self.max_len:
                raise InputError(
                    f"the conversation ({self.pos + len(tail)} tokens) + max_new_tokens "
                    f"({max_new_tokens}) does not fit max_len={self.max_len}"
                )
            self._feed(tail)
        reply: list[int] = []
        for _ in range(max_new_tokens):
            t, self.key = _sample_next(self.logits, self.key, self.sampler)
            t = int(t[0])
            reply.append(t)
            # Every sampled token is fed, the stop token too: the cache then holds exactly
            # the reply, and the next turn starts after it.
            self._feed([t])
            yield t
            if t in self.stops:
                break
        text = self.tok.decode(reply, skip_special=False)
        self.conv.add_model(text, fed=True)


@functools.cache
def _sample_fn():
    import jax

    def f(logits, key, sampler):
        key, sub = jax.random.split(key)
        return sampler(logits, sub), key

    return jax.jit(f, static_argnames=("sampler",))


def _sample_next(logits, key, sampler):
    return _sample_fn()(logits, key, sampler=sampler)


class ReplyPrinter:
    """Streams a reply, showing a thought channel (`<|channel>thought ... <channel|>`) apart
    from the answer. Works on token ids: the channel markers are single special tokens."""

    def __init__(self, tok, out=None):
        self.tok = tok
        self.out = out or sys.stdout
        self.open_id = tok.token_to_id("<|channel>")
        self.close_id = tok.token_to_id("<channel|>")
        self.special = tok.special_ids | {i for i in (self.open_id, self.close_id) if i is not None}
        self.dec = tok.stream(skip_special=True)
        self.state = "answer"  # | "name" (reading a channel name) | "thinking" | "channel"
        self.name = ""

    def _write(self, s: str) -> None:
        if s:
            self.out.write(s)
            self.out.flush()

    def push(self, t: int) -> None:
        if t == self.open_id:
            self.state, self.name = "name", ""
            return
        if t == self.close_id:
            if self.state in ("thinking", "name"):
                self._write("\n[/thinking]\n")
            self.state = "answer"
            return
        if t in self.special:
            return
        piece = self.dec.push(t)
        if self.state == "name":
            self.name += piece
            if "\n" not in self.name:
                return
            name, _, rest = self.name.partition("\n")
            if name.strip() == "thought":
                self.state = "thinking"
                self._write("[thinking]\n" + rest)
            else:  # another channel: show it as text
                self.state = "channel"
                self._write(f"[{name.strip()}] " + rest)
            return
        self._write(piece)

    def finish(self) -> None:
        self._write(self.dec.flush())
        if self.state == "thinking":
            self._write("\n[/thinking]")
        self._write("\n")


def cmd_chat(args) -> int:
    import jax

    from .errors import InputError

    sampler = _sampler_from_flags(args)
    model = _load_model(args.model, args.dtype)
    tok = model.tokenizer
    max_len = args.max_len or min(4096, model.config.context_length)
    session = ChatSession(
        model,
        max_len=max_len,
        sampler=sampler,
        key=jax.random.PRNGKey(args.seed),
        think=args.think,
        system=args.system,
    )
    interactive = sys.stdin.isatty()
    if interactive:
        _err("chat: type a message; /reset starts over, /exit or Ctrl-D ends")
    while True:
        if interactive:
            sys.stdout.write("you> ")
            sys.stdout.flush()
        line = sys.stdin.readline()
        if not line:
            break
        line = line.rstrip("\n")
        if not line.strip():
            continue
        if line.strip() in ("/exit", "/quit"):
            break
        if line.strip() == "/reset":
            session.restart()
            _err("[conversation reset]")
            continue
        if not interactive:
            print(f"you> {line}")
        sys.stdout.write("model> ")
        sys.stdout.flush()
        printer = ReplyPrinter(tok)
        t0 = time.perf_counter()
        first, n, prefills = None, 0, session.prefills
        try:
            for t in session.turn(line, args.max_new_tokens):
                if first is None:
                    first = time.perf_counter() - t0
                n += 1
                printer.push(t)
        except InputError as e:  # the conversation outgrew max_len
            printer.finish()
            session.restart()
            _err(f"[{_one_line(e)}: conversation reset, send the message again]")
            continue
        printer.finish()
        dt = time.perf_counter() - t0
        how = "prefilled the conversation" if session.prefills > prefills else "reused the cache"
        _err(
            f"[{n} tokens; first after {first:.3f} s; "
            f"{_rate(n - 1, dt - first)}; {how}; {session.pos}/{max_len} positions]"
        )
    return 0


# ============================================================================ info


def cmd_info(args) -> int:
    import collections

    from . import builtin
    from .config import config_from_gguf, describe, layer_plan
    from .gguf_file import read_gguf
    from .tokenizer import Tokenizer

    path = builtin.resolve_model(args.file)
    gf = read_gguf(path)
    fields = gf.fields
    tensors = {t.name: t for t in gf.tensors}
    embd = tensors.get("token_embd.weight")
    vocab = embd.numpy_shape[0] if embd is not None else None
    c = config_from_gguf(fields, set(tensors), str(path), vocab_size=vocab)
    p = print
    p(f"file:          {path} ({path.stat().st_size / 2**20:.1f} MiB)")
    if builtin.is_builtin(args.file):
        p(f"note:          {builtin.BUILTIN_NOTICE}")
    p(f"architecture:  {fields.get('general.architecture')}  name: {fields.get('general.name')}")
    plan = layer_plan(c)
    n_sliding = sum(s.sliding for s in plan)
    p(
        f"model:         {c.n_layers} layers ({n_sliding} sliding, {c.n_layers - n_sliding} "
        f"global), d_model {c.d_model}, {c.n_heads} heads, head dim "
        f"{sorted(set(c.head_dim))}, kv heads {sorted(set(c.n_kv_heads))}, "
        f"window {c.window}, context {c.context_length}, vocab {c.vocab_size}"
    )
    extra = [f"PLE width {c.ple_dim}"] if c.ple_dim else []
    if c.shared_kv_layers:
        extra.append(f"{c.shared_kv_layers} KV-shared layers")
    if c.n_experts:
        extra.append(f"{c.n_experts} experts ({c.n_experts_used} used, ffn {c.expert_ffn_dim})")
    extra.append("tied embeddings" if c.tied_embeddings else "separate output head")
    if c.final_softcap:
        extra.append(f"final soft-cap {c.final_softcap:g}")
    p(f"               {', '.join(extra)}")
    p("layer plan:")
    for line in describe(c).splitlines():
        p(f"  {line}")
    counts = collections.Counter(t.tensor_type.name for t in gf.tensors)
    nbytes: collections.Counter = collections.Counter()
    n_params = 0
    for t in gf.tensors:
        nbytes[t.tensor_type.name] += int(t.n_bytes)
        n_params += int(t.n_elements)
    p(
        "tensor types:  "
        + ", ".join(f"{k} x {v} ({nbytes[k] / 2**20:.1f} MiB)" for k, v in counts.most_common())
    )
    total = sum(nbytes.values())
    p(
        f"parameters:    {n_params:,} ({n_params / 1e6:.1f} M); tensor data {total:,} bytes "
        f"({total / 2**30:.3f} GiB, {8 * total / max(n_params, 1):.2f} bits/param)"
    )
    if "tokenizer.ggml.tokens" not in fields:
        p("tokenizer:     none in this file")
        return 0
    tok = Tokenizer.from_gguf_fields(fields)

    def name(i):
        return "none" if i is None else f"{tok.id_to_token(i)!r} ({i})"

    p(
        f"tokenizer:     {fields.get('tokenizer.ggml.model')}, vocab {tok.vocab_size}, "
        f"bos {name(tok.bos_id)}, eos {name(tok.eos_id)}, pad {name(tok.pad_id)}, "
        f"add_bos {tok.add_bos}"
    )
    p(f"               stop tokens: {', '.join(name(i) for i in tok.stop_ids)}")
    specials = sorted(tok.special_ids)
    shown = ", ".join(tok.id_to_token(i) for i in specials[:24])
    more = f" ... (+{len(specials) - 24})" if len(specials) > 24 else ""
    p(f"               {len(specials)} special tokens: {shown}{more}")
    tmpl = tok.chat_template
    if not tmpl:
        p("chat template: none")
    else:
        lines = tmpl.splitlines()
        p(f"chat template: yes ({len(tmpl)} chars, {len(lines)} lines); first lines:")
        for line in lines[: args.template_lines]:
            p(f"  | {line[:120]}")
    return 0


# ============================================================================ perplexity


def perplexity_windows(n: int, context: int, stride: int, prefix: int):
    """(begin, end, first_scored) text-token ranges of the sliding windows.

    Each window holds `prefix` tokens (BOS) then text tokens [begin, end), at most
    `context` in all; it scores the tokens [first_scored, end) not scored by an earlier
    window. A token at a window's first position without a prefix has nothing to predict
    it from and is left out (only possible when the model has no BOS).
    """
    span = context - prefix
    out, begin, done = [], 0, 0
    while done < n:
        end = min(begin + span, n)
        first = max(begin if prefix else begin + 1, done)
        out.append((begin, end, first))
        done = end
        if end == n:
            break
        begin += stride
    return out


def cmd_perplexity(args) -> int:
    import jax
    import numpy as np

    from .errors import InputError
    from .model import forward
    from .sampling import chosen_logprobs

    text_path = Path(args.text)
    if not text_path.is_file():
        what = "is a directory" if text_path.is_dir() else "does not exist"
        raise FileNotFoundError(f"text file {str(text_path)!r} {what}")
    text = text_path.read_text(encoding="utf-8")
    model = _load_model(args.model, args.dtype)
    tok, c = model.tokenizer, model.config
    context = args.context or min(1024, c.context_length)
    if not 2 <= context <= c.context_length:
        raise _UsageError(f"--context {context} must be in [2, {c.context_length}]")
    prefix = [] if tok.bos_id is None else [tok.bos_id]
    span = context - len(prefix)
    stride = args.stride or max(1, span // 2)
    if not 1 <= stride <= span - (0 if prefix else 1):
        raise _UsageError(
            f"--stride {stride} must be in [1, {span - (0 if prefix else 1)}] so that every "
            f"token is scored (context {context})"
        )
    ids = tok.encode(text, add_bos=False)
    if len(ids) < 2:
        raise InputError(f"{text_path}: too little text to score ({len(ids)} tokens)")
    windows = perplexity_windows(len(ids), context, stride, len(prefix))
    # Every window is padded to `context` and run in batches of the same shape: one compile.
    # Causal attention keeps the padding from reaching the scored positions.
    score = jax.jit(lambda logits, tgt: chosen_logprobs(logits[:, :-1], tgt[:, 1:]))
    total, scored = 0.0, 0
    t0 = time.perf_counter()
    bs = args.batch_size
    for i in range(0, len(windows), bs):
        group = windows[i : i + bs]
        toks = np.full((bs, context), c.pad_id, np.int32)
        mask = np.zeros((bs, context - 1), bool)
        for r, (b, e, first) in enumerate(group):
            row = prefix + ids[b:e]
            toks[r, : len(row)] = row
            # input position p predicts p + 1; text token k sits at len(prefix) + k - b
            lo, hi = len(prefix) + first - b, len(prefix) + e - b
            mask[r, lo - 1 : hi - 1] = True
        # numpy in: the ids are checked on the host and travel by device_put (no eager op)
        lp = np.asarray(score(forward(model.params, toks), jax.device_put(toks)))
        total += float(lp[mask].astype(np.float64).sum())
        scored += int(mask.sum())
    dt = time.perf_counter() - t0
    nll = -total / scored
    print(
        f"perplexity: {math.exp(nll):.4f} (mean NLL {nll:.4f} nats) over {scored} tokens of "
        f"{text_path.name}; {len(windows)} windows of {context} tokens, stride {stride}"
    )
    print(
        f"{scored} tokens scored in {dt:.2f} s = {_rate(scored, dt)} "
        f"({_rate(len(windows) * context, dt).replace('tok', 'positions')} evaluated, "
        f"first batch includes compilation)"
    )
    return 0


# ============================================================================ bench


def _bench_script() -> Path:
    return Path(__file__).resolve().parents[1] / "benchmarks" / "bench_e2e.py"


def cmd_bench(args) -> int:
    script = _bench_script()
    if not script.is_file():
        raise FileNotFoundError(
            f"no end-to-end benchmark at {script}: `bench` runs benchmarks/bench_e2e.py "
            "of a source checkout (git clone, then pip install -e .)"
        )
    root = script.parents[1]
    env = dict(os.environ)  # the checkout's own package, installed or not
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH")) if p)
    return subprocess.call([sys.executable, str(script), *args.bench_args], cwd=root, env=env)


# ============================================================================ parser


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{v} must be >= 1")
    return v


def _add_model_flags(p: argparse.ArgumentParser, *, model_required: bool = False) -> None:
    p.add_argument(
        "--model",
        default="builtin:tiny",
        required=model_required,
        help="GGUF file or builtin:tiny (default: builtin:tiny, random weights)",
    )
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        help="compute dtype (default: bfloat16 on GPU, float32 on CPU)",
    )


def _add_sampling_flags(p: argparse.ArgumentParser, max_new: int) -> None:
    p.add_argument("--max-new-tokens", type=_positive, default=max_new)
    p.add_argument("--max-len", type=_positive, help="KV cache length (default: derived)")
    g = p.add_argument_group("sampling (greedy unless one of these is given)")
    g.add_argument("--temperature", type=float, help="0 = greedy")
    g.add_argument("--top-k", type=int)
    g.add_argument("--top-p", type=float)
    g.add_argument("--min-p", type=float)
    g.add_argument("--seed", type=int, default=0, help="jax.random key (default 0)")


def build_parser() -> argparse.ArgumentParser:
    # Global flags work before and after the subcommand; SUPPRESS keeps a subcommand's
    # default from overwriting a value given before it.
    glob = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    glob.add_argument("--debug", action="store_true", default=argparse.SUPPRESS)
    glob.add_argument(
        "--kernels", choices=("reference", "pallas", "auto"), default=argparse.SUPPRESS
    )
    glob.add_argument("--no-compile-cache", action="store_true", default=argparse.SUPPRESS)

    parser = argparse.ArgumentParser(
        prog=PROG,
        allow_abbrev=False,
        description="Gemma 4 text models in JAX, from GGUF files.",
        epilog="FILE: a .gguf path or builtin:tiny (random weights, random text).",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    parser.add_argument(
        "--kernels",
        choices=("reference", "pallas", "auto"),
        help="sets GEMMA4_JAX_KERNELS (default: pallas on GPU, reference on CPU)",
    )
    parser.add_argument(
        "--no-compile-cache",
        action="store_true",
        help="do not use JAX's persistent compilation cache ($GEMMA4_JAX_CACHE/xla)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "run",
        parents=[glob],
        help="run a YAML config (see configs/)",
        description="Load CONFIG, apply KEY=VALUE overrides (YAML values, dotted keys: "
        "sampler.kind=top_p max_new_tokens=64), generate for every prompt in batches of "
        "batch_size, print each completion, write JSONL when `output` is set (plus "
        "OUTPUT.config.yaml, the effective config), then time to first token and tok/s.",
    )
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "generate",
        parents=[glob],
        help="stream one completion",
        description="Stream a completion of --prompt to the terminal (the decode loop runs "
        "in device programs of --chunk tokens), then print timings to stderr.",
    )
    _add_model_flags(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="wrap the prompt as one user turn")
    p.add_argument("--chunk", type=_positive, default=8, help="tokens per device program")
    _add_sampling_flags(p, 128)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser(
        "chat",
        parents=[glob],
        help="interactive chat on stdin",
        description="Chat, one stdin line per user message (works with piped stdin); "
        "/reset starts over, /exit or end of input ends. The KV cache is kept between "
        "turns: each turn runs only the tokens the model has not seen (the user's turn, one "
        f"decode step per token); the first turn, a turn longer than {FEED_MAX_TOKENS} "
        "tokens, or a history the template re-renders differently (it drops earlier "
        "thinking) prefill the whole conversation again. Replies end at <turn|>; a thought "
        "channel is shown between [thinking] and [/thinking].",
    )
    _add_model_flags(p)
    p.add_argument("--system", help="system prompt")
    p.add_argument("--think", action="store_true", help="enable thinking in the template")
    _add_sampling_flags(p, 256)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser(
        "info",
        parents=[glob],
        help="describe a GGUF file",
        description="Architecture, layer plan, tensor types, sizes, tokenizer and chat "
        "template of FILE (reads metadata only; loads no weights).",
    )
    p.add_argument("file", metavar="FILE")
    p.add_argument("--template-lines", type=int, default=8, help="chat template lines shown")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser(
        "perplexity",
        parents=[glob],
        help="perplexity of a text file",
        description="Sliding-window perplexity with forward(): windows of --context tokens "
        "(each starting with BOS) every --stride tokens; each window scores only the tokens "
        "no earlier window scored, so every token counts once.",
    )
    _add_model_flags(p)
    p.add_argument("--text", required=True, help="UTF-8 text file")
    p.add_argument("--context", type=_positive, help="window length (default min(1024, ctx))")
    p.add_argument("--stride", type=_positive, help="window step (default: half a window)")
    p.add_argument("--batch-size", type=_positive, default=1, help="windows per forward call")
    p.set_defaults(func=cmd_perplexity)

    # No global flags after `bench`: everything there belongs to the benchmark script.
    p = sub.add_parser(
        "bench",
        add_help=False,
        allow_abbrev=False,
        help="run benchmarks/bench_e2e.py",
        description="Runs benchmarks/bench_e2e.py from the source checkout with every "
        "argument after `bench` (e.g. --smoke; --help shows the script's own help).",
    )
    p.set_defaults(func=cmd_bench)  # its arguments: everything main() does not know
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "bench":
        args.bench_args = extra  # passed through: --smoke and whatever bench_e2e.py takes
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    debug = getattr(args, "debug", False)
    old_kernels = os.environ.get("GEMMA4_JAX_KERNELS")
    if getattr(args, "kernels", None):
        os.environ["GEMMA4_JAX_KERNELS"] = args.kernels
    try:
        if not getattr(args, "no_compile_cache", False):
            _enable_compile_cache()
        from .errors import Gemma4Error

        try:
            return int(args.func(args) or 0)
        except (Gemma4Error, FileNotFoundError, IsADirectoryError, ValueError) as e:
            if debug:
                raise
            _err(f"{PROG}: error: {_one_line(e)}")
            return 1
        except KeyboardInterrupt:
            if debug:
                raise
            _err(f"{PROG}: interrupted")
            return 130
        except BrokenPipeError:  # `gemma4-jax ... | head`
            with contextlib.suppress(Exception):
                sys.stdout = open(os.devnull, "w")  # noqa: SIM115
            return 0
    finally:
        if getattr(args, "kernels", None):
            if old_kernels is None:
                os.environ.pop("GEMMA4_JAX_KERNELS", None)
            else:
                os.environ["GEMMA4_JAX_KERNELS"] = old_kernels


if __name__ == "__main__":
    sys.exit(main())
