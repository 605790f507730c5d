"""Checks of what the functional API (`forward`, `init_cache`, `prefill`, `decode_step`) is
given, made before anything is traced: a wrong rank, a float or text array, a batch that does
not match the cache or a token outside the vocabulary is an `InputError` that names it, not
an error from inside JAX or a silently wrong answer. (`generate` checks its prompts itself:
it takes ragged lists.)

Shapes and dtypes are always checked. Token values are read where that is cheap: host values
(numpy arrays, lists, ints) always; device arrays once per call in `forward` and `prefill`, but
not in `decode_step`, whose token is usually the previous step's device output: reading it
back would stall every step. For that case `model.embed` gives a token outside the vocabulary
NaN logits in its row.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .errors import InputError
from .params import Params

__all__ = [
    "check_ids_in_vocab",
    "check_params",
    "check_prng_key",
    "check_sampler",
    "int32_array",
    "positive_int",
    "row_values",
    "stop_ids",
    "token_array",
]


def check_params(params, what: str) -> None:
    """`params` must be the model's `Params` (a common slip: the `Model` that `load` returns)."""
    if isinstance(params, Params):
        return
    hint = (
        ": pass model.params (the Model that load() returns holds them)"
        if isinstance(getattr(params, "params", None), Params)
        else " (gemma4_jax.load(path).params)"
    )
    raise InputError(f"{what} takes the model's Params, got {type(params).__name__}{hint}")


def check_prng_key(key) -> None:
    """A `jax.random` key: a typed key (`jax.random.key`) or raw uint32 key data
    (`jax.random.PRNGKey`). Tracers pass: a caller's own jit checks its own."""
    if isinstance(key, jax.core.Tracer):
        return
    dtype = getattr(key, "dtype", None)
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        if key.shape == ():
            return
    elif dtype == np.uint32 and np.ndim(key) == 1:
        return
    shown = f"{dtype} {np.shape(key)}" if dtype is not None else type(key).__name__
    raise InputError(
        f"key must be one jax.random key (jax.random.key(seed) or jax.random.PRNGKey(seed)), "
        f"got {shown}"
    )


def check_sampler(sampler) -> None:
    """Samplers are static arguments of the generation programs: callable and hashable."""
    try:
        hash(sampler)
    except TypeError:
        hashable = False
    else:
        hashable = True
    if not (callable(sampler) and hashable):
        raise InputError(
            f"sampler must be a gemma4_jax.sampling sampler (Greedy(), TopP(0.95), ...), a "
            f"hashable callable (logits, key) -> tokens; got {sampler!r}"
        )


def stop_ids(stop_tokens, vocab_size: int) -> tuple[int, ...]:
    """`stop_tokens` (token ids) as a tuple, each checked against the vocabulary."""
    if isinstance(stop_tokens, (str, bytes)):
        raise InputError(
            f"stop_tokens takes token ids, got the text {stop_tokens!r} (ids: "
            f"model.tokenizer.token_to_id(...), or a run config's stop_tokens)"
        )
    if isinstance(stop_tokens, (int, np.integer)):
        stop_tokens = (stop_tokens,)
    out = []
    for s in stop_tokens:
        if isinstance(s, bool) or not isinstance(s, (int, np.integer)):
            raise InputError(f"stop_tokens must be token ids (ints), got {s!r}")
        if not 0 <= s < vocab_size:
            raise InputError(f"stop token {s} is outside the vocabulary [0, {vocab_size})")
        out.append(int(s))
    return tuple(out)


def token_array(
    params: Params, tokens, *, ndim: int, what: str, read_device: bool = True
) -> jax.Array:
    """`tokens` as an int32 array of rank `ndim`, its ids checked against the vocabulary
    (device arrays only when `read_device`; never tracers)."""
    shape = "[batch, time]" if ndim == 2 else "[batch]"
    on_device = isinstance(tokens, jax.Array)
    arr = tokens if on_device else np.asarray(tokens)
    if arr.ndim != ndim or not np.issubdtype(arr.dtype, np.integer):
        raise InputError(f"{what} must be an int array {shape}, got {arr.dtype} {arr.shape}")
    if 0 in arr.shape:
        raise InputError(f"{what} {shape} is empty: shape {arr.shape}")
    if not isinstance(arr, jax.core.Tracer) and (read_device or not on_device):
        check_ids_in_vocab(params, arr, what)
    return int32_array(arr, arr.shape)


def check_ids_in_vocab(params: Params, ids, what: str) -> None:
    """Raises if any of the concrete ids lies outside [0, vocab)."""
    lo, hi = int(ids.min()), int(ids.max())
    v = params.config.vocab_size
    if lo < 0 or hi >= v:
        bad = lo if lo < 0 else hi
        raise InputError(f"{what}: token id {bad} is outside the vocabulary [0, {v})")


def row_values(values, batch: int, what: str):
    """One integer per row: a scalar or a [batch] array (host or device), as given."""
    on_device = isinstance(values, jax.Array)
    arr = values if on_device else np.asarray(values)
    if not np.issubdtype(arr.dtype, np.integer):
        raise InputError(f"{what} must be integers, got {arr.dtype}")
    if arr.shape not in ((), (batch,)):
        raise InputError(f"{what} must be one per row, shape () or ({batch},), got {arr.shape}")
    return arr


def int32_array(values, shape) -> jax.Array:
    """`values` (host or device, broadcastable) as an int32 device array of `shape`. Host
    values go by `device_put`: `jnp.asarray` of a numpy array compiles a copy program, and a
    new process pays a compilation for each such eager op (RESULTS.md run w)."""
    if isinstance(values, jax.Array):
        if values.dtype != jnp.int32:
            values = values.astype(jnp.int32)
        return values if values.shape == tuple(shape) else jnp.broadcast_to(values, shape)
    host = np.broadcast_to(np.asarray(values, np.int32), shape)
    return jax.device_put(np.ascontiguousarray(host))


def positive_int(value, what: str) -> int:
    """`value` as an int >= 1 (bools and floats are not sizes)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InputError(f"{what} must be an int >= 1, got {value!r}")
    return int(value)
