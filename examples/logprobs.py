"""Score candidate continuations with `forward`: sum of token log-probabilities, best first.

    python examples/logprobs.py                                   # builtin:tiny (random scores)
    python examples/logprobs.py --model gemma-4-E4B-it-Q8_0.gguf \
        --prompt "The capital of France is" --candidate " Paris" --candidate " Lyon"
"""

import argparse
import sys

import numpy as np

import gemma4_jax as g4
from gemma4_jax.builtin import BUILTIN_NOTICE, is_builtin, resolve_model
from gemma4_jax.sampling import chosen_logprobs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="builtin:tiny", help="GGUF file or builtin:tiny")
    ap.add_argument("--prompt", default="The capital of France is")
    ap.add_argument("--candidate", action="append", help="a continuation (repeatable)")
    args = ap.parse_args(argv)
    cands = args.candidate or [" Paris", " London", " a small village", " blue"]
    if is_builtin(args.model):
        print(f"note: {BUILTIN_NOTICE}")

    model = g4.load(resolve_model(args.model), dtype="float32")
    tok = model.tokenizer
    prompt = tok.encode(args.prompt)
    conts = [tok.encode(c, add_bos=False) for c in cands]
    # One batch: prompt + candidate per row, right-padded (causal attention ignores the pad).
    width = len(prompt) + max(len(c) for c in conts)
    batch = np.full((len(cands), width), model.config.pad_id, np.int32)
    for i, c in enumerate(conts):
        batch[i, : len(prompt) + len(c)] = prompt + c
    logits = g4.forward(model.params, batch)  # [N, T, V]; position t predicts token t + 1
    lp = np.asarray(chosen_logprobs(logits[:, :-1], batch[:, 1:]))  # [N, T - 1]
    scores = []
    for i, c in enumerate(conts):
        s = lp[i, len(prompt) - 1 : len(prompt) - 1 + len(c)]  # only the candidate's tokens
        scores.append((float(s.sum()), cands[i], len(c)))
    for total, cand, n in sorted(scores, reverse=True):
        print(f"{total:9.3f}  ({n} tokens, {total / n:7.3f} per token)  {args.prompt}{cand}")
    print(f"best: {max(scores)[1]!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
