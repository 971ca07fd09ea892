"""`jaxserve bench serve`: drive a running OpenAI-compatible server over HTTP, streaming.

Requests go to /v1/completions with `stream: true` (and `include_usage`), at `--request-rate`
requests per second drawn as a Poisson process (`inf`: all at once), at most `--max-concurrency`
in flight. The random dataset sends token-id prompts, so the server sees exactly `--input-len`
tokens; ShareGPT sends text. Works against any server that speaks the API (vLLM included).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

import numpy as np

from jaxserve.bench.datasets import BenchRequest, random_requests, sharegpt_requests
from jaxserve.bench.metrics import RequestRecord, format_report, summarize, write_json


async def _one(client, url: str, headers: dict, model: str, req: BenchRequest, ignore_eos: bool,
               temperature: float) -> RequestRecord:
    body = {"model": model, "prompt": req.prompt_text if req.prompt_text is not None else req.prompt_ids,
            "max_tokens": req.output_len, "temperature": temperature, "stream": True,
            "ignore_eos": ignore_eos, "stream_options": {"include_usage": True}}
    rec = RequestRecord(prompt_len=req.prompt_len)
    start = time.perf_counter()
    last = start
    chunks = 0
    try:
        async with client.stream("POST", url, json=body, headers=headers) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")
                raise RuntimeError(f"HTTP {resp.status_code}: {text[:200]}")
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                msg = json.loads(data)
                if "error" in msg:
                    raise RuntimeError(str(msg["error"].get("message", msg["error"])))
                if msg.get("usage"):
                    rec.output_len = int(msg["usage"].get("completion_tokens", 0))
                    if msg["usage"].get("prompt_tokens"):
                        rec.prompt_len = int(msg["usage"]["prompt_tokens"])
                # a chunk with text, or (a model served without a tokenizer) with token ids
                if not msg.get("choices") or not (msg["choices"][0].get("text")
                                                  or msg["choices"][0].get("token_ids")):
                    continue
                now = time.perf_counter()
                if chunks == 0:
                    rec.ttft = now - start
                else:
                    rec.itl.append(now - last)
                last = now
                chunks += 1
        rec.latency = last - start
        if rec.output_len == 0:
            rec.output_len = chunks   # servers without usage in the stream: one token per chunk
        if chunks == 0:
            raise RuntimeError("the stream carried no tokens")
    except Exception as e:  # noqa: BLE001 - every failure is recorded, the run goes on
        rec.success, rec.error = False, f"{type(e).__name__}: {e}"
    return rec


async def _run(args, reqs: list[BenchRequest], model: str) -> tuple[list[RequestRecord], float]:
    import httpx
    from tqdm import tqdm

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    url = args.base_url.rstrip("/") + "/v1/completions"
    rng = np.random.default_rng(args.seed)
    sem = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None
    bar = tqdm(total=len(reqs), desc="requests", file=sys.stderr, disable=args.disable_tqdm)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=httpx.Timeout(args.timeout), limits=limits) as client:
        async def guarded(r: BenchRequest) -> RequestRecord:
            if sem is None:
                rec = await _one(client, url, headers, model, r, args.ignore_eos, args.temperature)
            else:
                async with sem:
                    rec = await _one(client, url, headers, model, r, args.ignore_eos, args.temperature)
            bar.update(1)
            return rec

        tasks = []
        start = time.perf_counter()
        for r in reqs:
            tasks.append(asyncio.create_task(guarded(r)))
            if args.request_rate != float("inf"):
                await asyncio.sleep(rng.exponential(1.0 / args.request_rate))
        records = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    bar.close()
    return records, duration


def _server_model(args) -> str:
    import httpx
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    r = httpx.get(args.base_url.rstrip("/") + "/v1/models", headers=headers, timeout=30)
    r.raise_for_status()
    return r.json()["data"][0]["id"]


def load_tokenizer(path: str | None):
    """A local HF directory or .gguf file; None: the embedded default model's tokenizer."""
    from jaxserve.loading import default_model_path
    from jaxserve.loading.gguf_loader import GGUFCheckpoint
    from jaxserve.tokenizer import load_hf_tokenizer
    path = path or default_model_path()
    return GGUFCheckpoint(path).tokenizer() if path.endswith(".gguf") else load_hf_tokenizer(path)


def run_serve(args) -> dict[str, Any]:
    model = args.served_model_name or _server_model(args)
    if args.dataset_path:
        reqs = sharegpt_requests(args.dataset_path, args.num_prompts, load_tokenizer(args.tokenizer),
                                 seed=args.seed, output_len=args.sharegpt_output_len)
    else:
        vocab, special = args.vocab_size, ()
        if not vocab:
            tok = load_tokenizer(args.tokenizer)
            vocab, special = len(tok), tuple(getattr(tok, "all_special_ids", ()) or ())
        reqs = random_requests(args.num_prompts, args.input_len, args.output_len, vocab,
                               range_ratio=args.random_range_ratio, seed=args.seed,
                               special_ids=special)
    records, duration = asyncio.run(_run(args, reqs, model))
    res = summarize(records, duration)
    res.update({"benchmark": "serve", "model": model, "base_url": args.base_url,
                "request_rate": args.request_rate, "max_concurrency": args.max_concurrency,
                "num_prompts": len(reqs)})
    print(format_report("Serving Benchmark Result", res))
    write_json(args.output_json, res)
    return res
