"""Command-line arguments shared by the commands and the code they start: `vllm serve`'s flags
(the ones accepted as they are, noted, or refused with what to use instead), resolving vLLM's
spellings into ours after parsing (`resolve_args`), and the one mapping from flags to the engine's
configuration (`engine_kwargs`). Imported by `jaxserve.cli`, the server's launcher and the
in-process benchmarks; it imports none of them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os


class UsageError(ValueError):
    """A command line that cannot run as given; the message says what to use instead."""


@dataclasses.dataclass(frozen=True)
class _VllmOnly:
    """A vLLM serve flag with no counterpart here: `values` it takes silently (they are what
    jaxserve does anyway); otherwise a `note` (accepted, one line on stderr: it changes nothing)
    or a refusal (`refuse`: what to do instead)."""
    flags: tuple[str, ...]
    kind: str                 # "flag" (no value) | "value" | "values" (one or more) | "bool"
    refuse: str = ""
    note: str = ""
    values: tuple[str, ...] = ()

    @property
    def dest(self) -> str:
        return self.flags[0].lstrip("-").replace("-", "_")


_NO_LORA = ("LoRA adapters are not supported: merge the adapter into the base weights "
            "(peft's merge_and_unload) and serve the merged checkpoint")
_NO_TOOLS = ("tool calling is not supported yet (tools are accepted with tool_choice \"none\" "
             "and ignored; other tool choices get a 400): serve without tool-call flags")
_NO_STRUCTURED = ("structured output is not supported (requests for JSON or a schema get a "
                  "400): serve without it")

VLLM_ONLY: tuple[_VllmOnly, ...] = (
    _VllmOnly(("--quantization", "-q"), "value",
              refuse="quantized checkpoints (AWQ, GPTQ, fp8, bitsandbytes) are not loaded: serve "
                     "the unquantized checkpoint, or a GGUF file (dequantized on load)"),
    _VllmOnly(("--kv-cache-dtype",), "value", values=("auto",),
              refuse="the KV cache has the model's dtype (--dtype); fp8 KV caches are not "
                     "supported: use --kv-cache-dtype auto"),
    _VllmOnly(("--pipeline-parallel-size", "-pp"), "value", values=("1",),
              refuse="pipeline parallelism is not supported: split the model with "
                     "--tensor-parallel-size (a mesh may span hosts: --coordinator-address, "
                     "docs/scaling.md)"),
    _VllmOnly(("--cpu-offload-gb",), "value", values=("0",),
              refuse="weights cannot be offloaded to CPU memory: use more devices "
                     "(--tensor-parallel-size) or a smaller model"),
    _VllmOnly(("--swap-space",), "value",
              note="ignored: a preempted request's KV cache is recomputed, never swapped to "
                   "CPU memory"),
    _VllmOnly(("--enable-chunked-prefill",), "bool",
              note="ignored: chunked prefill is always on (a long prompt's prefill is split "
                   "under --max-num-batched-tokens)",
              refuse="chunked prefill is always on: with --max-num-batched-tokens at least "
                     "--max-model-len, a prompt that has a step to itself is never split"),
    _VllmOnly(("--speculative-config",), "value",
              refuse="speculative decoding is not supported: serve without it"),
    _VllmOnly(("--enable-lora",), "flag", refuse=_NO_LORA),
    _VllmOnly(("--lora-modules",), "values", refuse=_NO_LORA),
    _VllmOnly(("--disable-custom-all-reduce",), "flag",
              refuse="to use XLA's collectives only, set JAXSERVE_PEER_ALL_REDUCE=0 and "
                     "JAXSERVE_ONE_SHOT_ALL_REDUCE=0 in the environment"),
    _VllmOnly(("--enable-auto-tool-choice",), "flag", refuse=_NO_TOOLS),
    _VllmOnly(("--tool-call-parser",), "value", refuse=_NO_TOOLS),
    _VllmOnly(("--reasoning-parser",), "value",
              refuse="reasoning is not split from the answer (it stays in `content`): serve "
                     "without --reasoning-parser"),
    _VllmOnly(("--guided-decoding-backend",), "value", refuse=_NO_STRUCTURED),
    _VllmOnly(("--structured-outputs-config",), "value", refuse=_NO_STRUCTURED),
    _VllmOnly(("--trust-remote-code",), "flag",
              note="not needed: jaxserve never runs code from a model repository (its "
                   "architectures are built in)"),
    _VllmOnly(("--code-revision",), "value",
              note="ignored: no code from a model repository is run"),
    _VllmOnly(("--tokenizer-mode",), "value", values=("auto", "hf"),
              refuse="only Hugging Face fast tokenizers are used: --tokenizer-mode auto"),
    _VllmOnly(("--task",), "value", values=("auto", "generate", "embed", "embedding"),
              refuse="every model serves generation and /v1/embeddings; scoring, classification "
                     "and reward models are not supported"),
    _VllmOnly(("--runner",), "value", values=("auto", "generate", "pooling"),
              refuse="every model serves generation and /v1/embeddings (no draft runner)"),
    _VllmOnly(("--distributed-executor-backend",), "value",
              note="ignored: one process drives all of a host's devices (JAX SPMD); a mesh "
                   "over several hosts uses --coordinator-address"),
    _VllmOnly(("--scheduling-policy",), "value", values=("fcfs",),
              refuse="requests are scheduled first come, first served: --scheduling-policy fcfs"),
    _VllmOnly(("--limit-mm-per-prompt",), "value",
              refuse="multimodal inputs are not supported (text models only)"),
    _VllmOnly(("--hf-overrides",), "value",
              refuse="edit config.json in a copy of the model folder and serve that folder"),
    _VllmOnly(("--disable-fastapi-docs",), "flag", note="not needed: the server has no docs pages"),
    _VllmOnly(("--async-scheduling",), "bool",
              note="ignored: steps are always scheduled one ahead of the device",
              refuse="scheduling one step ahead is always on here"),
    _VllmOnly(("--compilation-config", "-O"), "value",
              note="ignored: XLA compiles every step shape at start-up (--enforce-eager: on "
                   "first use)"),
    _VllmOnly(("--max-seq-len-to-capture",), "value",
              note="ignored: there are no CUDA graphs to capture; every step shape is compiled"),
    _VllmOnly(("--long-prefill-token-threshold",), "value",
              note="ignored: long prompts are chunked under --max-num-batched-tokens"),
    _VllmOnly(("--max-num-partial-prefills",), "value",
              note="ignored: long prompts are chunked under --max-num-batched-tokens"),
    _VllmOnly(("--enable-prompt-tokens-details",), "flag",
              note="ignored: usage carries no prompt_tokens_details yet"),
    _VllmOnly(("--chat-template-content-format",), "value", values=("auto", "string"),
              refuse="message content is rendered as a string (text parts joined): "
                     "--chat-template-content-format string"),
    _VllmOnly(("--response-role",), "value", values=("assistant",),
              refuse="answers carry the role assistant: --response-role assistant"),
    _VllmOnly(("--disable-sliding-window",), "flag",
              refuse="the model's sliding window (Mistral) is always applied: serve without "
                     "--disable-sliding-window, capping --max-model-len instead"),
    _VllmOnly(("--enable-sleep-mode",), "flag",
              refuse="sleep mode is not supported: stop the server to free the GPU"),
)


def add_vllm_compat_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "vLLM compatibility",
        "vLLM flags with no counterpart here: accepted (with a note on stderr where they change "
        "nothing) or refused with what to use instead; docs/vllm.md maps every flag")
    for c in VLLM_ONLY:
        if c.kind == "bool":
            g.add_argument(*c.flags, dest=c.dest, action=argparse.BooleanOptionalAction,
                           default=None, help=f"accepted, {c.note}; --no-{c.flags[0][2:]} is "
                                              f"refused: {c.refuse}")
            continue
        if c.note:
            help_text = f"accepted, {c.note}"
        elif c.values:
            help_text = f"{' | '.join(c.values)} accepted; anything else refused: {c.refuse}"
        else:
            help_text = f"refused: {c.refuse}"
        if c.kind == "flag":
            g.add_argument(*c.flags, dest=c.dest, action="store_true", help=help_text)
        else:
            g.add_argument(*c.flags, dest=c.dest, default=None, help=help_text,
                           nargs="+" if c.kind == "values" else None)


def _vllm_only_notes(args: argparse.Namespace) -> list[str]:
    """Notes for the vLLM-only flags given that change nothing; UsageError for a refused one."""
    notes = []
    for c in VLLM_ONLY:
        value = getattr(args, c.dest, None)
        if value is None or (value is False and c.kind == "flag"):
            continue
        if c.kind == "value" and str(value) in c.values:
            continue
        on = value is not False
        if c.kind in ("flag", "bool"):
            shown = c.flags[0] if on else "--no-" + c.flags[0][2:]
        else:
            shown = f"{c.flags[0]} {' '.join(map(str, value)) if c.kind == 'values' else value}"
        if c.note and on:
            notes.append(f"{shown}: {c.note}")
        else:
            raise UsageError(f"{shown}: {c.refuse}")
    return notes


def _resolve_model(args: argparse.Namespace) -> None:
    """`serve MODEL` and `--model` (and a config file's `model`) name one model."""
    tag, flag = args.model_tag, args.model
    if tag and flag and tag != flag:
        raise UsageError(f"two models given: {tag!r} (positional) and --model {flag!r}; give one")
    args.model = tag or flag or getattr(args, "config_model", None)


def _resolve_mesh(args: argparse.Namespace) -> None:
    """-tp / -dp into the --mesh string; an axis --mesh sets too must agree."""
    from jaxserve.sharding import parse_mesh

    sizes = parse_mesh(args.mesh)
    given = ({part.split("=", 1)[0].strip() for part in args.mesh.split(",")}
             if args.mesh else set())
    changed = False
    for axis, flag in (("tp", "--tensor-parallel-size"), ("dp", "--data-parallel-size")):
        n = getattr(args, flag[2:].replace("-", "_"))
        if n is None:
            continue
        if n < 1:
            raise UsageError(f"{flag} must be at least 1, got {n}")
        if axis in given and sizes[axis] != n:
            raise UsageError(f"{flag} {n} disagrees with --mesh {args.mesh}; give one of them")
        sizes[axis], changed = n, True
    if changed:
        args.mesh = f"dp={sizes['dp']},tp={sizes['tp']}"


def _resolve_engine(args: argparse.Namespace) -> None:
    _resolve_mesh(args)
    override = args.num_gpu_blocks_override
    if override is not None:
        if override < 2:
            raise UsageError(f"--num-gpu-blocks-override must be at least 2 (one block is the "
                             f"null block), got {override}")
        if args.num_kv_blocks is not None and args.num_kv_blocks != override - 1:
            raise UsageError(f"--num-gpu-blocks-override {override} (= {override - 1} usable "
                             f"blocks) disagrees with --num-kv-blocks {args.num_kv_blocks}; give "
                             f"one of them")
        args.num_kv_blocks = override - 1


def _resolve_serve(args: argparse.Namespace) -> list[str]:
    from jaxserve.config import default_sampling
    from jaxserve.loading.hub import is_hub_id
    from jaxserve.sampling.sampler import NUM_TOP_LOGPROBS

    notes = _vllm_only_notes(args)
    _resolve_model(args)
    if args.max_logprobs == -1:
        raise UsageError(f"--max-logprobs -1 (no limit) is not supported: the sampler computes "
                         f"the top {NUM_TOP_LOGPROBS} logprobs on the device; use --max-logprobs "
                         f"{NUM_TOP_LOGPROBS}")
    if not 0 <= args.max_logprobs <= NUM_TOP_LOGPROBS:
        raise UsageError(f"--max-logprobs must be in [0, {NUM_TOP_LOGPROBS}] (the sampler computes "
                         f"the top {NUM_TOP_LOGPROBS} on the device), got {args.max_logprobs}")
    if args.enable_log_requests and args.disable_log_requests:
        raise UsageError("--enable-log-requests and --disable-log-requests: give one")
    if args.generation_config not in ("auto", "vllm") and not os.path.isfile(
            os.path.join(args.generation_config, "generation_config.json")):
        raise UsageError(f"--generation-config {args.generation_config}: no "
                         f"generation_config.json there (auto: the model's; vllm: none)")
    if isinstance(args.override_generation_config, str):
        try:
            args.override_generation_config = json.loads(args.override_generation_config)
        except json.JSONDecodeError as e:
            raise UsageError(f"--override-generation-config is not JSON ({e.msg})") from None
    if args.override_generation_config is not None and not isinstance(
            args.override_generation_config, dict):
        raise UsageError("--override-generation-config must be a JSON object")
    default_sampling(None, args.override_generation_config)   # its fields and types, now
    if args.api_keys_file and args.api_key:
        raise UsageError("--api-key and --api-keys-file: give one (a key of the file may have no "
                         "limits)")
    if args.api_keys_file and args.usage_db is None:   # budgets need the usage database
        from jaxserve.gateway.store import default_usage_db
        args.usage_db = default_usage_db()
    if args.ssl_keyfile and not args.ssl_certfile:
        raise UsageError("--ssl-keyfile needs --ssl-certfile (the certificate to serve)")
    for flag in ("ssl_keyfile", "ssl_certfile", "ssl_ca_certs"):
        path = getattr(args, flag)
        if path and not os.path.isfile(path):
            raise UsageError(f"--{flag.replace('_', '-')} {path}: no such file")
    for flag in ("revision", "download_dir"):
        if getattr(args, flag) and not (args.model and is_hub_id(args.model)):
            notes.append(f"--{flag.replace('_', '-')} is ignored: it applies to hub models "
                         f"(org/name), not to {args.model or 'the embedded default'}")
    return notes


def resolve_args(args: argparse.Namespace) -> list[str]:
    """After parsing: vLLM's spellings folded into ours (model, mesh, KV blocks), refused flags
    refused (UsageError). Returns the notes to print."""
    if hasattr(args, "num_gpu_blocks_override"):
        _resolve_engine(args)
    if args.command == "serve":
        return _resolve_serve(args)
    return []


def engine_kwargs(args: argparse.Namespace) -> dict:
    """The EngineConfig fields that `_add_engine_args` (and `--seed`) set: the one mapping from
    flags to the engine, shared by `serve` and the in-process benchmarks."""
    return dict(max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                max_num_batched_tokens=args.max_num_batched_tokens, block_size=args.block_size,
                num_kv_blocks=args.num_kv_blocks, gpu_memory_utilization=args.gpu_memory_utilization,
                enable_prefix_caching=args.enable_prefix_caching,
                attention_backend=args.attention_backend,
                compilation_cache_dir=args.compilation_cache_dir, seed=args.seed)
