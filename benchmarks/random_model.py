"""Random-weight Gemma 4 params of the REAL shapes, built straight on the device.

No GGUF file: `random_params("e4b", "q8_0")` fills the one params declaration
(`gemma4_jax.params.global_decls` / `segment_layer_decls`) with quantized tensors whose *field
arrays* (the repacked layout of docs/LAYOUT.md: `Q8_0(qs, d)`, `Q4_K(qs, d, dmin, sc, m)`,
`Q6_K(ql, qh, sc, d)`, dense `BF16(w)` / `F32(w)`) are drawn with `jax.random` on the default
device. An E4B Q8_0 model (~8 GB) takes a few seconds on a GPU, and about 1 s per GB on a CPU.

Values are random but sane: codes uniform over their range, scales chosen so that every
dequantized matrix has mean ~0 and std ~`2/sqrt(D)` (what `gemma4_jax.builtin` uses; it keeps
logits near std 2), norm weights near 1. Activations stay finite through all layers.

Quantization mixes (`QUANTS`) follow what llama.cpp's tools write (see the fixtures'
`tensors.txt`): `q8_0` makes every matrix Q8_0; `q4_k_m` makes most Q4_K and the token and
per-layer embeddings Q6_K, plus `attn_v` / `ffn_down` Q6_K on llama-quantize's "more bits"
layers; `per_layer_model_proj` and the MoE router stay F32 in both; `bf16` is all BF16. Rows
whose length is not a multiple of the block fall back to Q8_0, as llama-quantize does.

One difference from a llama.cpp Q4_K_M file, on purpose: the params stack each scan segment's
layers on a leading axis, so a tensor has ONE type across the periods of its segment. Where
llama.cpp mixes Q4_K and Q6_K layer by layer (attn_v, ffn_down), the type the majority of
the segment's layers get is used for all of them (ties go to Q6_K). `mix_bytes` reports the
byte count of both the exact llama.cpp mix and this stacked one.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np

from gemma4_jax import quant
from gemma4_jax.config import Gemma4Config, rope_inv_freq
from gemma4_jax.params import Params, TensorDecl, global_decls, segment_layer_decls

QUANTS = ("bf16", "q8_0", "q4_k_m")

# ---------------------------------------------------------------------------- the family


@dataclasses.dataclass(frozen=True)
class Family:
    """The numbers of one Gemma 4 text model (shared/docs/gemma4.md, "The family")."""

    n_layers: int
    d_model: int
    n_heads: int
    kv_heads: tuple[int, int]  # (sliding, global)
    head_dim: tuple[int, int]  # (sliding, global)
    ffn: int | tuple[int, ...]  # one width, or one per layer
    window: int
    period: int  # sliding_period: layer l is global iff (l + 1) % period == 0
    shared_kv_layers: int
    ple_dim: int = 0
    k_eq_v: bool = False  # global layers have no Wv (31B, 26B-A4B)
    n_experts: int = 0
    n_experts_used: int = 0
    expert_ffn: int = 0
    vocab_size: int = 262144
    context_length: int = 131072


FAMILIES: dict[str, Family] = {
    "e2b": Family(
        n_layers=35,
        d_model=1536,
        n_heads=8,
        kv_heads=(1, 1),
        head_dim=(256, 512),
        ffn=(6144,) * 15 + (12288,) * 20,  # double-wide MLP on the 20 KV-shared layers
        window=512,
        period=5,
        shared_kv_layers=20,
        ple_dim=256,
    ),
    "e4b": Family(
        n_layers=42,
        d_model=2560,
        n_heads=8,
        kv_heads=(2, 2),
        head_dim=(256, 512),
        ffn=10240,
        window=512,
        period=6,
        shared_kv_layers=18,
        ple_dim=256,
    ),
    "31b": Family(
        n_layers=60,
        d_model=5376,
        n_heads=32,
        kv_heads=(16, 4),
        head_dim=(256, 512),
        ffn=21504,
        window=1024,
        period=6,
        shared_kv_layers=0,
        k_eq_v=True,
        context_length=262144,
    ),
    "26b-a4b": Family(
        n_layers=30,
        d_model=2816,
        n_heads=16,
        kv_heads=(8, 2),
        head_dim=(256, 512),
        ffn=2112,
        window=1024,
        period=6,
        shared_kv_layers=0,
        k_eq_v=True,
        n_experts=128,
        n_experts_used=8,
        expert_ffn=704,
        context_length=262144,
    ),
    # Miniatures with the same structure, for CPU tests (D = 256 so K-quants apply).
    "tiny-e4b": Family(
        n_layers=12,
        d_model=256,
        n_heads=4,
        kv_heads=(2, 2),
        head_dim=(64, 128),
        ffn=512,
        window=16,
        period=6,
        shared_kv_layers=6,
        ple_dim=32,
        vocab_size=1024,
        context_length=4096,
    ),
    "smoke": Family(  # the smallest E4B-like model: 2 periods of [sliding, global]
        n_layers=4,
        d_model=256,
        n_heads=2,
        kv_heads=(1, 1),
        head_dim=(64, 128),
        ffn=512,
        window=16,
        period=2,
        shared_kv_layers=2,
        ple_dim=32,
        vocab_size=512,
        context_length=2048,
    ),
    "tiny-e2b": Family(
        n_layers=10,
        d_model=256,
        n_heads=4,
        kv_heads=(1, 1),
        head_dim=(64, 128),
        ffn=(256,) * 5 + (512,) * 5,
        window=16,
        period=5,
        shared_kv_layers=5,
        ple_dim=32,
        vocab_size=1024,
        context_length=4096,
    ),
    "tiny-31b": Family(
        n_layers=6,
        d_model=256,
        n_heads=4,
        kv_heads=(2, 1),
        head_dim=(64, 128),
        ffn=512,
        window=16,
        period=3,
        shared_kv_layers=0,
        k_eq_v=True,
        vocab_size=1024,
        context_length=4096,
    ),
    "tiny-26b-a4b": Family(
        n_layers=6,
        d_model=256,
        n_heads=4,
        kv_heads=(2, 1),
        head_dim=(64, 128),
        ffn=256,
        window=16,
        period=3,
        shared_kv_layers=0,
        k_eq_v=True,
        n_experts=8,
        n_experts_used=2,
        expert_ffn=64,
        vocab_size=1024,
        context_length=4096,
    ),
}


def family_config(family: str) -> Gemma4Config:
    """The `Gemma4Config` a converted GGUF of this family would give (same layer plan)."""
    f = FAMILIES[_family_key(family)]
    L = f.n_layers
    sliding = tuple((i + 1) % f.period != 0 for i in range(L))
    first_shared = L - f.shared_kv_layers
    ffn = f.ffn if isinstance(f.ffn, tuple) else (f.ffn,) * L
    dh_s, dh_g = f.head_dim
    return Gemma4Config(
        n_layers=L,
        d_model=f.d_model,
        n_heads=f.n_heads,
        vocab_size=f.vocab_size,
        context_length=f.context_length,
        sliding=sliding,
        n_kv_heads=tuple(f.kv_heads[0] if s else f.kv_heads[1] for s in sliding),
        head_dim=tuple(dh_s if s else dh_g for s in sliding),
        ffn_dim=ffn,
        k_eq_v=tuple(f.k_eq_v and not s and i < first_shared for i, s in enumerate(sliding)),
        moe=(f.n_experts > 0,) * L,
        window=f.window,
        shared_kv_layers=f.shared_kv_layers,
        rope_base_sliding=10_000.0,
        rope_base_global=1_000_000.0,
        rope_dims_sliding=dh_s,
        # proportional RoPE, partial factor 0.25: the first dh/8 pairs rotate
        rope_dims_global=dh_g // 4,
        rms_eps=1e-6,
        ple_dim=f.ple_dim,
        final_softcap=30.0,
        n_experts=f.n_experts,
        n_experts_used=f.n_experts_used,
        expert_ffn_dim=f.expert_ffn,
        tied_embeddings=True,
        has_rope_freqs=False,
        stop_ids=(1,),
        pad_id=0,
    )


def _family_key(family: str) -> str:
    key = family.lower().replace("_", "-")
    if key not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
    return key


def _quant_key(q: str) -> str:
    key = q.lower().replace("-", "_")
    if key not in QUANTS:
        raise ValueError(f"unknown quant {q!r}; known: {', '.join(QUANTS)}")
    return key


# ---------------------------------------------------------------------------- ggml types


def _more_bits(layer: int, n_layers: int) -> bool:
    """llama-quantize's `use_more_bits`: the layers whose attn_v / ffn_down get Q6_K in Q4_K_M."""
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def ggml_type(name: str, layer: int | None, k: int, n_layers: int, quant_mix: str) -> str:
    """The ggml type llama.cpp's converter / llama-quantize gives matrix `name` (the short GGUF
    name: `attn_v`, `token_embd`, ...) of layer `layer` with rows of length `k`."""
    q = _quant_key(quant_mix)
    if name in ("ffn_gate_inp",):
        return "F32"  # the MoE router stays F32 in every mix
    if q == "bf16":
        return "BF16"
    if name == "per_layer_model_proj":
        return "F32"  # llama-quantize leaves it as the converter wrote it (fixtures agree)
    if q == "q8_0":
        t = "Q8_0"
    elif name in ("token_embd", "per_layer_token_embd", "output"):
        t = "Q6_K"
    elif name in ("attn_v", "ffn_down", "ffn_down_exps") and layer is not None:
        t = "Q6_K" if _more_bits(layer, n_layers) else "Q4_K"
    else:
        t = "Q4_K"
    if k % (256 if t.endswith("_K") else 32):
        t = "Q8_0" if k % 32 == 0 else "F16"
    return t


