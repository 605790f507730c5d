"""A scripted multi-turn chat with the model's chat template (`chat.Conversation`).

    python examples/chat.py                                       # builtin:tiny (random text)
    python examples/chat.py --model gemma-4-E4B-it-Q8_0.gguf --turn "Hi!" --turn "Tell me more."

For brevity this re-renders and re-prefills the whole conversation every turn with
`generate`; `gemma4-jax chat` keeps the KV cache between turns instead.
"""

import argparse
import sys

import gemma4_jax as g4
from gemma4_jax.builtin import BUILTIN_NOTICE, is_builtin, resolve_model
from gemma4_jax.chat import Conversation, split_thinking


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="builtin:tiny", help="GGUF file or builtin:tiny")
    ap.add_argument("--system", default="You are a concise assistant.")
    ap.add_argument("--turn", action="append", help="a user message (repeatable)")
    ap.add_argument("--think", action="store_true", help="enable thinking")
    ap.add_argument("--max-new-tokens", type=int, default=12)
    args = ap.parse_args(argv)
    turns = args.turn or ["Hello! Who are you?", "Name three rivers."]
    if is_builtin(args.model):
        print(f"note: {BUILTIN_NOTICE}")

    model = g4.load(resolve_model(args.model), dtype="float32")
    tok = model.tokenizer
    conv = Conversation.from_tokenizer(tok, system=args.system, enable_thinking=args.think)
    for user in turns:
        conv.add_user(user)
        # Gemma's template writes <bos> itself: encode without adding another.
        ids = tok.encode(conv.render(), add_bos=False)
        out = g4.generate(model.params, [ids], max_new_tokens=args.max_new_tokens)
        reply = tok.decode(out.tokens[0], skip_special=False)  # keep channel markers
        thinking, answer = split_thinking(reply.removesuffix("<turn|>"))
        print(f"user:  {user}")
        if thinking:
            print(f"  (thinking: {thinking})")
        print(f"model: {tok.decode(tok.encode(answer, add_bos=False), skip_special=True)}")
        conv.add_model(reply)  # the history keeps the answer, not the thinking
    return 0


if __name__ == "__main__":
    sys.exit(main())
