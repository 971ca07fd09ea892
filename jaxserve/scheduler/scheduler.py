"""The continuous-batching scheduler (vLLM v1 style). Pure Python: no JAX import.

One rule drives everything: each request's `num_computed_tokens` catches up with its token count
(prompt + generated) under a per-step token budget. A long prompt therefore spreads over several
steps (chunked prefill), decodes (1 token) and prefill chunks share steps, a prefix-cache hit simply
starts a request with some tokens already computed, and a preempted request restarts from zero
and recomputes prompt + generated tokens.

A step's tokens count as computed as soon as it is scheduled, and a token it samples is a
PLACEHOLDER until `update_from_output` brings the real one. So the next step can be scheduled
while this one still runs on the device (async scheduling): a decode then feeds the placeholder,
which the runner resolves on the device from the token the previous step sampled. A request that
turns out to have stopped simply has its extra token dropped. Blocks are hashed for the prefix
cache only once their tokens are known, and a preempted request is not readmitted while a token of
it is still in flight.

Each step:
  1. running requests in order (oldest first) get their tokens; when the KV cache is full, the
     newest running request is preempted (blocks freed, back to the head of the waiting queue);
  2. if nothing was preempted, waiting requests are admitted first-come-first-served while the
     token budget, `max_num_seqs` and free blocks allow.
"""

from __future__ import annotations

import dataclasses
from collections import deque