def _short(decl: TensorDecl) -> str:
    parts = decl.gguf_name.split(".")
    return parts[2] if parts[0] == "blk" else parts[0]


def tensor_types(config: Gemma4Config, quant_mix: str) -> dict[tuple, str]:
    """(segment, slot, name) -> the one type of that stacked tensor; ("global", name) too.

    Majority over the segment's layers of the llama.cpp type (ties go to the wider type)."""
    out: dict[tuple, str] = {}
    L = config.n_layers
    for name, decl in global_decls(config).items():
        if decl.matrix:
            out[("global", name)] = ggml_type(_short(decl), None, decl.shape[-1], L, quant_mix)
    for si, (seg, slots) in enumerate(segment_layer_decls(config)):
        for j, (_, decls) in enumerate(slots):
            for name, decl in decls.items():
                if not decl.matrix:
                    continue
                votes: dict[str, int] = {}
                for p in range(seg.n_periods):
                    t = ggml_type(_short(decl), seg.layer_index(p, j), decl.shape[-1], L, quant_mix)
                    votes[t] = votes.get(t, 0) + 1
                out[(si, j, name)] = max(votes, key=lambda t: (votes[t], _bits(t)))
    return out


def _bits(t: str) -> float:
    return {"Q4_K": 4.5, "Q6_K": 6.5625, "Q8_0": 8.5, "F16": 16, "BF16": 16, "F32": 32}[t]


