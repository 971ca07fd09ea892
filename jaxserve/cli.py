"""`jaxserve` command line.

    jaxserve generate "prompt" [--model M]     one greedy answer, streamed to stdout
    jaxserve chat [--model M]                  interactive terminal chat
    jaxserve convert --model M --output DIR    save loaded parameters as an orbax checkpoint

With no --model, the embedded default (SmolLM2-135M-Instruct) is used.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="HF hub id, local HF directory, .gguf file, orbax directory or preset name "
                        "(default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="auto", help="auto | bfloat16 | float16 | float32")
    p.add_argument("--load-format", default="auto",
                   choices=["auto", "safetensors", "gguf", "orbax", "dummy"])
    p.add_argument("--seed", type=int, default=0)


def _load(args):
    from jaxserve.loading import load_model

    t0 = time.perf_counter()
    print(f"loading {args.model or 'SmolLM2-135M-Instruct (embedded default)'} ...",
          file=sys.stderr, flush=True)
    lm = load_model(args.model, dtype=args.dtype, load_format=args.load_format, seed=args.seed)
    import jax
    print(f"loaded {lm.config.architecture} ({lm.config.num_params() / 1e6:.0f}M params, "
          f"{lm.dtype.__name__ if hasattr(lm.dtype, '__name__') else lm.dtype}) on "
          f"{jax.devices()[0].platform} in {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
    return lm


def _stop_ids(lm) -> list[int]:
    ids = set(lm.config.eos_token_ids)
    if lm.tokenizer is not None and lm.tokenizer.eos_token_id is not None:
        ids.add(lm.tokenizer.eos_token_id)
    return sorted(ids)


def _answer(lm, gen, prompt_ids: list[int], max_tokens: int, out) -> str:
    from jaxserve.engine.detokenizer import IncrementalDetokenizer

    detok = IncrementalDetokenizer(lm.tokenizer, prompt_ids)
    stops = _stop_ids(lm)

    def on_token(tok: int) -> None:
        if tok not in stops:
            out.write(detok.add(tok))
            out.flush()

    gen.generate(prompt_ids, max_tokens, stop_token_ids=stops, on_token=on_token)
    out.write(detok.flush() + "\n")
    out.flush()
    return detok.text


def cmd_generate(args) -> int:
    from jaxserve.runner.generate import GreedyGenerator
    from jaxserve.tokenizer import encode_chat

    lm = _load(args)
    if lm.tokenizer is None:
        print("error: this model has no tokenizer (dummy preset); nothing to generate text with",
              file=sys.stderr)
        return 2
    if args.raw or not getattr(lm.tokenizer, "chat_template", None):
        ids = lm.tokenizer.encode(args.prompt)
    else:
        ids = encode_chat(lm.tokenizer, [{"role": "user", "content": args.prompt}])
    budget = lm.config.max_position_embeddings - len(ids)
    if budget < 1:
        print(f"error: prompt has {len(ids)} tokens, the model's context is "
              f"{lm.config.max_position_embeddings}", file=sys.stderr)
        return 2
    gen = GreedyGenerator(lm.model)
    t0 = time.perf_counter()
    _answer(lm, gen, ids, min(args.max_tokens, budget), sys.stdout)
    print(f"[{time.perf_counter() - t0:.1f}s]", file=sys.stderr)
    return 0


def cmd_chat(args) -> int:
    from jaxserve.runner.generate import GreedyGenerator
    from jaxserve.tokenizer import encode_chat

    lm = _load(args)
    gen = GreedyGenerator(lm.model)
    messages: list[dict] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    print("chat with the model; an empty line or Ctrl-D quits", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        messages.append({"role": "user", "content": line})
        ids = encode_chat(lm.tokenizer, messages)
        budget = lm.config.max_position_embeddings - len(ids)
        if budget < 1:
            print("[context full: start a new chat]", file=sys.stderr)
            break
        reply = _answer(lm, gen, ids, min(args.max_tokens, budget), sys.stdout)
        messages.append({"role": "assistant", "content": reply})
    return 0


def cmd_convert(args) -> int:
    from jaxserve.loading.orbax_io import save_orbax

    lm = _load(args)
    out = save_orbax(lm.model, lm.hf_config, args.output, tokenizer=lm.tokenizer)
    print(f"saved orbax checkpoint to {out}; serve it with --model {args.output}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxserve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="greedy answer to one prompt")
    g.add_argument("prompt")
    g.add_argument("--max-tokens", type=int, default=256)
    g.add_argument("--raw", action="store_true", help="do not apply the chat template")
    _add_model_args(g)
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="interactive chat in the terminal")
    c.add_argument("--max-tokens", type=int, default=512)
    c.add_argument("--system", default=None, help="system prompt")
    _add_model_args(c)
    c.set_defaults(func=cmd_chat)

    v = sub.add_parser("convert", help="save a model's parameters as an orbax checkpoint")
    v.add_argument("--output", required=True)
    _add_model_args(v)
    v.set_defaults(func=cmd_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
