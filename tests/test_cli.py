"""`gemma4-jax` on the built-in model: every subcommand exits 0, mistakes are one line.

Most commands run in-process through `cli.main` (the jit caches are shared, so the programs
compile once for the whole file) with `--no-compile-cache`, which keeps JAX's global cache
setting untouched for the rest of the session; the error paths run as real subprocesses, to
see exactly what a user sees (one stderr line, no traceback, non-zero exit status).
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gemma4_jax as g4
from gemma4_jax import cli
from gemma4_jax.builtin import BUILTIN_NOTICE

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
PROMPTS = ROOT / "configs" / "prompts.txt"
# Small and shared by the tests below: B=1 programs use max_len 256 (buckets 64, 128, 256).
FAST = ["--no-compile-cache"]


def run_cli(*args: str, cwd: Path = ROOT, env_extra: dict | None = None):
    """`python -m gemma4_jax.cli ARGS` as a user runs it."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), **(env_extra or {}))
    return subprocess.run(
        [sys.executable, "-m", "gemma4_jax.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def assert_one_line_error(proc, *needles: str) -> str:
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("gemma4-jax: error: ")]
    assert len(errors) == 1, proc.stderr
    for n in needles:
        assert n in errors[0], errors[0]
    return errors[0]


# ---------------------------------------------------------------------------- run


def test_run_tiny_config_writes_jsonl(tmp_path, capsys):
    out = tmp_path / "out" / "results.jsonl"
    rc = cli.main(["run", str(TINY), "max_new_tokens=4", f"output={out}", *FAST])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    text = captured.out
    assert BUILTIN_NOTICE in text
    assert text.index(BUILTIN_NOTICE) < text.index("=== [1/2]")
    assert "=== [2/2]" in text
    assert "time to first token:" in text and "tok/s" in text
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(recs) == 2
    for rec in recs:
        assert set(rec) >= {"prompt", "text", "tokens", "logprobs", "timings", "stop_reason"}
        assert 1 <= len(rec["tokens"]) <= 4 and len(rec["logprobs"]) == len(rec["tokens"])
        assert all(lp <= 0 for lp in rec["logprobs"])
        assert rec["timings"]["ttft_s"] > 0
    assert recs[0]["prompt"] == "The morning train left the valley station"
    side = out.with_name(out.name + ".config.yaml")
    assert "max_new_tokens: 4" in side.read_text()


def test_run_pads_the_last_batch(tmp_path, capsys):
    """Three prompts in batches of two: the last batch is padded, three results come out."""
    out = tmp_path / "r.jsonl"
    rc = cli.main(
        [
            "run",
            str(TINY),
            "max_new_tokens=2",
            "prompts.text=[a, b c, d e f]",
            "chat_template=false",
            f"output={out}",
            *FAST,
        ]
    )
    assert rc == 0, capsys.readouterr().err
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in recs] == ["a", "b c", "d e f"]
    assert "=== [3/3]" in capsys.readouterr().out


# ---------------------------------------------------------------------------- generate


def test_generate_streams(capsys):
    args = ["generate", "--prompt", "Once upon a time", "--max-new-tokens", "8"]
    rc = cli.main([*args, "--max-len", "256", *FAST])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert BUILTIN_NOTICE in captured.out
    assert "tok/s" in captured.err and "first tokens on screen after" in captured.err
    assert "8 tokens" in captured.err or "stop token" in captured.err


def test_generate_chat_and_sampling_flags(capsys):
    args = ["generate", "--prompt", "Hi", "--chat", "--max-new-tokens", "3", "--top-k", "5"]
    rc = cli.main([*args, "--temperature", "0.7", "--seed", "3", "--max-len", "256", *FAST])
    assert rc == 0, capsys.readouterr().err


def test_bad_flag_value_is_one_line(capsys):
    rc = cli.main(["generate", "--prompt", "x", "--top-p", "2", *FAST])
    err = capsys.readouterr().err
    assert rc == 1
    assert err.strip().splitlines() == ["gemma4-jax: error: TopP.p must be in (0, 1], got 2.0"]


def test_debug_shows_the_exception():
    with pytest.raises(ValueError, match="TopP.p"):
        cli.main(["--debug", "generate", "--prompt", "x", "--top-p", "2", *FAST])


# ---------------------------------------------------------------------------- chat