def type_bytes(gtype: str, shape: Iterable[int]) -> int:
    """Bytes of a ggml tensor of logical `shape` (the file's, = our field arrays' total)."""
    n = int(np.prod(tuple(shape), dtype=np.int64))
    return int(round(n * _bits(gtype) / 8))


def mix_bytes(config: Gemma4Config, quant_mix: str) -> dict[str, int]:
    """Total matrix bytes: the exact llama.cpp per-layer mix and the stacked one used here."""
    L = config.n_layers
    stacked_types = tensor_types(config, quant_mix)
    exact = stacked = 0
    for name, decl in global_decls(config).items():
        if decl.matrix:
            b = type_bytes(stacked_types[("global", name)], decl.shape)
            exact += b
            stacked += b
    for si, (seg, slots) in enumerate(segment_layer_decls(config)):
        for j, (_, decls) in enumerate(slots):
            for name, decl in decls.items():
                if not decl.matrix:
                    continue
                for p in range(seg.n_periods):
                    li = seg.layer_index(p, j)
                    exact += type_bytes(
                        ggml_type(_short(decl), li, decl.shape[-1], L, quant_mix), decl.shape
                    )
                    stacked += type_bytes(stacked_types[(si, j, name)], decl.shape)
    return {"llama_cpp_exact": exact, "stacked": stacked}


