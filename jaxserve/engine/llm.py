"""`LLM`: the synchronous library API, with vLLM's names so code can switch over.

    from jaxserve import LLM, SamplingParams
    llm = LLM()                                   # embedded default model
    outs = llm.generate(["Hello"], SamplingParams(max_tokens=32))
    print(outs[0].outputs[0].text)
    vecs = llm.embed(["Hello"])                   # pooled final hidden states, [D] float32 each

For use inside your own JAX code, `llm.model_fn()` returns `(graphdef, params, forward)` where
`forward(params, input_ids, positions, kv_caches, metadata)` is a pure function you can `jax.jit`.
"""

from __future__ import annotations

import itertools
import sys
from typing import Any, Sequence

from jaxserve.engine.core import EngineConfig
from jaxserve.engine.outputs import RequestOutput
from jaxserve.loading import LoadedModel
from jaxserve.sampling.params import SamplingParams
from jaxserve.tokenizer import encode_chat


class LLM:
    def __init__(self, model: str | LoadedModel | None = None, *, dtype: Any = "auto",
                 max_model_len: int | None = None, max_num_seqs: int | None = None,
                 max_num_batched_tokens: int | None = None, block_size: int = 16,
                 num_kv_blocks: int | None = None, gpu_memory_utilization: float = 0.9,
                 enable_prefix_caching: bool = True, attention_backend: str = "auto",
                 mesh: str | None = None, load_format: str = "auto", seed: int = 0,
                 compilation_cache_dir: str | None = "auto", show_progress: bool = True):
        if not 0 < gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
        from jaxserve.engine.dp import build_engine
        if show_progress:   # the engine's status lines (memory plan, compiles) on stderr
            from jaxserve import logs
            logs.configure()

        self.loaded, self.engine = build_engine(
            model, EngineConfig(
                max_model_len=max_model_len, max_num_seqs=max_num_seqs,
                max_num_batched_tokens=max_num_batched_tokens, block_size=block_size,
                num_kv_blocks=num_kv_blocks, gpu_memory_utilization=gpu_memory_utilization,
                enable_prefix_caching=enable_prefix_caching, attention_backend=attention_backend,
                seed=seed, compilation_cache_dir=compilation_cache_dir, show_progress=show_progress),
            mesh, dtype=dtype, load_format=load_format, seed=seed)
        from jaxserve.distributed import attach
        attach(self.engine)   # several processes (jax.distributed): process 0 leads
        self.show_progress = show_progress
        self._ids = itertools.count()

    @property
    def tokenizer(self):
        return self.loaded.tokenizer

    def get_tokenizer(self):
        return self.loaded.tokenizer

    def generate(self, prompts: Any, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """prompts: a string, {"prompt_token_ids": [...]}, or a list of those. Every request is
        validated before any runs; a bad one raises (InvalidRequestError / SamplingParamsError)."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = (list(sampling_params) if isinstance(sampling_params, (list, tuple))
                  else [sampling_params] * len(prompts))
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
        for p, sp in zip(prompts, params):  # validate all before starting any
            _, ids = self.engine.tokenize_prompt(p)
            self.engine.validate(ids, sp)
        ids = [f"gen-{next(self._ids)}" for _ in prompts]
        for rid, p, sp in zip(ids, prompts, params):
            self.engine.add_request(rid, p, sp)
        return self._run(ids, use_tqdm and self.show_progress and len(ids) > 1)

    def chat(self, messages: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, *,
             chat_template: str | None = None, add_generation_prompt: bool = True,
             use_tqdm: bool = True) -> list[RequestOutput]:
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [{"prompt_token_ids": encode_chat(self.tokenizer, conv, chat_template=chat_template,
                                                    add_generation_prompt=add_generation_prompt)}
                   for conv in conversations]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def _run(self, ids: list[str], progress: bool) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=len(ids), desc="generating", unit="req", file=sys.stderr)
        try:
            while len(done) < len(ids):
                for out in self.engine.step(snapshots=False):   # only finished ones are kept
                    if out.finished:
                        done[out.request_id] = out
                        if bar is not None:
                            bar.update(1)
        except BaseException:
            for rid in ids:  # leave nothing behind in the engine
                if rid not in done:
                    self.engine.abort(rid)
            raise
        finally:
            if bar is not None:
                bar.close()
        return [done[i] for i in ids]

    def embed(self, prompts: Any, *, pooling_type: str = "LAST", normalize: bool = True,
              add_special_tokens: bool = True) -> list:
        """One float32 vector [D] (numpy) per prompt: the model's final hidden states (after the
        final norm) pooled LAST (the last token's), MEAN or CLS (the first token's), then
        L2-normalized unless `normalize=False`. prompts: as `generate`. Runs on the engine's own
        weights (jaxserve/engine/embed.py); the first call of each size compiles."""
        from jaxserve.engine.embed import Embedder, as_token_lists

        ids = as_token_lists(prompts, self.tokenizer, add_special_tokens=add_special_tokens)
        if getattr(self, "_embedder", None) is None:
            self._embedder = Embedder.for_engine(self.engine)
        return self._embedder.embed(ids, pooling_type=pooling_type, normalize=normalize)

    def get_stats(self) -> dict[str, Any]:
        return self.engine.get_stats()

    # -- several processes (see jaxserve/distributed.py) ---------------------------------------
    def follow(self) -> int:
        """On processes other than 0: run the leader's steps until it calls `shutdown()`."""
        from jaxserve.distributed import follow
        return follow(self.engine)

    def shutdown(self) -> None:
        """On process 0: release the followers (a no-op with one process)."""
        from jaxserve.distributed import stop_followers
        stop_followers(self.engine)

    def model_fn(self):
        """(graphdef, params, forward) for your own `jax.jit`; see the module docstring."""
        from flax import nnx

        graphdef, params = nnx.split(self.loaded.model)
        backend = self.engine.runner.backend

        def forward(params, input_ids, positions, kv_caches, metadata):
            model = nnx.merge(graphdef, params)
            hidden, kv_caches = model(input_ids, positions, kv_caches, metadata, backend)
            return model.compute_logits(hidden), kv_caches

        return graphdef, params, forward
