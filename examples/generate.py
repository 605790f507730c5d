"""Load a GGUF, generate a completion, then stream one: the library behind `gemma4-jax generate`.

python examples/generate.py                                   # builtin:tiny (random text)
python examples/generate.py --model gemma-4-E4B-it-Q8_0.gguf --prompt "Why is the sky blue?"
"""

import argparse
import sys

import jax

import gemma4_jax as g4
from gemma4_jax.builtin import BUILTIN_NOTICE, is_builtin, resolve_model


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="builtin:tiny", help="GGUF file or builtin:tiny")
    ap.add_argument("--prompt", default="The capital of France is")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if is_builtin(args.model):
        print(f"note: {BUILTIN_NOTICE}")

    model = g4.load(resolve_model(args.model), dtype="float32")
    tok = model.tokenizer
    ids = tok.encode(args.prompt)  # BOS added as the file asks

    # 1. One call: the whole decode loop is one device program.
    out = g4.generate(
        model.params,
        [ids],
        max_new_tokens=args.max_new_tokens,
        sampler=g4.TopP(args.top_p),
        key=jax.random.PRNGKey(args.seed),
    )
    print(args.prompt + tok.decode(out.tokens[0], skip_special=True))
    print(f"  stop: {out.stop_reason[0]}, mean logprob {out.logprobs[0].mean():.3f}")

    # 2. Streaming: the same loop run in programs of 4 tokens, decoded incrementally.
    dec = tok.stream(skip_special=True)
    sys.stdout.write(args.prompt)
    for item in g4.generate_stream(
        model.params, [ids], max_new_tokens=args.max_new_tokens, chunk=4
    ):
        sys.stdout.write(dec.extend(int(t) for t in item["tokens"][0]))
        sys.stdout.flush()
    print(dec.flush())
    return 0


if __name__ == "__main__":
    sys.exit(main())
