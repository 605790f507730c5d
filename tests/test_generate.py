"""generate / prefill / decode_step against forward and the fixtures' greedy references."""

import importlib

import jax
import numpy as np
import pytest
from conftest import MODEL_FIXTURES, load_fixture

import gemma4_jax as g4

# the package re-exports the function `generate`, which shadows the module's attribute name
gen = importlib.import_module("gemma4_jax.generate")


@pytest.mark.parametrize("name", MODEL_FIXTURES + ("quant_small",))
def test_greedy_generate_reproduces_reference(fixtures_dir, name):
    file = "model.gguf" if name != "quant_small" else "model-Q4_K_M.gguf"
    model, ref = load_fixture(fixtures_dir, name, file)
    prompts = [ref["prompt_0"], ref["prompt_1"]]
    out = g4.generate(model.params, prompts, max_new_tokens=24, stop_tokens=())
    assert out.stop_reason == ["length", "length"]
    for k in (0, 1):
        np.testing.assert_array_equal(out.tokens[k], ref[f"greedy_{k}"])
        assert out.logprobs[k].shape == (24,) and np.all(out.logprobs[k] <= 0)


@pytest.mark.parametrize("name", MODEL_FIXTURES)
def test_decode_steps_match_forward_and_reference(fixtures_dir, name):
    """Every decode step's logits vs forward on the full sequence and vs greedy_logits.

    The fixtures' windows are 8-16 tokens and prompts 41-64, so most steps attend far past the
    window through the ring buffer (wrapped several times).
    """
    model, ref = load_fixture(fixtures_dir, name)
    prompt, greedy = ref["prompt_0"], ref["greedy_0"]
    n = len(prompt)
    full = np.concatenate([prompt, greedy])
    fwd = np.asarray(g4.forward(model.params, full[None]))[0]
    cache = g4.init_cache(model.params, 1, 128)
    padded = np.zeros((1, 64), np.int32)
    padded[0, :n] = prompt
    logits, cache = g4.prefill(model.params, padded, cache, np.array([n]))
    steps = [np.asarray(logits[0])]
    for i in range(len(greedy) - 1):
        logits, cache = g4.decode_step(model.params, greedy[i : i + 1], cache, np.array([n + i]))
        steps.append(np.asarray(logits[0]))
    steps = np.stack(steps)
    vs_forward = np.abs(steps - fwd[n - 1 : n - 1 + len(greedy)]).max()
    vs_ref = np.abs(steps - ref["greedy_logits_0"]).max()
    # float32: cache/no-cache paths sum in different orders. HF's own figure on these fixtures
    # is 3.5e-5..1.5e-4 (meta.json); ours measured 6e-5..1.9e-4.
    assert vs_forward < 2.5e-4, vs_forward
    assert vs_ref < 2e-3, vs_ref


def test_prompt_longer_than_window_fills_ring(fixtures_dir):
    """A 57-token prompt with window 8: the ring must hold the last 8 positions."""
    model, ref = load_fixture(fixtures_dir, "e4b_tiny")
    assert model.config.window < len(ref["prompt_1"])
    out = g4.generate(model.params, [ref["prompt_1"]], max_new_tokens=24, stop_tokens=())
    np.testing.assert_array_equal(out.tokens[0], ref["greedy_1"])


def test_ragged_batch_equals_single_rows(fixtures_dir):
    model, ref = load_fixture(fixtures_dir, "e2b_tiny")
    prompts = [ref["prompt_0"][:13], ref["prompt_1"], ref["prompt_0"][:30]]
    batch = g4.generate(model.params, prompts, max_new_tokens=10, stop_tokens=())
    for i, p in enumerate(prompts):
        one = g4.generate(model.params, [p], max_new_tokens=10, stop_tokens=())
        np.testing.assert_array_equal(batch.tokens[i], one.tokens[0])


def test_stop_tokens(fixtures_dir):
    model, ref = load_fixture(fixtures_dir, "dense_tiny")
    greedy = ref["greedy_0"]
    stop = int(greedy[5])
    first = int(np.argmax(greedy == stop))
    out = g4.generate(model.params, [ref["prompt_0"]], max_new_tokens=24, stop_tokens=[stop])
    assert out.stop_reason == ["stop"]
    np.testing.assert_array_equal(out.tokens[0], greedy[: first + 1])
    # default stop set: EOS and <turn|> from the file
    assert model.config.stop_ids == (1, 6)


