"""Samplers: determinism per key, allowed sets computed by hand, jit/vmap, validation."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma4_jax.sampling import (
    Chain,
    Greedy,
    MinP,
    Temperature,
    TopK,
    TopP,
    chosen_logprobs,
    sampler_from_params,
)

B, V = 4, 64
# One of each kind (with a temperature somewhere), and the two ways of composing.
SAMPLERS = [
    Greedy(),
    Temperature(0.5),
    TopK(3, temperature=2.0),
    TopP(0.5, temperature=0.7),
    MinP(0.05, temperature=1.5),
    Chain(TopK(40), TopP(0.95), Temperature(0.8)),
    sampler_from_params(temperature=0.8, top_k=20, top_p=0.9, min_p=0.02),
]


@functools.cache
def jitted(sampler):
    """Compiled `sampler` and `sampler.filter` (eager mode compiles every op on its own: slow)."""
    return jax.jit(sampler), jax.jit(sampler.filter)


def random_logits(seed=0, shape=(B, V), scale=2.0):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32) * scale


def draw_many(sampler, logits_row, n=4096, seed=0):
    """n independent draws for one row of logits: one key, the row repeated n times."""
    batch = jnp.broadcast_to(jnp.asarray(logits_row, jnp.float32), (n, logits_row.shape[-1]))
    return np.asarray(jitted(sampler)[0](batch, jax.random.key(seed)))


# Hand-built distribution: probabilities 0.5, 0.2, 0.15, 0.1, 0.05 put at scattered indices
# of an 8-token vocabulary whose other 3 tokens have probability 0 (-inf logits).
PROBS = {5: 0.5, 1: 0.2, 7: 0.15, 0: 0.1, 3: 0.05}
HAND_LOGITS = np.full(8, -np.inf, np.float32)
for _i, _p in PROBS.items():
    HAND_LOGITS[_i] = math.log(_p)


# ---------------------------------------------------------------------------- basics
@functools.partial(jax.jit, static_argnums=0)
def _exercise(samplers, logits, keys):
    """What the per-sampler test checks, for every sampler in one compiled program (compiling
    dominates the run time). The samplers are a static argument: they must hash."""
    out = []
    for sampler in samplers:
        by_key = jax.vmap(lambda k, s=sampler: s(logits, k))(keys)  # [n_keys, B]
        per_row = jax.vmap(sampler)(logits, keys[:B])  # one key per row, each call sees [V]
        out.append((by_key, per_row, sampler.filter(logits)))
    return out


@pytest.fixture(scope="module")
def exercised():
    logits = random_logits(1)
    keys = jax.random.split(jax.random.key(0), 16)
    keys = keys.at[1].set(keys[0])
    first = _exercise(tuple(SAMPLERS), logits, keys)
    again = _exercise(tuple(SAMPLERS), logits, keys)  # cached: no second compile
    return dict(zip(SAMPLERS, zip(first, again, strict=True), strict=True))


@pytest.mark.parametrize("sampler", SAMPLERS, ids=repr)
def test_sampler_under_jit_and_vmap(exercised, sampler):
    (by_key, per_row, masked), (by_key_again, _, _) = exercised[sampler]
    assert by_key.dtype == jnp.int32 and by_key.shape == (16, B) and per_row.shape == (B,)
    # Same key, same tokens; and the same again from a second call.
    np.testing.assert_array_equal(by_key[0], by_key[1])
    np.testing.assert_array_equal(by_key_again, by_key)
    # Different keys do not all agree.
    assert len({tuple(t) for t in np.asarray(by_key)}) > 1 or isinstance(sampler, Greedy)
    # Every draw lies in the filter's support, which is never empty.
    allowed = np.isfinite(np.asarray(masked))
    assert allowed.any(axis=-1).all()
    assert all(allowed[np.arange(B), t].all() for t in np.asarray(by_key))
    assert allowed[np.arange(B), np.asarray(per_row)].all()


def test_vmap_rows_equal_row_by_row():
    sampler = Chain(TopK(40), TopP(0.95), Temperature(0.8))
    logits = random_logits(2)
    keys = jax.random.split(jax.random.key(3), B)

    @jax.jit
    def both(logits, keys):
        rows = jnp.stack([sampler(logits[i], keys[i]) for i in range(B)])
        return jax.vmap(sampler)(logits, keys), rows

    per_row, row_by_row = both(logits, keys)
    np.testing.assert_array_equal(per_row, row_by_row)


def test_eager_and_bf16():
    # Without jit (op by op) the tokens are the same; bf16 logits are computed in float32.
    sampler = TopK(5, temperature=0.7)
    logits, key = random_logits(4), jax.random.key(9)
    want = jitted(sampler)[0](logits, key)
    np.testing.assert_array_equal(sampler(logits, key), want)
    half = logits.astype(jnp.bfloat16)
    want_half = jitted(sampler)[0](half.astype(jnp.float32), key)
    np.testing.assert_array_equal(sampler(half, key), want_half)


def test_different_keys_give_different_samples():
    logits = jnp.zeros((1, V))  # uniform: any two keys should rarely agree
    sample = jitted(Temperature(1.0))[0]
    draws = {int(sample(logits, jax.random.key(s))[0]) for s in range(64)}
    assert len(draws) > 30


def test_temperature_one_matches_softmax():
    logits = jnp.log(jnp.array([0.5, 0.25, 0.125, 0.125]))
    toks = draw_many(Temperature(1.0), logits, n=20000)
    freq = np.bincount(toks, minlength=4) / toks.size
    np.testing.assert_allclose(freq, [0.5, 0.25, 0.125, 0.125], atol=0.015)


def test_temperature_changes_distribution():
    logits = jnp.log(jnp.array([0.6, 0.4]))
    cold = draw_many(Temperature(0.25), logits, n=8000).mean()  # p(1) = .4^4/(.6^4+.4^4)
    hot = draw_many(Temperature(4.0), logits, n=8000).mean()
    assert abs(cold - 0.4**4 / (0.6**4 + 0.4**4)) < 0.02
    assert abs(hot - 0.4**0.25 / (0.6**0.25 + 0.4**0.25)) < 0.02


def test_topk1_is_greedy():
    greedy, top1, top1_hot = (jitted(s)[0] for s in (Greedy(), TopK(1), TopK(1, temperature=3.0)))
    for seed in range(5):
        logits = random_logits(seed, shape=(16, 1000))
        want = np.asarray(jnp.argmax(logits, axis=-1))
        np.testing.assert_array_equal(greedy(logits, jax.random.key(seed)), want)
        for k in range(4):
            np.testing.assert_array_equal(top1(logits, jax.random.key(k)), want)
            np.testing.assert_array_equal(top1_hot(logits, jax.random.key(k)), want)
    # Ties: both pick the lowest index.
    tied = jnp.array([[0.0, 2.0, 2.0, 1.0]])
    assert int(greedy(tied, jax.random.key(0))[0]) == 1
    assert all(int(top1(tied, jax.random.key(s))[0]) == 1 for s in range(20))


def test_topk_keeps_exactly_k():
    logits = random_logits(3, shape=(4, 100))
    masked = np.asarray(jitted(TopK(7))[1](logits))
    assert (np.isfinite(masked).sum(-1) == 7).all()
    top7 = np.argsort(-np.asarray(logits), axis=-1)[:, :7]
    for row, idx in zip(masked, top7, strict=True):
        assert set(np.flatnonzero(np.isfinite(row))) == set(idx)
    # k larger than the vocabulary keeps everything.
    assert np.isfinite(np.asarray(jitted(TopK(1000))[1](logits))).all()
    # Kept logits are the tempered logits, unchanged.
    masked = np.asarray(jitted(TopK(7, temperature=2.0))[1](logits))
    keep = np.isfinite(masked)
    np.testing.assert_allclose(masked[keep], np.asarray(logits)[keep] / 2.0, rtol=1e-6)


# ---------------------------------------------------------------------------- allowed sets
# Probabilities by rank: 0.5 (idx 5), 0.2 (idx 1), 0.15 (idx 7), 0.1 (idx 0), 0.05 (idx 3).
# Top-p keeps a token when the mass ranked above it is < p:
#   mass above = 0, 0.5, 0.7, 0.85, 0.95.
ALLOWED_CASES = [
    (TopP(0.3), {5}),
    (TopP(0.6), {5, 1}),
    (TopP(0.75), {5, 1, 7}),
    (TopP(0.9), {5, 1, 7, 0}),
    (TopP(1.0), {5, 1, 7, 0, 3}),
    # Temperature 0.5 squares the probabilities: .25,.04,.0225,.01,.0025 / .325, so the top
    # token alone has .769 >= .75.
    (TopP(0.75, temperature=0.5), {5}),
    # Min-p keeps prob >= p * 0.5.
    (MinP(0.25), {5, 1, 7}),  # threshold .125
    (MinP(0.35), {5, 1}),  # threshold .175
    (MinP(0.15), {5, 1, 7, 0}),  # threshold .075
    (MinP(0.01), {5, 1, 7, 0, 3}),
    (MinP(1.0), {5}),
    # Temperature 2 takes square roots: .707,.447,.387,.316,.224; p=.5 -> threshold .354.
    (MinP(0.5, temperature=2.0), {5, 1, 7}),
    (TopK(2), {5, 1}),
    # Chains: top-k 4 drops idx 3, then top-p .6 on what is left (renormalised
    # .526,.21,.158,.105: mass above 0,.526,.737) keeps {5, 1}.
    (Chain(TopK(4), TopP(0.6), Temperature(0.8)), {5, 1}),
    (Chain(MinP(0.15), TopK(3)), {5, 1, 7}),
    (Greedy(), {5}),
]


@pytest.fixture(scope="module")
def allowed_draws():
    """filter and 8192 independent draws on HAND_LOGITS for every case, in one compile."""
    samplers = tuple(s for s, _ in ALLOWED_CASES)
    batch = jnp.broadcast_to(jnp.asarray(HAND_LOGITS), (8192, 8))

    @jax.jit
    def run(x, key):
        return [(s.filter(x[:1])[0], s(x, key)) for s in samplers]

    return run(batch, jax.random.key(0))


@pytest.mark.parametrize("case", range(len(ALLOWED_CASES)), ids=lambda i: repr(ALLOWED_CASES[i]))
def test_allowed_set(allowed_draws, case):
    sampler, allowed = ALLOWED_CASES[case]
    masked, toks = allowed_draws[case]
    assert set(np.flatnonzero(np.isfinite(np.asarray(masked)))) == allowed, sampler
    seen = set(np.unique(np.asarray(toks)).tolist())
    assert seen <= allowed
    assert seen == allowed  # every allowed token shows up


def test_topp_on_random_logits_matches_numpy():
    logits = np.asarray(random_logits(5, shape=(6, 200), scale=3.0))
    p = 0.8
    masked = np.asarray(jitted(TopP(p))[1](jnp.asarray(logits)))
    for row, got in zip(logits, masked, strict=True):
        probs = np.exp(row - row.max())
        probs /= probs.sum()
        order = np.argsort(-probs, kind="stable")
        above = np.cumsum(probs[order]) - probs[order]
        want = set(order[above < p].tolist())
        assert set(np.flatnonzero(np.isfinite(got)).tolist()) == want


# ---------------------------------------------------------------------------- jit / scan
def test_jit_inside_scan():
    sampler = Chain(TopK(10), Temperature(0.7))

    @jax.jit
    def run(logits, key):
        def step(k, _):
            k, sub = jax.random.split(k)
            return k, sampler(logits, sub)

        return jax.lax.scan(step, key, None, length=5)[1]

    out = run(random_logits(4), jax.random.key(0))
    assert out.shape == (5, B) and out.dtype == jnp.int32
    np.testing.assert_array_equal(out, run(random_logits(4), jax.random.key(0)))


# ---------------------------------------------------------------------------- value semantics
def test_hash_and_equality():
    assert TopK(40) == TopK(40) and hash(TopK(40)) == hash(TopK(40))
    assert TopP(1) == TopP(1.0) and hash(TopP(1)) == hash(TopP(1.0))
    assert Temperature(1) == Temperature(1.0)
    assert TopK(40) != TopK(41) and TopP(0.9) != MinP(0.9)
    a = Chain(TopK(40), TopP(0.95), Temperature(0.8))
    b = Chain(TopK(40), Chain(TopP(0.95), Temperature(0.8)))
    assert a == b and hash(a) == hash(b) and a.steps == (TopK(40), TopP(0.95), Temperature(0.8))
    assert len({Greedy(), Greedy(), a, b}) == 2
    with pytest.raises(AttributeError):
        TopK(3).k = 4


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: Temperature(0), "Temperature.t"),
        (lambda: Temperature(-1.0), "Temperature.t"),
        (lambda: Temperature(float("nan")), "Temperature.t"),
        (lambda: Temperature(float("inf")), "Temperature.t"),
        (lambda: TopK(0), "TopK.k"),
        (lambda: TopK(2.5), "TopK.k"),
        (lambda: TopK(True), "TopK.k"),
        (lambda: TopK(5, temperature=0), "TopK.temperature"),
        (lambda: TopP(0), "TopP.p"),
        (lambda: TopP(1.01), "TopP.p"),
        (lambda: TopP(float("nan")), "TopP.p"),
        (lambda: TopP(0.9, temperature=-2), "TopP.temperature"),
        (lambda: MinP(0.0), "MinP.p"),
        (lambda: MinP(2), "MinP.p"),
        (lambda: MinP("0.1"), "MinP.p"),
        (lambda: Chain(), "at least one"),
        (lambda: Chain(TopK(3), "greedy"), "samplers"),
    ],
)
def test_validation(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_sampler_from_params():
    assert sampler_from_params(temperature=0) == Greedy()
    assert sampler_from_params() == Temperature(1.0)
    assert sampler_from_params(top_k=0, top_p=1.0, min_p=0.0) == Temperature(1.0)
    assert sampler_from_params(top_p=0.9) == TopP(0.9)
    assert sampler_from_params(temperature=0.7, top_k=40, top_p=0.95, min_p=0.05) == Chain(
        Temperature(0.7), TopK(40), TopP(0.95), MinP(0.05)
    )
    with pytest.raises(ValueError):
        sampler_from_params(temperature=-1)


# ---------------------------------------------------------------------------- logprobs
def test_chosen_logprobs_is_unfiltered_log_softmax():
    logits = random_logits(6, shape=(4, 50))
    toks = jitted(TopK(3, temperature=0.5))[0](logits, jax.random.key(0))
    got = np.asarray(jax.jit(chosen_logprobs)(logits, toks))
    x = np.asarray(logits, np.float64)
    logp = x - x.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    want = logp[np.arange(4), np.asarray(toks)]
    assert got.shape == (4,) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # Per row under vmap: logits [V], token [] -> [].
    np.testing.assert_allclose(jax.jit(jax.vmap(chosen_logprobs))(logits, toks), got, rtol=1e-6)
