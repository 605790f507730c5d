"""Token samplers: frozen, hashable dataclasses that are pure functions of (logits, key).

Every sampler is called as `sampler(logits[..., V], key) -> tokens[...] int32` and exposes
`sampler.filter(logits) -> logits'`: the logits it samples from, with temperature applied and
every excluded token set to -inf. Sampling is then one `jax.random.categorical` over the last
axis, so all randomness comes from the explicit `jax.random` key (one key draws independent
samples for every row of a batch). Samplers hash and compare by value, so they can be static
arguments of `jax.jit`; they work under `jax.vmap` (any leading shape, vocabulary last).

Design: each filter is its own class, and `Chain` applies several in order, e.g.
`Chain(TopK(40), TopP(0.95), Temperature(0.8))` (filters see the temperature-1
distribution, then the survivors are sharpened), or build transformers' order from plain
numbers with `sampler_from_params(temperature=0.8, top_k=40, top_p=0.95)` (temperature
first, then top-k, top-p, min-p). `TopK`, `TopP` and `MinP` take their own `temperature`,
applied before they filter, so `TopP(0.9, temperature=0.7)` is the common one-liner.

Ties: `Greedy` and `TopK` keep the lowest index among equal logits (as `argmax` and
`lax.top_k` do), so `TopK(1)` is exactly `Greedy()`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Real

import jax
import jax.numpy as jnp

__all__ = [
    "Chain",
    "Greedy",
    "MinP",
    "Sampler",
    "Temperature",
    "TopK",
    "TopP",
    "chosen_logprobs",
    "sampler_from_params",
]

_NEG_INF = -jnp.inf


class Sampler:
    """Base class. Subclasses implement `filter`; sampling is categorical over its output."""

    def filter(self, logits: jax.Array) -> jax.Array:
        raise NotImplementedError

    def __call__(self, logits: jax.Array, key: jax.Array) -> jax.Array:
        """logits[..., V] (any float dtype, computed in float32), key -> tokens[...] int32."""
        masked = self.filter(jnp.asarray(logits, jnp.float32))
        return jax.random.categorical(key, masked, axis=-1).astype(jnp.int32)


@dataclass(frozen=True)
class Greedy(Sampler):
    """The most likely token (lowest index on ties). The key is accepted and ignored."""

    def filter(self, logits: jax.Array) -> jax.Array:
        logits = jnp.asarray(logits, jnp.float32)
        best = jnp.argmax(logits, axis=-1)
        keep = jnp.arange(logits.shape[-1]) == best[..., None]
        return jnp.where(keep, logits, _NEG_INF)

    def __call__(self, logits: jax.Array, key: jax.Array | None = None) -> jax.Array:
        return jnp.argmax(jnp.asarray(logits, jnp.float32), axis=-1).astype(jnp.int32)


@dataclass(frozen=True)
class Temperature(Sampler):
    """Sample from softmax(logits / t): t < 1 sharpens, t > 1 flattens."""

    t: float

    def __post_init__(self):
        _set_float(self, "t", _check_temperature(self.t, "Temperature.t"))

    def filter(self, logits: jax.Array) -> jax.Array:
        return _temper(logits, self.t)


@dataclass(frozen=True)
class TopK(Sampler):
    """Keep the k most likely tokens (exactly k: ties broken toward the lower index)."""

    k: int
    temperature: float = 1.0

    def __post_init__(self):
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"TopK.k must be an int >= 1, got {self.k!r}")
        _set_float(self, "temperature", _check_temperature(self.temperature, "TopK.temperature"))

    def filter(self, logits: jax.Array) -> jax.Array:
        logits = _temper(logits, self.temperature)
        k = min(self.k, logits.shape[-1])  # static: the vocabulary size is a static shape
        _, idx = jax.lax.top_k(logits, k)
        keep = jnp.put_along_axis(jnp.zeros(logits.shape, bool), idx, True, axis=-1, inplace=False)
        return jnp.where(keep, logits, _NEG_INF)


@dataclass(frozen=True)
class TopP(Sampler):
    """Nucleus sampling: keep the most likely tokens until their probability reaches p.

    A token is kept when the probability of the tokens ranked strictly above it is below `p`,
    so the smallest set with mass >= p survives and the top token always does.
    """

    p: float
    temperature: float = 1.0

    def __post_init__(self):
        _set_float(self, "p", _check_prob(self.p, "TopP.p"))
        _set_float(self, "temperature", _check_temperature(self.temperature, "TopP.temperature"))

    def filter(self, logits: jax.Array) -> jax.Array:
        logits = _temper(logits, self.temperature)
        # Stable descending order: equal logits keep their index order.
        order = jnp.argsort(-logits, axis=-1, stable=True)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_above = jnp.cumsum(probs, axis=-1) - probs
        keep_sorted = mass_above < self.p
        keep = jnp.put_along_axis(
            jnp.zeros(logits.shape, bool), order, keep_sorted, axis=-1, inplace=False
        )
        return jnp.where(keep, logits, _NEG_INF)


@dataclass(frozen=True)
class MinP(Sampler):
    """Keep tokens whose probability is at least `p` times the top token's probability."""

    p: float
    temperature: float = 1.0

    def __post_init__(self):
        _set_float(self, "p", _check_prob(self.p, "MinP.p"))
        _set_float(self, "temperature", _check_temperature(self.temperature, "MinP.temperature"))

    def filter(self, logits: jax.Array) -> jax.Array:
        logits = _temper(logits, self.temperature)
        # prob_i >= p * prob_max  <=>  logit_i >= logit_max + log(p): no softmax needed.
        top = jnp.max(logits, axis=-1, keepdims=True)
        return jnp.where(logits >= top + math.log(self.p), logits, _NEG_INF)


