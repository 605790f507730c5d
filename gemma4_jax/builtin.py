"""Built-in random-weight Gemma 4 GGUF files (`builtin:tiny`) and a writer for any shape.

`builtin:tiny` is a real `gemma4` GGUF, written once into a cache folder, that exercises the
whole pipeline with no download: E4B's structure in miniature (5 sliding + 1 global layers,
per-layer embeddings, KV sharing over the last 6 layers, proportional RoPE on global layers),
Q8_0 matrices (quantized with `gguf.quants.quantize`, so the quantized path runs), F32 norms,
and a SentencePiece-style BPE vocabulary trained here on an embedded English text. Its weights
are random (fixed seed): the text it writes is random too. It exists for tests, examples and
CI, not for reading.

The tensor names, ggml shapes, metadata keys and tokenizer layout mirror what llama.cpp's
converter writes for real Gemma 4 checkpoints (see the fixture folders' `tensors.txt`), so
the loader cannot tell the difference. `write_gemma4_gguf` writes any `TinySpec`, including
the real E2B/E4B/31B/26B-A4B shapes in `REAL_SPECS` for benchmarks: tensors are generated and
encoded in row chunks on a thread pool and streamed to disk, so a multi-GB file needs neither
per-element Python nor the whole model in memory.

Random values follow the fixtures' recipe (HF init then perturbation): matrices and
embeddings ~ N(0, init_std) with the padding row zeroed, norm weights 1 + 0.2 N(0, 1),
`layer_output_scale` and the router scales U[0.5, 1.5], router weights N(0, router_std).
`init_std` defaults to 2/sqrt(D), which keeps the logit std near 2 (the fixtures' 0.18 at
D=128) whatever the width.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import heapq
import os
import re
import tempfile
import zlib
from collections.abc import Iterator
from functools import lru_cache
from itertools import pairwise
from pathlib import Path

import numpy as np

from .errors import ConfigError

BUILTIN_NOTICE = (
    "builtin:tiny has random weights: its text is random; it exists to exercise the pipeline"
)

# Part of every cache file name: bump it when the written bytes change for the same spec
# (a new key, a different init, a tokenizer change) so old caches are rebuilt, not reused.
FORMAT_VERSION = "1"

BUILTIN_PREFIX = "builtin:"

# The chat template of every fixture GGUF: Gemma 4 turns, roles passed through except
# "assistant" -> "model", generation prompt `<|turn>model\n`.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "<|turn>{{ role }}\n{{ message['content'] | trim }}<turn|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|turn>model\n{% endif %}"
)

# ggml token types (llama.cpp's llama_token_type / gguf.TokenType).
NORMAL, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 3, 4, 5, 6

# ids 0..16 and their token types exactly as in real Gemma 4 GGUFs (fixtures/tokenizer/
# meta.json): the converter marks the channel/tool/quote markers USER_DEFINED on purpose;
# llama.cpp still treats them as control tokens at load time.
SPECIAL_TOKENS: tuple[tuple[str, int], ...] = (
    ("<pad>", CONTROL),
    ("<eos>", CONTROL),
    ("<bos>", CONTROL),
    ("<unk>", CONTROL),
    ("<mask>", CONTROL),
    ("<|turn>", CONTROL),
    ("<turn|>", CONTROL),
    ("<|think|>", CONTROL),
    ("<|channel>", USER_DEFINED),
    ("<channel|>", USER_DEFINED),
    ("<|tool_call>", USER_DEFINED),
    ("<tool_call|>", USER_DEFINED),
    ("<|tool_response>", USER_DEFINED),
    ("<tool_response|>", USER_DEFINED),
    ('<|"|>', USER_DEFINED),
    ("<|image|>", CONTROL),
    ("<|audio|>", CONTROL),
)
PAD_ID, EOS_ID, BOS_ID, UNK_ID, MASK_ID = 0, 1, 2, 3, 4
SPACE = "\u2581"  # SentencePiece's visible space


class ModelNotFoundError(ConfigError, FileNotFoundError):
    """A model spec names a file that does not exist (catchable as either parent)."""


# --------------------------------------------------------------------------------------------
# Model shape


@dataclasses.dataclass(frozen=True)
class TinySpec:
    """The shape of a Gemma 4 text model to write. Defaults: `builtin:tiny`.

    Every field maps to GGUF metadata or tensor shapes; per-layer facts (sliding or global,
    KV heads, head dim, FFN width, KV sharing) are derived by the methods below, never stored.
    """

    name: str = "gemma4-jax builtin tiny (random weights)"
    vocab_size: int = 2048
    n_layers: int = 12
    d_model: int = 128
    n_heads: int = 4
    n_kv_heads: int = 2  # sliding layers
    n_kv_heads_global: int | None = None  # None: same as n_kv_heads
    head_dim: int = 32  # sliding layers
    head_dim_global: int = 64
    ffn: int | tuple[int, ...] = 256  # one width, or one per layer (double-wide MLPs)
    ple_dim: int = 32  # per-layer-input dim; 0 = no per-layer embeddings
    sliding_period: int = 6  # layer l is global iff (l + 1) % period == 0
    shared_kv_layers: int = 6
    window: int = 16
    context_length: int = 2048
    k_eq_v: bool = False  # global layers have no attn_v: V is the raw K projection
    n_experts: int = 0  # > 0: every layer adds an MoE branch (26B-A4B)
    n_experts_used: int = 0
    expert_ffn: int = 0
    rope_base: float = 1_000_000.0
    rope_base_swa: float = 10_000.0
    partial_rotary: float = 0.25  # fraction of global-layer frequency pairs that rotate
    eps: float = 1e-6
    softcap: float = 30.0
    tied: bool = True  # False writes a separate output.weight
    init_std: float | None = None  # None: 2 / sqrt(d_model)
    router_std: float | None = None  # None: 12 / sqrt(d_model) (the fixtures' 1.5 at D=64)

    def __post_init__(self):
        def bad(msg: str):
            raise ValueError(f"TinySpec: {msg}")

        L = self.n_layers
        for f in ("vocab_size", "n_layers", "d_model", "n_heads", "n_kv_heads", "head_dim"):
            if getattr(self, f) < 1:
                bad(f"{f}={getattr(self, f)} must be >= 1")
        if self.vocab_size < len(SPECIAL_TOKENS) + 256 + 1:
            bad(f"vocab_size={self.vocab_size} leaves no room beyond specials and byte tokens")
        if isinstance(self.ffn, tuple) and len(self.ffn) != L:
            bad(f"ffn has {len(self.ffn)} widths for {L} layers")
        pattern = self.sliding_pattern
        if pattern[-1]:
            bad(
                f"the last layer must be global: n_layers={L}, sliding_period={self.sliding_period}"
            )
        for l in range(L):
            if self.n_heads % self.kv_heads(l):
                bad(f"n_heads={self.n_heads} is not a multiple of layer {l}'s kv heads")
        s = L - self.shared_kv_layers
        if not 0 <= self.shared_kv_layers < L:
            bad(f"shared_kv_layers={self.shared_kv_layers} must be in [0, {L})")
        if self.shared_kv_layers and (s < 2 or pattern[s - 1] or not pattern[s - 2]):
            # llama.cpp reuses the cache of layer s-1 for global and s-2 for sliding layers
            # (as every released E model is built); HF takes the last of each type. Only a
            # layout where both agree is a valid test file.
            bad(
                f"with shared_kv_layers={self.shared_kv_layers} the last non-shared layer "
                f"({s - 1}) must be global and the one before it sliding"
            )
        if self.n_experts and not (0 < self.n_experts_used <= self.n_experts and self.expert_ffn):
            bad("an MoE spec needs 0 < n_experts_used <= n_experts and expert_ffn > 0")

    @property
    def sliding_pattern(self) -> tuple[bool, ...]:
        p = self.sliding_period
        return tuple((l + 1) % p != 0 for l in range(self.n_layers))

    def is_sliding(self, layer: int) -> bool:
        return self.sliding_pattern[layer]

    def kv_heads(self, layer: int) -> int:
        if self.is_sliding(layer) or self.n_kv_heads_global is None:
            return self.n_kv_heads
        return self.n_kv_heads_global

    def head_dim_of(self, layer: int) -> int:
        return self.head_dim if self.is_sliding(layer) else self.head_dim_global

    def ffn_of(self, layer: int) -> int:
        return self.ffn[layer] if isinstance(self.ffn, tuple) else self.ffn

    def has_kv(self, layer: int) -> bool:
        """False for KV-shared layers: they read another layer's cache and have no K/V."""
        return layer < self.n_layers - self.shared_kv_layers

    def has_v(self, layer: int) -> bool:
        return self.has_kv(layer) and not (self.k_eq_v and not self.is_sliding(layer))

    @property
    def std(self) -> float:
        return self.init_std if self.init_std is not None else 2.0 / self.d_model**0.5

    @property
    def router_init_std(self) -> float:
        return self.router_std if self.router_std is not None else 12.0 / self.d_model**0.5


