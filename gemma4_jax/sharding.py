"""Sharding the params and KV caches over a device mesh with axes ("data", "model").

One rules table (`RULES`) maps the logical axes named in `params.py` to mesh axes: tensor
parallelism over attention heads, KV heads, MLP width and vocabulary on "model", expert
parallelism over experts on "model", data parallelism over the batch on "data"; everything else
(model width, head dim, scan periods, cache positions) is replicated. `forward`, `prefill`,
`decode_step` and `generate` need no change: their inputs carry shardings and jit lets XLA
partition the jnp code. `generate.init_cache` allocates caches on their shards and `prefill` /
`decode_step` put their batch inputs on "data", so the caches they return keep
`cache_shardings`. Pallas kernels are opaque to XLA: in Pallas mode run under
`jax.set_mesh(mesh)` and `ops.py` wraps them in `shard_map`.

How a declared tensor becomes PartitionSpecs (`param_specs`):

* Its logical axes are claimed in order (leading axes such as experts, then N, then K); a mesh
  axis serves at most one dim of a tensor, so `experts_down [E, D, F]` shards E and keeps F whole.
* A dim is split only if every shard gets whole units: whole heads (an axis "heads"/"kv_heads"
  of size H*dh splits by heads, never inside a head), and along K whole quantization blocks
  (Q4_K needs K/256 divisible by the mesh size). Otherwise that dim is replicated.
  Consequence: with fewer KV heads than the "model" size (MQA/GQA under wide TP) the K/V
  projections and the KV cache are replicated on "model" and every device attends its own query
  heads against all KV heads (as vLLM does by duplicating KV heads); query heads not divisible by
  the TP size replicate attention as a whole, while MLP/vocab stay sharded.
* Each quantized field array `[..., N, K/r]` takes the spec of the dims it stores: leading axes
  and N as the logical tensor, its last dim that of K (a K split on whole blocks is a split on
  whole blocks of every field). Stacked layers keep their leading `n_periods` axis replicated.
* A mesh axis of size 1 is left out of the spec (the same placement, a plainer spec).

`shard_params` puts each host (numpy, possibly memory-mapped) leaf straight onto its shards:
every device receives only its slice, no device ever holds a full copy first.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from . import quant
from .config import Gemma4Config, segments
from .params import Params, TensorDecl, global_decls, segment_layer_decls

DATA, MODEL = "data", "model"
AXES = (DATA, MODEL)

# logical axis -> mesh axis (None: replicated). Axes not listed are replicated.
RULES: dict[str, str | None] = {
    "batch": DATA,
    "heads": MODEL,
    "kv_heads": MODEL,
    "mlp": MODEL,
    "vocab": MODEL,
    "experts": MODEL,
    "embed": None,
    "head_dim": None,
    "periods": None,  # the stacked-layer axis scanned over
    "cache_seq": None,
}

__all__ = [
    "AXES",
    "DATA",
    "MODEL",
    "RULES",
    "batch_sharding",
    "cache_shardings",
    "cache_specs",
    "describe",
    "make_mesh",
    "mesh_from_shape",
    "param_shardings",
    "param_specs",
    "params_mesh",
    "shard_batch",
    "shard_params",
    "tensor_specs",
]


# ---------------------------------------------------------------------------- meshes


def make_mesh(data: int = 1, model: int | None = None, *, devices=None) -> Mesh:
    """A ("data", "model") mesh with Auto axis types over the first data*model devices.

    `model=None` takes every remaining device (`make_mesh(1)`: pure tensor parallelism).
    """
    devices = list(jax.devices() if devices is None else devices)
    if model is None:
        model = len(devices) // data
    n = data * model
    if data < 1 or model < 1 or n > len(devices):
        raise ValueError(f"mesh data={data} x model={model} needs {n} devices, have {len(devices)}")
    arr = np.asarray(devices[:n], dtype=object).reshape(data, model)
    auto = (jax.sharding.AxisType.Auto,) * 2
    return Mesh(arr, AXES, axis_types=auto)


def mesh_from_shape(shape: Sequence[int] | None) -> Mesh | None:
    """`(data, model)` -> mesh; None -> None (single device). For run configs and the CLI."""
    if shape is None:
        return None
    if len(shape) != 2:
        raise ValueError(f"mesh shape must be (data, model), got {tuple(shape)}")
    return make_mesh(int(shape[0]), int(shape[1]))


def _sizes(mesh) -> dict[str, int]:
    """Axis sizes of a Mesh, an AbstractMesh or a plain {"data": d, "model": m} mapping."""
    shape = mesh if isinstance(mesh, Mapping) else mesh.shape
    sizes = {a: int(shape.get(a, 1)) for a in AXES}
    extra = set(shape) - set(AXES)
    if extra:
        raise ValueError(f"mesh axes must be {AXES}, got {tuple(shape)}")
    return sizes


# ---------------------------------------------------------------------------- spec derivation


@dataclasses.dataclass(frozen=True)
class _Dim:
    size: int
    axis: str | None  # logical axis name
    unit: int = 1  # a shard must hold a multiple of this many elements


def _assign(dims: Sequence[_Dim], sizes: Mapping[str, int]) -> tuple[str | None, ...]:
    """Mesh axis per dim: claimed in order, each mesh axis once, only where shards are whole."""
    used: set[str] = set()
    out = []
    for d in dims:
        mesh_axis = RULES.get(d.axis) if d.axis else None
        m = sizes.get(mesh_axis, 1) if mesh_axis else 1
        if mesh_axis is None or mesh_axis in used or m == 1 or d.size % (m * d.unit):
            out.append(None)
            continue
        used.add(mesh_axis)
        out.append(mesh_axis)
    return tuple(out)


def _units(decl: TensorDecl, head_dim: int | None) -> tuple[int, ...]:
    """Splitting granule of each logical dim: a whole head for head axes, else 1."""
    return tuple(head_dim if a in ("heads", "kv_heads") and head_dim else 1 for a in decl.axes)


def tensor_specs(decl: TensorDecl, leaf, sizes: Mapping[str, int], *, head_dim=None, stacked=False):
    """PartitionSpecs for one declared tensor: a `QTensor` of specs, or one spec for an array.

    `leaf` supplies the quant type and field shapes (arrays, ShapeDtypeStructs: anything with
    `.shape`); `stacked` says it carries a leading `n_periods` axis.
    """
    lead = (None,) if stacked else ()
    units = _units(decl, head_dim)
    if not isinstance(leaf, quant.QTensor):
        dims = [_Dim(s, a, u) for s, a, u in zip(decl.shape, decl.axes, units, strict=True)]
        return PartitionSpec(*lead, *_assign(dims, sizes))
    *outer, k = decl.shape
    # K splits on whole blocks (and whole heads, for attn_output's K = heads).
    k_unit = math.lcm(units[-1], type(leaf).block_size)
    dims = [_Dim(s, a, u) for s, a, u in zip(outer, decl.axes[:-1], units[:-1], strict=True)]
    dims.append(_Dim(k, decl.axes[-1], k_unit))
    spec = PartitionSpec(*lead, *_assign(dims, sizes))
    # Every field stores [..., N, K/r]: the same dims, so the same spec.
    return type(leaf)(*(spec for _ in leaf.arrays()))


def param_specs(params: Params, mesh) -> Params:
    """The params pytree with a PartitionSpec (per quant field) in place of every array.

    `mesh` may be a Mesh, an AbstractMesh or a {"data": d, "model": m} mapping: only the axis
    sizes matter, so specs can be derived (and tested) without the devices.
    """
    sizes = _sizes(mesh)
    c = params.config
    g_decls = global_decls(c)
    globals_ = {
        name: tensor_specs(g_decls[name], leaf, sizes) for name, leaf in params.globals.items()
    }
    segs = []
    for (_, slots), seg_params in zip(segment_layer_decls(c), params.segments, strict=True):
        segs.append(
            tuple(
                {
                    name: tensor_specs(
                        decls[name], leaf, sizes, head_dim=spec.head_dim, stacked=True
                    )
                    for name, leaf in slot_params.items()
                }
                for (spec, decls), slot_params in zip(slots, seg_params, strict=True)
            )
        )
    rope = {k: PartitionSpec() for k in params.rope}
    return dataclasses.replace(params, globals=globals_, segments=tuple(segs), rope=rope)


def _is_spec(x) -> bool:
    return isinstance(x, PartitionSpec)


def param_shardings(params: Params, mesh: Mesh) -> Params:
    """The params pytree with a `NamedSharding` in place of every array (see `param_specs`)."""
    return jax.tree.map(
        lambda s: NamedSharding(mesh, s), param_specs(params, mesh), is_leaf=_is_spec
    )


# ---------------------------------------------------------------------------- placement


def _place(x, sharding: NamedSharding) -> jax.Array:
    """One leaf onto its shards. Host arrays: each device gets (a copy of) only its slice."""
    if isinstance(x, jax.Array):
        return jax.device_put(x, sharding)
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: np.ascontiguousarray(x[idx]))


def shard_params(params: Params, mesh: Mesh) -> Params:
    """Place every leaf of `params` (numpy or jax) on `mesh` with `param_shardings`."""
    return jax.tree.map(_place, params, param_shardings(params, mesh))


def params_mesh(params: Params) -> Mesh | None:
    """The mesh `params` live on (None for single-device or host params)."""
    leaves = jax.tree.leaves(params)
    s = getattr(leaves[0], "sharding", None) if leaves else None
    return s.mesh if isinstance(s, NamedSharding) and s.mesh.size > 1 else None


def cache_specs(config: Gemma4Config, cache_spec, mesh) -> tuple:
    """PartitionSpecs of a KV cache laid out as `generate.cache_spec` (per segment, per slot
    {"k","v"} [n_periods, B, S, Hk, dh]): batch on "data", KV heads on "model" when each
    device gets whole heads, otherwise replicated (like the K/V projections)."""
    sizes = _sizes(mesh)
    out = []
    for seg, seg_cache in zip(segments(config), cache_spec, strict=True):
        if seg_cache is None:
            out.append(None)
            continue
        if len(seg_cache) != len(seg.slots):
            raise ValueError(f"cache segment has {len(seg_cache)} slots, expected {seg.period}")
        out.append(
            tuple(
                None if slot is None else {k: _cache_spec(a.shape, sizes) for k, a in slot.items()}
                for slot in seg_cache
            )
        )
    return tuple(out)


def _cache_spec(shape, sizes) -> PartitionSpec:
    n, b, size, hk, dh = shape
    dims = (
        _Dim(n, "periods"),
        _Dim(b, "batch"),
        _Dim(size, "cache_seq"),
        _Dim(hk * dh, "kv_heads", dh),  # whole heads only: [Hk, dh] split as one Hk*dh dim
        _Dim(dh, "head_dim"),
    )
    return PartitionSpec(*_assign(dims, sizes))


def cache_shardings(config: Gemma4Config, cache_spec, mesh: Mesh) -> tuple:
    """`cache_specs` as NamedShardings on `mesh`."""
    return jax.tree.map(
        lambda s: NamedSharding(mesh, s), cache_specs(config, cache_spec, mesh), is_leaf=_is_spec
    )


def batch_sharding(mesh: Mesh, shape: Sequence[int]) -> NamedSharding:
    """Leading (batch) axis on "data" when it divides evenly, the rest replicated."""
    first = _assign([_Dim(int(shape[0]), "batch")], _sizes(mesh)) if len(shape) else ()
    return NamedSharding(mesh, PartitionSpec(*first))


def shard_batch(x, mesh: Mesh) -> jax.Array:
    """Place a batch-major input (tokens [B, T], lengths [B], ...) with `batch_sharding`."""
    x = x if isinstance(x, jax.Array) else np.asarray(x)
    return _place(x, batch_sharding(mesh, x.shape))


def describe(params: Params, mesh) -> dict[str, Any]:
    """{"globals.embed.w": "P('model', None)", ...}: a readable table of the param specs."""
    specs = param_specs(params, mesh)
    flat = jax.tree_util.tree_flatten_with_path(specs, is_leaf=_is_spec)[0]
    return {jax.tree_util.keystr(path, simple=True, separator="."): str(s) for path, s in flat}