def test_chat_piped_stdin(monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello there\nAnd then?\n/exit\nignored\n"))
    rc = cli.main(["chat", "--max-new-tokens", "4", "--max-len", "256", "--system", "Hi", *FAST])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert captured.out.count("model> ") == 2 and "ignored" not in captured.out
    assert captured.err.count("tok/s") == 2
    assert "prefilled the conversation" in captured.err  # the first turn


def test_chat_eof_ends(monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    assert cli.main(["chat", *FAST]) == 0


def session(model, sampler=None, **kw) -> cli.ChatSession:
    sampler = g4.Greedy() if sampler is None else sampler
    kw = {"max_len": 256, "key": jax.random.PRNGKey(0), "think": False, "system": None, **kw}
    return cli.ChatSession(model, sampler=sampler, **kw)


def test_chat_cache_feed_equals_prefill(tiny):
    """Feeding a turn's tokens into the kept cache (decode steps) gives the logits one prefill
    of the whole token sequence gives: the cache really carries the conversation."""
    sess = session(tiny)
    a = tiny.tokenizer.encode("<|turn>user\nHello<turn|>\n<|turn>model\n", add_bos=True)
    b = tiny.tokenizer.encode(" Hi.<turn|>\n<|turn>user\nMore, with a longer tail", add_bos=False)
    b = b * 2  # past the sliding window (16) so the ring wraps while feeding
    sess._prefill(a)
    sess._feed(b)
    assert sess.pos == len(a) + len(b) and sess.prefills == 1 and sess.ids == a + b
    whole = session(tiny)
    whole._prefill(a + b)
    # float32 summation order alone: prefill vs forward already differ by ~3e-4 here; a
    # wrong ring slot or position would move these logits (|x| <= ~8) by O(1).
    np.testing.assert_allclose(np.asarray(sess.logits), np.asarray(whole.logits), atol=2e-3)


@dataclasses.dataclass(frozen=True)
class AlwaysTurnEnd(g4.Greedy):
    """A sampler that ends every reply at once: replies then round-trip through the template
    exactly, so the next turn must reuse the cache."""

    def __call__(self, logits, key=None):
        return jnp.full(logits.shape[:-1], 6, jnp.int32)  # <turn|>


def test_chat_second_turn_reuses_the_cache(tiny):
    sess = session(tiny, AlwaysTurnEnd(), system="Be brief.")
    assert list(sess.turn("Hello", 4)) == [6]
    first = sess.pos
    assert list(sess.turn("And then?", 4)) == [6]
    assert sess.prefills == 1  # only the first turn prefilled
    tail = sess.fed - 2  # the stop token of each reply is fed too
    assert tail > 0 and sess.pos == first + tail + 1 == len(sess.ids)
    # The cache holds exactly the rendered conversation, up to its last <turn|>.
    want = cli._encode_prompt(sess.tok, sess.conv.render(add_generation_prompt=False))
    assert sess.ids == want[: sess.pos]
    assert sess.tok.decode(want[sess.pos :]) == "\n"


def test_reply_printer_separates_thinking(tiny):
    tok = tiny.tokenizer
    ids = tok.encode("<|channel>thought\nhmm let me see<channel|>The answer<turn|>", add_bos=False)
    out = io.StringIO()
    pr = cli.ReplyPrinter(tok, out)
    for i in ids:
        pr.push(i)
    pr.finish()
    text = out.getvalue()
    assert text.startswith("[thinking]\n") and "[/thinking]" in text
    assert "hmm let me see" in text and text.rstrip().endswith("The answer")
    assert "<turn|>" not in text and "<|channel>" not in text


# ---------------------------------------------------------------------------- info


def test_info_as_a_subprocess_exits_zero():
    proc = run_cli("info", "builtin:tiny")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for needle in ("architecture:  gemma4", "layer plan:", "layers 0-5", "Q8_0 x", "parameters:"):
        assert needle in out
    assert "vocab 2048" in out and "add_bos True" in out and "'<turn|>' (6)" in out
    assert "chat template: yes" in out and "{{ bos_token }}" in out


def test_info_with_global_flags_after_the_command(capsys):
    before = os.environ.get("GEMMA4_JAX_KERNELS")
    assert cli.main(["info", "builtin:tiny", "--kernels", "reference", *FAST]) == 0
    assert os.environ.get("GEMMA4_JAX_KERNELS") == before  # restored after the call
    assert "layer plan:" in capsys.readouterr().out


def test_info_not_a_gguf(tmp_path, capsys):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"nope" * 10)
    assert cli.main(["info", str(bad), *FAST]) == 1
    assert capsys.readouterr().err.strip() == (
        f"gemma4-jax: error: {bad}: not a GGUF file (magic b'nope', expected b'GGUF')"
    )


# ---------------------------------------------------------------------------- perplexity


@pytest.mark.parametrize(
    "n,context,stride,prefix",
    [(100, 64, 32, 1), (63, 64, 32, 1), (64, 64, 63, 1), (200, 16, 1, 1), (50, 16, 7, 0)],
)
def test_perplexity_windows_score_every_token_once(n, context, stride, prefix):
    seen = []
    for begin, end, first in cli.perplexity_windows(n, context, stride, prefix):
        assert end - begin + prefix <= context and begin <= first <= end
        seen.extend(range(first, end))
    assert seen == list(range(0 if prefix else 1, n))


def test_perplexity_matches_forward(tiny, capsys):
    """One window: the reported perplexity is exp(mean NLL) of forward on BOS + text."""
    rc = cli.main(["perplexity", "--text", str(PROMPTS), "--context", "128", *FAST])
    out = capsys.readouterr().out
    assert rc == 0
    ppl = float(out.split("perplexity: ")[1].split()[0])
    tok = tiny.tokenizer
    ids = [tok.bos_id, *tok.encode(PROMPTS.read_text(), add_bos=False)]
    assert len(ids) <= 128
    padded = np.zeros((1, 128), np.int32)
    padded[0, : len(ids)] = ids
    logits = np.asarray(g4.forward(tiny.params, padded), np.float64)[0, : len(ids) - 1]
    m = logits.max(-1, keepdims=True)
    logp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
    nll = -np.mean(logp[np.arange(len(ids) - 1), ids[1:]])
    assert f"over {len(ids) - 1} tokens" in out
    assert ppl == pytest.approx(math.exp(nll), rel=1e-3)


def test_perplexity_strided(capsys):
    args = ["perplexity", "--text", str(PROMPTS), "--context", "32", "--stride", "16"]
    assert cli.main([*args, "--batch-size", "2", *FAST]) == 0
    out = capsys.readouterr().out
    assert "windows of 32 tokens, stride 16" in out and "tok/s" in out


def test_perplexity_bad_stride(capsys):
    args = ["perplexity", "--text", str(PROMPTS), "--context", "32", "--stride", "40", *FAST]
    assert cli.main(args) == 1
    assert "--stride 40 must be in [1, 31]" in capsys.readouterr().err


# ---------------------------------------------------------------------------- bench


def test_bench_passes_arguments_through(tmp_path, monkeypatch, capfd):
    script = tmp_path / "benchmarks" / "bench_e2e.py"
    script.parent.mkdir()
    script.write_text("import sys\nprint('BENCH', sys.argv[1:])\n")
    monkeypatch.setattr(cli, "_bench_script", lambda: script)
    # Global flags go before `bench`; everything after it is the script's (no abbreviations).
    assert cli.main([*FAST, "bench", "--smoke", "--n", "3", "--debug"]) == 0
    assert "BENCH ['--smoke', '--n', '3', '--debug']" in capfd.readouterr().out


def test_bench_without_the_script(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "_bench_script", lambda: tmp_path / "bench_e2e.py")
    assert cli.main([*FAST, "bench", "--smoke"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("gemma4-jax: error: no end-to-end benchmark at") and err.count("\n") == 1


# ---------------------------------------------------------------------------- errors


def test_unknown_config_key_is_one_line(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("model: builtin:tiny\nmax_new_tokns: 4\nprompts: {text: [hi]}\n")
    err = assert_one_line_error(run_cli("run", str(cfg)), "unknown key 'max_new_tokns'")
    assert "did you mean 'max_new_tokens'" in err and str(cfg) in err


def test_missing_model_file_is_one_line(tmp_path):
    missing = tmp_path / "nowhere" / "gemma-4-E4B-it-Q8_0.gguf"
    proc = run_cli("run", str(TINY), f"model={missing}")
    assert_one_line_error(proc, str(missing), "does not exist")


def test_missing_text_file_is_one_line(tmp_path):
    missing = tmp_path / "book.txt"
    proc = run_cli("perplexity", "--text", str(missing))
    assert_one_line_error(proc, str(missing), "does not exist")


def test_missing_generate_model_in_process(tmp_path, capsys):
    missing = tmp_path / "m.gguf"
    assert cli.main(["generate", "--model", str(missing), "--prompt", "x", *FAST]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(missing) in err[0]


@pytest.fixture(scope="module", autouse=True)
def _builtin_cache(g4_cache):
    """Every test here runs with the shared builtin cache set (see conftest.g4_cache)."""
    return g4_cache