# Small variants mirroring each fixture's structure: (spec, seed, quant). As for the fixtures,
# each seed is the first from a base whose greedy continuations (16 tokens, two prompts) are
# not a repeated token: >= 8 distinct tokens, no run longer than 3. Small tied-embedding
# models often collapse onto one token otherwise.
BUILTINS: dict[str, tuple[TinySpec, int, str]] = {
    "tiny": (TinySpec(), 1234, "Q8_0"),
    "tiny-e2b": (
        TinySpec(
            name="gemma4-jax builtin tiny-e2b (random weights)",
            n_layers=10,
            d_model=64,
            n_kv_heads=1,
            ffn=(128,) * 5 + (256,) * 5,
            ple_dim=16,  # proj rows of 16 cannot be Q8_0: F16, as llama-quantize falls back
            sliding_period=5,
            shared_kv_layers=5,
            window=8,
        ),
        2347,
        "Q8_0",
    ),
    "tiny-dense": (
        TinySpec(
            name="gemma4-jax builtin tiny-dense (random weights)",
            d_model=64,
            n_kv_heads_global=1,
            ffn=128,
            ple_dim=0,
            shared_kv_layers=0,
            k_eq_v=True,
        ),
        3456,
        "Q8_0",
    ),
    "tiny-moe": (
        TinySpec(
            name="gemma4-jax builtin tiny-moe (random weights)",
            n_layers=6,
            d_model=64,
            n_kv_heads_global=1,
            ffn=96,
            ple_dim=0,
            shared_kv_layers=0,
            k_eq_v=True,
            n_experts=8,
            n_experts_used=2,
            expert_ffn=64,
        ),
        4574,
        "Q8_0",
    ),
}

# The released shapes (docs/gemma4.md): the one table of the family's numbers (benchmarks'
# `random_model.FAMILIES` uses it too). For benchmark files, write with
# `write_gemma4_gguf(path, REAL_SPECS["e4b"], seed=0, synthesize=True)`.
_REAL = TinySpec(  # what every released model shares
    vocab_size=262144,
    head_dim=256,
    head_dim_global=512,
    sliding_period=6,
    context_length=131072,
)
_REAL_E = dataclasses.replace(_REAL, n_heads=8, ple_dim=256, window=512)  # E2B, E4B
_REAL_BIG = dataclasses.replace(  # 31B, 26B-A4B: no PLE, no KV sharing, K = V on global layers
    _REAL, ple_dim=0, shared_kv_layers=0, window=1024, context_length=262144, k_eq_v=True
)


def _real(base: TinySpec, key: str, **kw) -> TinySpec:
    return dataclasses.replace(base, name=f"gemma4-jax random {key.upper()}-shaped", **kw)


