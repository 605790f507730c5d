"""Per-layer activations: the residual stream after every layer, and a logit lens on it.

    python examples/activations.py                                # builtin:tiny
    python examples/activations.py --model gemma-4-E4B-it-Q8_0.gguf --prompt "Rome is in"

`forward(params, tokens, return_hidden="layers")` returns float32 [L, B, T, D] from the same
jitted scan as the logits (the hidden states are scan outputs). Entry -1 is the final hidden
state before the output norm (`return_hidden=True`); `model.lm_head` turns any entry into
logits: what each layer would predict if the model stopped there.
"""

import argparse
import sys

import jax
import numpy as np

import gemma4_jax as g4
from gemma4_jax.builtin import BUILTIN_NOTICE, is_builtin, resolve_model
from gemma4_jax.model import lm_head


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="builtin:tiny", help="GGUF file or builtin:tiny")
    ap.add_argument("--prompt", default="The Eiffel Tower is in the city of")
    args = ap.parse_args(argv)
    if is_builtin(args.model):
        print(f"note: {BUILTIN_NOTICE}")

    model = g4.load(resolve_model(args.model), dtype="float32")
    tok = model.tokenizer
    tokens = np.array([tok.encode(args.prompt)])
    hidden = g4.forward(model.params, tokens, return_hidden="layers")  # [L, 1, T, D]
    last = hidden[:, 0, -1]  # [L, D]: the last position after every layer
    lens = jax.jit(lm_head)(model.params, last[:, None])[:, 0]  # [L, V]
    norms = np.linalg.norm(np.asarray(last), axis=-1)
    print(f"{hidden.shape[0]} layers, hidden {tuple(hidden.shape)} {hidden.dtype}")
    for i, spec in enumerate(g4.layer_plan(model.config)):
        top = int(np.argmax(lens[i]))
        kind = "sliding" if spec.sliding else "global "
        print(f"layer {i:3d} {kind} |h| = {norms[i]:9.3f}  lens -> {tok.decode([top])!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
