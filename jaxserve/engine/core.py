"""EngineCore: the step loop shared by `LLM` (synchronous) and `AsyncEngine` (background thread).

    add_request(id, prompt, params)    validate, tokenize, fan out n samples
    step()                             schedule -> run on device -> stop rules, detokenize
                                       -> RequestOutputs of the requests that changed
    abort(id)                          finish with "abort", blocks back to the pool at once

Token-level stop rules (EOS, stop_token_ids, max_tokens) live in the scheduler; stop strings are
checked here on the incrementally detokenized text.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import math
import os
import time
from typing import Any

import jax
import numpy as np
from flax import nnx

from jaxserve.collectives import peer_buffer_bytes, peer_capacity_bytes
from jaxserve.engine.detokenizer import IncrementalDetokenizer
from jaxserve.engine.outputs import CompletionOutput, InvalidRequestError, Logprob, RequestOutput
from jaxserve.kv_cache.manager import KVCacheManager
from jaxserve.loading import LoadedModel
from jaxserve.runner import exec_store
from jaxserve.runner.compile import enable_persistent_cache
from jaxserve.runner.model_runner import ModelRunner, Sampled
from jaxserve.sampling.params import SamplingParams
from jaxserve.sampling.sampler import NUM_TOP_LOGPROBS
from jaxserve.scheduler.request import Request
from jaxserve.scheduler.scheduler import Scheduler, SchedulerConfig
from jaxserve.sharding import splits_heads

log = logging.getLogger("jaxserve.engine")

# A fault in this many steps in a row is the engine's, not a request's: it stops (and the server
# exits non-zero for its supervisor to restart it) rather than failing every request forever.
MAX_CONSECUTIVE_STEP_FAULTS = 3


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    max_model_len: int | None = None          # default: the model's max_position_embeddings
    max_num_seqs: int | None = None           # default: 256 on GPU, 16 on CPU
    max_num_batched_tokens: int | None = None  # default: 2048 on GPU, 256 on CPU
    block_size: int = 16
    num_kv_blocks: int | None = None          # usable pages; default: sized from free memory
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    attention_backend: str = "auto"
    seed: int = 0
    compilation_cache_dir: str | None = "auto"
    show_progress: bool = True
    # Schedule and dispatch step N+1 before waiting for step N's tokens (decodes feed placeholders
    # the device fills in), then process step N's outputs (detokenize, stop strings,
    # RequestOutputs) while the device runs step N+1. The host never leaves the device idle; a
    # request that stopped in step N has its extra token in step N+1 dropped.
    async_scheduling: bool = True
    # Compile every step executable at start-up, so that serving never compiles (the default).
    # Off (`--enforce-eager`), each executable compiles when a step first needs it: start-up takes
    # seconds instead of minutes, and the first step of each new shape waits for its compile
    # (`compiles_after_warmup` then counts those compiles).
    warmup: bool = True
    # The most logprobs (top alternatives per token) a request may ask for; at most the sampler's
    # fixed on-device top-K (NUM_TOP_LOGPROBS).
    max_logprobs: int = NUM_TOP_LOGPROBS
    # Move everything alive once the engine is built (the block pool's page objects, the model's
    # structure, the process's modules) out of the cyclic GC's reach (gc.freeze): with ~200k pages,
    # a full collection walked ~300k objects and paused the step loop ~200 ms mid-generation.
    # Reference counting still frees them; only garbage *cycles* among them would stay.
    freeze_gc: bool = True


def plan_num_blocks(lm: LoadedModel, ec: EngineConfig, max_model_len: int, max_num_seqs: int,
                    kv_itemsize: int, kv_shards: int = 1, other_bytes: int = 0) -> int:
    """Usable KV pages: explicit, or from free device memory x gpu_memory_utilization, less
    `other_bytes` that the runner allocates besides the cache (tp comm buffers)."""
    if ec.num_kv_blocks is not None:
        return int(ec.num_kv_blocks)
    per_block = ec.block_size * lm.config.kv_bytes_per_token(kv_itemsize) // kv_shards  # per device
    stats = jax.local_devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        sampler = max_num_seqs * lm.config.vocab_size * 10
        reserve = 1 << 30  # activations and workspace of the largest bucket
        budget = stats["bytes_limit"] * ec.gpu_memory_utilization - stats.get("bytes_in_use", 0)
        n = max(int((budget - sampler - reserve - other_bytes) // per_block), 0)
        if jax.process_count() > 1:   # every process must allocate the same global cache
            from jax.experimental import multihost_utils
            n = int(np.min(multihost_utils.process_allgather(np.int64(n))))
        return n
    # CPU: no memory stats; enough for every sequence at full length, capped at 2 GiB
    tokens = min(max_num_seqs * max_model_len, (2 << 30) // lm.config.kv_bytes_per_token(kv_itemsize))
    return -(-max(tokens, max_model_len) // ec.block_size)


def memory_summary(lm: LoadedModel, usable_blocks: int, block_size: int, kv_itemsize: int, tp: int,
                   kv_shards: int, max_model_len: int, max_num_seqs: int) -> str:
    """The start-up memory arithmetic (docs/scaling.md walks through it)."""
    cfg = lm.config
    gib = 1 << 30
    w_bytes = cfg.num_params() * np.dtype(lm.dtype).itemsize
    # what one device really holds (replicated parameters count whole)
    local = sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
                for x in jax.tree.leaves(nnx.state(lm.model)) if isinstance(x, jax.Array))
    kv_tok = cfg.kv_bytes_per_token(kv_itemsize)
    tokens = usable_blocks * block_size
    return (f"memory: weights {w_bytes / gib:.2f} GiB total, {local / gib:.2f} GiB per device "
            f"(tp={tp}); KV cache {kv_tok / 1024:.0f} KiB per token ({cfg.num_layers} layers x 2 x "
            f"{cfg.num_kv_heads} kv heads x {cfg.head_dim} x {kv_itemsize} B), {usable_blocks} pages x "
            f"{block_size} tokens = {tokens} tokens = {tokens * kv_tok / kv_shards / gib:.2f} GiB per "
            f"device (kv heads split {kv_shards} ways); {tokens / max_model_len:.1f} sequences of "
            f"max_model_len={max_model_len} fit (max_num_seqs={max_num_seqs})")


@dataclasses.dataclass
class _Sample:
    """Host-side state of one of a request's n samples."""
    index: int
    req: Request
    detok: IncrementalDetokenizer | None
    logprobs: list[dict[int, Logprob]] | None
    cumulative: float = 0.0
    text: str = ""
    finish_reason: str | None = None
    stop_reason: Any = None