REAL_SPECS: dict[str, TinySpec] = {
    "e2b": _real(
        _REAL_E,
        "e2b",
        n_layers=35,
        d_model=1536,
        n_kv_heads=1,
        ffn=(6144,) * 15 + (12288,) * 20,  # double-wide MLP on the 20 KV-shared layers
        sliding_period=5,
        shared_kv_layers=20,
    ),
    "e4b": _real(
        _REAL_E, "e4b", n_layers=42, d_model=2560, n_kv_heads=2, ffn=10240, shared_kv_layers=18
    ),
    "31b": _real(
        _REAL_BIG,
        "31b",
        n_layers=60,
        d_model=5376,
        n_heads=32,
        n_kv_heads=16,
        n_kv_heads_global=4,
        ffn=21504,
    ),
    "26b-a4b": _real(
        _REAL_BIG,
        "26b-a4b",
        n_layers=30,
        d_model=2816,
        n_heads=16,
        n_kv_heads=8,
        n_kv_heads_global=2,
        ffn=2112,
        n_experts=128,
        n_experts_used=8,
        expert_ffn=704,
    ),
}


# --------------------------------------------------------------------------------------------
# Tokenizer: specials, 256 byte-fallback tokens, an alphabet, then BPE merges learned below.

# Written for this project and dedicated to the public domain (CC0): plain English prose,
# dialogue, numbers and punctuation, enough for ~1,800 merges.
_CORPUS = """\
The morning train left the valley station a few minutes after six. It was an old train with \
green carriages, wooden benches and windows that rattled whenever the line curved along the \
river. Most of the passengers knew one another. The baker sat near the door with two baskets \
of bread, the teacher read the newspaper from the first page to the last, and a small boy \
counted the bridges out loud until his mother asked him to stop.

Nobody was in a hurry. The train stopped at every village, even when nobody was waiting on \
the platform, because the timetable said it should and the driver believed in the timetable. \
At the third stop a farmer climbed on board with a crate of apples and offered them to anyone \
who wanted one. By the time the train reached the city, the whole carriage smelled of apples \
and warm bread.

Rivers shape the land slowly. Water finds the lowest path, carries sand and stones \
downstream, and over thousands of years it cuts deep channels through solid rock. A river \
that looks calm in summer can rise quickly after heavy rain in the mountains. People who live \
on its banks learn to read the colour of the water, the height of the reeds and the sound of \
the current at night. They build their houses on higher ground and keep a boat tied near the \
door.

To make a simple loaf of bread you need flour, water, salt and yeast. Mix the flour and the \
salt in a large bowl, add the yeast and then pour in the water a little at a time. Knead the \
dough for ten minutes until it feels smooth and elastic. Cover the bowl with a clean cloth \
and leave it in a warm place for an hour, or until the dough has doubled in size. Shape it \
gently, let it rise again, and bake it in a hot oven for about thirty five minutes. The loaf \
is ready when it sounds hollow if you tap the bottom.

The library opened at nine and closed at five, except on Thursdays, when it stayed open late \
for the evening reading group. Its shelves held more than forty thousand books, a collection \
of old maps and a room full of letters written by people who had lived in the town two \
hundred years ago. The librarian, a patient woman with silver glasses, could find almost \
anything in a few minutes. When someone asked her how she did it, she only smiled and said \
that every book has a place and every place has a reason.

On clear winter nights the sky above the hills is full of stars. Without the lights of the \
city you can see the pale band of the galaxy stretching from one side of the horizon to the \
other. The planets move slowly against the background of fixed stars, and the moon changes \
its shape from night to night. Long before there were clocks and calendars, farmers and \
sailors used these patterns to measure time, to plan the harvest and to find their way \
across the sea.

Dear Anna, thank you for your letter and for the photographs of the garden. The roses look \
wonderful, and I was glad to hear that the old pear tree finally gave fruit this year. Here \
the weather has been cold and wet, but the children do not seem to mind. They spend the \
afternoons building a small wooden boat in the shed, and they are certain it will float. I am \
less certain, but I have promised to take them to the lake next Sunday to find out. Write \
again soon and tell me how your new work is going. With love, Maria.

"Where are you going?" asked the old man.
"To the market," said the girl. "My father needs new nails for the roof."
"Then take the path by the mill. It is shorter, and the bridge was repaired last week."
"Thank you. Will you be at the market too?"
"Perhaps later. First I have to feed the goats, and they are never patient."

A good question is often more useful than a quick answer. When we learn something new, we \
begin by noticing what we do not understand. We compare the new idea with what we already \
know, we test it with small examples, and we change our minds when the evidence is strong. \
Mistakes are part of the process. A student who is afraid of being wrong will learn slowly, \
while a student who is curious will try, fail, think again and try once more.

The town held its market every Saturday in the square in front of the church. Farmers \
brought vegetables, cheese, eggs and honey, and in autumn there were mushrooms from the \
forest and pumpkins of every size. A man with a long white beard sold knives and repaired old \
tools. Children ran between the stalls, and dogs waited patiently for anything that might \
fall from a table. In the afternoon a band played music near the fountain, and people danced \
until the sun went down behind the roofs.

Machines that learn from data are built from many simple parts. Each part receives numbers, \
multiplies them by weights, adds the results and passes them on. During training the weights \
change a little at a time so that the output moves closer to the desired answer. A model with \
random weights has learned nothing at all: it can still read its input and produce an output, \
but the words it writes are a random walk through its vocabulary. Such a model is useful for \
testing the machinery, because every step of the computation still has to be correct.

The lighthouse stood on a rock at the end of the harbour wall. For more than a century its \
lamp had turned through the night, sending a beam of light across the water every twelve \
seconds. The keeper lived in a small house at its foot with his wife, three cats and a radio \
that only worked when the wind came from the west. He kept a careful log of the weather, the \
ships that passed and the birds that rested on the gallery during storms. His notes filled \
twenty seven books, and they are still kept in the harbour office.

In spring the forest wakes up slowly. The first green leaves appear on the birch trees, the \
streams are full of melted snow, and the ground is covered with small white flowers. Birds \
return from the south and begin to build their nests. Deer come to the edge of the fields in \
the early morning, and if you walk quietly you may see a fox crossing the path with something \
in its mouth. By the beginning of summer the forest is dark and cool, and the air is heavy \
with the smell of pine.

Numbers appear everywhere in daily life. A recipe asks for 250 grams of flour and 3 eggs. A \
train leaves at 7:45 and arrives at 9:10. The temperature falls from 18 degrees in the \
afternoon to 6 degrees at night. A book has 312 pages, a year has 365 days, and a leap year \
has one more. We add, subtract, multiply and divide so often that we hardly notice it, yet \
each of these small calculations once had to be learned, one step after another.

The bridge over the river was built of stone in the year 1784. Its five arches rest on heavy \
pillars that have survived floods, frost and the weight of countless carts, cars and trucks. \
Engineers who examined it recently were surprised to find it in excellent condition. The \
builders had chosen the stone carefully, shaped each block by hand and laid the foundations \
deep in the gravel of the river bed. Good work, one engineer said, does not need to be \
repeated.

When the storm arrived, the wind bent the trees and the rain fell so heavily that the road \
turned into a stream. The electricity failed just after dinner. The family lit candles, found \
a pack of cards and played games at the kitchen table while the thunder rolled over the \
house. Nobody could remember who won. What they remembered, years later, was the sound of the \
rain on the roof, the smell of the candles and the feeling of being safe together while the \
world outside was wild.

Every language has its own rhythm. Some languages put the verb at the end of the sentence, \
others at the beginning, and many allow the order to change when the speaker wants to \
emphasise something. Children learn these patterns long before they can explain them. They \
listen, imitate, invent words that do not exist and gradually discover the rules by \
themselves. Linguists spend whole careers describing what a five year old already knows \
without thinking.

The museum on the hill keeps a strange collection: clocks that no longer tick, musical \
instruments that nobody plays, and glass cases full of keys whose locks have disappeared. \
Visitors walk through the quiet rooms and read the small cards that describe each object. \
Sometimes a card says only "unknown origin", and those are the objects people look at \
longest. A mystery, it seems, is more interesting than a complete explanation.

Cycling across the country takes patience and a good map. The roads climb through vineyards \
and forests, descend into sleepy villages and follow canals where barges move more slowly \
than walkers. Each evening the travellers look for a campsite or a cheap guesthouse, repair a \
puncture, wash their clothes and plan the next stage. Their legs grow stronger every week. At \
the end of the journey they are tired, sunburnt and happy, and already talking about the next \
trip.

Software is written by people for people, even when a machine is the one that runs it. A \
clear name for a variable, a short comment that explains why a strange choice was made, and a \
test that fails loudly when something breaks: these small habits save hours of confusion \
later. The best programmers are rarely the ones who type fastest. They are the ones who read \
carefully, ask simple questions and keep their designs small enough to understand.

Grandmother kept her recipes in a tin box on the shelf above the stove. The cards were \
stained with butter and sugar, and the handwriting changed over the years from careful \
letters to quick notes that only she could read. Plum cake, onion soup, pickled cucumbers, a \
winter stew with beans and smoked sausage: each card carried the memory of a particular \
kitchen, a particular season and the people who had gathered around the table to eat.
"""