def test_sampling_keys(fixtures_dir):
    model, ref = load_fixture(fixtures_dir, "e4b_tiny")
    p = [ref["prompt_0"]]
    run = lambda sampler, seed: g4.generate(
        model.params,
        p,
        max_new_tokens=12,
        sampler=sampler,
        key=jax.random.PRNGKey(seed),
        stop_tokens=(),
    ).tokens[0]
    t1 = g4.Temperature(1.0)
    np.testing.assert_array_equal(run(t1, 1), run(t1, 1))
    assert any(not np.array_equal(run(t1, 1), run(t1, s)) for s in (2, 3, 4))
    np.testing.assert_array_equal(run(g4.TopK(1), 7), ref["greedy_0"][:12])


def test_prefill_compiles_once_per_bucket(fixtures_dir):
    model, ref = load_fixture(fixtures_dir, "moe_tiny")
    before = gen.TRACE_COUNTS["prefill"]
    for n in (20, 33, 47, 64):  # all inside the 64 bucket
        g4.generate(
            model.params, [ref["prompt_0"][:n]], max_new_tokens=4, max_len=256, stop_tokens=()
        )
    assert gen.TRACE_COUNTS["prefill"] - before == 1


def _count_decode_loop_calls(monkeypatch) -> list:
    """A list that grows by one per call of the decode-loop program (for this test only)."""
    program = gen._program("decode_loop")
    calls = []
    monkeypatch.setitem(
        gen._PROGRAMS, "decode_loop", lambda *a, **k: calls.append(1) or program(*a, **k)
    )
    return calls


def test_generation_is_one_decode_program_call(fixtures_dir, monkeypatch):
    model, ref = load_fixture(fixtures_dir, "moe_tiny")
    calls = _count_decode_loop_calls(monkeypatch)
    out = g4.generate(model.params, [ref["prompt_0"]], max_new_tokens=20, stop_tokens=())
    assert len(out.tokens[0]) == 20 and len(calls) == 1
    # streaming in chunks of 8: 3 calls of the same program
    calls.clear()
    chunks = list(
        g4.generate_stream(
            model.params, [ref["prompt_0"]], max_new_tokens=20, stop_tokens=(), chunk=8
        )
    )
    assert len(calls) == 3 and sum(c["tokens"].shape[1] for c in chunks) == 20


def test_first_token_before_the_decode_loop(fixtures_dir, monkeypatch):
    """The first token is yielded from the prefill logits before the decode loop runs, and N
    tokens cost N - 1 decode steps (the last position fed is prompt + N - 2)."""
    model, ref = load_fixture(fixtures_dir, "moe_tiny")
    calls = _count_decode_loop_calls(monkeypatch)
    prompt = ref["prompt_0"]
    stream = g4.generate_stream(model.params, [prompt], max_new_tokens=6, stop_tokens=(), chunk=8)
    first = next(stream)
    assert first["tokens"].shape == (1, 1) and not calls
    assert first["tokens"][0, 0] == ref["greedy_0"][0]
    *_, last = stream
    assert len(calls) == 1
    # `pos` is the position of the last sampled token, never fed: 5 decode steps for 6 tokens.
    assert int(last["state"]["pos"][0]) == len(prompt) + 6 - 1
    one = g4.generate(model.params, [prompt], max_new_tokens=1, stop_tokens=())
    assert len(calls) == 1 and list(one.tokens[0]) == [ref["greedy_0"][0]]


def test_sliding_cache_shape_independent_of_max_len(fixtures_dir):
    model, _ = load_fixture(fixtures_dir, "e4b_tiny")
    c = model.config
    for max_len in (256, 1024):
        spec = gen.cache_spec(c, 2, max_len, np.float32)
        seg0 = spec[0]
        for s, slot in zip(g4.segments(c)[0].slots, seg0, strict=True):
            size = slot["k"].shape[2]
            assert size == (c.window if s.sliding else max_len)
        assert spec[1] is None  # KV-shared layers own no cache


