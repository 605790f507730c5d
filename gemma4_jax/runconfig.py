"""Run configs: one YAML file describes one run (model, dtype, lengths, sampler, prompts).

    cfg = load_run_config("configs/tiny.yaml", ["sampler.kind=top_p", "max_new_tokens=64"])
    cfg.model_path()      # Path of the GGUF (builds builtin:tiny on first use)
    cfg.load_prompts()    # list of strings, or of message lists for `prompts.chat`
    cfg.to_dict()         # the effective config, to record beside the outputs

Keys (all but `model` optional; see `configs/*.yaml` for commented examples):

    model: PATH.gguf | builtin:tiny
    description: free text
    dtype: float32 | bfloat16                     (default bfloat16)
    max_len: total tokens per sequence, prompt + generated   (default 4096)
    prefill_buckets: [128, 512, 2048]             explicit prompt-length buckets, or a rule:
                     {min: 64, max: null, step: null}   powers of two from `min` (or multiples
                     of `step`) up to `max` (null: max_len), plus the cap itself
    sampler: {kind: greedy|temperature|top_k|top_p|min_p, temperature, top_k, top_p, min_p}
             temperature applies to every kind but greedy; top_k/top_p/min_p to their kind
    seed: int                                     (jax.random key of the sampler)
    max_new_tokens: int
    prompts: exactly one of
        text: [str, ...]                          (a single string is one prompt)
        file: prompts.txt                         with `split: blocks` (default: prompts are
                                                  separated by blank lines; newlines inside
                                                  a block are kept) or `split: lines` (one
                                                  prompt per non-empty line)
        chat: [[{role: system|user|assistant|model, content: str}, ...], ...]
    chat_template: bool     wrap each plain prompt as one user turn and add the generation
                            prompt (default true; `prompts.chat` requires it)
    batch_size: int
    output: results.jsonl | null                  (null: print)
    stop_tokens: null (the model's: <eos> and <turn|>) | [ids or token strings]
    mesh: null | {data: int, model: int}

Validation happens on load: an unknown key anywhere, a wrong type or an out-of-range value is
a `ConfigError` naming the file, the key path, the value and what is allowed. Relative paths
(`model`, `prompts.file`, `output`) resolve against the YAML file's folder, except when they
come from an override, which resolve against the working directory, where the user typed
them. Files are not opened on load (a preset loads before its model is downloaded):
`model_path()` and `load_prompts()` check them.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
from collections.abc import Mapping, Sequence
from itertools import pairwise
from pathlib import Path
from typing import Any

from .errors import ConfigError

DTYPES = ("float32", "bfloat16")
SAMPLER_KINDS = ("greedy", "temperature", "top_k", "top_p", "min_p")
ROLES = ("system", "user", "assistant", "model")
SPLITS = ("blocks", "lines")
PROMPT_SOURCES = ("text", "file", "chat")


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    """Defaults follow Gemma's recommended sampling (temperature 1, top-k 64, top-p 0.95)."""

    kind: str = "greedy"
    temperature: float = 1.0
    top_k: int = 64
    top_p: float = 0.95
    min_p: float = 0.05


@dataclasses.dataclass(frozen=True)
class BucketRule:
    """Prompt-length buckets from a rule: powers of two from `min` (or `min + i * step`)
    below the cap, then the cap (`max`, or max_len when null) itself."""

    min: int = 64
    max: int | None = None
    step: int | None = None

    def sizes(self, max_len: int) -> tuple[int, ...]:
        cap = max_len if self.max is None else min(self.max, max_len)
        out = []
        n = self.min
        while n < cap:
            out.append(n)
            n = n + self.step if self.step else n * 2
        return (*out, cap)


@dataclasses.dataclass(frozen=True)
class Message:
    role: str
    content: str


@dataclasses.dataclass(frozen=True)
class PromptsConfig:
    """Exactly one of text / file / chat is set."""

    text: tuple[str, ...] | None = None
    file: Path | None = None
    split: str = "blocks"
    chat: tuple[tuple[Message, ...], ...] | None = None

    def load(self) -> list[str] | list[list[dict[str, str]]]:
        """The prompts: strings for text/file, message lists for chat."""
        if self.chat is not None:
            return [[dataclasses.asdict(m) for m in conv] for conv in self.chat]
        if self.text is not None:
            return list(self.text)
        assert self.file is not None
        try:
            raw = self.file.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"prompts.file: {str(self.file)!r} does not exist") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"prompts.file: cannot read {str(self.file)!r}: {e}") from None
        return split_prompts(raw, self.split)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    data: int = 1
    model: int = 1