# ---------------------------------------------------------------------------- random fields

# rms of the 6-bit sub-block scales drawn below, and std of the codes around their centre
_SC_LO, _SC_HI = 16, 63  # Q4_K scales (6-bit)
_RMS_SC_K = math.sqrt(sum(s * s for s in range(_SC_LO, _SC_HI + 1)) / (_SC_HI - _SC_LO + 1))
_Q6_LO, _Q6_HI = 8, 31  # Q6_K scales (int8): smaller, so that d stays a normal f16
_RMS_SC_6 = math.sqrt(sum(s * s for s in range(_Q6_LO, _Q6_HI + 1)) / (_Q6_HI - _Q6_LO + 1))


class _DeviceRng:
    """Draws inside a jit trace with `jax.random` (a key per draw, folded from one root)."""

    xp = jnp

    def __init__(self, root):
        self.root, self.n = root, 0

    def _key(self):
        self.n += 1
        return jax.random.fold_in(self.root, self.n)

    def bytes(self, shape):
        return jax.random.bits(self._key(), shape, jnp.uint8)

    def uniform(self, shape, lo, hi):
        return jax.random.uniform(self._key(), shape, jnp.float32, lo, hi)

    def normal(self, shape):
        return jax.random.normal(self._key(), shape, jnp.float32)

    @staticmethod
    def as_int8(u8):
        return jax.lax.bitcast_convert_type(u8, jnp.int8)


class _HostRng:
    """The same draws with numpy (no compilation at all: the CPU path, where XLA would spend
    ~40 ms compiling each of the few hundred small generator fusions)."""

    xp = np

    def __init__(self, seed: int):
        self.g = np.random.default_rng(seed)

    def bytes(self, shape):
        n = int(np.prod(shape, dtype=np.int64))
        return np.frombuffer(self.g.bytes(n), np.uint8).reshape(shape)

    def uniform(self, shape, lo, hi):
        return self.g.uniform(lo, hi, shape).astype(np.float32)

    def normal(self, shape):
        return self.g.standard_normal(shape, dtype=np.float32)

    @staticmethod
    def as_int8(u8):
        return u8.view(np.int8)


