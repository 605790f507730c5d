"""GGUF -> `Model` (config + params pytree + tokenizer).

Reads with `gguf_file.read_gguf` (memory-mapped), fills the declaration in `params.py`, and checks
every tensor's presence, shape and type against it. Quantized tensors stay in their block
format (repacked into field arrays, see docs/LAYOUT.md) so the device holds ~1 byte per weight
for Q8_0 instead of 2 for bf16. Every problem becomes a `GGUFError` naming the file.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np

from . import quant
from .config import Gemma4Config, config_from_gguf, rope_inv_freq
from .errors import GGUFError
from .file_transfer import FileTransfers
from .gguf_file import GGUFFile, read_gguf
from .params import Params, TensorDecl, global_decls, segment_layer_decls

_DTYPES = {"float32": "float32", "f32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16"}


@dataclasses.dataclass(frozen=True)
class Model:
    """What `load` returns. `params` alone is enough for `forward`/`generate`."""

    path: Path
    params: Params
    tokenizer: Any  # gemma4_jax.tokenizer.Tokenizer, or None if the file has no vocabulary
    metadata: dict[str, Any]
    tensor_types: dict[str, int]  # ggml type name -> count of tensors

    @property
    def config(self) -> Gemma4Config:
        return self.params.config


class _TensorSource:
    """Name -> (checked) tensor access on one reader."""

    def __init__(self, path: Path, reader: GGUFFile, dtype: str):
        self.path, self.dtype = path, dtype
        self.tensors = {t.name: t for t in reader.tensors}
        self.types = collections.Counter(t.tensor_type.name for t in reader.tensors)

    def has(self, name: str) -> bool:
        return name in self.tensors

    def checked(self, name: str, decl: TensorDecl):
        """The reader's tensor `name`, present and of the declared shape."""
        t = self.tensors.get(name)
        if t is None:
            raise GGUFError(f"{self.path}: missing tensor {name!r}")
        shape = t.numpy_shape
        if shape != decl.shape:
            raise GGUFError(
                f"{self.path}: tensor {name!r} has shape {shape}, expected "
                f"{decl.shape} from the metadata"
            )
        return t

    def on_device(self, names: list[str], decl: TensorDecl, *, stacked: bool, transfer=None):
        """Matrices `names` (one type, declared shape) repacked on the device, stacked if
        `stacked`; `transfer` moves the bytes (see `quant.from_gguf_on_device`)."""
        ts = [self.checked(n, decl) for n in names]
        kinds = {t.tensor_type.name for t in ts}
        if len(kinds) > 1:  # the layer plan groups layers by storage type: a mismatch is a bug
            raise GGUFError(f"{self.path}: tensors {names} mix types {sorted(kinds)}")
        try:
            return quant.from_gguf_on_device(
                [t.data for t in ts],
                ts[0].tensor_type,
                decl.shape,
                stacked=stacked,
                name=names[0],
                transfer=transfer,
            )
        except quant.UnsupportedTensorType as e:
            raise GGUFError(f"{self.path}: tensor {names[0]!r}: {e}") from e

    def get(self, name: str, decl: TensorDecl):
        import gguf

        t = self.checked(name, decl)
        shape = decl.shape
        if not decl.matrix:
            try:
                arr = gguf.quants.dequantize(t.data, t.tensor_type)
            except NotImplementedError as e:
                raise GGUFError(
                    f"{self.path}: tensor {name!r} has unsupported type {t.tensor_type.name}"
                ) from e
            return np.asarray(arr, np.float32).reshape(shape)
        try:
            w = quant.from_gguf(t.data, t.tensor_type, shape)
        except quant.UnsupportedTensorType as e:
            raise GGUFError(f"{self.path}: tensor {name!r}: {e}") from e
        return w


