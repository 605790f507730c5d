"""Perplexity of a text file with `forward`, in consecutive windows that each start with BOS.

    python examples/perplexity.py                                 # builtin:tiny, prompts.txt
    python examples/perplexity.py --model gemma-4-E4B-it-Q8_0.gguf --text book.txt --context 2048

`gemma4-jax perplexity` does the same with overlapping (strided) windows and batching.
"""

import argparse
import math
import sys
from pathlib import Path

import numpy as np

import gemma4_jax as g4
from gemma4_jax.builtin import BUILTIN_NOTICE, is_builtin, resolve_model
from gemma4_jax.sampling import chosen_logprobs

DEFAULT_TEXT = Path(__file__).resolve().parents[1] / "configs" / "prompts.txt"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="builtin:tiny", help="GGUF file or builtin:tiny")
    ap.add_argument("--text", default=str(DEFAULT_TEXT), help="UTF-8 text file")
    ap.add_argument("--context", type=int, default=64, help="window length in tokens")
    args = ap.parse_args(argv)
    if is_builtin(args.model):
        print(f"note: {BUILTIN_NOTICE}")

    model = g4.load(resolve_model(args.model), dtype="float32")
    tok = model.tokenizer
    ids = tok.encode(Path(args.text).read_text(encoding="utf-8"), add_bos=False)
    span = args.context - 1  # text tokens per window, after BOS
    nll, n = 0.0, 0
    for start in range(0, len(ids), span):
        window = [tok.bos_id, *ids[start : start + span]]
        logits = g4.forward(model.params, np.array([window]))  # [1, T, V]
        # position t predicts token t + 1: every text token of the window is scored once
        lp = chosen_logprobs(logits[:, :-1], np.array([window[1:]]))
        nll -= float(lp.sum())
        n += len(window) - 1
    print(f"perplexity {math.exp(nll / n):.3f} over {n} tokens (windows of {args.context})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