@dataclasses.dataclass(frozen=True)
class RunConfig:
    model: str  # "builtin:NAME" or an absolute path
    description: str | None = None
    dtype: str = "bfloat16"
    max_len: int = 4096
    prefill_buckets: tuple[int, ...] | BucketRule = BucketRule()
    sampler: SamplerConfig = SamplerConfig()
    seed: int = 0
    max_new_tokens: int = 128
    prompts: PromptsConfig | None = None
    chat_template: bool = True
    batch_size: int = 1
    output: Path | None = None
    stop_tokens: tuple[int | str, ...] | None = None
    mesh: MeshConfig | None = None

    @property
    def is_builtin(self) -> bool:
        from .builtin import is_builtin

        return is_builtin(self.model)

    def model_path(self) -> Path:
        """The GGUF file: builds a builtin model on first use; a missing file raises
        `builtin.ModelNotFoundError` (a ConfigError) naming it."""
        from .builtin import resolve_model

        return resolve_model(self.model)

    def bucket_sizes(self) -> tuple[int, ...]:
        if isinstance(self.prefill_buckets, BucketRule):
            return self.prefill_buckets.sizes(self.max_len)
        return self.prefill_buckets

    def load_prompts(self) -> list[str] | list[list[dict[str, str]]]:
        if self.prompts is None:
            raise ConfigError("this config has no `prompts`")
        return self.prompts.load()

    def conversations(self) -> list[list[dict[str, str]]] | None:
        """Message lists to render with the chat template, or None when the prompts are to
        be tokenized as they are (plain prompts with `chat_template: false`)."""
        items = self.load_prompts()
        if self.prompts is not None and self.prompts.chat is not None:
            return items  # type: ignore[return-value]
        if not self.chat_template:
            return None
        return [[{"role": "user", "content": p}] for p in items]  # type: ignore[misc]

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML/JSON data; `run_config_from_dict(cfg.to_dict()) == cfg`."""
        d = dataclasses.asdict(self)
        d["prefill_buckets"] = (
            dataclasses.asdict(self.prefill_buckets)
            if isinstance(self.prefill_buckets, BucketRule)
            else list(self.prefill_buckets)
        )
        d["output"] = None if self.output is None else str(self.output)
        d["stop_tokens"] = None if self.stop_tokens is None else list(self.stop_tokens)
        p = self.prompts
        if p is not None:  # only the source that is set, so the dict validates again
            if p.text is not None:
                d["prompts"] = {"text": list(p.text)}
            elif p.file is not None:
                d["prompts"] = {"file": str(p.file), "split": p.split}
            else:
                d["prompts"] = {"chat": p.load()}
        return d


def split_prompts(text: str, split: str = "blocks") -> list[str]:
    """`blocks`: prompts separated by one or more blank (whitespace-only) lines, each
    stripped, newlines inside kept. `lines`: each non-empty line, stripped."""
    if split == "lines":
        return [ln.strip() for ln in text.splitlines() if ln.strip()]
    blocks, cur = [], []
    for ln in text.splitlines():
        if ln.strip():
            cur.append(ln.rstrip())
        elif cur:
            blocks.append("\n".join(cur).strip())
            cur = []
    if cur:
        blocks.append("\n".join(cur).strip())
    return blocks


# --------------------------------------------------------------------------------------------
# Loading and validation

_TOP_KEYS = tuple(f.name for f in dataclasses.fields(RunConfig))
_SAMPLER_KEYS = tuple(f.name for f in dataclasses.fields(SamplerConfig))
_BUCKET_KEYS = tuple(f.name for f in dataclasses.fields(BucketRule))
_PROMPT_KEYS = tuple(f.name for f in dataclasses.fields(PromptsConfig))
_MESH_KEYS = tuple(f.name for f in dataclasses.fields(MeshConfig))
_MESSAGE_KEYS = ("role", "content")


class _Ctx:
    """Where values come from, for error messages and path resolution."""

    def __init__(self, source: str, base_dir: Path, overridden: Mapping[str, str]):
        self.source = source
        self.base_dir = base_dir
        self.overridden = overridden

    def origin(self, path: str) -> str | None:
        """The override that set `path` or a parent of it (`prompts.chat[0].role` was set
        by `prompts.chat=...`), else None."""
        for key, item in self.overridden.items():
            if path == key or path.startswith((key + ".", key + "[")):
                return item
        return None

    def fail(self, path: str, msg: str):
        where = f"{self.source}: " if self.source else ""
        ov = self.origin(path)
        origin = f" (from override {ov!r})" if ov is not None else ""
        raise ConfigError(f"{where}{path}{origin}: {msg}")

    def bad(self, path: str, value: Any, allowed: str):
        self.fail(path, f"{value!r} is not allowed; expected {allowed}")

    def resolve(self, path: str, value: str) -> Path:
        p = Path(value).expanduser()
        if p.is_absolute():
            return p
        base = Path.cwd() if self.origin(path) is not None else self.base_dir
        return (base / p).resolve()


def _keys(ctx: _Ctx, value: Any, path: str, allowed: Sequence[str]) -> dict:
    if not isinstance(value, Mapping):
        ctx.bad(path or "config", value, f"a mapping with keys {', '.join(allowed)}")
    for k in value:
        if k not in allowed:
            full = f"{path}.{k}" if path else str(k)
            hint = difflib.get_close_matches(str(k), allowed, n=1)
            did = f" (did you mean {hint[0]!r}?)" if hint else ""
            under = f"under {path!r}" if path else "at the top level"
            where = f"{ctx.source}: " if ctx.source else ""
            raise ConfigError(
                f"{where}unknown key {full!r}{did}; allowed keys {under}: {', '.join(allowed)}"
            )
    return dict(value)


def _int(ctx: _Ctx, v: Any, path: str, lo: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        ctx.bad(path, v, "an integer" + (f" >= {lo}" if lo is not None else ""))
    if lo is not None and v < lo:
        ctx.bad(path, v, f"an integer >= {lo}")
    return v


def _float(ctx: _Ctx, v: Any, path: str, lo: float, hi: float, lo_open: bool, hi_open: bool):
    rng = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        ctx.bad(path, v, f"a number in {rng}")
    if v < lo or v > hi or (lo_open and v == lo) or (hi_open and v == hi):
        ctx.bad(path, v, f"a number in {rng}")
    return float(v)


def _bool(ctx: _Ctx, v: Any, path: str) -> bool:
    if not isinstance(v, bool):
        ctx.bad(path, v, "true or false")
    return v


def _choice(ctx: _Ctx, v: Any, path: str, choices: Sequence[str]) -> str:
    if v not in choices:
        ctx.bad(path, v, "one of " + ", ".join(choices))
    return v


def _str(ctx: _Ctx, v: Any, path: str) -> str:
    if not isinstance(v, str) or not v:
        ctx.bad(path, v, "a non-empty string")
    return v


def _list(ctx: _Ctx, v: Any, path: str, what: str) -> list:
    if not isinstance(v, list | tuple):
        ctx.bad(path, v, f"a list of {what}")
    return list(v)


def _model(ctx: _Ctx, v: Any) -> str:
    from .builtin import BUILTIN_PREFIX, BUILTINS

    v = _str(ctx, v, "model")
    if v.startswith(BUILTIN_PREFIX):
        if v[len(BUILTIN_PREFIX) :] not in BUILTINS:
            ctx.bad(
                "model",
                v,
                "a GGUF path or one of " + ", ".join(BUILTIN_PREFIX + n for n in BUILTINS),
            )
        return v
    return str(ctx.resolve("model", v))


def _sampler(ctx: _Ctx, v: Any) -> SamplerConfig:
    d = _keys(ctx, {} if v is None else v, "sampler", _SAMPLER_KEYS)
    s = SamplerConfig()
    kw: dict[str, Any] = {}
    kw["kind"] = _choice(ctx, d.get("kind", s.kind), "sampler.kind", SAMPLER_KINDS)
    t = d.get("temperature", s.temperature)
    kw["temperature"] = _float(ctx, t, "sampler.temperature", 0.0, math.inf, True, True)
    kw["top_k"] = _int(ctx, d.get("top_k", s.top_k), "sampler.top_k", 1)
    kw["top_p"] = _float(ctx, d.get("top_p", s.top_p), "sampler.top_p", 0.0, 1.0, True, False)
    kw["min_p"] = _float(ctx, d.get("min_p", s.min_p), "sampler.min_p", 0.0, 1.0, False, True)
    return SamplerConfig(**kw)


def _buckets(ctx: _Ctx, v: Any, max_len: int) -> tuple[int, ...] | BucketRule:
    path = "prefill_buckets"
    if isinstance(v, list | tuple):
        if not v:
            ctx.bad(path, v, "a non-empty list of increasing lengths, or {min, max, step}")
        sizes = tuple(_int(ctx, x, f"{path}[{i}]", 1) for i, x in enumerate(v))
        if any(a >= b for a, b in pairwise(sizes)):
            ctx.bad(path, list(v), "strictly increasing lengths")
        if sizes[-1] > max_len:
            ctx.bad(path, list(v), f"lengths <= max_len ({max_len})")
        return sizes
    if not isinstance(v, Mapping):
        ctx.bad(path, v, "a list of lengths or a rule {min: 64, max: null, step: null}")
    d = _keys(ctx, v, path, _BUCKET_KEYS)
    lo = _int(ctx, d.get("min", BucketRule.min), f"{path}.min", 1)
    hi = d.get("max")
    if hi is not None:
        hi = _int(ctx, hi, f"{path}.max", lo)
    step = d.get("step")
    if step is not None:
        step = _int(ctx, step, f"{path}.step", 1)
    elif lo & (lo - 1):
        ctx.bad(f"{path}.min", lo, "a power of two (the rule doubles it), or set `step`")
    return BucketRule(min=lo, max=hi, step=step)


def _prompts(ctx: _Ctx, v: Any) -> PromptsConfig | None:
    if v is None:
        return None
    d = _keys(ctx, v, "prompts", _PROMPT_KEYS)
    given = [k for k in PROMPT_SOURCES if d.get(k) is not None]
    if len(given) != 1:
        got = " and ".join(f"prompts.{k}" for k in given) if given else "none"
        ctx.fail(
            "prompts", f"set exactly one of prompts.text, prompts.file, prompts.chat (got {got})"
        )
    split = d.get("split")
    if split is not None and "file" not in given:
        ctx.fail("prompts.split", "only applies to prompts.file")
    kind = given[0]
    if kind == "text":
        text = d["text"]
        items = [text] if isinstance(text, str) else _list(ctx, text, "prompts.text", "strings")
        if not items:
            ctx.bad("prompts.text", text, "at least one prompt")
        for i, s in enumerate(items):
            if not isinstance(s, str):
                ctx.bad(f"prompts.text[{i}]", s, "a string")
        return PromptsConfig(text=tuple(items))
    if kind == "file":
        f = ctx.resolve("prompts.file", _str(ctx, d["file"], "prompts.file"))
        sp = _choice(ctx, "blocks" if split is None else split, "prompts.split", SPLITS)
        return PromptsConfig(file=f, split=sp)
    convs = _list(ctx, d["chat"], "prompts.chat", "conversations (lists of messages)")
    if not convs:
        ctx.bad("prompts.chat", d["chat"], "at least one conversation")
    out = []
    for i, conv in enumerate(convs):
        p = f"prompts.chat[{i}]"
        msgs = _list(ctx, conv, p, "messages {role, content}")
        if not msgs:
            ctx.bad(p, conv, "at least one message")
        conv_out = []
        for j, m in enumerate(msgs):
            mp = f"{p}[{j}]"
            md = _keys(ctx, m, mp, _MESSAGE_KEYS)
            for k in _MESSAGE_KEYS:
                if k not in md:
                    ctx.fail(mp, f"missing key {k!r}; a message has keys role, content")
            role = _choice(ctx, md["role"], f"{mp}.role", ROLES)
            if not isinstance(md["content"], str):
                ctx.bad(f"{mp}.content", md["content"], "a string")
            conv_out.append(Message(role, md["content"]))
        out.append(tuple(conv_out))
    return PromptsConfig(chat=tuple(out))


def _stop_tokens(ctx: _Ctx, v: Any) -> tuple[int | str, ...] | None:
    if v is None:
        return None
    items = _list(ctx, v, "stop_tokens", "token ids or token strings (or null for the default)")
    out: list[int | str] = []
    for i, x in enumerate(items):
        if isinstance(x, str) and x:
            out.append(x)
        else:
            out.append(_int(ctx, x, f"stop_tokens[{i}]", 0))
    return tuple(out)


def _mesh(ctx: _Ctx, v: Any) -> MeshConfig | None:
    if v is None:
        return None
    d = _keys(ctx, v, "mesh", _MESH_KEYS)
    return MeshConfig(**{k: _int(ctx, d.get(k, 1), f"mesh.{k}", 1) for k in _MESH_KEYS})


def _build(ctx: _Ctx, raw: Any) -> RunConfig:
    d = _keys(ctx, raw, "", _TOP_KEYS)
    if d.get("model") is None:
        ctx.fail("model", "required: a GGUF path or builtin:tiny")
    dflt = RunConfig(model="")
    max_len = _int(ctx, d.get("max_len", dflt.max_len), "max_len", 2)
    max_new = _int(ctx, d.get("max_new_tokens", dflt.max_new_tokens), "max_new_tokens", 1)
    if max_new >= max_len:
        ctx.bad(
            "max_new_tokens", max_new, f"fewer than max_len ({max_len}) to leave room for a prompt"
        )
    desc = d.get("description")
    if desc is not None and not isinstance(desc, str):
        ctx.bad("description", desc, "a string")
    output = d.get("output")
    cfg = RunConfig(
        model=_model(ctx, d["model"]),
        description=desc,
        dtype=_choice(ctx, d.get("dtype", dflt.dtype), "dtype", DTYPES),
        max_len=max_len,
        prefill_buckets=dflt.prefill_buckets
        if d.get("prefill_buckets") is None
        else _buckets(ctx, d["prefill_buckets"], max_len),
        sampler=_sampler(ctx, d.get("sampler")),
        seed=_int(ctx, d.get("seed", dflt.seed), "seed", 0),
        max_new_tokens=max_new,
        prompts=_prompts(ctx, d.get("prompts")),
        chat_template=_bool(ctx, d.get("chat_template", dflt.chat_template), "chat_template"),
        batch_size=_int(ctx, d.get("batch_size", dflt.batch_size), "batch_size", 1),
        output=None if output is None else ctx.resolve("output", _str(ctx, output, "output")),
        stop_tokens=_stop_tokens(ctx, d.get("stop_tokens")),
        mesh=_mesh(ctx, d.get("mesh")),
    )
    if cfg.prompts is not None and cfg.prompts.chat is not None and not cfg.chat_template:
        ctx.fail("chat_template", "prompts.chat needs chat_template: true")
    return cfg


def parse_override(item: str) -> tuple[str, Any]:
    """`"sampler.top_p=0.9"` -> `("sampler.top_p", 0.9)`; the value is parsed as YAML
    (`null`, `true`, `[1, 2]`, `{min: 64}`), anything unparsable is an error."""
    import yaml

    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. sampler.kind=top_p")
    try:
        return key, yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: the value is not valid YAML ({e})") from None


def _apply_overrides(raw: dict, overrides: Sequence[str]) -> dict[str, str]:
    """Set each override in `raw` (in place); returns {dotted key: override text}."""
    done: dict[str, str] = {}
    for item in overrides:
        key, value = parse_override(item)
        parts = key.split(".")
        node = raw
        for i, part in enumerate(parts[:-1]):
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            elif not isinstance(nxt, dict):
                prefix = ".".join(parts[: i + 1])
                raise ConfigError(
                    f"override {item!r}: {prefix!r} is {nxt!r} in the config, not a mapping; "
                    f"set it as a whole ({prefix}=...)"
                )
            node = nxt
        node[parts[-1]] = value
        # A prompt source given on the command line replaces the file's source rather than
        # clashing with it (`prompts.text=[...]` on a preset that uses prompts.file).
        if len(parts) == 2 and parts[0] == "prompts" and parts[1] in PROMPT_SOURCES:
            if value is not None:
                for other in PROMPT_SOURCES:
                    if other != parts[1] and f"prompts.{other}" not in done:
                        node.pop(other, None)
                if parts[1] != "file" and "prompts.split" not in done:
                    node.pop("split", None)
        done[key] = item
    return done


def run_config_from_dict(
    data: Mapping[str, Any],
    *,
    base_dir: str | os.PathLike | None = None,
    source: str = "",
    overrides: Sequence[str] = (),
) -> RunConfig:
    """Validate a parsed config. Relative paths resolve against `base_dir` (default: the
    working directory); `source` prefixes error messages."""
    import copy

    raw = copy.deepcopy(dict(data)) if isinstance(data, Mapping) else data
    overridden = _apply_overrides(raw, overrides) if isinstance(raw, dict) else {}
    ctx = _Ctx(source, Path(base_dir) if base_dir is not None else Path.cwd(), overridden)
    return _build(ctx, raw)


def load_run_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> RunConfig:
    """Read, override and validate a YAML run config (see the module docstring)."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"run config {str(path)!r} does not exist") from None
    except OSError as e:
        raise ConfigError(f"run config {str(path)!r}: {e}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {data!r}")
    return run_config_from_dict(
        data, base_dir=path.resolve().parent, source=str(path), overrides=overrides
    )


__all__ = [
    "DTYPES",
    "SAMPLER_KINDS",
    "BucketRule",
    "MeshConfig",
    "Message",
    "PromptsConfig",
    "RunConfig",
    "SamplerConfig",
    "load_run_config",
    "parse_override",
    "run_config_from_dict",
    "split_prompts",
]
