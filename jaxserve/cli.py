"""`jaxserve` command line.

    jaxserve [serve] [MODEL] [--port 8000]     OpenAI-compatible server (the default command)
    jaxserve generate "prompt" [--model M]     one answer, streamed to stdout (greedy by default)
    jaxserve chat [--model M]                  interactive terminal chat
    jaxserve convert --model M --output DIR    save loaded parameters as an orbax checkpoint
    jaxserve bench throughput|latency|serve    benchmarks with `vllm bench`'s definitions
    jaxserve cost --bench-json F --gpu-hour-usd X   self-hosted $/1M tokens beside an API's
    jaxserve usage [--usage-db FILE] [--json]  per-key token usage the server recorded

With no model, the embedded default (SmolLM2-135M-Instruct) is used. `python -m jaxserve` is the
same command. `serve` takes `vllm serve` command lines: its flags mean what vLLM's mean, and the
vLLM flags with no counterpart here are refused with what to use instead (docs/vllm.md).
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time

from jaxserve.arg_utils import add_vllm_compat_args, resolve_args


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """`--help` shows each flag's default; a flag that is off or unset by default (False, None)
    says in its help what it then does."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if ("%(default)" not in text and action.option_strings and default is not None
                and default is not False and default is not argparse.SUPPRESS):
            text += " (default: %(default)s)"
        return text


def _human_int(value: str) -> int:
    """An integer, also written as vLLM takes it: 32k = 32,000, 32K = 32,768 (m/M, g/G alike)."""
    scale = {"k": 10**3, "m": 10**6, "g": 10**9, "K": 2**10, "M": 2**20, "G": 2**30}
    try:
        if value and value[-1] in scale:
            number = float(value[:-1]) * scale[value[-1]]
            if not number.is_integer():
                raise ValueError
            return int(number)
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected an integer like 4096, 32k or 32K, got {value!r}") from None


def _dtype(value: str) -> str:
    return "float32" if value == "float" else value   # vLLM's spelling of float32


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="HF hub id, local HF directory, .gguf file, orbax directory or preset name "
                        "(default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", type=_dtype, default="auto",
                   help="auto (float32 on CPU, else the checkpoint's) | bfloat16 | float16 | half | "
                        "float32 | float")
    p.add_argument("--load-format", default="auto",
                   choices=["auto", "safetensors", "gguf", "orbax", "dummy"],
                   help="how to read the weights; dummy: random weights of the real shapes")
    p.add_argument("--seed", type=int, default=0,
                   help="random seed of dummy weights and of sampling (a request's own seed "
                        "wins)")


def _add_sampling_args(p: argparse.ArgumentParser, max_tokens: int) -> None:
    p.add_argument("--temperature", type=float, default=0.0,
                   help="0 answers greedily; above 0 samples through the serving engine")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (1: off)")
    p.add_argument("--top-k", type=int, default=0,
                   help="sample from the k most likely tokens (0: off)")
    p.add_argument("--max-tokens", type=int, default=max_tokens, help="most tokens per answer")


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


class _SampledAnswers:
    """Sampled answers (--temperature > 0) from the serving engine, so that they are exactly what
    the server's sampler gives for the same values and seed. Its warm-up is off: the one batch
    shape a single conversation needs compiles on first use, in seconds."""

    def __init__(self, lm, args):
        from jaxserve.engine.core import EngineConfig, EngineCore

        self.core = EngineCore(lm, EngineConfig(max_num_seqs=1, seed=args.seed, warmup=False,
                                                show_progress=False, freeze_gc=False))
        self.args = args
        self.turns = itertools.count()

    def answer(self, prompt_ids: list[int], max_tokens: int, out) -> str:
        from jaxserve.sampling.params import SamplingParams

        turn = next(self.turns)
        a = self.args
        params = SamplingParams(temperature=a.temperature, top_p=a.top_p, top_k=a.top_k,
                                max_tokens=max_tokens, seed=a.seed + turn)
        rid = f"cli-{turn}"
        self.core.add_request(rid, {"prompt_token_ids": prompt_ids}, params)
        text = ""
        while self.core.has_unfinished():
            for o in self.core.step():
                if o.request_id == rid:   # cumulative text: write what is new
                    out.write(o.outputs[0].text[len(text):])
                    out.flush()
                    text = o.outputs[0].text
        out.write("\n")
        out.flush()
        return text