@dataclasses.dataclass(frozen=True)
class Vocab:
    """The `tokenizer.ggml.*` arrays of a GGUF."""

    tokens: tuple[str, ...]
    scores: tuple[float, ...]
    token_types: tuple[int, ...]
    merges: tuple[str, ...]  # "left right", by rank


def train_bpe(text: str, n_merges: int) -> list[tuple[str, str]]:
    """Learn up to `n_merges` BPE merges from `text`, SentencePiece style.

    Spaces become U+2581 and start a piece (`▁word`), digits stay single (as in Gemma's
    vocabulary), newlines stand alone, so no merge ever crosses a word boundary; that makes
    rank-ordered merging over a whole string (what Gemma's runtime does) give the same result
    as merging each piece. Ties break on the pair's strings, so the result is deterministic.
    Pair counts are updated incrementally (a heap with lazy deletion): ~50 ms here.
    """
    norm = text.replace(" ", SPACE)
    counts = collections.Counter(re.findall(rf"\d|\n|{SPACE}?[^{SPACE}\n\d]+|{SPACE}", norm))
    words = [list(w) for w in counts]
    freq = list(counts.values())
    pair_count: collections.Counter[tuple[str, str]] = collections.Counter()
    where: dict[tuple[str, str], set[int]] = collections.defaultdict(set)
    for i, w in enumerate(words):
        for p in pairwise(w):
            pair_count[p] += freq[i]
            where[p].add(i)
    heap = [(-c, a, b) for (a, b), c in pair_count.items()]
    heapq.heapify(heap)
    merges: list[tuple[str, str]] = []
    while heap and len(merges) < n_merges:
        neg, a, b = heapq.heappop(heap)
        if pair_count.get((a, b), 0) != -neg or neg == 0:
            continue  # stale heap entry
        merges.append((a, b))
        ab = a + b
        for i in where.pop((a, b)):
            old, f = words[i], freq[i]
            new, j = [], 0
            while j < len(old):
                if j + 1 < len(old) and old[j] == a and old[j + 1] == b:
                    new.append(ab)
                    j += 2
                else:
                    new.append(old[j])
                    j += 1
            if len(new) == len(old):
                continue
            words[i] = new
            for p in pairwise(old):
                pair_count[p] -= f
            for p in pairwise(new):
                pair_count[p] += f
                where[p].add(i)
            for p in set(pairwise(old)) | set(pairwise(new)):
                if pair_count[p] > 0:
                    heapq.heappush(heap, (-pair_count[p], *p))
        del pair_count[(a, b)]
    return merges


