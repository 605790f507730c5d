"""Chat prompts: render a GGUF's `tokenizer.chat_template` as transformers does, and split replies.

`render_chat` reproduces `PreTrainedTokenizer.apply_chat_template(..., tokenize=False)`: the same
Jinja environment (`ImmutableSandboxedEnvironment` with `trim_blocks` and `lstrip_blocks`, the
`loopcontrols` extension, a `{% generation %}` block that just renders its body, a `tojson`
filter that does not HTML-escape, the `raise_exception` and `strftime_now` globals) and the same
variables (`messages`, `tools`, `documents`, `add_generation_prompt`, the special-token strings,
plus any extra keyword such as `enable_thinking`). Messages are passed to the template as given:
templates map `assistant` to Gemma's `model` role themselves, so both spellings work.

Gemma 4 thinks in a channel: with thinking on, a reply reads
`<|channel>thought\\n...reasoning...<channel|>the answer`. `split_thinking` separates the two
parts of a reply decoded with `skip_special=False` (the markers are special tokens).

`Conversation` keeps the message list and tells a cached engine which text to feed next.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from datetime import datetime
from functools import lru_cache
from typing import TYPE_CHECKING, Any, NamedTuple

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from gemma4_jax.errors import InputError

if TYPE_CHECKING:
    from gemma4_jax.tokenizer import Tokenizer

__all__ = [
    "ROLES",
    "Conversation",
    "PromptUpdate",
    "compile_template",
    "render_chat",
    "split_thinking",
]

# `assistant` is the transformers spelling of Gemma's `model`; `tool` carries tool results.
ROLES = ("system", "user", "model", "assistant", "tool")

CHANNEL_OPEN = "<|channel>"
THOUGHT_OPEN = CHANNEL_OPEN + "thought"
CHANNEL_CLOSE = "<channel|>"
TURN_END = "<turn|>"


# ---------------------------------------------------------------------------- rendering
class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: transformers uses it to find assistant tokens
    for training masks; for rendering it is a no-op, but templates using it must still parse."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        call = self.call_method("_render_body")
        return jinja2.nodes.CallBlock(call, [], [], body).set_lineno(lineno)

    def _render_body(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own `tojson` HTML-escapes `<`, `>`, `&` and `'`, which would change the prompt.
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def compile_template(template: str) -> jinja2.Template:
    """Compile a chat template in transformers' sandboxed environment (cached per string)."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationBlock, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(template)


