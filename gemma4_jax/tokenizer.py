"""Gemma 4 tokenizer rebuilt from GGUF metadata with the `tokenizers` library.

A Gemma 4 GGUF carries the whole tokenizer as `tokenizer.ggml.*` metadata (`model = "gemma4"`,
`tokens`, `token_type`, `merges`, special ids, `add_bos_token`...). This module turns those
fields into a `tokenizers.Tokenizer` configured exactly like the `tokenizer.json` that
transformers ships for Gemma (checked against it in `tests/test_tokenizer.py`):

* normalizer: every `" "` becomes U+2581 (`▁`); a `▁` is prepended only when
  `tokenizer.ggml.add_space_prefix` is true (Gemma 4 files say false),
* pre-tokenizer: `Split(" ", merged_with_previous)`. After the normalizer there are no spaces
  left, so the whole text is one BPE "word"; it is kept because it is what the reference has,
* model: BPE with merges by rank, `<0xNN>` byte fallback for characters the vocab lacks,
* added tokens: CONTROL / UNKNOWN / USER_DEFINED tokens (`<bos>`, `<|turn>`, `<|channel>`...)
  are matched whole in the raw text before BPE, so a chat template's markers stay one id.
  Byte tokens are not: the text `<0x41>` is seven characters, not the byte `A`,
* decoder: `▁` back to space, byte fallback, fuse.

BOS/EOS are added by `encode` itself (not by a post-processor) so `add_bos=` can override the
file's `add_bos_token` either way. Where transformers and llama.cpp disagree, transformers wins.

Streaming: `Tokenizer.stream()` returns an `IncrementalDecoder` that turns ids into text one id
at a time and holds back an incomplete UTF-8 sequence spelled in byte-fallback tokens until the
character is complete, so no piece ever ends in half a character.
"""

from __future__ import annotations

import codecs
import errno
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from os import PathLike
from typing import Any

import gguf
import numpy as np
from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as _Backend

from gemma4_jax.errors import GGUFError, InputError
from gemma4_jax.gguf_file import read_gguf

__all__ = ["IncrementalDecoder", "Tokenizer", "read_tokenizer_fields"]

_K = "tokenizer.ggml."
KEY_MODEL = _K + "model"
KEY_TOKENS = _K + "tokens"
KEY_TOKEN_TYPE = _K + "token_type"
KEY_MERGES = _K + "merges"
KEY_BOS = _K + "bos_token_id"
KEY_EOS = _K + "eos_token_id"
KEY_PAD = _K + "padding_token_id"
KEY_UNK = _K + "unknown_token_id"
KEY_EOT = _K + "eot_token_id"
KEY_ADD_BOS = _K + "add_bos_token"
KEY_ADD_EOS = _K + "add_eos_token"
KEY_ADD_SPACE_PREFIX = _K + "add_space_prefix"
KEY_CHAT_TEMPLATE = "tokenizer.chat_template"

# `llama` is the tokenizer model string of SentencePiece GGUFs (Gemma 1-3); it is accepted
# when the file also carries merges, which makes it the same BPE as `gemma4`.
SUPPORTED_MODELS = ("gemma4", "llama")
SPACE = "\u2581"  # SentencePiece's visible space
TURN_END = "<turn|>"  # Gemma 4 ends every chat turn with it: generation stops there too

_NORMAL = int(gguf.TokenType.NORMAL)
_UNKNOWN = int(gguf.TokenType.UNKNOWN)
_CONTROL = int(gguf.TokenType.CONTROL)
_USER_DEFINED = int(gguf.TokenType.USER_DEFINED)
_UNUSED = int(gguf.TokenType.UNUSED)
_BYTE = int(gguf.TokenType.BYTE)
_VALID_TYPES = {_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE}

# The same test as the `ByteFallback` decoder of `tokenizers`: any token spelled `<0xNN>`.
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def read_tokenizer_fields(path: str | PathLike[str]) -> dict[str, Any]:
    """Read the `tokenizer.*` (and `general.architecture`) metadata of a GGUF as python values.

    String arrays come back as `list[str]` (decoded from UTF-8), numeric arrays as lists,
    scalars as `int` / `float` / `bool` / `str`. A missing file raises `FileNotFoundError`;
    a broken one `GGUFError` (from `read_gguf`, which names the file).
    """
    # A missing file stays a FileNotFoundError, as it was with GGUFReader (callers catch it).
    if not os.path.exists(path):
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(path))
    fields = read_gguf(path).fields
    return {
        key: value
        for key, value in fields.items()
        if key.startswith("tokenizer.") or key == "general.architecture"
    }