def random_tensor(rng, gtype: str, shape: tuple[int, ...], std: float) -> quant.QTensor:
    """A `gtype` tensor of logical shape `(..., N, K)` whose dequantized values have mean ~0 and
    std ~`std`: the same fields `quant.from_gguf` produces, drawn by `rng` (`_DeviceRng` inside
    a jit, or `_HostRng`)."""
    xp = rng.xp
    *lead, k = shape
    lead = tuple(lead)

    def scale(n_per_row, value):  # f16 block scales: value * U[0.75, 1.25]
        return (value * rng.uniform((*lead, n_per_row), 0.75, 1.25)).astype(xp.float16)

    if gtype == "Q8_0":
        qs = rng.as_int8(rng.bytes((*lead, k)))
        qs = xp.maximum(qs, xp.int8(-127))  # ggml's quantizer never writes -128
        return quant.Q8_0(qs=qs, d=scale(k // 32, std / 73.3))
    if gtype == "Q4_K":
        # value (d * sc) * q - dmin * m, q uniform 0..15 (mean 7.5, std 4.61): dmin = 8 d and
        # m = sc * 7.5 / 8 cancel each sub-block's mean.
        d = scale(k // 256, std / (_RMS_SC_K * 4.61))
        span = _SC_HI - _SC_LO + 1
        sc = (rng.bytes((*lead, k // 32)) % xp.uint8(span) + xp.uint8(_SC_LO)).astype(xp.uint8)
        m = xp.round(sc.astype(xp.float32) * (7.5 / 8)).astype(xp.uint8)
        dmin = (d.astype(xp.float32) * 8).astype(xp.float16)
        return quant.Q4_K(qs=rng.bytes((*lead, k // 2)), d=d, dmin=dmin, sc=sc, m=m)
    if gtype == "Q6_K":
        # value (d * sc) * (q - 32), q uniform 0..63 (std 18.47)
        span = _Q6_HI - _Q6_LO + 1
        sc = (rng.bytes((*lead, k // 16)) % xp.uint8(span) + xp.uint8(_Q6_LO)).astype(xp.int8)
        return quant.Q6_K(
            ql=rng.bytes((*lead, k // 2)),
            qh=rng.bytes((*lead, k // 4)),
            sc=sc,
            d=scale(k // 256, std / (_RMS_SC_6 * 18.47)),
        )
    dense = {
        "BF16": (quant.BF16, jnp.bfloat16),
        "F16": (quant.F16, np.float16),
        "F32": (quant.F32, np.float32),
    }
    if gtype in dense:
        cls, dt = dense[gtype]
        return cls(w=(std * rng.normal(shape)).astype(dt))
    raise ValueError(f"no random generator for ggml type {gtype}")


def _vector(rng, name: str, shape: tuple[int, ...]):
    """Norm weights near 1; scalars and router scales in [0.5, 1.5] (float32, as loaded)."""
    if name in ("layer_output_scale",):
        return rng.uniform(shape, 0.9, 1.1)
    if name in ("router_scale", "expert_scale"):
        return rng.uniform(shape, 0.5, 1.5)
    return (1.0 + 0.1 * rng.normal(shape)).astype(rng.xp.float32)


def _std(config: Gemma4Config, name: str) -> float:
    if name == "router":
        return 12.0 / math.sqrt(config.d_model)
    return 2.0 / math.sqrt(config.d_model)


def random_params(
    family: str,
    quant: str,
    dtype: str = "bfloat16",
    seed: int = 0,
    *,
    config: Gemma4Config | None = None,
    on_device: bool | None = None,
) -> Params:
    """Params of `family` ("e2b", "e4b", "31b", "26b-a4b", or a "tiny-*" miniature) in the
    `quant` mix ("bf16", "q8_0", "q4_k_m"), random, on the default device.

    `dtype` is the compute dtype ("bfloat16" or "float32"), as for `gemma4_jax.load`.
    `config` overrides the family's config (its shapes must follow the same declaration).
    `on_device` (default: unless the backend is the CPU): draw each tensor with `jax.random`
    on the accelerator, one small jitted program per distinct (type, shape) (E4B: ~31
    programs for 189 tensors); else draw with numpy on the host and copy (no compilation:
    instant at test sizes, where XLA:CPU would spend ~40 ms compiling each generator fusion).
    """
    config = family_config(family) if config is None else config
    if dtype not in ("bfloat16", "float32"):
        raise ValueError(f"dtype={dtype!r}: use 'bfloat16' or 'float32'")
    mix = _quant_key(quant)
    if on_device is None:
        on_device = jax.default_backend() != "cpu"
    gen = _DeviceGen(seed) if on_device else _HostGen(seed)
    return _build(gen, config, mix, dtype)


# One program per distinct (type, shape): a whole-model program would be one compile, but of
# ~500 generator fusions (35-50 s on XLA:CPU for E4B); separate programs share compiles
# between the many stacked tensors of one shape.
@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _device_tensor(key, gtype: str, shape: tuple[int, ...], std: float):
    return random_tensor(_DeviceRng(key), gtype, shape, std)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _device_vector(key, name: str, shape: tuple[int, ...]):
    return _vector(_DeviceRng(key), name, shape)


class _DeviceGen:
    def __init__(self, seed: int):
        # unsafe_rbg: XLA's RngBitGenerator, one cheap op per draw (threefry's unrolled rounds
        # make each generator fusion several times slower to compile). Quality is irrelevant.
        self.root, self.n = jax.random.key(seed, impl="unsafe_rbg"), 0

    def _key(self):
        self.n += 1
        return jax.random.fold_in(self.root, self.n)

    def tensor(self, gtype, shape, std):
        return _device_tensor(self._key(), gtype, tuple(shape), float(std))

    def vector(self, name, shape):
        return _device_vector(self._key(), name, tuple(shape))

    def array(self, x):
        return jnp.asarray(x)


class _HostGen:
    def __init__(self, seed: int):
        self.rng = _HostRng(seed)

    def tensor(self, gtype, shape, std):
        return jax.tree.map(jnp.asarray, random_tensor(self.rng, gtype, tuple(shape), std))

    def vector(self, name, shape):
        return jnp.asarray(_vector(self.rng, name, tuple(shape)))

    def array(self, x):
        return jnp.asarray(x)


def _build(gen, config: Gemma4Config, quant_mix: str, dtype: str) -> Params:
    types = tensor_types(config, quant_mix)
    globals_ = {}
    for name, decl in global_decls(config).items():
        if decl.matrix:
            std = _std(config, name)
            globals_[name] = gen.tensor(types[("global", name)], decl.shape, std)
        else:
            globals_[name] = gen.vector(name, decl.shape)
    segs = []
    for si, (seg, slots) in enumerate(segment_layer_decls(config)):
        slot_params = []
        for j, (_, decls) in enumerate(slots):
            d = {}
            for name, decl in decls.items():
                shape = (seg.n_periods, *decl.shape)
                if decl.matrix:
                    d[name] = gen.tensor(types[(si, j, name)], shape, _std(config, name))
                else:
                    d[name] = gen.vector(name, shape)
            slot_params.append(d)
        segs.append(tuple(slot_params))
    rope = {
        "sliding": gen.array(rope_inv_freq(config, True)),
        "global": gen.array(rope_inv_freq(config, False)),
    }
    return Params(globals=globals_, segments=tuple(segs), rope=rope, config=config, dtype=dtype)


def params_bytes(params: Params) -> int:
    """Bytes of every array in the params (what they cost on the device)."""
    return sum(int(a.size) * a.dtype.itemsize for a in jax.tree.leaves(params))


def type_summary(params: Params) -> dict[str, int]:
    """ggml type -> bytes held by tensors of that type (vectors count as F32)."""
    out: dict[str, int] = {}
    for leaf in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, quant.QTensor)):
        t = leaf.ggml_type if isinstance(leaf, quant.QTensor) else "F32"
        n = leaf.nbytes if isinstance(leaf, quant.QTensor) else int(leaf.size) * leaf.dtype.itemsize
        out[t] = out.get(t, 0) + int(n)
    return out


# ---------------------------------------------------------------------------- GGUF on disk


def write_real_size_gguf(path, family: str, quant: str, *, seed: int = 0, threads=None):
    """A random GGUF of the family's real shapes, written with `gemma4_jax.builtin` (for load
    time). K-quant and Q8_0 blocks are synthesized directly; returns the path."""
    from gemma4_jax import builtin

    key = _family_key(family)
    spec = getattr(builtin, "REAL_SPECS", {}).get(key)
    if spec is None:
        f = FAMILIES[key]
        spec = builtin.TinySpec(
            name=f"gemma4-jax random {key}",
            vocab_size=f.vocab_size,
            n_layers=f.n_layers,
            d_model=f.d_model,
            n_heads=f.n_heads,
            n_kv_heads=f.kv_heads[0],
            n_kv_heads_global=f.kv_heads[1],
            head_dim=f.head_dim[0],
            head_dim_global=f.head_dim[1],
            ffn=f.ffn,
            ple_dim=f.ple_dim,
            sliding_period=f.period,
            shared_kv_layers=f.shared_kv_layers,
            window=f.window,
            context_length=f.context_length,
            k_eq_v=f.k_eq_v,
            n_experts=f.n_experts,
            n_experts_used=f.n_experts_used,
            expert_ffn=f.expert_ffn,
        )
    qname = {"bf16": "BF16", "q8_0": "Q8_0", "q4_k_m": "Q4_K_M"}[_quant_key(quant)]
    return builtin.write_gemma4_gguf(
        path, spec, seed=seed, quant=qname, synthesize=True, threads=threads
    )