def test_context_errors(fixtures_dir):
    model, ref = load_fixture(fixtures_dir, "e4b_tiny")
    p = [ref["prompt_0"]]
    with pytest.raises(g4.InputError, match="exceeds max_len"):
        g4.generate(model.params, p, max_new_tokens=100, max_len=64)
    with pytest.raises(g4.InputError, match="context"):
        g4.generate(model.params, p, max_new_tokens=model.config.context_length)
    with pytest.raises(g4.InputError, match="outside the vocabulary"):
        g4.generate(model.params, [[1, 2, model.config.vocab_size + 5]], max_new_tokens=2)
    with pytest.raises(g4.InputError, match="empty"):
        g4.generate(model.params, [[]], max_new_tokens=2)


def test_generate_names_bad_arguments(fixtures_dir):
    """generate's other arguments: each mistake is an InputError naming it, found before
    anything is traced (not a TypeError from inside JAX or numpy)."""
    model, _ = load_fixture(fixtures_dir, "e4b_tiny")
    p = [[1, 2, 3]]
    cases = [
        (dict(params=model), "takes the model's Params, got Model: pass model.params"),
        (dict(tokens="hello"), "token ids, not text"),
        (dict(max_new_tokens=2.5), "max_new_tokens must be an int >= 1, got 2.5"),
        (dict(max_len="64"), "max_len must be an int >= 1"),
        (dict(buckets=[0, 64]), "prefill bucket must be an int >= 1, got 0"),
        (dict(stop_tokens="<eos>"), "stop_tokens takes token ids, got the text '<eos>'"),
        (dict(stop_tokens=[1.0]), r"stop_tokens must be token ids \(ints\), got 1.0"),
        (dict(stop_tokens=[model.config.vocab_size]), "stop token .* outside the vocabulary"),
        (dict(key=5), "key must be one jax.random key"),
        (dict(key=jax.random.split(jax.random.key(0), 2)), r"got key<fry> \(2,\)"),
        (dict(sampler="greedy"), "sampler must be a gemma4_jax.sampling sampler"),
    ]
    for change, message in cases:
        kwargs = dict(params=model.params, tokens=p, max_new_tokens=2) | change
        with pytest.raises(g4.InputError, match=message):
            g4.generate(**kwargs)
    with pytest.raises(g4.InputError, match="chunk must be an int >= 1, got 0"):
        next(g4.generate_stream(model.params, p, max_new_tokens=2, chunk=0))


def test_generate_takes_typed_and_raw_keys(fixtures_dir):
    # jax.random.key (typed) and jax.random.PRNGKey (raw uint32 data) of one seed: same tokens.
    model, _ = load_fixture(fixtures_dir, "e4b_tiny")
    runs = [
        g4.generate(model.params, [[1, 2, 3]], max_new_tokens=4, sampler=g4.TopK(8), key=k)
        for k in (jax.random.key(3), jax.random.PRNGKey(3))
    ]
    np.testing.assert_array_equal(runs[0].tokens[0], runs[1].tokens[0])


