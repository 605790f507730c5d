"""Sample several continuations of prompts of different lengths in one batch.

    python examples/batch_sampling.py                             # builtin:tiny (random text)
    python examples/batch_sampling.py --model gemma-4-E4B-it-Q8_0.gguf --samples 4 --min-p 0.1

Ragged prompts share one batch (right-padded, per-row lengths). One `jax.random` key draws
independent samples for every row; the same key gives the same tokens again.
"""

import argparse
import sys

import jax
import numpy as np

import gemma4_jax as g4
from gemma4_jax.builtin import BUILTIN_NOTICE, is_builtin, resolve_model


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="builtin:tiny", help="GGUF file or builtin:tiny")
    ap.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    ap.add_argument("--samples", type=int, default=2, help="samples per prompt")
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--min-p", type=float, default=0.05)
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    prompts = args.prompt or ["Once upon a time", "The three primary colours are red,"]
    if is_builtin(args.model):
        print(f"note: {BUILTIN_NOTICE}")

    model = g4.load(resolve_model(args.model), dtype="float32")
    tok = model.tokenizer
    rows = [tok.encode(p) for p in prompts for _ in range(args.samples)]
    sampler = g4.MinP(args.min_p, temperature=args.temperature)
    key = jax.random.PRNGKey(args.seed)
    kw = dict(max_new_tokens=args.max_new_tokens, sampler=sampler, key=key)
    out = g4.generate(model.params, rows, **kw)
    for i, toks in enumerate(out.tokens):
        prompt = prompts[i // args.samples]
        text = tok.decode(toks, skip_special=True)
        print(f"[{prompt!r} #{i % args.samples}] {text!r}  (logprob {out.logprobs[i].sum():.2f})")

    again = g4.generate(model.params, rows, **kw)
    same = all(np.array_equal(a, b) for a, b in zip(out.tokens, again.tokens, strict=True))
    print(f"same key, same tokens: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