from jaxserve.kv_cache.manager import KVCacheManager
from jaxserve.scheduler.output import NewSequence, ScheduledSequence, SchedulerOutput
from jaxserve.scheduler.request import Request, RequestStatus


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int = 4096
    block_size: int = 16


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager):
        if kv.num_total_blocks * kv.block_size < config.max_model_len:
            raise ValueError(f"the KV cache holds {kv.num_total_blocks * kv.block_size} tokens, fewer "
                             f"than max_model_len={config.max_model_len}: one request could never "
                             f"fit. Lower max_model_len or give the cache more blocks")
        if kv.block_size != config.block_size:
            raise ValueError("scheduler and KV cache disagree on block_size")
        self.config = config
        self.kv = kv
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self._released: list[str] = []
        self._seen_by_runner: set[str] = set()
        self.num_preemptions = 0

    # -- requests in and out --------------------------------------------------------------------
    def add_request(self, req: Request) -> None:
        if req.request_id in self.requests:
            raise ValueError(f"request id {req.request_id!r} is already in use")
        if req.num_tokens > self.config.max_model_len:
            raise ValueError(f"request {req.request_id!r} has {req.num_tokens} tokens, more than "
                             f"max_model_len={self.config.max_model_len}")
        self.requests[req.request_id] = req
        self.waiting.append(req)

    def finish_request(self, request_id: str, reason: str, stop_reason=None) -> Request | None:
        """Finish (stop/length) or abort a request; frees its blocks at once. Idempotent."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        if req.status is RequestStatus.RUNNING:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        req.stop_reason = stop_reason
        self._release(req)
        return req

    def _release(self, req: Request) -> None:
        self.kv.free(req.request_id)
        if req.request_id in self._seen_by_runner:
            self._seen_by_runner.discard(req.request_id)
            self._released.append(req.request_id)

    @property
    def num_unfinished(self) -> int:
        return len(self.requests)

    def has_work(self) -> bool:
        return bool(self.requests) or bool(self._released)

    # -- one step -------------------------------------------------------------------------------
    def _preempt(self, victim: Request) -> None:
        self.running.remove(victim)
        self._release(victim)
        victim.status = RequestStatus.PREEMPTED
        victim.num_computed_tokens = 0
        victim.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(victim)

    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        max_model_len = self.config.max_model_len
        scheduled: list[tuple[Request, int]] = []
        new: list[Request] = []
        preempted = 0

        i = 0
        running = self.running
        while i < len(running) and budget > 0:
            req = running[i]
            # (the Request properties spelled out: this loop runs per running request per step)
            known = len(req.prompt_token_ids) + len(req.output_token_ids)
            computed = req.num_computed_tokens
            num_new = min(known + req.num_placeholders - computed, budget, max_model_len - computed)
            max_tokens = req.params.max_tokens
            if (max_tokens is not None
                    and len(req.output_token_ids) + req.num_placeholders >= max_tokens):
                num_new = 0   # its last token is in flight: nothing more to compute
            if num_new <= 0:
                i += 1
                continue
            # most decode steps have room in their last block: nothing to allocate
            ok = self.kv.has_room(req.request_id, computed + num_new, known)
            while not ok:
                if self.kv.allocate_slots(req.request_id, req.known_tokens, computed, num_new,
                                          num_known=known):
                    ok = True
                    break
                victim = self.running[-1]
                self._preempt(victim)
                preempted += 1
                if victim is req:
                    break
            if not ok:
                break
            scheduled.append((req, num_new))
            budget -= num_new
            i += 1

        if not preempted:
            skipped: list[Request] = []
            while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
                req = self.waiting[0]
                if req.num_placeholders or (
                        req.leader is not None and not self._leader_prompt_done(req.leader)):
                    skipped.append(self.waiting.popleft())
                    continue
                hits = self.kv.find_cached_prefix(req.request_id, req.known_tokens)
                computed = len(hits) * self.kv.block_size
                num_new = min(req.num_tokens - computed, budget)
                if not self.kv.allocate_slots(req.request_id, req.known_tokens, computed, num_new,
                                              hits):
                    break
                self.waiting.popleft()
                if req.num_preemptions == 0 and req.status is RequestStatus.WAITING:
                    self.kv.record_prefix_lookup(len(req.prompt_token_ids), computed)
                req.num_computed_tokens = computed
                req.status = RequestStatus.RUNNING
                self.running.append(req)
                scheduled.append((req, num_new))
                new.append(req)
                budget -= num_new
            self.waiting.extendleft(reversed(skipped))

        seqs, new_seqs = [], []
        for req, n in scheduled:
            start = req.num_computed_tokens
            tokens = req.token_slice(start, start + n)
            sample = start + n == req.num_tokens
            seqs.append(ScheduledSequence(req.request_id, tokens, start,
                                          self.kv.block_ids(req.request_id), sample,
                                          req.num_generated))
            req.num_computed_tokens = start + n
            if sample:
                req.num_placeholders += 1
            if req.request_id not in self._seen_by_runner:
                self._seen_by_runner.add(req.request_id)
                new_seqs.append(NewSequence(req.request_id, req.prompt_token_ids,
                                            list(req.output_token_ids), req.params, req.seed,
                                            req.eos_token_ids, req.slot_row))
        released, self._released = self._released, []
        return SchedulerOutput(seqs, new_seqs, released, sum(len(s.token_ids) for s in seqs),
                               preempted)

    def _leader_prompt_done(self, leader: Request) -> bool:
        return leader.is_finished or leader.num_computed_tokens >= len(leader.prompt_token_ids)

    def update_from_output(self, out: SchedulerOutput,
                           sampled: dict[str, int]) -> list[tuple[Request, int | None]]:
        """Turn the step's placeholders into its sampled tokens and apply token-level stop rules.
        Returns (request, new token or None) for every scheduled request still known."""
        events = []
        for seq in out.seqs:
            req = self.requests.get(seq.request_id)
            if req is None:  # finished or aborted while the step ran: its token is dropped
                continue
            if not seq.sample:
                events.append((req, None))
                continue
            tok = sampled[seq.request_id]
            req.num_placeholders -= 1
            req.output_token_ids.append(tok)
            events.append((req, tok))
            reason = self._check_stop(req, tok)
            if reason is not None:
                self.finish_request(req.request_id, reason[0], reason[1])
        return events

    def _check_stop(self, req: Request, tok: int):
        p = req.params
        n_out = len(req.output_token_ids)
        if n_out >= p.min_tokens:
            if not p.ignore_eos and tok in req.eos_token_ids:
                return "stop", None
            if tok in p.stop_token_ids:
                return "stop", tok
        if p.max_tokens is not None and n_out >= p.max_tokens:
            return "length", None
        if req.num_tokens >= self.config.max_model_len:
            return "length", None
        return None
