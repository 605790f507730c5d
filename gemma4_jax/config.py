"""Model config and layer plan, derived from GGUF metadata alone.

`Gemma4Config` is frozen and hashable: it rides along as static metadata inside the params
pytree, so `forward(params, tokens)` needs nothing else. No family constants live in code: E2B,
E4B, 31B and 26B-A4B differ only in the numbers read here.

`layer_plan(config)` answers every per-layer question once (sliding or global, head dim, kv
heads, FFN width, KV donor, MoE, K=V) and `segments(config)` groups consecutive periods of
identical layers so the model can `lax.scan` over them: E4B (42 layers, 5+1 pattern, last 18
KV-shared) becomes 4 non-shared periods then 3 shared ones.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .errors import GGUFError

ARCH = "gemma4"


@dataclasses.dataclass(frozen=True)
class Gemma4Config:
    """Everything static about a Gemma 4 text model. Per-layer values are tuples."""

    n_layers: int
    d_model: int
    n_heads: int
    vocab_size: int
    context_length: int
    # per layer
    sliding: tuple[bool, ...]
    n_kv_heads: tuple[int, ...]
    head_dim: tuple[int, ...]
    ffn_dim: tuple[int, ...]
    k_eq_v: tuple[bool, ...]  # global layers of 31B / 26B: no Wv, V is the raw K projection
    moe: tuple[bool, ...]
    # attention
    window: int
    shared_kv_layers: int
    rope_base_sliding: float
    rope_base_global: float
    rope_dims_sliding: int
    rope_dims_global: int
    # other
    rms_eps: float = 1e-6
    ple_dim: int = 0  # per-layer-input embedding width (E2B / E4B); 0 = absent
    final_softcap: float | None = 30.0
    n_experts: int = 0
    n_experts_used: int = 0
    expert_ffn_dim: int = 0
    tied_embeddings: bool = True
    has_rope_freqs: bool = False  # global-layer frequency divisors shipped as a tensor
    # generation stops here by default: EOS, plus `<turn|>` (end of a chat turn) when present
    stop_ids: tuple[int, ...] = ()
    pad_id: int = 0
    # per layer: ((tensor, ggml type), ...) of its matrices. Real mixes (Q4_K_M gives some
    # layers' attn_v / ffn_down Q6_K, others Q4_K) cannot be stacked into one scan: layers of
    # different types land in different segments. Empty = all layers alike.
    layer_types: tuple[tuple[tuple[str, str], ...], ...] = ()

    def __post_init__(self):
        for name in ("sliding", "n_kv_heads", "head_dim", "ffn_dim", "k_eq_v", "moe"):
            if len(getattr(self, name)) != self.n_layers:
                raise ValueError(
                    f"{name} has {len(getattr(self, name))} entries, expected {self.n_layers}"
                )

    @property
    def first_shared_layer(self) -> int:
        return self.n_layers - self.shared_kv_layers

    def max_head_dim(self) -> int:
        return max(self.head_dim)


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """What layer `index` is. Two layers with equal `signature` share code and param shapes."""

    index: int
    sliding: bool
    head_dim: int
    n_kv_heads: int
    ffn_dim: int
    has_kv: bool  # computes its own K/V (False = KV-shared, reads the donor's cache)
    kv_donor: int  # layer whose cache this layer reads (itself when has_kv)
    k_eq_v: bool
    moe: bool

    types: tuple[tuple[str, str], ...] = ()  # storage types of its matrices

    @property
    def signature(self) -> tuple:
        """Layers with equal signatures stack into one scan: same shapes AND storage types."""
        return (*self.structure, self.types)

    @property
    def structure(self) -> tuple:
        donor = None if self.has_kv else self.kv_donor
        return (
            self.sliding,
            self.head_dim,
            self.n_kv_heads,
            self.ffn_dim,
            self.has_kv,
            donor,
            self.k_eq_v,
            self.moe,
        )


@dataclasses.dataclass(frozen=True)
class Segment:
    """`n_periods` consecutive repeats of the layers in `slots`, scanned as one `lax.scan`."""

    start: int  # first layer index
    n_periods: int
    slots: tuple[LayerSpec, ...]  # the specs of the first period

    @property
    def period(self) -> int:
        return len(self.slots)

    @property
    def stop(self) -> int:
        return self.start + self.period * self.n_periods

    def layer_index(self, period: int, slot: int) -> int:
        return self.start + period * self.period + slot

    @property
    def has_kv(self) -> bool:
        return any(s.has_kv for s in self.slots)


@functools.cache
def layer_plan(config: Gemma4Config) -> tuple[LayerSpec, ...]:
    c = config
    first_shared = c.first_shared_layer
    specs = []
    for i in range(c.n_layers):
        has_kv = i < first_shared
        donor = i
        if not has_kv:
            # HF: the last non-shared layer of the same attention type (llama.cpp agrees on
            # every released model; the fixtures keep the two in agreement).
            same = [j for j in range(first_shared) if c.sliding[j] == c.sliding[i]]
            if not same:
                raise GGUFError(
                    f"inconsistent metadata: layer {i} is KV-shared but no earlier "
                    f"{'sliding' if c.sliding[i] else 'global'} layer computes K/V to share"
                )
            donor = same[-1]
        specs.append(
            LayerSpec(
                index=i,
                sliding=c.sliding[i],
                head_dim=c.head_dim[i],
                n_kv_heads=c.n_kv_heads[i],
                ffn_dim=c.ffn_dim[i],
                has_kv=has_kv,
                kv_donor=donor,
                k_eq_v=c.k_eq_v[i],
                moe=c.moe[i],
                types=c.layer_types[i] if c.layer_types else (),
            )
        )
    return tuple(specs)


def _find_period(sigs: Sequence[tuple]) -> int:
    """Smallest p such that the signature sequence repeats with period p."""
    n = len(sigs)
    for p in range(1, n + 1):
        if all(sigs[i] == sigs[i + p] for i in range(n - p)):
            return p
    return n


@functools.cache
def segments(config: Gemma4Config) -> tuple[Segment, ...]:
    """Scan segments. KV-shared layers always start a new part so a donor is never in the
    segment that reads it (E2B's 4+1 pattern with 20 shared layers works the same way)."""
    plan = layer_plan(config)
    parts = [plan[: config.first_shared_layer], plan[config.first_shared_layer :]]
    out: list[Segment] = []
    for part in parts:
        if not part:
            continue
        # The period comes from the structure; storage types only decide which periods merge.
        p = _find_period([s.structure for s in part])
        chunks = [part[i : i + p] for i in range(0, len(part), p)]
        for chunk in chunks:
            prev = out[-1] if out and out[-1].stop == chunk[0].index else None
            same = prev is not None and [s.signature for s in prev.slots] == [
                s.signature for s in chunk
            ]
            if same:
                out[-1] = dataclasses.replace(prev, n_periods=prev.n_periods + 1)
            else:
                out.append(Segment(start=chunk[0].index, n_periods=1, slots=tuple(chunk)))
    return tuple(out)


def locate(config: Gemma4Config, layer: int) -> tuple[int, int, int]:
    """(segment index, period, slot) of a layer."""
    for si, seg in enumerate(segments(config)):
        if seg.start <= layer < seg.stop:
            period, slot = divmod(layer - seg.start, seg.period)
            return si, period, slot
    raise IndexError(layer)


# --------------------------------------------------------------------------- from GGUF


def _per_layer(value: Any, n: int, key: str, path: str, cast=int) -> tuple:
    if isinstance(value, (list, tuple, np.ndarray)):
        if len(value) != n:
            raise GGUFError(
                f"{path}: inconsistent metadata: {key} has {len(value)} entries "
                f"but block_count is {n}"
            )
        return tuple(cast(v) for v in value)
    return (cast(value),) * n


def config_from_gguf(
    fields: Mapping[str, Any],
    tensor_names: set[str] | Mapping[str, str],
    path: str = "<gguf>",
    vocab_size: int | None = None,
) -> Gemma4Config:
    """Build the config from GGUF key/values plus the set of tensor names.

    Tensor presence decides what the metadata does not say: K=V layers (no `attn_v` on a layer
    that computes K/V), MoE layers (`ffn_gate_inp`), untied output (`output.weight`).
    """
    arch = fields.get("general.architecture")
    if arch != ARCH:
        raise GGUFError(
            f"{path}: architecture is {arch!r}, expected {ARCH!r} (a Gemma 4 text model)"
        )

    def get(key: str, default: Any = ...):
        full = f"{ARCH}.{key}"
        if full in fields:
            return fields[full]
        if default is ...:
            raise GGUFError(f"{path}: inconsistent metadata: required key {full!r} is missing")
        return default

    n = int(get("block_count"))
    if n <= 0:
        raise GGUFError(f"{path}: inconsistent metadata: block_count is {n}")
    d = int(get("embedding_length"))
    h = int(get("attention.head_count"))
    n_kv = _per_layer(get("attention.head_count_kv"), n, "attention.head_count_kv", path)
    pattern = get("attention.sliding_window_pattern", None)
    if pattern is None:
        raise GGUFError(
            f"{path}: inconsistent metadata: {ARCH}.attention.sliding_window_pattern "
            "is missing (needed to tell sliding from global layers)"
        )
    sliding = _per_layer(pattern, n, "attention.sliding_window_pattern", path, cast=bool)
    if sliding[-1]:
        raise GGUFError(f"{path}: inconsistent metadata: the last layer must be global")
    dh_g = int(get("attention.key_length"))
    dh_s = int(get("attention.key_length_swa", dh_g))
    for k_key, v_key in (
        ("attention.key_length", "attention.value_length"),
        ("attention.key_length_swa", "attention.value_length_swa"),
    ):
        kv, vv = get(k_key, None), get(v_key, None)
        if kv is not None and vv is not None and int(kv) != int(vv):
            raise GGUFError(f"{path}: inconsistent metadata: {k_key}={kv} != {v_key}={vv}")
    ffn = _per_layer(get("feed_forward_length"), n, "feed_forward_length", path)
    shared = int(get("attention.shared_kv_layers", 0))
    if not 0 <= shared < n:
        raise GGUFError(
            f"{path}: inconsistent metadata: attention.shared_kv_layers={shared} "
            f"with block_count={n}"
        )
    head_dim = tuple(dh_s if s else dh_g for s in sliding)
    for i, kv in enumerate(n_kv):
        if kv <= 0 or h % kv:
            raise GGUFError(
                f"{path}: inconsistent metadata: layer {i} has {kv} kv heads, "
                f"which does not divide {h} query heads"
            )

    def has(name: str) -> bool:
        return name in tensor_names

    k_eq_v = tuple(i < n - shared and not has(f"blk.{i}.attn_v.weight") for i in range(n))
    moe = tuple(has(f"blk.{i}.ffn_gate_inp.weight") for i in range(n))
    n_experts = int(get("expert_count", 0))
    if any(moe) and n_experts <= 0:
        raise GGUFError(
            f"{path}: inconsistent metadata: router tensors present but "
            f"{ARCH}.expert_count is missing"
        )
    softcap = get("final_logit_softcapping", None)
    tokens = fields.get("tokenizer.ggml.tokens") or ()
    if vocab_size is None:
        vocab_size = len(tokens)
    stop_ids = []
    if "tokenizer.ggml.eos_token_id" in fields:
        stop_ids.append(int(fields["tokenizer.ggml.eos_token_id"]))
    if "<turn|>" in tokens:
        stop_ids.append(list(tokens).index("<turn|>"))
    return Gemma4Config(
        n_layers=n,
        d_model=d,
        n_heads=h,
        vocab_size=int(vocab_size),
        context_length=int(get("context_length")),
        sliding=sliding,
        n_kv_heads=n_kv,
        head_dim=head_dim,
        ffn_dim=ffn,
        k_eq_v=k_eq_v,
        moe=moe,
        window=int(get("attention.sliding_window")),
        shared_kv_layers=shared,
        rope_base_sliding=float(get("rope.freq_base_swa", 10_000.0)),
        rope_base_global=float(get("rope.freq_base", 1_000_000.0)),
        rope_dims_sliding=int(get("rope.dimension_count_swa", dh_s)),
        rope_dims_global=int(get("rope.dimension_count", dh_g)),
        rms_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        ple_dim=int(get("embedding_length_per_layer_input", 0)),
        final_softcap=None if softcap is None or float(softcap) <= 0 else float(softcap),
        n_experts=n_experts if any(moe) else 0,
        n_experts_used=int(get("expert_used_count", 0)) if any(moe) else 0,
        expert_ffn_dim=int(get("expert_feed_forward_length", 0)) if any(moe) else 0,
        tied_embeddings=not has("output.weight"),
        has_rope_freqs=has("rope_freqs.weight"),
        stop_ids=tuple(dict.fromkeys(stop_ids)),
        pad_id=int(fields.get("tokenizer.ggml.padding_token_id", 0)),
        layer_types=_layer_types(tensor_names, n),
    )


def _layer_types(tensor_types, n_layers: int) -> tuple:
    """Per layer, the sorted (tensor, ggml type) pairs of its multi-dimensional tensors."""
    if not isinstance(tensor_types, Mapping):
        return ()
    per = [[] for _ in range(n_layers)]
    for name, ttype in tensor_types.items():
        parts = name.split(".")
        if len(parts) >= 3 and parts[0] == "blk" and parts[1].isdigit() and ttype != "F32":
            i = int(parts[1])
            if i < n_layers:
                per[i].append((".".join(parts[2:]), str(ttype)))
    return tuple(tuple(sorted(p)) for p in per)


def rope_inv_freq(
    config: Gemma4Config, sliding: bool, freq_factors: np.ndarray | None = None
) -> np.ndarray:
    """Inverse frequencies [head_dim/2] (float32), zero for pairs that do not rotate.

    Global layers use proportional RoPE: the exponent's denominator is the FULL head dim, and
    only some pairs rotate. GGUF says which through `rope_freqs` (1.0 = rotate, 1e30 = not,
    dividing the frequency); without that tensor, the first `rope.dimension_count / 2` pairs
    rotate. Computed like HF (float32 `base ** (2i / dim)`) so angles agree to the last bit.
    """
    layers = [i for i in range(config.n_layers) if config.sliding[i] == sliding] or [-1]
    dh = config.head_dim[layers[0]]
    base = config.rope_base_sliding if sliding else config.rope_base_global
    rot_dims = config.rope_dims_sliding if sliding else config.rope_dims_global
    i = np.arange(0, dh, 2, dtype=np.int64).astype(np.float32)
    inv = (1.0 / (np.float32(base) ** (i / np.float32(dh)))).astype(np.float32)
    if not sliding and freq_factors is not None:
        ff = np.asarray(freq_factors, dtype=np.float32).reshape(-1)
        if ff.shape[0] != dh // 2:
            raise GGUFError(
                f"inconsistent metadata: rope_freqs has {ff.shape[0]} entries, "
                f"expected head_dim/2 = {dh // 2}"
            )
        # 1e30 marks a pair that does not rotate: make it exactly 0 like HF's proportional
        # RoPE instead of relying on a 1e-36 frequency.
        inv = np.where(ff >= 1e20, np.float32(0.0), inv / ff).astype(np.float32)
    else:
        inv[rot_dims // 2 :] = 0.0
    return inv


def describe(config: Gemma4Config) -> str:
    """One line per segment, for `gemma4-jax info` and logs."""
    lines = []
    for seg in segments(config):
        kinds = "".join("s" if s.sliding else "G" for s in seg.slots)
        shared = "" if seg.has_kv else " kv-shared"
        lines.append(f"layers {seg.start}-{seg.stop - 1}: {seg.n_periods} x [{kinds}]{shared}")
    return "\n".join(lines)