def render_chat(
    template: str | None,
    messages: Iterable[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = True,
    enable_thinking: bool = False,
    bos_token: str = "<bos>",
    eos_token: str = "<eos>",
    **extra: Any,
) -> str:
    """Render `messages` (`{"role": ..., "content": ...}` dicts) with a Jinja chat template.

    Equals transformers' `apply_chat_template(messages, tokenize=False,
    add_generation_prompt=..., enable_thinking=...)` for a tokenizer whose special tokens are
    `bos_token` / `eos_token`. `extra` becomes template variables too (`tools=[...]`,
    `documents=[...]`, `pad_token=...`...). The result already holds `bos_token` when the
    template writes it (Gemma's does): encode it with `add_bos=False`.
    """
    if not template:
        raise InputError("no chat template: this GGUF has no tokenizer.chat_template")
    msgs = _check_messages(messages)
    variables: dict[str, Any] = {"tools": None, "documents": None}
    variables.update(extra)
    variables.update(
        messages=msgs,
        add_generation_prompt=add_generation_prompt,
        enable_thinking=enable_thinking,
        bos_token=bos_token,
        eos_token=eos_token,
    )
    return compile_template(template).render(**variables)


def _check_messages(messages: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m:
            raise InputError(f"messages[{i}] must be a mapping with a 'role', got {m!r:.60}")
        if m["role"] not in ROLES:
            raise InputError(f"messages[{i}] has role {m['role']!r}; expected one of {ROLES}")
        out.append(dict(m))
    return out


# ---------------------------------------------------------------------------- replies
# The channel name must be exactly `thought` (then a newline or the close); a missing close
# means the block runs to the end of the text.
_THOUGHT_BLOCK = re.compile(
    re.escape(THOUGHT_OPEN) + r"(?=\s|<|\Z)(.*?)(?:" + re.escape(CHANNEL_CLOSE) + r"|\Z)", re.S
)


def split_thinking(text: str) -> tuple[str | None, str]:
    """Split a decoded reply into `(thinking, answer)`.

    * `<|channel>thought\\n R <channel|> A` -> `(R, A)` (several thought blocks are joined with a
      blank line; text around them forms the answer),
    * `R <channel|> A` with no opener -> `(R, A)`: the opener was in the prompt (a template
      that pre-fills the thought channel),
    * an unterminated `<|channel>thought\\n R` (still streaming, or cut off) -> `(R, text
      before it)`,
    * anything else, including only other channel names, -> `(None, text)` unchanged.

    Thinking and answer are stripped of surrounding whitespace. The markers are special
    tokens: decode the reply with `skip_special=False`.
    """
    if CHANNEL_OPEN not in text:
        close = text.find(CHANNEL_CLOSE)
        if close < 0:
            return None, text
        return text[:close].strip(), text[close + len(CHANNEL_CLOSE) :].strip()
    thoughts, answer, pos = [], [], 0
    for m in _THOUGHT_BLOCK.finditer(text):
        answer.append(text[pos : m.start()])
        thoughts.append(m.group(1).strip())
        pos = m.end()
    if not thoughts:  # only other channels: a format we do not know
        return None, text
    answer.append(text[pos:])
    return "\n\n".join(thoughts), "".join(answer).strip()


# ---------------------------------------------------------------------------- conversation
class PromptUpdate(NamedTuple):
    """What to feed the model next. `reset=False`: append `text` to what it has already seen.
    `reset=True`: the template re-rendered earlier turns differently (e.g. it dropped an old
    turn's thinking), so `text` is the whole prompt and the cache must start over."""

    text: str
    reset: bool


class Conversation:
    """A chat history rendered with one template, fed to a cached engine turn by turn.

    >>> conv = Conversation.from_tokenizer(tok)
    >>> conv.add_user("Hi")
    >>> conv.next_prompt()            # full first prompt
    >>> conv.add_model(reply, fed=True)  # `reply` is exactly the text the engine generated
    >>> conv.add_user("And then?")
    >>> conv.next_prompt()            # only the new tail: end of the reply's turn, next turn

    `next_prompt` renders the whole history and returns the part after what the model has
    already seen. Encoding that tail on its own matches encoding the whole prompt when the
    boundary falls on a special token (`<turn|>`, `<|turn>`), as it does with Gemma templates.
    """

    def __init__(
        self,
        template: str | None,
        *,
        system: str | None = None,
        enable_thinking: bool = False,
        bos_token: str = "<bos>",
        eos_token: str = "<eos>",
        **extra: Any,
    ):
        if not template:
            raise InputError("no chat template: this GGUF has no tokenizer.chat_template")
        self.template = template
        self.enable_thinking = enable_thinking
        self._vars = {"bos_token": bos_token, "eos_token": eos_token, **extra}
        self._messages: list[dict[str, Any]] = []
        self._seen = ""  # text the model has consumed (prompts fed + its own replies)
        if system is not None:
            self.add_system(system)

    @classmethod
    def from_tokenizer(cls, tokenizer: Tokenizer, **kwargs: Any) -> Conversation:
        """Use the tokenizer's chat template and special-token strings."""
        tokens = {}
        for name, i in (
            ("bos_token", tokenizer.bos_id),
            ("eos_token", tokenizer.eos_id),
            ("pad_token", tokenizer.pad_id),
            ("unk_token", tokenizer.token_to_id("<unk>")),
        ):
            if i is not None:
                tokens[name] = tokenizer.id_to_token(i)
        return cls(tokenizer.chat_template, **{**tokens, **kwargs})

    @property
    def messages(self) -> list[dict[str, Any]]:
        """A copy of the history."""
        return [dict(m) for m in self._messages]

    def add(self, role: str, content: Any) -> None:
        self._messages.extend(_check_messages([{"role": role, "content": content}]))

    def add_system(self, content: str) -> None:
        self.add("system", content)

    def add_user(self, content: str) -> None:
        self.add("user", content)

    def add_model(self, reply: str, *, fed: bool = False, keep_thinking: bool = False) -> None:
        """Append the model's reply.

        `reply` is the decoded text (`skip_special=False`) the engine generated after the last
        prompt, with its thinking, and with the `<turn|>` stop token if the engine fed it back.
        `fed=True` says the engine holds exactly `reply` in its cache, so `next_prompt` will not
        send it again.
        Unless `keep_thinking`, only the answer goes into the history: Gemma 4 expects past
        turns without their reasoning.
        """
        if fed:
            self._seen += reply
        # The template writes the turn end itself; the engine may have fed the stop token.
        content = reply.removesuffix(TURN_END)
        if not keep_thinking:
            content = split_thinking(content)[1]
        self.add("model", content)

    def render(self, *, add_generation_prompt: bool = True) -> str:
        """The whole history as one prompt."""
        return render_chat(
            self.template,
            self._messages,
            add_generation_prompt=add_generation_prompt,
            enable_thinking=self.enable_thinking,
            **self._vars,
        )

    def next_prompt(self) -> PromptUpdate:
        """The text to feed now (ending with the generation prompt), and whether to reset."""
        full = self.render(add_generation_prompt=True)
        seen, self._seen = self._seen, full
        if full.startswith(seen):
            return PromptUpdate(full[len(seen) :], reset=False)
        return PromptUpdate(full, reset=True)

    def reset_cache(self) -> None:
        """Forget what the model has seen (the engine dropped its cache)."""
        self._seen = ""