@lru_cache(maxsize=8)
def build_vocab(vocab_size: int) -> Vocab:
    """Specials (ids 0..16), `<0x00>`..`<0xFF>`, the alphabet, merged tokens; then
    `<unusedN>` (type UNUSED) up to `vocab_size` when the corpus has fewer merges (the real
    262144-token shapes). Scores are all -1000, as the converter writes them for Gemma 4."""
    tokens = [t for t, _ in SPECIAL_TOKENS]
    types = [k for _, k in SPECIAL_TOKENS]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [BYTE] * 256
    # Printable ASCII is always in, so plain English text never needs byte fallback.
    alphabet = set(_CORPUS.replace(" ", SPACE)) | {chr(c) for c in range(0x21, 0x7F)}
    alphabet |= {"\t", "\n", SPACE}
    tokens += sorted(alphabet)
    types += [NORMAL] * len(alphabet)
    known = set(tokens)
    merges = []
    for a, b in train_bpe(_CORPUS, max(0, vocab_size - len(tokens))):
        merges.append(f"{a} {b}")
        if a + b not in known and len(tokens) < vocab_size:
            known.add(a + b)
            tokens.append(a + b)
            types.append(NORMAL)
    n_unused = vocab_size - len(tokens)
    if n_unused < 0:
        raise ValueError(f"vocab_size={vocab_size} is smaller than the base alphabet")
    tokens += [f"<unused{i}>" for i in range(n_unused)]
    types += [UNUSED] * n_unused
    return Vocab(tuple(tokens), (-1000.0,) * len(tokens), tuple(types), tuple(merges))


# --------------------------------------------------------------------------------------------
# Tensor plan: names, numpy shapes ([..., N, K], K = ggml ne0), ggml types, init


@dataclasses.dataclass(frozen=True)
class TensorPlan:
    name: str
    shape: tuple[int, ...]  # numpy order
    ggml_type: str  # a gguf.GGMLQuantizationType name
    init: str  # "normal" | "norm" | "uniform" | "rope_freqs"
    std: float = 0.0
    zero_row0: bool = False  # embedding row of <pad>, zeroed as HF's padding_idx does


QUANTS = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_K_M", "Q5_K_M", "Q6_K")

# general.file_type (llama_ftype) of each mix.
_FILE_TYPE = {
    "F32": 0,
    "F16": 1,
    "Q4_0": 2,
    "Q8_0": 7,
    "Q4_K_M": 15,
    "Q5_K_M": 17,
    "Q6_K": 18,
    "BF16": 32,
}


def _use_more_bits(layer: int, n_layers: int) -> bool:
    # llama-quantize's rule for the layers whose attn_v / ffn_down get Q6_K in *_K_M mixes.
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


# What llama-quantize gives a tensor whose rows are too short for the K-quant it chose (its
# `convert_incompatible_tensor` fallback); F16 where even 32 does not divide the row.
_K_FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


def llama_cpp_type(name: str, layer: int | None, k: int, n_layers: int, quant: str) -> str:
    """The ggml type llama.cpp's tools would give a matrix: the converter for F32/F16/BF16,
    llama-quantize (approximated for the K mixes) for the rest. Matrices whose row length is
    not a multiple of the block fall back as llama-quantize does: a K-quant to `_K_FALLBACK`
    (26B-A4B's ffn_down, K = 2112, and ffn_down_exps, K = 704, are Q5_0 / Q8_0 in a real Q4_K_M
    file), then to F16."""
    if quant in ("F32", "F16", "BF16"):
        return "F32" if name.startswith("ffn_gate_inp") else quant
    if name in ("per_layer_model_proj", "ffn_gate_inp"):
        return "F32"  # llama-quantize leaves these as the converter wrote them
    embeds = ("token_embd", "per_layer_token_embd", "output")
    if quant == "Q8_0":
        t = "Q8_0"
    elif quant == "Q6_K" or name in embeds:
        t = "Q6_K"
    elif quant == "Q4_0":
        t = "Q4_0"
    else:  # Q4_K_M, Q5_K_M
        more = name in ("attn_v", "ffn_down", "ffn_down_exps") and layer is not None
        if more and _use_more_bits(layer, n_layers):
            t = "Q6_K"
        else:
            t = "Q4_K" if quant == "Q4_K_M" else "Q5_K"
    if t.endswith("_K") and k % 256:
        t = _K_FALLBACK[t]
    return "F16" if k % 32 else t


