"""`jaxserve` command line.

    jaxserve [serve] [--model M] [--port 8000]  OpenAI-compatible server (the default command)
    jaxserve generate "prompt" [--model M]     one greedy answer, streamed to stdout
    jaxserve chat [--model M]                  interactive terminal chat
    jaxserve convert --model M --output DIR    save loaded parameters as an orbax checkpoint
    jaxserve bench throughput|latency|serve    benchmarks with `vllm bench`'s definitions

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
    lm = load_model(args.model, dtype=args.dtype, load_format=args.load_format, seed=args.seed,
                    progress=True)
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


def cmd_serve(args) -> int:
    from jaxserve.server.launch import follow, serve
    from jaxserve.sharding import parse_mesh
    parse_mesh(args.mesh)   # a malformed --mesh fails here, before the server starts
    if args.coordinator_address or args.num_processes:
        import jax

        from jaxserve.distributed import initialize
        initialize(args.coordinator_address, args.num_processes, args.process_id)
        if jax.process_index() != 0:
            return follow(args)
    return serve(args)


def _add_serve_args(p: argparse.ArgumentParser) -> None:
    _add_model_args(p)
    p.add_argument("--config", default=None, help="YAML file of flag values (see configs/)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (0.0.0.0 for all interfaces)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` "
                   "(also read from $JAXSERVE_API_KEY)")
    p.add_argument("--served-model-name", nargs="+", default=None)
    _add_engine_args(p)
    p.add_argument("--chat-template", default=None, help="a Jinja template file or string")
    p.add_argument("--trust-request-chat-template", action="store_true",
                   help="allow requests to carry their own chat_template (rendered in worker "
                        "processes under --chat-template-timeout)")
    p.add_argument("--chat-template-timeout", type=float, default=2.0,
                   help="seconds a request's own chat template may take to render")
    p.add_argument("--max-queued-requests", type=int, default=1024,
                   help="sequences (prompts x n) that may wait beyond --max-num-seqs; more get 429")
    p.add_argument("--max-request-sequences", type=int, default=256,
                   help="most sequences (prompts x n) one request may ask for; more get 400")
    p.add_argument("--http-header-timeout", type=float, default=10.0,
                   help="seconds a connection has to send a request's headers")
    p.add_argument("--http-body-timeout", type=float, default=30.0,
                   help="seconds a request's body may take to arrive, in total")
    p.add_argument("--max-connections-per-client", type=int, default=0,
                   help="concurrent connections per client IP address (0: no limit; behind a "
                        "reverse proxy every client has the proxy's address)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds to let in-flight requests finish on SIGTERM")
    p.add_argument("--allowed-origins", default=None, help="CORS origins, comma-separated or JSON")
    p.add_argument("--max-request-body-bytes", type=int, default=32 << 20)
    p.add_argument("--uvicorn-log-level", default="warning")
    p.add_argument("--coordinator-address", default=None,
                   help="multi-host: HOST:PORT of process 0 (jax.distributed); the mesh then spans "
                        "every process's devices and process 0 serves HTTP")
    p.add_argument("--num-processes", type=int, default=None, help="multi-host: processes in the job")
    p.add_argument("--process-id", type=int, default=None, help="multi-host: this process's index")


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=None)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--num-kv-blocks", type=int, default=None)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--mesh", default=None, help="device mesh, e.g. tp=2 (tensor parallel over the "
                   "first 2 devices) or dp=2,tp=2 (two replicas of tp=2)")
    p.add_argument("--attention-backend", default="auto")
    p.add_argument("--compilation-cache-dir", default="auto")


def engine_kwargs(args: argparse.Namespace) -> dict:
    """The EngineConfig fields that `_add_engine_args` (and `--seed`) set: the one mapping from
    flags to the engine, shared by `serve` and the in-process benchmarks."""
    return dict(max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                max_num_batched_tokens=args.max_num_batched_tokens, block_size=args.block_size,
                num_kv_blocks=args.num_kv_blocks, gpu_memory_utilization=args.gpu_memory_utilization,
                enable_prefix_caching=args.enable_prefix_caching,
                attention_backend=args.attention_backend,
                compilation_cache_dir=args.compilation_cache_dir, seed=args.seed)


def _add_workload_args(p: argparse.ArgumentParser, *, input_len: int, output_len: int,
                       num_prompts: int | None) -> None:
    p.add_argument("--dataset-path", default=None,
                   help="a ShareGPT-format JSON file (default: random token prompts)")
    p.add_argument("--input-len", type=int, default=input_len, help="random dataset prompt length")
    p.add_argument("--output-len", type=int, default=output_len, help="random dataset output length")
    p.add_argument("--random-range-ratio", type=float, default=0.0,
                   help="draw lengths from [len*(1-r), len*(1+r)]")
    p.add_argument("--sharegpt-output-len", type=int, default=None,
                   help="override the ShareGPT reply lengths")
    if num_prompts is not None:
        p.add_argument("--num-prompts", type=int, default=num_prompts)
    p.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                   help="generate exactly the requested output lengths (default on)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--output-json", default=None, help="write the results to this JSON file")


def cmd_bench(args) -> int:
    if args.bench == "serve":
        from jaxserve.bench.serve import run_serve
        run_serve(args)
    elif args.bench == "throughput":
        from jaxserve.bench.offline import run_throughput
        run_throughput(args)
    else:
        from jaxserve.bench.offline import run_latency
        run_latency(args)
    return 0


def _add_bench_parser(sub) -> None:
    b = sub.add_parser("bench", help="benchmarks: throughput | latency | serve")
    bs = b.add_subparsers(dest="bench", required=True)
    t = bs.add_parser("throughput", help="offline: every prompt at once through the engine")
    _add_model_args(t)
    _add_engine_args(t)
    _add_workload_args(t, input_len=1024, output_len=128, num_prompts=1000)
    la = bs.add_parser("latency", help="offline: end-to-end time of one batch, repeated")
    _add_model_args(la)
    _add_engine_args(la)
    _add_workload_args(la, input_len=32, output_len=128, num_prompts=None)
    la.add_argument("--batch-size", type=int, default=8)
    la.add_argument("--num-iters-warmup", type=int, default=10)
    la.add_argument("--num-iters", type=int, default=30)
    sv = bs.add_parser("serve", help="online: stream requests to a running server over HTTP")
    sv.add_argument("--base-url", default="http://127.0.0.1:8000")
    sv.add_argument("--served-model-name", default=None,
                    help="model name to request (default: the server's first /v1/models entry)")
    sv.add_argument("--api-key", default=None)
    sv.add_argument("--tokenizer", default=None, help="HF directory or .gguf file used to build "
                    "prompts (default: the embedded SmolLM2 tokenizer)")
    sv.add_argument("--vocab-size", type=int, default=None,
                    help="random token ids are drawn below this (default: the tokenizer's size)")
    _add_workload_args(sv, input_len=1024, output_len=128, num_prompts=1000)
    sv.add_argument("--request-rate", type=float, default=float("inf"),
                    help="requests per second, Poisson arrivals (default inf: all at once)")
    sv.add_argument("--max-concurrency", type=int, default=None)
    sv.add_argument("--timeout", type=float, default=600.0, help="per-request timeout, seconds")
    sv.add_argument("--seed", type=int, default=0)
    sv.add_argument("--disable-tqdm", action="store_true")
    for p in (t, la, sv):
        p.set_defaults(func=cmd_bench)


COMMANDS = ("serve", "generate", "chat", "convert", "bench")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxserve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server (default command)")
    _add_serve_args(s)
    s.set_defaults(func=cmd_serve)

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
    _add_bench_parser(sub)
    return parser


def _apply_config_file(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """`--config FILE.yaml`: its keys (flag names) become defaults; flags on the line win."""
    if "--config" not in argv:
        return
    path = argv[argv.index("--config") + 1]
    import yaml
    with open(path) as f:
        values = yaml.safe_load(f) or {}
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of flag names to values")
    serve_parser = parser._subparsers._group_actions[0].choices["serve"]
    known = {a.dest for a in serve_parser._actions}
    defaults = {}
    for k, v in values.items():
        dest = str(k).replace("-", "_")
        if dest not in known:
            raise ValueError(f"{path}: unknown setting {k!r}")
        defaults[dest] = v
    serve_parser.set_defaults(**defaults)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0] not in COMMANDS and argv[0] not in ("-h", "--help")):
        argv = ["serve"] + argv
    parser = build_parser()
    try:
        _apply_config_file(parser, argv)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