def _load_layer_tensor(src: _TensorSource, layer: int, name: str, decl: TensorDecl):
    gname = decl.gguf_name.format(i=layer)
    if name == "experts_gate_up" and not src.has(gname):
        # Older converters write gate and up experts separately; fuse them (gate first).
        e, two_f, d = decl.shape
        half = TensorDecl(gname, (e, two_f // 2, d), decl.axes)
        names = (f"blk.{layer}.ffn_gate_exps.weight", f"blk.{layer}.ffn_up_exps.weight")
        gate, up = (src.get(n, half) for n in names)
        if type(gate) is not type(up):  # one fused tensor holds one type
            raise GGUFError(
                f"{src.path}: {names[0]!r} and {names[1]!r} have different types "
                f"({type(gate).__name__}, {type(up).__name__}); this loader fuses them into "
                f"one tensor and needs them alike"
            )
        return jax.tree.map(lambda a, b: np.concatenate([a, b], axis=-2), gate, up)
    if decl.optional and not src.has(gname):
        return np.ones(decl.shape, np.float32)
    return src.get(gname, decl)


def load(
    path: str | os.PathLike, *, dtype: str = "float32", progress: bool = False, mesh=None
) -> Model:
    """Load a Gemma 4 GGUF file.

    dtype: compute dtype, "float32" or "bfloat16". Quantized tensors stay quantized either way.
    mesh: an optional `jax.sharding.Mesh` with axes ("data", "model"): tensors are placed
    straight onto their shards (see `gemma4_jax.sharding`).
    """
    path = Path(path)
    if dtype not in _DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; use one of {sorted(set(_DTYPES))}")
    dtype = _DTYPES[dtype]
    reader = read_gguf(path)  # every malformed-file problem is a GGUFError naming the file
    fields = reader.fields
    src = _TensorSource(path, reader, dtype)
    embd = src.tensors.get("token_embd.weight")
    if embd is None:
        arch = fields.get("general.architecture")
        if arch != "gemma4":
            raise GGUFError(
                f"{path}: architecture is {arch!r}, expected 'gemma4' (a Gemma 4 text model)"
            )
        raise GGUFError(f"{path}: missing tensor 'token_embd.weight'")
    config = config_from_gguf(
        fields,
        {n: t.tensor_type.name for n, t in src.tensors.items()},
        str(path),
        vocab_size=embd.numpy_shape[0],
    )

    todo = list(global_decls(config).items())
    seg_decls = segment_layer_decls(config)
    n_layer_tensors = sum(seg.n_periods * len(d) for seg, slots in seg_decls for _, d in slots)
    bar = _progress(len(todo) + n_layer_tensors, progress, path.name)

    # Repacking blocks and copying to the device are numpy / transfer work that releases the
    # GIL: a thread pool over tensors turns a ~0.25 GB/s serial load into a parallel one.
    # Without a mesh each tensor goes to the device as soon as it is built (host copies die
    # young); with a mesh, `place` shards the whole tree at the end. On an accelerator the
    # matrices skip the host repack: their file bytes go over as they are and the device splits
    # the blocks (`quant.from_gguf_on_device`); the bytes travel in pieces read from the file
    # by a second pool (`file_transfer.FileTransfers`: no page faults, a 3 GB table spread
    # over all its threads).
    to_device = (lambda x: x) if mesh is not None else (lambda x: jax.tree.map(jax.device_put, x))
    device_repack = mesh is None and _device_repack()

    def build_global(decl):
        if device_repack and decl.matrix:
            out = src.on_device([decl.gguf_name], decl, stacked=False, transfer=transfer)
        else:
            out = to_device(src.get(decl.gguf_name, decl))
        bar.update(1)
        return out

    def build_stacked(seg, slot, name, decl):
        names = [decl.gguf_name.format(i=seg.layer_index(p, slot)) for p in range(seg.n_periods)]
        if device_repack and decl.matrix and all(src.has(n) for n in names):
            out = src.on_device(names, decl, stacked=True, transfer=transfer)
            bar.update(len(names))
            return out
        per_period = []
        for period in range(seg.n_periods):
            per_period.append(_load_layer_tensor(src, seg.layer_index(period, slot), name, decl))
            bar.update(1)
        stacked = quant.stack(per_period) if decl.matrix else np.stack(per_period)
        return to_device(stacked)

    workers = max(1, min(16, os.cpu_count() or 1))
    pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="gemma4-load")
    with pool, _file_transfers(reader, workers, device_repack) as transfer:
        g_futs = {name: pool.submit(build_global, decl) for name, decl in todo}
        s_futs = [
            [
                {
                    name: pool.submit(build_stacked, seg, slot, name, decl)
                    for name, decl in decls.items()
                }
                for slot, (_, decls) in enumerate(slots)
            ]
            for seg, slots in seg_decls
        ]
        # The tokenizer (~0.6 s of Python for a 262K vocabulary) is built while the weights
        # travel: the main thread would only wait.
        tokenizer = _tokenizer(path, fields)
        globals_ = {name: f.result() for name, f in g_futs.items()}
        seg_params = [
            tuple({name: f.result() for name, f in slot.items()} for slot in seg) for seg in s_futs
        ]
    bar.close()
    seg_params = [tuple(sp) for sp in seg_params]

    freq_factors = None
    if config.has_rope_freqs:
        rf = src.tensors["rope_freqs.weight"]
        freq_factors = np.asarray(rf.data, np.float32)
    rope = {
        "sliding": rope_inv_freq(config, True),
        "global": rope_inv_freq(config, False, freq_factors),
    }
    params = Params(
        globals=globals_, segments=tuple(seg_params), rope=rope, config=config, dtype=dtype
    )
    params = place(params, mesh)

    meta = {k: v for k, v in fields.items() if not k.startswith("tokenizer.ggml.")}
    return Model(
        path=path, params=params, tokenizer=tokenizer, metadata=meta, tensor_types=dict(src.types)
    )


@contextlib.contextmanager
def _file_transfers(reader: GGUFFile, workers: int, device_repack: bool):
    """`FileTransfers` over the reader's file, or None (each tensor one `device_put` on its
    loader thread) where nothing goes to the device as raw bytes (no device repack, or no
    tensors). For A/B runs, GEMMA4_JAX_FILE_TRANSFERS=0 gives None too, and =nodma transfers
    without registering the buffers."""
    mode = os.environ.get("GEMMA4_JAX_FILE_TRANSFERS", "1").strip().lower()
    if mode not in ("0", "1", "nodma"):
        raise ValueError(f"GEMMA4_JAX_FILE_TRANSFERS={mode!r}: use 1, 0 or nodma")
    if mode == "0" or not device_repack or not reader.tensors:
        yield None
        return
    with FileTransfers.for_gguf(reader, workers, dma_map=mode == "1") as transfers:
        yield transfers


def _tokenizer(path: Path, fields: dict):
    """The file's tokenizer, or None if it has no vocabulary."""
    if "tokenizer.ggml.tokens" not in fields:
        return None
    from .tokenizer import Tokenizer

    try:
        return Tokenizer.from_gguf_fields(fields)
    except GGUFError as e:
        raise GGUFError(f"{path}: {e}") from e


def _device_repack() -> bool:
    """Split quantized blocks on the device (default: on accelerators; the CPU backend's
    "device" is the host, where numpy is as fast). GEMMA4_JAX_DEVICE_REPACK=1/0 overrides."""
    env = os.environ.get("GEMMA4_JAX_DEVICE_REPACK", "").strip()
    if env in ("0", "1"):
        return env == "1"
    return jax.default_backend() != "cpu"


def place(params: Params, mesh=None) -> Params:
    """Move numpy leaves to the device(s); with a mesh, each leaf straight onto its shards."""
    if mesh is None:
        # device_put, not jnp.asarray: the latter compiles a copy program per numpy leaf
        # (device arrays pass through device_put as they are).
        return jax.tree.map(jax.device_put, params)
    from .sharding import shard_params

    return shard_params(params, mesh)


def _progress(total: int, enabled: bool, desc: str):
    if enabled:
        try:
            from tqdm.auto import tqdm

            return tqdm(total=total, desc=f"loading {desc}", unit="tensor", leave=False)
        except ImportError:
            pass

    class _Null:
        def update(self, n):
            pass

        def close(self):
            pass

    return _Null()