@dataclasses.dataclass
class _Group:
    request_id: str
    prompt: str | None
    prompt_ids: list[int]
    params: SamplingParams
    samples: list[_Sample]
    arrival: float
    scheduled_time: float | None = None
    first_token_time: float | None = None
    error: str | None = None

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.samples)


class EngineCore:
    def __init__(self, lm: LoadedModel, config: EngineConfig = EngineConfig(), mesh=None):
        self.lm = lm
        self.mesh = mesh
        self.config = config
        self.tokenizer = lm.tokenizer
        cfg = lm.config
        if not 0 <= config.max_logprobs <= NUM_TOP_LOGPROBS:
            raise ValueError(f"max_logprobs must be in [0, {NUM_TOP_LOGPROBS}] (the sampler computes "
                             f"the top {NUM_TOP_LOGPROBS} on the device), got {config.max_logprobs}")
        on_cpu = jax.default_backend() == "cpu"
        self.max_model_len = int(config.max_model_len or cfg.max_position_embeddings)
        max_num_seqs = int(config.max_num_seqs or (16 if on_cpu else 256))
        max_tokens = int(config.max_num_batched_tokens or (256 if on_cpu else 2048))
        max_tokens = max(max_tokens, max_num_seqs)
        self.max_num_seqs = max_num_seqs
        cache_path = enable_persistent_cache(config.compilation_cache_dir)
        kv_itemsize = np.dtype(lm.dtype).itemsize
        tp = 1 if mesh is None else mesh.shape["tp"]
        kv_shards = tp if cfg.num_kv_heads % tp == 0 else 1   # else the cache is replicated
        comm = peer_buffer_bytes(mesh, peer_capacity_bytes(mesh, cfg, max_tokens, kv_itemsize))
        usable = plan_num_blocks(lm, config, self.max_model_len, max_num_seqs, kv_itemsize,
                                 kv_shards, other_bytes=comm)
        backend = config.attention_backend
        if tp > 1:
            # NOTE: when tp splits q and kv heads the runner runs the whole forward per shard
            # (shard_map), so any backend works there unchanged; otherwise XLA partitions the
            # step and only the jnp reference attention is used.
            splittable = splits_heads(cfg, tp)
            if backend == "auto":
                backend = "pallas" if jax.default_backend() == "gpu" and splittable else "reference"
            if backend == "pallas" and not splittable:
                raise ValueError(f"attention_backend='pallas' under tp={tp} needs the kv heads "
                                 f"({cfg.num_kv_heads}) split evenly over tp; use 'reference'")
        self.kv_manager = KVCacheManager(usable + 1, config.block_size,
                                         enable_caching=config.enable_prefix_caching)
        self.scheduler = Scheduler(SchedulerConfig(max_num_seqs, max_tokens, self.max_model_len,
                                                   config.block_size), self.kv_manager)
        self.runner = ModelRunner(lm.model, block_size=config.block_size, num_blocks=usable + 1,
                                  max_num_seqs=max_num_seqs, max_num_batched_tokens=max_tokens,
                                  max_model_len=self.max_model_len,
                                  attention_backend=backend, mesh=mesh)
        if config.show_progress:
            log.info("%s", memory_summary(lm, usable, config.block_size, kv_itemsize, tp,
                                          kv_shards, self.max_model_len, max_num_seqs))
        # compiled executables next to XLA's cache (a warm start neither traces nor lowers)
        store = (os.path.join(cache_path, "jaxserve-executables")
                 if cache_path and exec_store.enabled() else None)
        if config.warmup:
            self.runner.warmup(progress=config.show_progress, store_dir=store)
            if config.show_progress:
                ws = self.runner.warmup_seconds
                took = ws["trace_lower"] + ws["compile_after"] + ws["first_run"]
                log.info(f"step executables: {ws['executables']} ready in {took:.1f}s "
                         f"({ws['loaded']} loaded from {store}, "
                         f"{ws['executables'] - ws['loaded']} compiled)" if store
                         else f"step executables: {ws['executables']} compiled in {took:.1f}s")
        else:
            # NOTE: without warm-up every compile from here on is one a step waits for: all count
            # in compiles_after_warmup
            self.runner.compile_counter.mark_warm()
            if config.show_progress:
                log.info("step executables: compiled on first use (warm-up off): the first step "
                         "of each new batch shape waits for its compile")
        self.eos_token_ids = tuple(sorted(set(cfg.eos_token_ids) | (
            {self.tokenizer.eos_token_id} if self.tokenizer is not None
            and self.tokenizer.eos_token_id is not None else set())))
        self._rng = np.random.default_rng(config.seed)
        self._groups: dict[str, _Group] = {}
        self._sample_of: dict[str, tuple[_Group, _Sample]] = {}
        self._inflight = None   # (SchedulerOutput, handle) of the dispatched, unfetched step
        self._failed: list[RequestOutput] = []   # requests failed by a step fault, not yet returned
        self._step_faults = 0                    # consecutive steps that raised
        # multi-host (jaxserve.distributed): the leader hands each step to the followers first
        self.step_listener = None
        self.broadcast = None
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.requests_finished_total = 0
        if config.freeze_gc:
            gc.collect()
            gc.freeze()

    # -- requests -------------------------------------------------------------------------------
    def tokenize_prompt(self, prompt: Any) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                ids = prompt["prompt_token_ids"]
                if not isinstance(ids, (list, tuple)) or not all(
                        isinstance(t, int) and not isinstance(t, bool) for t in ids):
                    raise InvalidRequestError("prompt_token_ids", "must be a list of integers")
                return prompt.get("prompt"), list(ids)
            prompt = prompt.get("prompt")
        if not isinstance(prompt, str):
            raise InvalidRequestError("prompt", "must be a string or {'prompt_token_ids': [...]}")
        if self.tokenizer is None:
            raise InvalidRequestError("prompt", "this model has no tokenizer; pass prompt_token_ids")
        return prompt, self.tokenizer.encode(prompt)

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> int:
        """Check a request against the model; returns its effective max_tokens."""
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError("sampling_params", "must be a SamplingParams")
        params.validate(self.lm.config.vocab_size)
        if params.logprobs is not None and params.logprobs > self.config.max_logprobs:
            raise InvalidRequestError("logprobs", f"at most {self.config.max_logprobs} logprobs per "
                                                  f"token on this server (--max-logprobs), got "
                                                  f"{params.logprobs}")
        n = len(prompt_ids)
        if n == 0:
            raise InvalidRequestError("prompt", "the prompt is empty")
        v = self.lm.config.vocab_size
        bad = [t for t in prompt_ids if t < 0 or t >= v]
        if bad:
            raise InvalidRequestError("prompt_token_ids", f"token id {bad[0]} is outside the "
                                                          f"vocabulary [0, {v})")
        if n >= self.max_model_len:
            raise InvalidRequestError("prompt", f"the prompt has {n} tokens; max_model_len is "
                                                f"{self.max_model_len}, leaving no room to generate")
        if params.max_tokens is None:
            room = self.max_model_len - n
            if params.min_tokens > room:
                raise InvalidRequestError("min_tokens", f"min_tokens ({params.min_tokens}) exceeds "
                                                        f"the {room} tokens the prompt ({n} tokens) "
                                                        f"leaves in max_model_len "
                                                        f"({self.max_model_len})")
            return room
        if n + params.max_tokens > self.max_model_len:
            raise InvalidRequestError("max_tokens", f"prompt ({n} tokens) + max_tokens "
                                                    f"({params.max_tokens}) exceeds max_model_len "
                                                    f"({self.max_model_len})")
        return params.max_tokens

    def add_request(self, request_id: str, prompt: Any, params: SamplingParams | None = None) -> None:
        params = params or SamplingParams()
        if request_id in self._groups:
            raise InvalidRequestError("request_id", f"{request_id!r} is already in use")
        text, ids = self.tokenize_prompt(prompt)
        max_tokens = self.validate(ids, params)
        eff = dataclasses.replace(params, max_tokens=max_tokens)
        now = time.monotonic()
        group = _Group(request_id, text, ids, params, [], now)
        leader = None
        for i in range(params.n):
            sid = request_id if params.n == 1 else f"{request_id}#{i}"
            seed = (params.seed + i) if params.seed is not None else int(self._rng.integers(2**31))
            try:   # the values the runner's fixed-width rows will hold, converted here (not in a step)
                row = self.runner.slot_row(eff, seed, self.eos_token_ids)
            except (OverflowError, FloatingPointError, ValueError) as e:
                raise InvalidRequestError("sampling_params", f"a value does not fit the device "
                                                             f"rows: {e}") from None
            req = Request(sid, ids, eff, eos_token_ids=self.eos_token_ids, arrival=now,
                          leader=leader if self.config.enable_prefix_caching else None, seed=seed,
                          slot_row=row)
            leader = leader or req
            detok = (IncrementalDetokenizer(self.tokenizer, ids,
                                            skip_special_tokens=params.skip_special_tokens)
                     if self.tokenizer is not None else None)
            group.samples.append(_Sample(i, req, detok, [] if params.logprobs is not None else None))
        # NOTE: registered only once every sample is built: a failure above leaves nothing behind
        added = []
        try:
            for s in group.samples:
                self.scheduler.add_request(s.req)
                added.append(s.req.request_id)
        except BaseException:
            for sid in added:
                self.scheduler.finish_request(sid, "abort")
            raise
        for s in group.samples:
            self._sample_of[s.req.request_id] = (group, s)
        self._groups[request_id] = group
        self.prompt_tokens_total += len(ids)

    def abort(self, request_id: str) -> RequestOutput | None:
        group = self._groups.get(request_id)
        if group is None:
            return None
        for s in group.samples:
            if s.finish_reason is None:
                self.scheduler.finish_request(s.req.request_id, "abort")
                s.finish_reason = "abort"
        return self._finish_group(group)

    # -- the loop -------------------------------------------------------------------------------
    def step(self, snapshots: bool = True) -> list[RequestOutput]:
        """One engine iteration. `snapshots=False` returns only finished requests' outputs (for
        callers that never stream: building every running request's cumulative output each step
        copies its token list, O(generated) per request per step)."""
        return self.step_end(self.step_begin(), snapshots)

    def step_begin(self):
        """Schedule and dispatch a step; returns the dispatched step to complete next (with
        async scheduling, the one before)."""
        try:
            return self._step_begin()
        except Exception as e:  # noqa: BLE001 - see _recover
            self._recover(e, "scheduling or dispatching a step")
            return None

    def _step_begin(self):
        out = self.scheduler.schedule()
        handle = None
        if not out.is_empty or out.released_ids:
            if self.step_listener is not None:
                self.step_listener(out)
            handle = self.runner.dispatch(out)           # the device starts on this step
        current = (out, handle) if out.seqs else None
        if not self.config.async_scheduling:
            return current
        previous, self._inflight = self._inflight, current
        return previous                                  # completed while this one runs

    def step_end(self, entry, snapshots: bool = True) -> list[RequestOutput]:
        """Wait for a dispatched step's tokens, hand them to the scheduler, build the outputs (and
        those of requests a step fault failed)."""
        try:
            outs = self._step_end(entry, snapshots) if entry is not None else []
            if entry is not None:
                self._step_faults = 0
        except Exception as e:  # noqa: BLE001 - see _recover
            self._recover(e, "completing a step")
            outs = []
        if self._failed:
            outs, self._failed = outs + self._failed, []
        return outs

    def _recover(self, exc: Exception, where: str) -> None:
        """A step raised. When the device state survived (the fault was on the host: scheduling,
        row building, stop rules), fail the requests that were in flight — each ends with
        finish_reason "error" — and carry on: waiting requests and later ones are unaffected. When
        the device state was lost (a failed call after its buffers were donated), re-raise: the
        engine cannot continue."""
        self._step_faults += 1
        if not self.runner.state_intact() or self._step_faults >= MAX_CONSECUTIVE_STEP_FAULTS:
            raise exc   # the engine cannot go on (or every step fails): let it stop visibly
        victims = [g for g in self._groups.values()
                   if any(s.finish_reason is None and s.req.num_computed_tokens > 0
                          or s.req.num_placeholders for s in g.samples)]
        log.error("engine fault while %s (%s: %s); failing the %d requests in flight: %s", where,
                  type(exc).__name__, exc, len(victims),
                  ", ".join(g.request_id for g in victims[:16]) + (" ..." if len(victims) > 16 else ""),
                  exc_info=exc)
        self._inflight = None
        self.runner.drop_pending()
        for g in victims:
            self._failed.append(self._fail(g, f"engine fault while {where}"))

    def _fail(self, group: _Group, message: str) -> RequestOutput:
        """End every unfinished sample of `group` with finish_reason "error" (its blocks go back to
        the pool at once) and return its final output."""
        for s in group.samples:
            if s.finish_reason is None:
                self.scheduler.finish_request(s.req.request_id, "error")
                s.finish_reason = "error"
        group.error = message
        return self._finish_group(group)

    def _step_end(self, entry, snapshots: bool) -> list[RequestOutput]:
        out, handle = entry
        sampled = self.runner.fetch(handle)
        events = self.scheduler.update_from_output(out, {k: v.token for k, v in sampled.items()})
        now = time.monotonic()
        for ns in out.new_seqs:
            group_sample = self._sample_of.get(ns.request_id)
            if group_sample is not None and group_sample[0].scheduled_time is None:
                group_sample[0].scheduled_time = now
        return self._outputs(events, sampled, now, snapshots)

    @property
    def num_unfinished_requests(self) -> int:
        return len(self._groups)

    def has_unfinished(self) -> bool:
        return bool(self._groups) or self._inflight is not None

    def _outputs(self, events, sampled: dict[str, Sampled], now: float,
                 snapshots: bool = True) -> list[RequestOutput]:
        changed: dict[str, _Group] = {}
        failed: list[RequestOutput] = []
        for req, tok in events:
            if tok is None:
                continue
            entry = self._sample_of.get(req.request_id)
            if entry is None:  # aborted meanwhile
                continue
            group, sample = entry
            if sample.finish_reason is not None:  # ended by a stop string one step earlier
                continue
            if group.first_token_time is None:
                group.first_token_time = now
            try:
                self._on_token(group, sample, tok, sampled[req.request_id])
            except Exception as e:  # noqa: BLE001 - this request's fault: it alone ends
                log.error("request %s failed while processing its token %d (%s: %s)",
                          group.request_id, tok, type(e).__name__, e, exc_info=e)
                changed.pop(group.request_id, None)
                failed.append(self._fail(group, "failed while processing its output"))
                continue
            changed[group.request_id] = group
        outs = failed
        for g in changed.values():
            if g.finished:
                outs.append(self._finish_group(g))
            elif snapshots:
                outs.append(self._snapshot(g, finished=False))
        return outs

    def _on_token(self, group: _Group, s: _Sample, tok: int, sm: Sampled) -> None:
        self.generation_tokens_total += 1
        s.cumulative += sm.logprob
        if s.logprobs is not None:
            s.logprobs.append(self._logprob_entry(tok, sm, group.params.logprobs))
        if s.detok is not None:
            s.detok.add(tok)  # special tokens (EOS) decode to "" when skip_special_tokens
            if s.req.is_finished:
                s.detok.flush()
            s.text = s.detok.text
            if group.params.stop and s.finish_reason is None:
                self._check_stop_strings(group, s)
        if s.req.is_finished and s.finish_reason is None:
            s.finish_reason, s.stop_reason = s.req.finish_reason, s.req.stop_reason

    def _check_stop_strings(self, group: _Group, s: _Sample) -> None:
        text = s.detok.text
        for stop in group.params.stop:
            i = text.find(stop)
            if i >= 0:
                s.text = text[: i + len(stop)] if group.params.include_stop_str_in_output else text[:i]
                self.scheduler.finish_request(s.req.request_id, "stop", stop)
                s.finish_reason, s.stop_reason = "stop", stop
                return

    def _logprob_entry(self, tok: int, sm: Sampled, k: int) -> dict[int, Logprob]:
        dec = self.tokenizer.decode if self.tokenizer is not None else (lambda ids: None)
        entry: dict[int, Logprob] = {}
        higher = int(np.sum(sm.top_logprobs > sm.logprob))
        rank = higher + 1 if higher < len(sm.top_ids) else None
        entry[tok] = Logprob(sm.logprob, rank, dec([tok]))
        for r in range(min(k, len(sm.top_ids))):
            t = int(sm.top_ids[r])
            if t not in entry:
                entry[t] = Logprob(float(sm.top_logprobs[r]), r + 1, dec([t]))
        return entry

    def _snapshot(self, group: _Group, finished: bool) -> RequestOutput:
        # NOTE: while a sample runs, hold back the last (longest stop string - 1) characters, so a
        # streamed prefix of a stop string is never shown and then taken back.
        stop = group.params.stop
        hold = max(map(len, stop)) - 1 if stop else 0
        outs = []
        for s in group.samples:
            text = s.text
            if hold and s.finish_reason is None:
                text = text[: max(0, len(text) - hold)]
            outs.append(CompletionOutput(s.index, text, s.req.output_token_ids[:], s.cumulative,
                                         s.logprobs[:] if s.logprobs is not None else None,
                                         s.finish_reason, s.stop_reason))
        metrics = {"arrival": group.arrival}
        if group.scheduled_time is not None:
            metrics["first_scheduled_time"] = group.scheduled_time
        if group.first_token_time is not None:
            metrics["first_token_time"] = group.first_token_time
        return RequestOutput(group.request_id, group.prompt, group.prompt_ids, outs,
                             finished, metrics, error=group.error)

    def _finish_group(self, group: _Group) -> RequestOutput:
        out = self._snapshot(group, finished=True)
        out.metrics["finished_time"] = time.monotonic()
        self._groups.pop(group.request_id, None)
        for s in group.samples:
            self._sample_of.pop(s.req.request_id, None)
        self.requests_finished_total += 1
        return out

    # -- introspection --------------------------------------------------------------------------
    def get_stats(self) -> dict[str, Any]:
        kv = self.kv_manager
        return {
            "kv_blocks_total": kv.num_total_blocks,
            "kv_blocks_free": kv.num_free_blocks,
            "kv_cache_usage_perc": kv.usage(),
            "num_requests_running": len(self.scheduler.running),
            "num_requests_waiting": len(self.scheduler.waiting),
            "num_preemptions": self.scheduler.num_preemptions,
            "prefix_cache_queries": kv.prefix_cache_queries,
            "prefix_cache_hits": kv.prefix_cache_hits,
            "compiles_after_warmup": self.runner.compile_counter.compiles_after_warmup,
            "prompt_tokens_total": self.prompt_tokens_total,
            "generation_tokens_total": self.generation_tokens_total,
            "requests_finished_total": self.requests_finished_total,
            "num_steps": self.runner.num_steps,
        }