def _bad_step_calls(params, v):
    """(call, message) pairs: each call to the functional API must raise InputError(message)."""
    import jax.numpy as jnp

    c1 = lambda: g4.init_cache(params, 1, 32)  # noqa: E731
    bf16 = lambda a: a.astype(jnp.bfloat16)  # noqa: E731  (the fixtures' params are float32)
    tok = np.array([[1, 2, 3]])
    return [
        (lambda: g4.prefill(params, np.array([1, 2, 3]), c1()), r"int array \[batch, time\]"),
        (lambda: g4.prefill(params, tok.astype(float), c1()), "got float64"),
        (lambda: g4.prefill(params, np.zeros((1, 0), int), c1()), "is empty"),
        (lambda: g4.prefill(params, np.repeat(tok, 2, 0), c1()), "2 rows, the cache 1"),
        (lambda: g4.prefill(params, np.array([[1, v]]), c1()), f"token id {v} is outside"),
        (lambda: g4.prefill(params, jnp.array([[1, -2]]), c1()), "token id -2 is outside"),
        (lambda: g4.prefill(params, tok, c1(), [0]), r"length 0 is outside \[1, 3\]"),
        (lambda: g4.prefill(params, tok, c1(), [4]), "length 4 is outside"),
        (lambda: g4.prefill(params, tok, c1(), [1, 2]), r"one per row, shape \(\) or \(1,\)"),
        (lambda: g4.prefill(params, tok, c1(), [1.5]), "must be integers"),
        (lambda: g4.prefill(params, tok, c1()[:1]), "was it made for another model"),
        (lambda: g4.prefill(params, tok, "cache"), "laid out as str"),
        (lambda: g4.decode_step(params, [[5]], c1(), [3]), r"int array \[batch\]"),
        (lambda: g4.decode_step(params, [5, 6], c1(), [3]), "2 rows, the cache 1"),
        (lambda: g4.decode_step(params, [v], c1(), [3]), f"token id {v} is outside"),
        (lambda: g4.decode_step(params, [5], c1(), [3, 4]), "one per row"),
        (
            lambda: g4.decode_step(params, [5], jax.tree.map(bf16, c1()), [3]),
            "cache array 0 is bfloat16",
        ),
        (lambda: g4.init_cache(params, 0, 32), "batch must be an int >= 1, got 0"),
        (lambda: g4.init_cache(params, 1, 2.5), "max_len must be an int >= 1"),
        (lambda: g4.init_cache(params, 1, 10**9), "exceeds the model's context"),
        (lambda: g4.forward(params, "hello"), r"int array \[batch, time\], got <U5"),
        (lambda: g4.forward({"w": 1}, tok), "forward takes the model's Params, got dict"),
        (lambda: g4.init_cache(None, 1, 32), "init_cache takes the model's Params"),
        (lambda: g4.prefill([], tok, c1()), "prefill takes the model's Params"),
        (lambda: g4.decode_step((), [5], c1(), [3]), "decode_step takes the model's Params"),
    ]


def test_functional_api_names_bad_input(fixtures_dir):
    """prefill / decode_step / init_cache / forward: a wrong rank or dtype, a batch that does
    not match the cache, another model's cache, a bad length or an id outside the vocabulary
    is an InputError naming it (not an error from inside JAX, not a silently wrong answer)."""
    model, _ = load_fixture(fixtures_dir, "e4b_tiny")
    for call, message in _bad_step_calls(model.params, model.config.vocab_size):
        with pytest.raises(g4.InputError, match=message):
            call()


def test_device_token_outside_the_vocabulary_gives_nan_logits(fixtures_dir):
    """decode_step does not read a device token back (it would stall each step): an id
    outside the vocabulary gives NaN logits in its row, and the other rows are unaffected."""
    import jax.numpy as jnp

    model, ref = load_fixture(fixtures_dir, "e4b_tiny")
    v = model.config.vocab_size
    prompt = np.stack([ref["prompt_0"][:8], ref["prompt_0"][:8]])
    _, cache = g4.prefill(model.params, prompt, g4.init_cache(model.params, 2, 32))
    logits, _ = g4.decode_step(model.params, jnp.array([5, v + 3]), cache, np.array([8, 8]))
    logits = np.asarray(logits)
    assert np.isfinite(logits[0]).all() and np.isnan(logits[1]).all()


def test_decode_step_position_outside_the_cache(fixtures_dir):
    # A write outside the cache would be dropped (silently wrong logits): an error instead.
    model, _ = load_fixture(fixtures_dir, "e4b_tiny")
    cache = g4.init_cache(model.params, 1, 32)
    with pytest.raises(g4.InputError, match="position 32 is outside a cache of 32 positions"):
        g4.decode_step(model.params, [5], cache, [32])
    with pytest.raises(g4.InputError, match="position -1"):
        g4.decode_step(model.params, [5], cache, [-1])


def test_prng_key_is_jax_key():
    """`prng_key` (one cached program) gives exactly `PRNGKey(seed)` / `fold_in(..., index)`."""
    for seed, index in [(0, None), (7, None), (123, 5), (2**31 - 1, 0), (5, 2**32 - 1)]:
        want = jax.random.PRNGKey(seed)
        if index is not None:
            want = jax.random.fold_in(want, index)
        np.testing.assert_array_equal(np.asarray(gen.prng_key(seed, index)), np.asarray(want))
    with pytest.raises(g4.InputError, match="index -1 is not a uint32"):
        gen.prng_key(1, -1)
