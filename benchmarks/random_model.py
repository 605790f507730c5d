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
too short for a K-quant fall back as llama-quantize does (Q4_K -> Q5_0, Q6_K -> Q8_0: 26B-A4B's
ffn_down and ffn_down_exps). The rules are `gemma4_jax.builtin`'s, which writes such files.

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

import gguf
import jax
import jax.numpy as jnp
import numpy as np

from gemma4_jax import builtin, quant
from gemma4_jax.builtin import REAL_SPECS, TinySpec
from gemma4_jax.config import Gemma4Config, rope_inv_freq
from gemma4_jax.params import Params, TensorDecl, global_decls, segment_layer_decls

QUANTS = ("bf16", "q8_0", "q4_k_m")

# ---------------------------------------------------------------------------- the family


# The real shapes are `gemma4_jax.builtin.REAL_SPECS` (the one table of the family's numbers);
# the miniatures keep their structure for CPU tests (D = 256 so K-quants apply).
_TINY = TinySpec(  # tiny-e4b as is: 5 sliding + 1 global, PLE, KV sharing over the last 6
    name="gemma4-jax random tiny-e4b",
    vocab_size=1024,
    n_layers=12,
    d_model=256,
    n_heads=4,
    n_kv_heads=2,
    head_dim=64,
    head_dim_global=128,
    ffn=512,
    ple_dim=32,
    sliding_period=6,
    shared_kv_layers=6,
    window=16,
    context_length=4096,
)
_TINY_31B = dataclasses.replace(
    _TINY,
    name="gemma4-jax random tiny-31b",
    n_layers=6,
    n_kv_heads_global=1,
    ple_dim=0,
    sliding_period=3,
    shared_kv_layers=0,
    k_eq_v=True,
)

FAMILIES: dict[str, TinySpec] = {
    **REAL_SPECS,
    "tiny-e4b": _TINY,
    "smoke": dataclasses.replace(  # the smallest E4B-like model: 2 periods of [sliding, global]
        _TINY,
        name="gemma4-jax random smoke",
        vocab_size=512,
        n_layers=4,
        n_heads=2,
        n_kv_heads=1,
        sliding_period=2,
        shared_kv_layers=2,
        context_length=2048,
    ),
    "tiny-e2b": dataclasses.replace(
        _TINY,
        name="gemma4-jax random tiny-e2b",
        n_layers=10,
        n_kv_heads=1,
        ffn=(256,) * 5 + (512,) * 5,
        sliding_period=5,
        shared_kv_layers=5,
    ),
    "tiny-31b": _TINY_31B,
    "tiny-26b-a4b": dataclasses.replace(
        _TINY_31B,
        name="gemma4-jax random tiny-26b-a4b",
        ffn=256,
        n_experts=8,
        n_experts_used=2,
        expert_ffn=64,
    ),
}


def spec_config(spec: TinySpec) -> Gemma4Config:
    """The config of `spec`'s model: the layer plan and shapes its GGUF (`write_real_size_gguf`)
    loads with, RoPE given as partial dims rather than a `rope_freqs` tensor."""
    L = spec.n_layers
    sliding = spec.sliding_pattern
    return Gemma4Config(
        n_layers=L,
        d_model=spec.d_model,
        n_heads=spec.n_heads,
        vocab_size=spec.vocab_size,
        context_length=spec.context_length,
        sliding=sliding,
        n_kv_heads=tuple(spec.kv_heads(i) for i in range(L)),
        head_dim=tuple(spec.head_dim_of(i) for i in range(L)),
        ffn_dim=tuple(spec.ffn_of(i) for i in range(L)),
        k_eq_v=tuple(spec.has_kv(i) and not spec.has_v(i) for i in range(L)),
        moe=(spec.n_experts > 0,) * L,
        window=spec.window,
        shared_kv_layers=spec.shared_kv_layers,
        rope_base_sliding=spec.rope_base_swa,
        rope_base_global=spec.rope_base,
        rope_dims_sliding=spec.head_dim,
        # proportional RoPE: only the first partial_rotary of the global pairs rotate
        rope_dims_global=int(spec.head_dim_global * spec.partial_rotary),
        rms_eps=spec.eps,
        ple_dim=spec.ple_dim,
        final_softcap=spec.softcap,
        n_experts=spec.n_experts,
        n_experts_used=spec.n_experts_used,
        expert_ffn_dim=spec.expert_ffn,
        tied_embeddings=spec.tied,
        has_rope_freqs=False,
        stop_ids=(1,),
        pad_id=0,
    )