class Tokenizer:
    """Gemma 4 tokenizer: text <-> token ids, built from GGUF metadata.

    Build with `Tokenizer.from_gguf(path)` or `Tokenizer.from_gguf_fields(fields)`.
    The underlying `tokenizers.Tokenizer` is `backend` (`backend.to_str()` gives a
    `tokenizer.json` equivalent to the one transformers ships).
    """

    def __init__(
        self,
        backend: _Backend,
        *,
        tokens: Sequence[str],
        special_ids: frozenset[int],
        bos_id: int | None,
        eos_id: int,
        pad_id: int | None,
        eot_id: int | None = None,
        add_bos: bool,
        add_eos: bool = False,
        add_space_prefix: bool = False,
        chat_template: str | None = None,
    ):
        self._backend = backend
        self._tokens = tuple(tokens)
        self._special_ids = special_ids
        self._bos_id = bos_id
        self._eos_id = eos_id
        self._pad_id = pad_id
        self._add_bos = add_bos
        self._add_eos = add_eos
        self._add_space_prefix = add_space_prefix
        self._chat_template = chat_template
        stops = [eos_id]
        turn_end = backend.token_to_id(TURN_END)
        for extra in (eot_id, turn_end):
            if extra is not None and extra not in stops:
                stops.append(extra)
        self._stop_ids = tuple(stops)
        self._piece_bytes: tuple[bytes, ...] | None = None  # built on first stream()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_gguf(cls, path: str | PathLike[str]) -> Tokenizer:
        """Build from the metadata of a GGUF file (only the metadata is read)."""
        fields = read_tokenizer_fields(path)
        try:
            return cls.from_gguf_fields(fields)
        except GGUFError as e:
            raise GGUFError(f"{path}: {e}") from e

    @classmethod
    def from_gguf_fields(cls, fields: Mapping[str, Any]) -> Tokenizer:
        """Build from a dict of GGUF metadata key -> python value (`tokenizer.ggml.*`)."""
        model = _get(fields, KEY_MODEL, str)
        if model not in SUPPORTED_MODELS:
            raise GGUFError(
                f"{KEY_MODEL}={model!r} is not supported: expected one of {SUPPORTED_MODELS} "
                "(SentencePiece-style BPE with merges)"
            )
        tokens = _get_list(fields, KEY_TOKENS, str)
        if not tokens:
            raise GGUFError(f"{KEY_TOKENS} is empty")
        n = len(tokens)
        types = _get_list(fields, KEY_TOKEN_TYPE, int)
        if len(types) != n:
            raise GGUFError(f"{KEY_TOKEN_TYPE} has {len(types)} entries but {KEY_TOKENS} has {n}")
        bad = next((t for t in types if t not in _VALID_TYPES), None)
        if bad is not None:
            raise GGUFError(f"{KEY_TOKEN_TYPE} holds unknown token type {bad}")
        if KEY_MERGES not in fields:
            raise GGUFError(
                f"missing key {KEY_MERGES!r}: BPE merges are required (deriving them from "
                "SentencePiece scores is not supported)"
            )
        merges = [_split_merge(m) for m in _get_list(fields, KEY_MERGES, str)]

        vocab: dict[str, int] = {}
        for i, tok in enumerate(tokens):
            if tok in vocab:
                raise GGUFError(f"{KEY_TOKENS} lists {tok!r} twice (ids {vocab[tok]} and {i})")
            vocab[tok] = i

        def special_id(key: str, fallback: str | None) -> int | None:
            if key in fields:
                i = _get(fields, key, int)
                if not 0 <= i < n:
                    raise GGUFError(f"{key}={i} is outside the vocabulary (size {n})")
                return i
            return vocab.get(fallback) if fallback is not None else None

        bos_id = special_id(KEY_BOS, "<bos>")
        eos_id = special_id(KEY_EOS, "<eos>")
        if eos_id is None:
            raise GGUFError(f"missing key {KEY_EOS!r} and no <eos> token in {KEY_TOKENS}")
        pad_id = special_id(KEY_PAD, None)
        unk_id = special_id(KEY_UNK, "<unk>")
        eot_id = special_id(KEY_EOT, None)
        add_bos = _get(fields, KEY_ADD_BOS, bool, default=True)
        add_eos = _get(fields, KEY_ADD_EOS, bool, default=False)
        if add_bos and bos_id is None:
            raise GGUFError(f"{KEY_ADD_BOS} is true but {KEY_BOS!r} is missing")
        # llama.cpp's default: SentencePiece (`llama`) files prefix a space, `gemma4` does not.
        add_space_prefix = _get(fields, KEY_ADD_SPACE_PREFIX, bool, default=model == "llama")
        chat_template = _get(fields, KEY_CHAT_TEMPLATE, str, default=None)

        try:
            bpe = models.BPE(
                vocab=vocab,
                merges=merges,
                unk_token=tokens[unk_id] if unk_id is not None else None,
                fuse_unk=True,
                byte_fallback=True,
            )
        except Exception as e:  # tokenizers raises its own exception types
            raise GGUFError(f"{KEY_MERGES}: cannot build the BPE model: {e}") from e
        backend = _Backend(bpe)
        if add_space_prefix:
            backend.normalizer = normalizers.Sequence(
                [normalizers.Prepend(SPACE), normalizers.Replace(" ", SPACE)]
            )
        else:
            backend.normalizer = normalizers.Replace(" ", SPACE)
        backend.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")
        steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
        if add_space_prefix:
            steps.append(decoders.Strip(" ", 1, 0))
        backend.decoder = decoders.Sequence(steps)
        if add_bos or add_eos:
            # Mirrors transformers' tokenizer.json; `encode` adds BOS/EOS itself (see there).
            used = [i for i, on in ((bos_id, add_bos), (eos_id, add_eos)) if on and i is not None]
            specials = [(tokens[i], i) for i in used]
            bos = f"{tokens[bos_id]} " if add_bos and bos_id is not None else ""
            eos = f" {tokens[eos_id]}" if add_eos else ""
            backend.post_processor = processors.TemplateProcessing(
                single=f"{bos}$A{eos}", pair=f"{bos}$A{eos} $B:1{eos}", special_tokens=specials
            )

        added, special_ids = [], set()
        for i, (tok, ty) in enumerate(zip(tokens, types, strict=True)):
            if ty not in (_CONTROL, _UNKNOWN, _USER_DEFINED):
                continue
            # The converter marks Gemma 4's markers `<|channel>`, `<|tool_call>`, `<|"|>`...
            # USER_DEFINED on purpose, yet transformers treats them as special (dropped by
            # skip_special). USER_DEFINED can also hold plain user words, which are not: only
            # tokens spelled like markers (`<|...` or `...|>`) count as special here.
            special = ty != _USER_DEFINED or _looks_like_control(tok)
            if special:
                special_ids.add(i)
            added.append(AddedToken(tok, special=special, normalized=False))
        if added:
            backend.add_tokens(added)
        if backend.get_vocab_size(with_added_tokens=True) != n:
            raise GGUFError(f"{KEY_TOKENS}: added tokens changed the vocabulary size")

        return cls(
            backend,
            tokens=tokens,
            special_ids=frozenset(special_ids),
            bos_id=bos_id,
            eos_id=eos_id,
            pad_id=pad_id,
            eot_id=eot_id,
            add_bos=add_bos,
            add_eos=add_eos,
            add_space_prefix=add_space_prefix,
            chat_template=chat_template,
        )

    # ------------------------------------------------------------------ properties
    @property
    def backend(self) -> _Backend:
        """The underlying `tokenizers.Tokenizer` (do not mutate it)."""
        return self._backend

    @property
    def bos_id(self) -> int | None:
        return self._bos_id

    @property
    def eos_id(self) -> int:
        return self._eos_id

    @property
    def pad_id(self) -> int | None:
        return self._pad_id

    @property
    def vocab_size(self) -> int:
        return len(self._tokens)

    @property
    def add_bos(self) -> bool:
        """The file's `add_bos_token`: whether `encode` prepends BOS by default."""
        return self._add_bos

    @property
    def chat_template(self) -> str | None:
        return self._chat_template

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Ids that end generation: EOS, then EOT (if the file names one) and `<turn|>`."""
        return self._stop_ids

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids that `decode(..., skip_special=True)` drops."""
        return self._special_ids

    # ------------------------------------------------------------------ lookups
    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str:
        self._check_ids((token_id,))
        return self._tokens[token_id]

    # ------------------------------------------------------------------ encode / decode
    def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`. `add_bos=None` follows the file's `add_bos_token`.

        Special tokens written in the text (`<bos>`, `<|turn>`...) become their single id.
        """
        ids = self._backend.encode(text, add_special_tokens=False).ids
        if self._add_bos if add_bos is None else add_bos:
            if self._bos_id is None:
                raise InputError("add_bos=True but this tokenizer has no BOS token")
            ids.insert(0, self._bos_id)
        if self._add_eos:
            ids.append(self._eos_id)
        return ids

    def decode(self, ids: Iterable[int], *, skip_special: bool = False) -> str:
        """Text of `ids`; `skip_special` drops control tokens (BOS, `<|turn>`...)."""
        ids = [int(i) for i in ids]
        self._check_ids(ids)
        return self._backend.decode(ids, skip_special_tokens=skip_special)

    def stream(self, *, skip_special: bool = False) -> IncrementalDecoder:
        """A fresh `IncrementalDecoder` for one generated sequence."""
        return IncrementalDecoder(self, skip_special=skip_special)

    def _check_ids(self, ids: Iterable[int]) -> None:
        n = len(self._tokens)
        for i in ids:
            if not 0 <= i < n:
                raise InputError(f"token id {i} is outside the vocabulary (size {n})")

    def _pieces(self) -> tuple[bytes, ...]:
        """The UTF-8 bytes each id contributes to the decoded text (same rules as `decode`)."""
        if self._piece_bytes is None:
            pieces = []
            for tok in self._tokens:
                m = _BYTE_TOKEN.fullmatch(tok)
                if m is not None:
                    pieces.append(bytes([int(m.group(1), 16)]))
                else:
                    pieces.append(tok.replace(SPACE, " ").encode("utf-8"))
            self._piece_bytes = tuple(pieces)
        return self._piece_bytes

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, bos_id={self._bos_id}, "
            f"eos_id={self._eos_id}, stop_ids={self._stop_ids})"
        )


class IncrementalDecoder:
    """Turns a stream of ids into text pieces that never end in half a UTF-8 character.

    `push(id)` returns the text that became final with this id (often `""` while a character
    spelled in `<0xNN>` byte tokens is incomplete); `flush()` returns what is still held at the
    end of the stream. For valid UTF-8 the concatenated pieces equal `Tokenizer.decode` of all
    ids. Invalid bytes become one U+FFFD each; `decode` (the `tokenizers` ByteFallback
    decoder) instead replaces every byte of a run of byte tokens that contains an invalid one.
    """

    def __init__(self, tokenizer: Tokenizer, *, skip_special: bool = False):
        self._tok = tokenizer
        self._pieces = tokenizer._pieces()
        self._skip = tokenizer.special_ids if skip_special else frozenset()
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        # With a space prefix the decoder strips the first leading space of the whole text.
        self._strip_first_space = tokenizer._add_space_prefix
        self._started = False

    def push(self, token_id: int) -> str:
        token_id = int(token_id)
        self._tok._check_ids((token_id,))
        if token_id in self._skip:
            return ""
        return self._emit(self._utf8.decode(self._pieces[token_id]))

    def extend(self, ids: Iterable[int]) -> str:
        """Push several ids; returns their pieces joined."""
        return "".join(self.push(i) for i in ids)

    def flush(self) -> str:
        """End of stream: an incomplete trailing byte sequence comes out as U+FFFD."""
        return self._emit(self._utf8.decode(b"", final=True))

    def reset(self) -> None:
        self._utf8.reset()
        self._started = False

    __call__ = push

    def _emit(self, text: str) -> str:
        if text and not self._started:
            self._started = True
            if self._strip_first_space and text.startswith(" "):
                text = text[1:]
        return text


def _looks_like_control(token: str) -> bool:
    return token.startswith("<|") or token.endswith("|>")


def _split_merge(merge: str) -> tuple[str, str]:
    # Tokens never contain a plain space (spaces are spelled U+2581), so one space separates
    # the pair.
    parts = merge.split(" ")
    if len(parts) != 2 or not all(parts):
        raise GGUFError(f"{KEY_MERGES} entry {merge!r} is not two tokens separated by a space")
    return parts[0], parts[1]


_MISSING = object()


def _coerce(value: Any, kind: type) -> Any:
    """`value` as `kind`, or `_MISSING` when it is not one (bools are not ints here)."""
    if kind is int:
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
            return _MISSING
        return int(value)
    if kind is bool:
        return bool(value) if isinstance(value, (bool, np.bool_)) else _MISSING
    return value if isinstance(value, kind) else _MISSING


def _get(fields: Mapping[str, Any], key: str, kind: type, default: Any = _MISSING) -> Any:
    if key not in fields:
        if default is _MISSING:
            raise GGUFError(f"missing key {key!r}")
        return default
    value = _coerce(fields[key], kind)
    if value is _MISSING:
        got = type(fields[key]).__name__
        raise GGUFError(f"{key} must be {kind.__name__}, got {got}")
    return value


def _get_list(fields: Mapping[str, Any], key: str, kind: type) -> list[Any]:
    if key not in fields:
        raise GGUFError(f"missing key {key!r}")
    value = fields[key]
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        raise GGUFError(f"{key} must be a list of {kind.__name__}, got {type(value).__name__}")
    out = []
    for i, v in enumerate(value):
        c = _coerce(v, kind)
        if c is _MISSING:
            raise GGUFError(f"{key}[{i}] must be {kind.__name__}, got {type(v).__name__} {v!r:.40}")
        out.append(c)
    return out