def tensor_plan(spec: TinySpec, quant: str = "Q8_0") -> list[TensorPlan]:
    """Every tensor of the file, in the converter's order (globals, blocks, trailing globals)."""
    if quant not in QUANTS:
        raise ValueError(f"quant={quant!r}: use one of {QUANTS}")
    L, D, V, P, H = spec.n_layers, spec.d_model, spec.vocab_size, spec.ple_dim, spec.n_heads
    std = spec.std
    out: list[TensorPlan] = []

    def mat(name, shape, layer=None, s=std, zero_row0=False):
        full = name if layer is None else f"blk.{layer}.{name}"
        gt = llama_cpp_type(name, layer, shape[-1], L, quant)
        out.append(TensorPlan(full + ".weight", tuple(shape), gt, "normal", s, zero_row0))

    def vec(name, n, layer=None, init="norm", suffix=".weight"):
        full = name if layer is None else f"blk.{layer}.{name}"
        out.append(TensorPlan(full + suffix, (n,), "F32", init))

    vec("rope_freqs", spec.head_dim_global // 2, init="rope_freqs")
    mat("token_embd", (V, D), zero_row0=True)
    if not spec.tied:
        mat("output", (V, D))
    if P:
        mat("per_layer_token_embd", (V, L * P), zero_row0=True)
    for l in range(L):
        dh, hk, F = spec.head_dim_of(l), spec.kv_heads(l), spec.ffn_of(l)
        if spec.n_experts:
            E, Fe = spec.n_experts, spec.expert_ffn
            mat("ffn_down_exps", (E, D, Fe), l)
            mat("ffn_gate_up_exps", (E, 2 * Fe, D), l)
        vec("attn_norm", D, l)
        vec("layer_output_scale", 1, l, init="uniform")
        mat("ffn_down", (D, F), l)
        mat("ffn_gate", (F, D), l)
        mat("ffn_up", (F, D), l)
        if P:
            mat("inp_gate", (P, D), l)
            mat("proj", (D, P), l)
        vec("post_attention_norm", D, l)
        vec("post_ffw_norm", D, l)
        if spec.n_experts:
            vec("post_ffw_norm_1", D, l)
            vec("post_ffw_norm_2", D, l)
        if P:
            vec("post_norm", D, l)
        vec("ffn_norm", D, l)
        if spec.n_experts:
            vec("pre_ffw_norm_2", D, l)
            vec("ffn_down_exps", spec.n_experts, l, init="uniform", suffix=".scale")
            mat("ffn_gate_inp", (spec.n_experts, D), l, s=spec.router_init_std)
            vec("ffn_gate_inp", D, l, init="uniform", suffix=".scale")
        if spec.has_kv(l):
            vec("attn_k_norm", dh, l)
            mat("attn_k", (hk * dh, D), l)
        mat("attn_output", (D, H * dh), l)
        vec("attn_q_norm", dh, l)
        mat("attn_q", (H * dh, D), l)
        if spec.has_v(l):
            mat("attn_v", (hk * dh, D), l)
    vec("output_norm", D)
    if P:
        mat("per_layer_model_proj", (L * P, D))
        vec("per_layer_proj_norm", P)
    return out


# --------------------------------------------------------------------------------------------
# Values: float draws encoded with gguf.quants, or quantized blocks synthesized directly

_CHUNK_ELEMS = 1 << 22  # ~16 MB of float32 per job: bounded memory, enough work per thread


def _float_chunk(t: TensorPlan, spec: TinySpec, rng, rows: int, k: int) -> np.ndarray:
    if t.init == "normal":
        return rng.standard_normal((rows, k), dtype=np.float32) * np.float32(t.std)
    if t.init == "norm":
        return 1.0 + 0.2 * rng.standard_normal((rows, k), dtype=np.float32)
    if t.init == "uniform":
        return rng.uniform(0.5, 1.5, (rows, k)).astype(np.float32)
    if t.init == "rope_freqs":
        # Proportional RoPE as the converter encodes it: the first partial_rotary share of
        # the pairs rotate (factor 1), the rest get 1e30, which divides their frequency to 0.
        n_rot = int(spec.partial_rotary * spec.head_dim_global) // 2
        return np.where(np.arange(k) < n_rot, 1.0, 1e30).astype(np.float32)[None]
    raise AssertionError(t.init)


def _f16(x) -> np.ndarray:
    return np.asarray(x, np.float16).reshape(-1).view(np.uint8).reshape(-1, 2)


def _pack_k_scales(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """Inverse of gguf.quants.Q4_K.get_scale_min: 8 six-bit scales + 8 mins -> 12 bytes."""
    lo_s, hi_s, lo_m, hi_m = sc[:, :4], sc[:, 4:], mn[:, :4], mn[:, 4:]
    return np.concatenate(
        [lo_s | ((hi_s >> 4) << 6), lo_m | ((hi_m >> 4) << 6), (hi_s & 0xF) | ((hi_m & 0xF) << 4)],
        axis=1,
    ).astype(np.uint8)


def synthesize_blocks(gtype: str, n_blocks: int, std: float, rng) -> np.ndarray:
    """Random blocks of a ggml block type whose dequantized values have mean ~0 and std
    ~`std`, drawn straight as quantized fields (random quants, fixed or random scales).

    An order of magnitude faster than drawing floats and quantizing them, and the only way to get
    K-quant blocks here (gguf-py has no K-quant quantizer). Returns uint8 [n_blocks, size].
    """
    u8 = np.uint8
    if gtype == "Q8_0":  # d f16 | qs int8[32]; uniform [-127, 127] has std 73.6
        out = np.empty((n_blocks, 34), u8)
        out[:, :2] = _f16(std / 73.6)
        out[:, 2:] = rng.integers(-127, 128, (n_blocks, 32), np.int8).view(u8)
        return out
    # q - 8 (Q4_0) and q - 32 (Q6_K) have mean -0.5: a random sign on the scale (both are
    # signed, and ggml's own quantizers make negative ones) cancels that bias.
    if gtype in ("Q4_0", "Q5_0"):  # d f16 | (qh[4]) | 16 bytes of nibbles, value d * (q - 2^(b-1))
        std_q, size = (4.61, 18) if gtype == "Q4_0" else (9.23, 22)  # std of q uniform in [0, 2^b)
        sign = rng.integers(0, 2, n_blocks) * 2 - 1
        out = np.empty((n_blocks, size), u8)
        out[:, :2] = _f16(sign * (std / std_q))
        out[:, 2:] = rng.integers(0, 256, (n_blocks, size - 2), u8)
        return out
    if gtype in ("Q4_1", "Q5_1"):  # d f16 | m f16 | (qh[4]) | nibbles, value d * q + m
        mean_q, std_q, size = (7.5, 4.61, 20) if gtype == "Q4_1" else (15.5, 9.23, 24)
        d = std / std_q
        out = np.empty((n_blocks, size), u8)
        out[:, :2] = _f16(d)
        out[:, 2:4] = _f16(-mean_q * d)  # m cancels the codes' mean
        out[:, 4:] = rng.integers(0, 256, (n_blocks, size - 4), u8)
        return out
    sc = rng.integers(16, 64, (n_blocks, 16 if gtype == "Q6_K" else 8), u8)
    rms_sc = 41.5  # sqrt(mean(sc^2)) for sc uniform in [16, 63]
    if gtype == "Q6_K":  # ql[128] | qh[64] | int8 scales[16] | d f16; value d*sc*(q - 32)
        sign = (rng.integers(0, 2, sc.shape) * 2 - 1).astype(np.int8)
        out = np.empty((n_blocks, 210), u8)
        out[:, :192] = rng.integers(0, 256, (n_blocks, 192), u8)
        out[:, 192:208] = (sc.astype(np.int8) * sign).view(u8)
        out[:, 208:] = _f16(std / (rms_sc * 18.47))
        return out
    # Q4_K / Q5_K: d | dmin | scales[12] | (qh[32]) | qs[128]; value d*sc*q - dmin*m.
    # Sub-block means cancel when dmin*m = d*sc*mean(q): dmin = 8d (16d), m = sc*mean(q)/8 (16).
    bits = 4 if gtype == "Q4_K" else 5
    mean_q, std_q = (7.5, 4.61) if bits == 4 else (15.5, 9.23)
    ratio = 8 if bits == 4 else 16
    d = std / (rms_sc * std_q)
    mn = np.rint(sc * (mean_q / ratio)).astype(u8)
    size = 144 if bits == 4 else 176
    out = np.empty((n_blocks, size), u8)
    out[:, :2] = _f16(d)
    out[:, 2:4] = _f16(d * ratio)
    out[:, 4:16] = _pack_k_scales(sc, mn)
    out[:, 16:] = rng.integers(0, 256, (n_blocks, size - 16), u8)
    return out


def _encode(x: np.ndarray, gtype: str) -> np.ndarray:
    import gguf

    if gtype == "F32":
        return x.astype(np.float32, copy=False)
    if gtype == "F16":
        return x.astype(np.float16)
    return gguf.quants.quantize(x, gguf.GGMLQuantizationType[gtype])


def _chunk_job(t: TensorPlan, spec: TinySpec, seed: int, synth: bool, row0: int, rows: int):
    """Bytes of rows [row0, row0 + rows) of tensor t, independent of every other chunk."""
    import gguf

    k = t.shape[-1]
    # Seeded by (seed, name, first row): the values do not depend on the thread count, the
    # chunk size used for other tensors, or which other tensors the spec has.
    rng = np.random.default_rng([seed, zlib.crc32(t.name.encode()), row0])
    is_block = t.ggml_type not in ("F32", "F16", "BF16")
    synth = is_block and t.init == "normal" and (synth or t.ggml_type.endswith("_K"))
    if synth:
        block, _ = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[t.ggml_type]]
        data = synthesize_blocks(t.ggml_type, rows * k // block, t.std, rng).reshape(rows, -1)
    else:
        data = _encode(_float_chunk(t, spec, rng, rows, k), t.ggml_type)
    if t.zero_row0 and row0 == 0:
        data[0] = 0  # all-zero bytes are a zero row in every ggml type
    return data


def _nbytes(t: TensorPlan) -> int:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[t.ggml_type]]
    return int(np.prod(t.shape[:-1], dtype=np.int64)) * (t.shape[-1] // block) * size


def _size_label(plan: list[TensorPlan], n_experts: int) -> str:
    from gguf.utility import size_label

    total = expert_total = 0
    for t in plan:
        n = int(np.prod(t.shape, dtype=np.int64))
        total += n
        if "_exps." in t.name and len(t.shape) == 3:
            expert_total += n
    expert = expert_total // n_experts if n_experts else 0
    return size_label(total, total - expert_total, expert, n_experts)


def _add_metadata(w, spec: TinySpec, quant: str, plan: list[TensorPlan]) -> None:
    """Every key a converted Gemma 4 file has, in the converter's order."""
    import gguf

    arch = "gemma4"
    L = spec.n_layers
    kv = [spec.kv_heads(l) for l in range(L)]
    ffn = [spec.ffn_of(l) for l in range(L)]
    w.add_type("model")
    w.add_name(spec.name)
    w.add_size_label(_size_label(plan, spec.n_experts))
    w.add_block_count(L)
    w.add_context_length(spec.context_length)
    w.add_embedding_length(spec.d_model)
    # One number when uniform, else one per layer (INT32 arrays, like the converter's).
    w.add_feed_forward_length(ffn[0] if len(set(ffn)) == 1 else ffn)
    w.add_head_count(spec.n_heads)
    w.add_head_count_kv(kv[0] if len(set(kv)) == 1 else kv)
    w.add_rope_freq_base(spec.rope_base)
    w.add_float32(f"{arch}.rope.freq_base_swa", spec.rope_base_swa)
    w.add_layer_norm_rms_eps(spec.eps)
    if spec.n_experts:
        w.add_expert_count(spec.n_experts)
        w.add_expert_used_count(spec.n_experts_used)
    w.add_key_length(spec.head_dim_global)
    w.add_value_length(spec.head_dim_global)
    w.add_file_type(_FILE_TYPE[quant])
    w.add_final_logit_softcapping(spec.softcap)
    w.add_sliding_window(spec.window)
    w.add_shared_kv_layers(spec.shared_kv_layers)
    w.add_uint32(f"{arch}.embedding_length_per_layer_input", spec.ple_dim)
    w.add_sliding_window_pattern(list(spec.sliding_pattern))
    w.add_key_length_swa(spec.head_dim)
    w.add_value_length_swa(spec.head_dim)
    if spec.n_experts:
        w.add_expert_feed_forward_length(spec.expert_ffn)
    w.add_rope_dimension_count(spec.head_dim_global)
    w.add_uint32(f"{arch}.rope.dimension_count_swa", spec.head_dim)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    vocab = build_vocab(spec.vocab_size)
    w.add_tokenizer_model("gemma4")
    w.add_token_list(list(vocab.tokens))
    w.add_token_scores(list(vocab.scores))
    w.add_token_types(list(vocab.token_types))
    w.add_token_merges(list(vocab.merges))
    w.add_bos_token_id(BOS_ID)
    w.add_eos_token_id(EOS_ID)
    w.add_unk_token_id(UNK_ID)
    w.add_pad_token_id(PAD_ID)
    w.add_mask_token_id(MASK_ID)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)
    w.add_add_space_prefix(False)


def _jobs(plan: list[TensorPlan]) -> Iterator[tuple[int, int, int]]:
    for i, t in enumerate(plan):
        rows = int(np.prod(t.shape[:-1], dtype=np.int64))
        step = max(1, _CHUNK_ELEMS // t.shape[-1])
        for row0 in range(0, rows, step):
            yield i, row0, min(step, rows - row0)


def write_gemma4_gguf(
    path: str | os.PathLike,
    spec: TinySpec,
    *,
    seed: int,
    quant: str = "Q8_0",
    synthesize: bool = False,
    threads: int | None = None,
    progress: bool = False,
) -> Path:
    """Write a random-weight Gemma 4 GGUF of shape `spec` to `path` (atomically).

    quant: the file's mix, one of `QUANTS`, chosen per tensor as llama.cpp's tools would
      (`llama_cpp_type`): norms and scales stay F32.
    synthesize: draw Q8_0/Q4_0 blocks directly instead of quantizing float draws (an order
      of magnitude faster; for real-size benchmark files). K-quant blocks are always
      synthesized (gguf-py cannot quantize them).
    threads: encoding threads (default: all cores). The bytes do not depend on it.
    Returns the path. Same (spec, seed, quant, synthesize) -> same bytes.
    """
    import gguf

    path = Path(path)
    plan = tensor_plan(spec, quant)
    threads = max(1, threads or os.cpu_count() or 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A temp file beside the target, renamed at the end: readers (and concurrent writers of
    # the same cache entry) only ever see a complete file.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        w = gguf.GGUFWriter(tmp, "gemma4")
        _add_metadata(w, spec, quant, plan)
        for t in plan:
            raw = gguf.GGMLQuantizationType[t.ggml_type]
            # float32 + raw_dtype: the writer takes `shape` as element shape (not bytes).
            w.add_tensor_info(t.name, t.shape, np.dtype(np.float32), _nbytes(t), raw_dtype=raw)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        # Stream the tensor data ourselves (GGUFWriter would hold every tensor in memory):
        # same layout as GGUFWriter.write_tensors_to_file, each tensor padded to alignment.
        fout = w.fout[0]
        w.write_padding(fout, fout.tell())
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=sum(_nbytes(t) for t in plan), unit="B", unit_scale=True)
        written = [0] * len(plan)

        def emit(i: int, data: np.ndarray) -> None:
            data.tofile(fout)
            written[i] += data.nbytes
            if bar is not None:
                bar.update(data.nbytes)
            if written[i] == _nbytes(plan[i]):
                w.write_padding(fout, written[i])

        def job(i: int, row0: int, rows: int) -> np.ndarray:
            return _chunk_job(plan[i], spec, seed, synthesize, row0, rows)

        with concurrent.futures.ThreadPoolExecutor(threads) as ex:
            # numpy's generators and ufuncs release the GIL on large arrays, so threads
            # scale; a bounded window keeps memory at ~2 * threads chunks.
            pending: collections.deque = collections.deque()
            for i, row0, rows in _jobs(plan):
                pending.append((i, ex.submit(job, i, row0, rows)))
                if len(pending) >= 2 * threads:
                    i0, fut = pending.popleft()
                    emit(i0, fut.result())
            while pending:
                i0, fut = pending.popleft()
                emit(i0, fut.result())
        if bar is not None:
            bar.close()
        w.close()
        for i, t in enumerate(plan):
            assert written[i] == _nbytes(t), t.name
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; a cache may be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# --------------------------------------------------------------------------------------------
# Cache and model specs


def cache_dir() -> Path:
    """`$GEMMA4_JAX_CACHE`, else `~/.cache/gemma4_jax`."""
    env = os.environ.get("GEMMA4_JAX_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "gemma4_jax"


def _cache_key(spec: TinySpec, seed: int, quant: str) -> str:
    h = hashlib.sha256()
    for part in (FORMAT_VERSION, repr(spec), str(seed), quant, _CORPUS):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:12]


def builtin_path(name: str = "tiny") -> Path:
    """Path of builtin model `name` (see `BUILTINS`), writing it first if it is not cached.

    The file name carries FORMAT_VERSION and a hash of the spec, so a change rebuilds it;
    concurrent builders each write a temp file and rename it, so readers never see a
    partial file.
    """
    if name not in BUILTINS:
        raise ConfigError(
            f"unknown builtin model {BUILTIN_PREFIX}{name}; "
            f"available: {', '.join(BUILTIN_PREFIX + n for n in BUILTINS)}"
        )
    spec, seed, quant = BUILTINS[name]
    folder = cache_dir()
    path = folder / f"builtin-{name}-v{FORMAT_VERSION}-{_cache_key(spec, seed, quant)}.gguf"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        write_gemma4_gguf(path, spec, seed=seed, quant=quant)
    return path


def is_builtin(spec: str | os.PathLike) -> bool:
    return isinstance(spec, str) and spec.startswith(BUILTIN_PREFIX)


def resolve_model(spec: str | os.PathLike) -> Path:
    """`builtin:NAME` -> its cached file (built on first use); anything else -> an existing
    file path. A missing file raises ModelNotFoundError (a ConfigError and a
    FileNotFoundError) naming it."""
    if is_builtin(spec):
        return builtin_path(str(spec)[len(BUILTIN_PREFIX) :])
    path = Path(spec).expanduser()
    if not path.is_file():
        what = "is a directory, not a GGUF file" if path.is_dir() else "does not exist"
        raise ModelNotFoundError(
            f"model file {str(path)!r} {what} (give a .gguf path, or one of: "
            f"{', '.join(BUILTIN_PREFIX + n for n in BUILTINS)})"
        )
    return path


__all__ = [
    "BUILTIN_NOTICE",
    "BUILTINS",
    "CHAT_TEMPLATE",
    "FORMAT_VERSION",
    "QUANTS",
    "REAL_SPECS",
    "ModelNotFoundError",
    "TensorPlan",
    "TinySpec",
    "Vocab",
    "build_vocab",
    "builtin_path",
    "cache_dir",
    "is_builtin",
    "llama_cpp_type",
    "resolve_model",
    "synthesize_blocks",
    "tensor_plan",
    "train_bpe",
    "write_gemma4_gguf",
]