def family_config(family: str) -> Gemma4Config:
    """The `Gemma4Config` a converted GGUF of this family would give (same layer plan)."""
    return spec_config(FAMILIES[_family_key(family)])


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


def ggml_type(name: str, layer: int | None, k: int, n_layers: int, quant_mix: str) -> str:
    """The ggml type llama.cpp's converter / llama-quantize gives matrix `name` (the short GGUF
    name: `attn_v`, `token_embd`, ...) of layer `layer` with rows of length `k`: the rules of
    `gemma4_jax.builtin`, whose files the loader tests read."""
    return builtin.llama_cpp_type(name, layer, k, n_layers, _quant_key(quant_mix).upper())


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
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[t]]
    return 8 * size / block


def type_bytes(gtype: str, shape: Iterable[int]) -> int:
    """Bytes of a ggml tensor of logical `shape` (the file's, = our field arrays' total)."""
    n = int(np.prod(tuple(shape), dtype=np.int64))
    return int(round(n * _bits(gtype) / 8))


def layer_matrix_bytes(c: Gemma4Config, quant_mix: str, exact: bool) -> list[dict[str, int]]:
    """Per layer: short name -> bytes of that matrix (expert tensors: all experts), in the
    exact llama.cpp per-layer mix (`exact`) or the stacked one used here."""
    stacked = None if exact else tensor_types(c, quant_mix)
    out: list[dict[str, int]] = [dict() for _ in range(c.n_layers)]
    for si, (seg, slots) in enumerate(segment_layer_decls(c)):
        for j, (_, decls) in enumerate(slots):
            for name, decl in decls.items():
                if not decl.matrix:
                    continue
                for p in range(seg.n_periods):
                    li = seg.layer_index(p, j)
                    if exact:
                        t = ggml_type(_short(decl), li, decl.shape[-1], c.n_layers, quant_mix)
                    else:
                        t = stacked[(si, j, name)]
                    out[li][name] = type_bytes(t, decl.shape)
    return out


def mix_bytes(config: Gemma4Config, quant_mix: str) -> dict[str, int]:
    """Total matrix bytes: the exact llama.cpp per-layer mix and the stacked one used here."""
    types = tensor_types(config, quant_mix)
    globals_ = sum(
        type_bytes(types[("global", name)], decl.shape)
        for name, decl in global_decls(config).items()
        if decl.matrix
    )
    total = lambda exact: (
        globals_ + sum(sum(m.values()) for m in layer_matrix_bytes(config, quant_mix, exact))
    )
    return {"llama_cpp_exact": total(True), "stacked": total(False)}


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

    @staticmethod
    def as_uint32(u8):  # [..., 4] bytes -> [...] little-endian words
        return jax.lax.bitcast_convert_type(u8, jnp.uint32)


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

    @staticmethod
    def as_uint32(u8):
        return np.ascontiguousarray(u8).view("<u4")[..., 0]


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
    if gtype == "Q5_0":
        # value d * (q - 16), q uniform 0..31 (std 9.23); a random sign on d cancels the -0.5
        # mean of q - 16 (ggml's quantizer makes negative scales too).
        sign = (rng.bytes((*lead, k // 32)) & 1).astype(xp.float16) * 2 - 1
        d = scale(k // 32, std / 9.23) * sign
        qh = rng.as_uint32(rng.bytes((*lead, k // 32, 4)))
        return quant.Q5_0(qs=rng.bytes((*lead, k // 2)), qh=qh, d=d)
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
    spec = FAMILIES[_family_key(family)]
    qname = {"bf16": "BF16", "q8_0": "Q8_0", "q4_k_m": "Q4_K_M"}[_quant_key(quant)]
    return builtin.write_gemma4_gguf(
        path, spec, seed=seed, quant=qname, synthesize=True, threads=threads
    )