def _answerer(lm, args):
    """`answer(prompt_ids, max_tokens, out) -> text`: greedy answers (the default) run the model
    step by step on their own, nothing to compile ahead; sampled ones go through the engine."""
    if args.temperature == 0:
        from jaxserve.runner.generate import GreedyGenerator

        gen = GreedyGenerator(lm.model)
        return lambda ids, max_tokens, out: _answer(lm, gen, ids, max_tokens, out)
    return _SampledAnswers(lm, args).answer


def cmd_generate(args) -> int:
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
    answer = _answerer(lm, args)
    t0 = time.perf_counter()
    answer(ids, min(args.max_tokens, budget), sys.stdout)
    print(f"[answered in {time.perf_counter() - t0:.1f} s]", file=sys.stderr)
    return 0


def cmd_chat(args) -> int:
    from jaxserve.tokenizer import encode_chat

    lm = _load(args)
    answer = _answerer(lm, args)
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
        reply = answer(ids, min(args.max_tokens, budget), sys.stdout)
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
    p.add_argument("model_tag", nargs="?", default=None, metavar="MODEL",
                   help="the model, as `vllm serve MODEL` takes it: same as --model")
    _add_model_args(p)
    p.add_argument("--tokenizer", default=None,
                   help="HF directory, hub id or .gguf file to take the tokenizer (and chat "
                        "template) from instead of the model's")
    p.add_argument("--tokenizer-revision", default=None, help="hub revision of --tokenizer")
    p.add_argument("--revision", default=None,
                   help="hub revision of the model (branch, tag or commit; default: main)")
    p.add_argument("--download-dir", default=None,
                   help="Hugging Face cache directory for hub downloads (default: $HF_HUB_CACHE "
                        "or ~/.cache/huggingface/hub)")
    p.add_argument("--generation-config", default="auto",
                   help="default sampling for requests that leave fields out: auto reads the "
                        "model's generation_config.json (temperature, top_p, top_k, min_p, "
                        "repetition_penalty, max_new_tokens); vllm ignores it; or a folder "
                        "holding a generation_config.json")
    p.add_argument("--override-generation-config", default=None, metavar="JSON",
                   help='sampling defaults set over the generation config, e.g. '
                        '\'{"temperature": 0.5}\'')
    p.add_argument("--config", default=None, help="YAML file of flag values (see configs/)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (0.0.0.0 for all interfaces)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port")
    p.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` "
                   "(also read from $JAXSERVE_API_KEY)")
    gw = p.add_argument_group("keys, limits and usage (docs/gateway.md)")
    gw.add_argument("--api-keys-file", default=None, metavar="YAML",
                    help="named keys with per-key limits and budgets (configs/api-keys.example"
                         ".yaml); re-read on SIGHUP; instead of --api-key")
    gw.add_argument("--usage-db", default=None, metavar="PATH",
                    help="SQLite file of per-key usage (default with --api-keys-file: "
                         "$XDG_DATA_HOME/jaxserve/usage.db; without it nothing is recorded)")
    gw.add_argument("--request-log", default=None, metavar="FILE|-",
                    help="one JSON line per request (no prompt or completion text)")
    gw.add_argument("--log-request-content", action="store_true",
                    help="put the prompt and completion in the --request-log lines")
    p.add_argument("--served-model-name", nargs="+", default=None,
                   help="names clients send as `model`; the first is shown (default: the hub id, "
                        "or a local model's folder or file name)")
    p.add_argument("--root-path", default=None,
                   help="path prefix a reverse proxy strips before forwarding (ASGI root_path)")
    _add_engine_args(p)
    p.add_argument("--max-logprobs", type=int, default=20,
                   help="most logprobs (top alternatives per token) a request may ask for; at "
                        "most 20, the top-K the sampler computes on the device")
    p.add_argument("--enforce-eager", action="store_true",
                   help="skip the start-up warm-up: each step executable compiles when first "
                        "needed (start-up in seconds; early requests wait for compiles)")
    p.add_argument("--pooler-config", default=None,
                   help="how /v1/embeddings pools: LAST | MEAN | CLS, or JSON like "
                        "'{\"pooling_type\": \"MEAN\", \"normalize\": false}' (default: LAST, "
                        "normalized)")
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
    p.add_argument("--allowed-origins", default=None,
                   help="CORS origins, comma-separated or JSON (default: no CORS headers)")
    p.add_argument("--max-request-body-bytes", type=int, default=32 << 20,
                   help="largest request body; larger ones get 413")
    tls = p.add_argument_group("TLS (HTTPS)")
    tls.add_argument("--ssl-keyfile", default=None, help="the server's private key (PEM)")
    tls.add_argument("--ssl-certfile", default=None,
                     help="the server's certificate chain (PEM); with it the server speaks HTTPS")
    tls.add_argument("--ssl-ca-certs", default=None,
                     help="CA certificates to verify client certificates with")
    tls.add_argument("--ssl-cert-reqs", type=int, default=0, choices=[0, 1, 2],
                     help="client certificates: 0 not asked, 1 optional, 2 required "
                          "(Python's ssl.CERT_NONE/OPTIONAL/REQUIRED)")
    tls.add_argument("--ssl-ciphers", default=None, help="OpenSSL cipher list (default: Python's)")
    logs = p.add_argument_group("logging")
    logs.add_argument("--uvicorn-log-level", default="warning",
                      choices=["critical", "error", "warning", "info", "debug", "trace"],
                      help="uvicorn's own log lines")
    logs.add_argument("--disable-uvicorn-access-log", action="store_true",
                      help="no per-request access lines from uvicorn (they show at "
                           "--uvicorn-log-level info)")
    logs.add_argument("--enable-log-requests", action="store_true",
                      help="log each request: its id, prompt, sampling parameters, and how it "
                           "ended (off: only refused and failed requests are logged)")
    logs.add_argument("--disable-log-requests", action="store_true",
                      help="vLLM's older switch: request logging is off by default here")
    logs.add_argument("--max-log-len", type=int, default=None,
                      help="characters of a prompt that --enable-log-requests shows (default: all)")
    logs.add_argument("--disable-log-stats", action="store_true",
                      help="no periodic stats lines (throughput, running and waiting requests, KV "
                           "cache use; every 10 s while there is work)")
    hosts = p.add_argument_group("multi-host")
    hosts.add_argument("--coordinator-address", default=None,
                       help="HOST:PORT of process 0 (jax.distributed); the mesh then spans every "
                            "process's devices and process 0 serves HTTP")
    hosts.add_argument("--num-processes", type=int, default=None, help="processes in the job")
    hosts.add_argument("--process-id", type=int, default=None, help="this process's index")
    add_vllm_compat_args(p)


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-model-len", type=_human_int, default=None,
                   help="longest sequence, prompt + output; 32k and 32K work (default: the "
                        "model's max_position_embeddings)")
    p.add_argument("--max-num-seqs", type=int, default=None,
                   help="sequences running at once (default: 256 on GPU, 16 on CPU)")
    p.add_argument("--max-num-batched-tokens", type=_human_int, default=None,
                   help="tokens per engine step (default: 2048 on GPU, 256 on CPU)")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV cache page")
    p.add_argument("--num-kv-blocks", type=int, default=None,
                   help="usable KV cache pages (default: sized from free device memory x "
                        "--gpu-memory-utilization)")
    p.add_argument("--num-gpu-blocks-override", type=int, default=None,
                   help="vLLM's spelling: KV cache blocks in all, one of them the null block "
                        "(= --num-kv-blocks N-1)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                   help="fraction of device memory for weights, activations and the KV cache")
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="reuse the KV cache of shared prompt prefixes")
    p.add_argument("--mesh", default=None, help="device mesh, e.g. tp=2 (tensor parallel over the "
                   "first 2 devices) or dp=2,tp=2 (two replicas of tp=2) (default: one device)")
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=None,
                   help="vLLM's spelling of --mesh tp=N")
    p.add_argument("--data-parallel-size", "-dp", type=int, default=None,
                   help="vLLM's spelling of --mesh dp=N (replicas)")
    p.add_argument("--attention-backend", default="auto",
                   help="auto | pallas | reference (the jnp attention)")
    p.add_argument("--compilation-cache-dir", default="auto",
                   help="XLA's persistent compilation cache; auto: $JAXSERVE_COMPILATION_CACHE_DIR "
                        "or ~/.cache/jaxserve/xla; \"\" turns it off")


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
        p.add_argument("--num-prompts", type=int, default=num_prompts, help="requests to send")
    p.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                   help="generate exactly the requested output lengths")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0: greedy)")
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
    b = sub.add_parser("bench", help="benchmarks: throughput | latency | serve",
                       formatter_class=_HelpFormatter)
    bs = b.add_subparsers(dest="bench", required=True)
    t = bs.add_parser("throughput", help="offline: every prompt at once through the engine",
                      formatter_class=_HelpFormatter)
    _add_model_args(t)
    _add_engine_args(t)
    _add_workload_args(t, input_len=1024, output_len=128, num_prompts=1000)
    la = bs.add_parser("latency", help="offline: end-to-end time of one batch, repeated",
                       formatter_class=_HelpFormatter)
    _add_model_args(la)
    _add_engine_args(la)
    _add_workload_args(la, input_len=32, output_len=128, num_prompts=None)
    la.add_argument("--batch-size", type=int, default=8, help="prompts in the batch")
    la.add_argument("--num-iters-warmup", type=int, default=10, help="untimed runs first")
    la.add_argument("--num-iters", type=int, default=30, help="timed runs")
    la.add_argument("--repeat-prompts", action="store_true",
                    help="time the same batch every iteration (prefix-cache hits after the first "
                         "run); off: fresh prompts each iteration")
    sv = bs.add_parser("serve", help="online: stream requests to a running server over HTTP",
                       formatter_class=_HelpFormatter)
    sv.add_argument("--base-url", default="http://127.0.0.1:8000", help="the server to load")
    sv.add_argument("--served-model-name", default=None,
                    help="model name to request (default: the server's first /v1/models entry)")
    sv.add_argument("--api-key", default=None, help="sent as `Authorization: Bearer KEY`")
    sv.add_argument("--tokenizer", default=None, help="HF directory or .gguf file used to build "
                    "prompts (default: the embedded SmolLM2 tokenizer)")
    sv.add_argument("--vocab-size", type=int, default=None,
                    help="random token ids are drawn below this (default: the tokenizer's size)")
    _add_workload_args(sv, input_len=1024, output_len=128, num_prompts=1000)
    sv.add_argument("--request-rate", type=float, default=float("inf"),
                    help="requests per second, Poisson arrivals (inf: all at once)")
    sv.add_argument("--max-concurrency", type=int, default=None,
                    help="most requests in flight at once (default: no limit)")
    sv.add_argument("--timeout", type=float, default=600.0, help="per-request timeout, seconds")
    sv.add_argument("--seed", type=int, default=0, help="seed of the prompts and arrival times")
    sv.add_argument("--disable-tqdm", action="store_true", help="no progress bar")
    for p in (t, la, sv):
        p.set_defaults(func=cmd_bench)


COMMANDS = ("serve", "generate", "chat", "convert", "bench", "cost", "usage")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxserve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help_text: str, func):
        p = sub.add_parser(name, help=help_text, description=help_text,
                           formatter_class=_HelpFormatter)
        p.set_defaults(func=func)
        return p

    _add_serve_args(command("serve", "OpenAI-compatible HTTP server (the default command)",
                            cmd_serve))
    g = command("generate", "answer one prompt (greedy unless --temperature > 0)", cmd_generate)
    g.add_argument("prompt", help="the prompt (in the chat template unless --raw)")
    g.add_argument("--raw", action="store_true", help="do not apply the chat template")
    _add_sampling_args(g, max_tokens=256)
    _add_model_args(g)
    c = command("chat", "interactive chat in the terminal", cmd_chat)
    c.add_argument("--system", default=None, help="system prompt")
    _add_sampling_args(c, max_tokens=512)
    _add_model_args(c)
    v = command("convert", "save a model's parameters as an orbax checkpoint", cmd_convert)
    v.add_argument("--output", required=True)
    _add_model_args(v)
    _add_bench_parser(sub)
    from jaxserve import cost
    cost.add_args(command("cost", "self-hosted $ per 1M tokens from a bench JSON, beside a hosted "
                                  "API's, and the break-even daily volume", cost.cmd_cost))
    from jaxserve.gateway import usage
    usage.add_args(command("usage", "per-key usage recorded by the server (--usage-db)",
                           usage.cmd_usage))
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
        # NOTE: the file's model is the fallback of both spellings on the line (MODEL, --model)
        defaults["config_model" if dest == "model" else dest] = v
    serve_parser.set_defaults(**defaults)


def parse_command_line(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """(arguments, notes to print): `serve` is the command when none is named (`jaxserve MODEL`),
    a --config file supplies defaults, vLLM's spellings are resolved. Raises ValueError (a usage
    mistake; its message says what to use instead); argparse's own errors exit with status 2."""
    argv = list(argv)
    if not argv or (argv[0] not in COMMANDS and argv[0] not in ("-h", "--help")):
        argv = ["serve"] + argv
    parser = build_parser()
    _apply_config_file(parser, argv)
    args = parser.parse_args(argv)
    return args, resolve_args(args)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        args, notes = parse_command_line(sys.argv[1:] if argv is None else argv)
    except (OSError, ValueError) as e:   # a config file, UsageError, MeshError
        print(f"error: {e}", file=sys.stderr)
        return 2
    for note in notes:
        print(f"jaxserve: {note}", file=sys.stderr)
    from jaxserve import logs
    logs.configure()
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
