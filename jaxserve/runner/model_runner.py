"""The model runner: SchedulerOutput -> numpy int32 metadata -> jitted calls -> sampled tokens.

Every executable a step can need is compiled in `warmup()` (lowered one by one, compiled on a
thread pool) and then called directly, so a step can never trigger a compile:
  * the forward, one per bucket (T tokens, S sequences): forward + KV write + logits at the S
    sampling rows, KV cache donated;
  * the sampler, one per (S, mode): the host picks the cheapest mode that serves every row
    ("greedy", "random", "full"; see `sampler_mode`), sampler state donated;
  * when the attention backend has a decode kernel, all-decode steps (one token per sequence) run
    one executable per (sequence bucket, mode) holding both: decode forward and sampler.
A step's calls are enqueued without waiting, so the host never blocks inside a step. Per-request
sampling state lives in device "slots" (`jaxserve/sampling/sampler.py`); the runner maps request
ids to slots.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import itertools
import logging
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxserve.attention import AttentionBackend, build_metadata, get_backend
from jaxserve.collectives import (PeerAccessError, PeerBuffers, TensorParallel,
                                  peer_all_reduce_mode, peer_capacity_bytes)
from jaxserve.config import ModelConfig
from jaxserve.kv_cache.cache import allocate_kv_cache
from jaxserve.models.layers import CausalLM
from jaxserve.runner.compile import CompileCounter
from jaxserve.runner.packing import (pack_forward, pack_result, pack_sampling, unpack_forward,
                                     unpack_result, unpack_sampling)
from jaxserve.sampling.sampler import (FILL_SIZES, SAMPLER_MODES, SamplingTensors, SlotFills,
                                       SlotRow, fill_slots, finish_without_top,
                                       greedy_vocab_parallel, init_sampler_state, sample, slot_row)
from jaxserve.scheduler.buckets import make_buckets, pick_bucket
from jaxserve.scheduler.output import NewSequence, SchedulerOutput
from jaxserve.sharding import kv_cache_sharding, replicated, splits_heads
from jaxserve.scheduler.request import PLACEHOLDER

log = logging.getLogger("jaxserve.runner")


@dataclasses.dataclass
class Sampled:
    token: int
    logprob: float
    top_ids: np.ndarray      # [K] int32, best first
    top_logprobs: np.ndarray  # [K] float32


def _host_copy(x: jax.Array) -> jax.Array:
    """Start copying a replicated result to the host (over several processes, the local copy);
    `np.asarray` of the returned array then waits for that copy instead of issuing its own."""
    src = x if x.is_fully_addressable else x.addressable_data(0)
    src.copy_to_host_async()
    return src


def _count_ready(bar, pending: list[tuple]) -> None:
    """Advance the warm-up bar to the number of executables ready: loaded, or compiled."""
    ready = sum(not isinstance(e, concurrent.futures.Future) or e.done() for _, _, e in pending)
    if ready > bar.n:
        bar.update(ready - bar.n)   # the rate and time left follow these updates
    else:
        bar.refresh()


def _no_src(num_tokens: int) -> np.ndarray:
    return np.full(num_tokens, -1, np.int32)


def _vocab_parallel_greedy() -> bool:
    """Greedy decode steps under tp pick tokens per vocab shard (default);
    JAXSERVE_VOCAB_PARALLEL_GREEDY=0 gathers the logits first (read when a step is traced)."""
    return os.environ.get("JAXSERVE_VOCAB_PARALLEL_GREEDY", "1") != "0"


def _fused_decode_sampler() -> bool:
    """Decode steps run forward and sampler as one executable (default);
    JAXSERVE_FUSED_DECODE_SAMPLER=0 calls them one after the other."""
    return os.environ.get("JAXSERVE_FUSED_DECODE_SAMPLER", "1") != "0"


class ModelRunner:
    def __init__(self, model: CausalLM, *, block_size: int, num_blocks: int, max_num_seqs: int,
                 max_num_batched_tokens: int, max_model_len: int,
                 attention_backend: str | AttentionBackend = "auto", kv_dtype=None, mesh=None):
        self.cfg: ModelConfig = model.config
        self.graphdef, state = nnx.split(model)
        # NOTE: the executables take the weights as a flat list of arrays (rebuilt into the model's
        # state when traced): flattening ~200 nnx Variables in Python on every call cost ~0.5 ms
        # of host time per step.
        self.params, self.param_tree = jax.tree.flatten(state)
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_blocks_per_seq = -(-max_model_len // block_size)
        self.kv_dtype = kv_dtype or self.params[0].dtype
        kv_sharding = rep = None
        if mesh is not None:
            kv_sharding = kv_cache_sharding(mesh, self.cfg.num_kv_heads)
            rep = replicated(mesh)
        self._kv_sharding, self._replicated = kv_sharding, rep
        # Tensor parallel as explicit SPMD (shard_map, collectives written in the model) when tp
        # splits both q and kv heads; otherwise XLA's sharding propagation partitions the step.
        self.mesh, self._tp_specs = mesh, None
        tp = 1 if mesh is None else mesh.shape["tp"]
        self._num_weights = len(self.params)
        self.peer_buffers = None
        if tp > 1 and splits_heads(self.cfg, tp):
            capacity = peer_capacity_bytes(mesh, self.cfg, max(max_num_batched_tokens, max_num_seqs),
                                           np.dtype(model.embed[...].dtype).itemsize)
            if capacity:
                self.peer_buffers = self._peer_buffers(mesh, capacity)
            if self.peer_buffers is not None:
                # NOTE: the comm table rides at the end of the executables' first argument (the
                # flat weights): one more per-device array, no new argument anywhere.
                self.params = self.params + [self.peer_buffers.table]
            self._tp_specs = ([a.sharding.spec for a in self.params],
                              [(kv_sharding.spec,) * 2 for _ in range(self.cfg.num_layers)])
        self.kv = allocate_kv_cache(self.cfg, num_blocks, block_size, self.kv_dtype, sharding=kv_sharding)
        self.sampler_state = init_sampler_state(max_num_seqs, self.cfg.vocab_size, sharding=rep)
        self._fill_slots = jax.jit(fill_slots, donate_argnums=(0,), out_shardings=rep)
        self._fills = SlotFills(max_num_seqs)
        all_buckets = make_buckets(max_num_batched_tokens, max_num_seqs)
        self.buckets = all_buckets
        self.backend = (get_backend(attention_backend) if isinstance(attention_backend, str)
                        else attention_backend)
        self._step = jax.jit(functools.partial(self._forward_fn, backend=self.backend),
                             donate_argnums=(1,), static_argnames=("t", "s"))
        # A decode-only variant of the forward (every sequence feeds one token: T == S), when the
        # backend has a specialised kernel for it; its buckets are the sequence-count buckets.
        decode_backend = getattr(self.backend, "decode_variant", lambda: None)()
        self._step_decode = None
        self._decode_sample: dict[str, object] = {}
        self.decode_buckets: list[tuple[int, int]] = []
        if decode_backend is not None:
            self._step_decode = jax.jit(functools.partial(self._forward_fn, backend=decode_backend),
                                        donate_argnums=(1,), static_argnames=("t", "s"))
            if _fused_decode_sampler():
                # NOTE: a decode step is one executable, forward and sampler together, per
                # sampler mode: one launch (and, under tp, one rendezvous of the launch threads)
                # fewer per step than forward + sampler called one after the other.
                # The modes share one jitted forward called inside each: JAX traces it once per
                # bucket instead of once per (bucket, mode) (start-up time; same programs).
                forward = jax.jit(functools.partial(self._forward_fn, backend=decode_backend),
                                  static_argnames=("t", "s"))
                self._decode_sample = {m: jax.jit(
                    functools.partial(self._decode_sample_fn, forward=forward, mode=m),
                    donate_argnums=(1, 3), static_argnames=("t", "s")) for m in SAMPLER_MODES}
            floor = min(self._decode_row_floor(tp), max_num_seqs, max_num_batched_tokens)
            self.decode_buckets = sorted({(max(s, floor),) * 2 for _, s in all_buckets})
            # every all-decode step has its own variant, so the general one (steps with prefill)
            # starts at 16 tokens: four fewer executables to compile, padding that costs ~nothing
            self.buckets = make_buckets(max_num_batched_tokens, max_num_seqs, token_floor=16)
        # NOTE: sampling is its own executable per (rows, mode): the host picks the cheapest mode
        # for the batch, so the forward holds no data-dependent branch (an XLA conditional on the
        # GPU reads its predicate back to the host and stalls the launch queue every step).
        self._sample = {m: jax.jit(functools.partial(self._sample_fn, mode=m), donate_argnums=(1,))
                        for m in SAMPLER_MODES}
        # the sampler alone serves the steps whose sampler is not fused into the forward
        alone = self.buckets + ([] if self._decode_sample else self.decode_buckets)
        self.sample_sizes = sorted({s for _, s in alone})
        self._free_slots = list(range(max_num_seqs - 1, -1, -1))
        self._slot: dict[str, int] = {}
        # each slot's fixed sampling rows (set at admission), gathered by slot every step; "mode"
        # ranks the sampler variant the request needs (0 greedy, 1 random, 2 full)
        self._slot_rows = SamplingTensors.host(max_num_seqs)
        self._slot_rows.update(min_tokens=np.zeros(max_num_seqs, np.int32),
                               mode=np.zeros(max_num_seqs, np.int8))
        self._exec: dict[tuple, object] = {}   # filled by warmup(): key -> compiled executable
        self.warmup_seconds: dict[str, float] = {}
        self.compile_counter = CompileCounter()
        self.num_steps = 0

    # -- the jitted step ------------------------------------------------------------------------
    def _forward_fn(self, params, kv, packed, last_token, *, t: int, s: int,
                    backend: AttentionBackend, greedy=None):
        """(logits [S, V], KV cache); with `greedy` = (sampler state, sampling tensors) under
        tensor parallelism: ((greedy tokens [S], their logprobs [S]), KV cache), picked by the
        shards from their slices of a vocab-split head (`greedy_vocab_parallel`)."""
        input_ids, positions, meta, logits_indices, src_slot = unpack_forward(
            packed, t, s, self.max_blocks_per_seq)
        # placeholders (src_slot >= 0) take the token their slot sampled in the previous step
        input_ids = jnp.where(src_slot >= 0, last_token[jnp.maximum(src_slot, 0)], input_ids)

        def body(params, kv, input_ids, positions, meta, logits_indices, greedy, per_shard=False):
            weights, tp = params[:self._num_weights], None
            if per_shard:
                tp = TensorParallel("tp", self.mesh.shape["tp"])
                if self.peer_buffers is not None:   # this shard's row of the comm table
                    tp = dataclasses.replace(self.peer_buffers.tp, table=params[self._num_weights])
            model = nnx.merge(self.graphdef, jax.tree.unflatten(self.param_tree, weights))
            hidden, kv = model(input_ids, positions, kv, meta, backend, tp)
            if greedy is None:
                return model.compute_logits(hidden[logits_indices], tp), kv
            logits, offset, split = model.compute_local_logits(hidden[logits_indices], tp)
            return greedy_vocab_parallel(logits, offset, *greedy, tp if split else None), kv

        if self._tp_specs is None:
            assert greedy is None, "greedy_vocab_parallel is for tensor-parallel steps"
            logits, kv = body(params, kv, input_ids, positions, meta, logits_indices, None)
        else:
            from jax.sharding import PartitionSpec as P
            pspecs, kvspecs = self._tp_specs
            logits, kv = jax.shard_map(
                functools.partial(body, per_shard=True), mesh=self.mesh,
                in_specs=(pspecs, kvspecs, P(), P(), P(), P(), P()), out_specs=(P(), kvspecs),
                check_vma=False)(params, kv, input_ids, positions, meta, logits_indices, greedy)
        if self._kv_sharding is not None:
            # NOTE: pin the donated state's layout so every step variant hands the next call
            # arrays with the same shardings: no recompiles after warm-up.
            kv = jax.lax.with_sharding_constraint(kv, [(self._kv_sharding,) * 2 for _ in kv])
            logits = jax.lax.with_sharding_constraint(logits, self._replicated)
        return logits, kv

    def _sample_fn(self, logits, sstate, packed, *, mode: str):
        return self._result(*sample(logits, sstate, unpack_sampling(packed, logits.shape[0]), mode))

    def _result(self, tokens, lp, top_ids, top_lp, sstate):
        """The sampler's outputs as (one packed int32 array, the state pinned replicated)."""
        if self._replicated is not None:
            sstate = jax.lax.with_sharding_constraint(sstate, self._replicated)
        return pack_result(tokens, lp, top_ids, top_lp), sstate

    def _decode_sample_fn(self, params, kv, packed, sstate, sampling, *, t: int, s: int,
                          forward, mode: str):
        """A decode step and its sampler as one executable: (packed result, KV cache, sampler
        state). `forward` is `_forward_fn` with the decode backend bound. Greedy steps under
        tensor parallelism pick their tokens per vocab shard (no [S, V] logits gathered;
        JAXSERVE_VOCAB_PARALLEL_GREEDY=0 gathers them and samples as elsewhere)."""
        if mode == "greedy" and self._tp_specs is not None and _vocab_parallel_greedy():
            st = unpack_sampling(sampling, s)
            (tokens, lp), kv = forward(params, kv, packed, sstate.last_token, t=t, s=s,
                                       greedy=(sstate, st))
            result, sstate = self._result(*finish_without_top(tokens, lp, sstate, st))
            return result, kv, sstate
        logits, kv = forward(params, kv, packed, sstate.last_token, t=t, s=s)
        result, sstate = self._sample_fn(logits, sstate, sampling, mode=mode)
        return result, kv, sstate

    def lower(self, num_tokens: int, num_seqs: int):
        """The lowered forward for one bucket (for HLO inspection)."""
        packed, _ = self._padding_inputs(num_tokens, num_seqs)
        return self._step.lower(self.params, self.kv, packed, self.sampler_state.last_token,
                                t=num_tokens, s=num_seqs)

    def lower_sampler(self, num_seqs: int, mode: str = "full"):
        packed = self._padding_inputs(num_seqs, num_seqs)[-1]
        logits = jax.ShapeDtypeStruct((num_seqs, self.cfg.vocab_size), np.float32)
        return self._sample[mode].lower(logits, self.sampler_state, packed)

    def _padding_inputs(self, t: int, s: int) -> tuple[np.ndarray, np.ndarray]:
        """Packed inputs of an all-padding step: (forward int32, sampler int32)."""
        meta, pos = build_metadata([], block_size=self.block_size, num_tokens=t, num_seqs=s,
                                   max_blocks_per_seq=self.max_blocks_per_seq)
        fwd = pack_forward(np.zeros(t, np.int32), pos, meta, np.zeros(s, np.int32), _no_src(t))
        return fwd, pack_sampling(SamplingTensors.host(s))

    def _warmup_work(self) -> list[tuple[tuple, object, tuple, dict]]:
        """(key, jitted function, example arguments, static arguments) for every executable a step
        can need."""
        work = []
        variants = [("forward", self._step, self.buckets)]
        if not self._decode_sample:
            variants.append(("decode", self._step_decode, self.decode_buckets))
        for kind, fn, buckets in variants:
            for t, s in buckets:
                fwd, _ = self._padding_inputs(t, s)
                work.append(((kind, t, s), fn,
                             (self.params, self.kv, fwd, self.sampler_state.last_token),
                             {"t": t, "s": s}))
        for m, fn in self._decode_sample.items():
            for t, s in self.decode_buckets:
                fwd, st = self._padding_inputs(t, s)
                work.append((("decode_sample", t, s, m), fn,
                             (self.params, self.kv, fwd, self.sampler_state, st), {"t": t, "s": s}))
        for s in self.sample_sizes:
            # as the forward hands them over: uncommitted on one device, replicated over a mesh
            # (another input sharding would be another executable)
            logits = jax.ShapeDtypeStruct((s, self.cfg.vocab_size), np.float32,
                                          sharding=self._replicated)
            st = self._padding_inputs(s, s)[-1]
            for m in SAMPLER_MODES:
                work.append((("sample", m, s), self._sample[m], (logits, self.sampler_state, st), {}))
        return work

    def _store_description(self) -> str:
        """Everything about this runner that shapes its executables beyond their arguments (for
        the executable store's fingerprint)."""
        backend = getattr(self.backend, "__dict__", {})
        return repr([self.cfg, self.block_size, self.max_num_seqs, self.max_blocks_per_seq,
                     str(self.kv_dtype), self.buckets, self.decode_buckets, self.sample_sizes,
                     None if self.mesh is None else (dict(self.mesh.shape), self.mesh.devices.tolist()),
                     self._tp_specs, type(self.backend).__name__, sorted(backend.items(), key=str),
                     sorted(self._decode_sample), self.compiler_options(),
                     None if self.peer_buffers is None else self.peer_buffers.tp.capacity_bytes])

    def _devices(self) -> list:
        if self.mesh is not None:
            return list(self.mesh.devices.flat)
        return sorted(self.params[0].sharding.device_set, key=lambda d: d.id)

    def warmup(self, progress: bool = True, compile_threads: int | None = None,
               store_dir: str | None = None) -> None:
        """Compile every executable a step can need, then run each once on padding.

        Tracing and lowering are Python (serial); XLA compiles release the GIL, so they run on a
        thread pool while the next executables are lowered. With `store_dir`, compiled
        executables are loaded from / saved to an `ExecutableStore` there (a warm start then
        neither traces nor lowers them). Steps then dispatch these executables directly: serving
        cannot compile.
        """
        work = self._warmup_work()
        store = None
        if store_dir:
            from jaxserve.runner.exec_store import ExecutableStore
            store = ExecutableStore(store_dir, self._store_description(), self._devices())
        bar = None
        if progress:
            from tqdm import tqdm
            # NOTE: the bar counts executables ready (compiled or loaded), the unit of the summary
            # line after it; its rate and time left follow the compiles, which dominate start-up
            bar = tqdm(total=len(work), desc="compiling step executables", unit="exe",
                       file=sys.stderr)
        threads = (compile_threads or int(os.environ.get("JAXSERVE_COMPILE_THREADS", "0"))
                   or max(1, min(8, (os.cpu_count() or 1) // 2)))
        options = self.compiler_options() or None
        t0 = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(threads) as pool:
            # stored executables load on the pool; the others compile there (or come from XLA's
            # persistent cache) while the next ones are traced and lowered here
            paths = [None if store is None else store.path(key, args, static)
                     for key, _, args, static in work]
            loads = [None if p is None else pool.submit(store.load, p) for p in paths]
            pending, loaded = [], 0
            for (key, fn, args, static), path, load in zip(work, paths, loads):
                exe = None if load is None else load.result()
                loaded += exe is not None
                if exe is None:
                    exe = pool.submit(fn.lower(*args, **static).compile, options)
                pending.append((key, path, exe))
                if bar is not None:
                    bar.set_postfix_str(f"lowered {len(pending) - loaded}", refresh=False)
                    _count_ready(bar, pending)
            t1 = time.perf_counter()
            if bar is not None:
                for _ in concurrent.futures.as_completed(
                        [e for _, _, e in pending if isinstance(e, concurrent.futures.Future)]):
                    _count_ready(bar, pending)
            for key, path, exe in pending:
                if isinstance(exe, concurrent.futures.Future):
                    exe = exe.result()
                    if store is not None:
                        store.save(path, exe)
                self._exec[key] = exe
        t2 = time.perf_counter()
        if bar is not None:
            bar.close()
        # one run each on padding (only the null page is written): loads the kernels
        for key, _, args, _ in work:
            if key[0] == "sample":
                logits = np.zeros((key[2], self.cfg.vocab_size), np.float32)
                if self._replicated is not None:
                    logits = jax.device_put(logits, self._replicated)
                _, self.sampler_state = self._exec[key](logits, self.sampler_state, args[2])
            elif key[0] == "decode_sample":
                _, self.kv, self.sampler_state = self._exec[key](
                    self.params, self.kv, args[2], self.sampler_state, args[4])
            else:
                _, self.kv = self._exec[key](self.params, self.kv, args[2], self.sampler_state.last_token)
        # the padding runs wrote into slot 0: every slot starts empty (and both fill sizes compile)
        r = self.max_num_seqs
        for n in FILL_SIZES:
            entries = np.zeros((n, 4), np.int32)
            entries[:, 0] = r
            self.sampler_state = self._fill_slots(self.sampler_state, np.arange(r, dtype=np.int32),
                                                  entries)
        jax.block_until_ready((self.kv, self.sampler_state))
        self.warmup_seconds = {"trace_lower": t1 - t0, "compile_after": t2 - t1,
                               "first_run": time.perf_counter() - t2, "executables": len(work),
                               "compile_threads": threads,
                               "loaded": loaded,
                               "saved": 0 if store is None else store.saved}
        self.compile_counter.mark_warm()

    # -- slots ----------------------------------------------------------------------------------
    def slot_row(self, params, seed: int, eos_token_ids) -> SlotRow:
        """A request's sampling values in this runner's row dtypes (the engine builds it when the
        request is added, where a failure is that request's alone)."""
        return slot_row(params, seed, eos_token_ids, self.cfg.vocab_size)

    def _admit(self, ns: NewSequence) -> None:
        row = ns.slot_row or self.slot_row(ns.params, ns.seed, ns.eos_token_ids)
        if ns.request_id in self._slot:
            self._release(ns.request_id)
        slot = self._free_slots[-1]
        # sent with the step's other admissions (`_flush_fills`), before its sampler runs
        self._fills.add_row(slot, ns.prompt_token_ids, ns.output_token_ids, row.stop_ids,
                            row.bias_ids, row.bias_values)
        self._free_slots.pop()
        self._slot[ns.request_id] = slot
        for field, value in row.values.items():
            self._slot_rows[field][slot] = value

    def state_intact(self) -> bool:
        """Whether the device state (KV cache, sampler state) is still usable: False once a call
        that donated it failed."""
        return not any(x.is_deleted() for x in jax.tree.leaves((self.kv, self.sampler_state))
                       if isinstance(x, jax.Array))

    def drop_pending(self) -> None:
        """Forget admissions not yet sent to the device (their requests were failed: the slots
        come back through the scheduler's released ids)."""
        self._fills.take()

    def _flush_fills(self) -> None:
        """Set up the slots admitted since the last call on the device (one small call per step,
        more only for very long prompts)."""
        for clear, entries in self._fills.take():
            self.sampler_state = self._fill_slots(self.sampler_state, clear, entries)

    def _release(self, request_id: str) -> None:
        slot = self._slot.pop(request_id, None)
        if slot is not None:
            self._free_slots.append(slot)

    def _peer_buffers(self, mesh, capacity_bytes: int) -> PeerBuffers | None:
        """Comm buffers for the peer-memory all-reduce (`jaxserve/collectives.py`) when this
        mesh's GPUs are all in this process and can reach each other's memory; else None (XLA's
        collectives). Sized for the largest step's [T, D] activations."""
        try:
            return PeerBuffers(mesh, capacity_bytes)
        except PeerAccessError as e:
            if peer_all_reduce_mode(mesh) == "on":
                raise
            log.warning("peer all-reduce unavailable (%s); using XLA's collectives", e)
            return None

    @staticmethod
    def _decode_row_floor(tp: int) -> int:
        """The fewest rows a decode step is padded to. XLA rewrites a one-row matmul whose weight
        holds < 10^7 elements into a reduction that reads far below the memory bandwidth; under
        tensor parallelism the qkv and o shards of a 7B model fall under that size.
        JAXSERVE_DECODE_ROW_FLOOR overrides."""
        flag = os.environ.get("JAXSERVE_DECODE_ROW_FLOOR")
        return int(flag) if flag else (2 if tp > 1 else 1)

    def compiler_options(self) -> dict:
        """XLA options for the step executables. Tensor parallel on GPUs: small all-reduces (a
        decode step's [T, D] activations) use XLA's one-shot kernel over peer memory instead of
        NCCL, when the devices have peer access (XLA checks and falls back to NCCL otherwise);
        measured +12% at batch 64 on 2 x H200 (docs/benchmarks/2026-11-to-12.md). JAXSERVE_ONE_SHOT_ALL_REDUCE=0
        turns it off."""
        tp = 1 if self.mesh is None else self.mesh.shape["tp"]
        if (tp > 1 and jax.default_backend() == "gpu"
                and os.environ.get("JAXSERVE_ONE_SHOT_ALL_REDUCE", "1") != "0"):
            return {"xla_gpu_unsupported_use_all_reduce_one_shot_kernel": True}
        return {}

    def _executable(self, key: tuple):
        """The compiled executable for `key`; before `warmup()`, the jitted function (compiles on
        first use)."""
        exe = self._exec.get(key)
        if exe is not None:
            return exe
        if key[0] == "sample":
            return self._sample[key[1]]
        if key[0] == "decode_sample":
            return functools.partial(self._decode_sample[key[3]], t=key[1], s=key[2])
        fn = self._step if key[0] == "forward" else self._step_decode
        return functools.partial(fn, t=key[1], s=key[2])

    # -- one step -------------------------------------------------------------------------------
    def dispatch(self, out: SchedulerOutput):
        """Enqueue the step on the device and return at once (JAX dispatch is asynchronous)."""
        for rid in out.released_ids:
            self._release(rid)
        for ns in out.new_seqs:
            self._admit(ns)
        self._flush_fills()
        if not out.seqs:
            return None
        if self._step_decode is not None and out.num_tokens == len(out.seqs):
            kind = "decode"   # every sequence feeds exactly one token
            t, s = pick_bucket(len(out.seqs), len(out.seqs), self.decode_buckets)
        else:
            kind = "forward"
            t, s = pick_bucket(out.num_tokens, len(out.seqs), self.buckets)
        meta, positions = build_metadata(
            [(q.block_table, q.num_computed_tokens, len(q.token_ids)) for q in out.seqs],
            block_size=self.block_size, num_tokens=t, num_seqs=s,
            max_blocks_per_seq=self.max_blocks_per_seq)
        ids, src, logits_idx, rows = self._step_rows(out.seqs, t, s)
        packed = pack_forward(ids, positions, meta, logits_idx, src)
        mode = SAMPLER_MODES[int(self._slot_rows["mode"][rows["slot"][:len(out.seqs)]].max())]
        if kind == "decode" and self._decode_sample:
            result, self.kv, self.sampler_state = self._executable(("decode_sample", t, s, mode))(
                self.params, self.kv, packed, self.sampler_state, pack_sampling(rows))
        else:
            logits, self.kv = self._executable((kind, t, s))(
                self.params, self.kv, packed, self.sampler_state.last_token)
            result, self.sampler_state = self._executable(("sample", mode, s))(
                logits, self.sampler_state, pack_sampling(rows))
        self.num_steps += 1
        # NOTE: the copy to the host is queued now, behind the step: fetching four arrays one
        # blocking transfer at a time cost ~2 ms of host time per step (measured under tp=2).
        return out, _host_copy(result)

    def _step_rows(self, seqs, t: int, s: int):
        """A step's token ids [T], placeholder source slots [T], logits rows [S] and sampling rows,
        filled one numpy call per field (a request's fixed sampling values sit in per-slot rows set
        at admission); the per-sequence loop this replaces took 0.64 ms at 256 sequences, this
        0.16 ms (CPU)."""
        n = len(seqs)
        ids, src = np.zeros(t, np.int32), _no_src(t)
        rows = SamplingTensors.host(s)
        logits_idx = np.zeros(s, np.int32)
        if not n:
            return ids, src, logits_idx, rows
        ends = np.cumsum(np.fromiter((len(q.token_ids) for q in seqs), np.int64, n))
        total = int(ends[-1])
        ids[:total] = np.fromiter(itertools.chain.from_iterable(q.token_ids for q in seqs),
                                  np.int32, total)
        last = ends - 1
        slots = np.fromiter((self._slot[q.request_id] for q in seqs), np.int32, n)
        placeholder = ids[:total] == PLACEHOLDER
        if placeholder.any():
            # only ever the last token fed: the device takes it from the slot's last sample
            ends_in_one = placeholder[last]
            early = placeholder.copy()
            early[last] = False
            if early.any():
                bad = seqs[int(np.searchsorted(ends, np.argmax(early), side="right"))]
                raise RuntimeError(f"{bad.request_id}: a placeholder token before the last one")
            at = last[ends_in_one]
            ids[at] = 0
            src[at] = slots[ends_in_one]
        logits_idx[:n] = last
        fixed = self._slot_rows
        for field in ("seed", "temperature", "top_k", "top_p", "min_p", "presence", "frequency",
                      "repetition"):
            rows[field][:n] = fixed[field][slots]
        rows["slot"][:n] = slots
        rows["valid"][:n] = np.fromiter((q.sample for q in seqs), bool, n)
        gen = np.fromiter((q.num_generated for q in seqs), np.int32, n)
        rows["num_generated"][:n] = gen
        rows["block_stop"][:n] = gen < fixed["min_tokens"][slots]
        return ids, src, logits_idx, rows

    def fetch(self, handle) -> dict[str, Sampled]:
        """Wait for a dispatched step and bring its sampled tokens to the host."""
        if handle is None:
            return {}
        out, result = handle
        tokens, lp, top_ids, top_lp = unpack_result(np.asarray(result))
        return {q.request_id: Sampled(int(tokens[i]), float(lp[i]), top_ids[i], top_lp[i])
                for i, q in enumerate(out.seqs) if q.sample}