@dataclass(frozen=True, init=False)
class Chain(Sampler):
    """Apply several samplers' filters in order, then sample once.

    `Chain(TopK(40), TopP(0.95), Temperature(0.8))`: top-k and top-p on the temperature-1
    distribution, then the survivors are divided by 0.8. Nested chains are flattened.
    """

    steps: tuple[Sampler, ...]

    def __init__(self, *steps: Sampler):
        flat: list[Sampler] = []
        for s in steps:
            if not isinstance(s, Sampler):
                raise ValueError(f"Chain steps must be samplers, got {s!r}")
            flat.extend(s.steps if isinstance(s, Chain) else (s,))
        if not flat:
            raise ValueError("Chain needs at least one step")
        object.__setattr__(self, "steps", tuple(flat))

    def filter(self, logits: jax.Array) -> jax.Array:
        logits = jnp.asarray(logits, jnp.float32)
        for s in self.steps:
            logits = s.filter(logits)
        return logits


def sampler_from_params(
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
) -> Sampler:
    """A sampler from the usual knobs, in transformers' order (temperature, top-k, top-p, min-p).

    `temperature == 0` means greedy. `None` (or `top_k=0`, `top_p=1`, `min_p=0`, the
    conventional "off" values) leaves a filter out.
    """
    if temperature == 0:
        return Greedy()
    steps: list[Sampler] = []
    if temperature != 1:
        steps.append(Temperature(temperature))
    if top_k is not None and top_k != 0:
        steps.append(TopK(top_k))
    if top_p is not None and top_p != 1:
        steps.append(TopP(top_p))
    if min_p is not None and min_p != 0:
        steps.append(MinP(min_p))
    if not steps:
        return Temperature(1.0)
    return steps[0] if len(steps) == 1 else Chain(*steps)


def chosen_logprobs(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """log p(token) under the model's own distribution: log_softmax(logits) at temperature 1,
    with no filter applied, whatever sampler chose the token.

    logits[..., V], tokens[...] -> float32[...]. This is the quantity for scoring and
    perplexity; it is not the probability the sampler drew the token with (that one is -inf
    outside a filter's set and changes with temperature).
    """
    logp = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1)
    idx = jnp.asarray(tokens, jnp.int32)[..., None]
    return jnp.take_along_axis(logp, idx, axis=-1)[..., 0]


# ---------------------------------------------------------------------------- helpers
def _temper(logits: jax.Array, t: float) -> jax.Array:
    logits = jnp.asarray(logits, jnp.float32)
    return logits if t == 1.0 else logits / t


def _check_temperature(t: object, name: str) -> float:
    if isinstance(t, bool) or not isinstance(t, Real) or not math.isfinite(t) or t <= 0:
        raise ValueError(f"{name} must be a finite number > 0 (use Greedy() for 0), got {t!r}")
    return float(t)


def _check_prob(p: object, name: str) -> float:
    if isinstance(p, bool) or not isinstance(p, Real) or not 0 < p <= 1:
        raise ValueError(f"{name} must be in (0, 1], got {p!r}")
    return float(p)


def _set_float(obj: object, field: str, value: float) -> None:
    # Normalise ints to floats so TopP(1) == TopP(1.0) and both hash alike (static jit args).
    object.__setattr__(obj, field, value)
