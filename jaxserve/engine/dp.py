"""Building the engine for a mesh: one `EngineCore`, or `dp` of them (data parallel).

`--mesh dp=D,tp=T` takes D*T devices as a [D, T] grid. Each row is one replica: its own copy of the
weights split over its T devices, its own KV cache, scheduler and compiled steps. The
`DataParallelEngine` has EngineCore's interface; a new request goes to the replica with the fewest
unfinished requests, and a step first dispatches every replica's next step, then collects each
one's previous step, so the replicas' devices work at the same time.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from jaxserve.engine.core import EngineConfig, EngineCore
from jaxserve.engine.outputs import InvalidRequestError, RequestOutput
from jaxserve.loading import LoadedModel, load_model


class DataParallelEngine:
    def __init__(self, replicas: list[EngineCore]):
        if not replicas:
            raise ValueError("a data-parallel engine needs at least one replica")
        self.replicas = replicas
        first = replicas[0]
        self.lm, self.config, self.tokenizer = first.lm, first.config, first.tokenizer
        self.max_model_len = first.max_model_len
        self.max_num_seqs = sum(r.max_num_seqs for r in replicas)   # sequences running at once
        self.eos_token_ids = first.eos_token_ids
        self.runner = first.runner
        self.scheduler = _AnyScheduler(replicas)
        self._owner: dict[str, EngineCore] = {}

    # -- requests -------------------------------------------------------------------------------
    def tokenize_prompt(self, prompt: Any):
        return self.replicas[0].tokenize_prompt(prompt)

    def validate(self, prompt_ids, params) -> int:
        return self.replicas[0].validate(prompt_ids, params)

    def add_request(self, request_id: str, prompt: Any, params=None) -> None:
        if request_id in self._owner:
            raise InvalidRequestError("request_id", f"{request_id!r} is already in use")
        replica = min(self.replicas, key=lambda e: e.num_unfinished_requests)
        replica.add_request(request_id, prompt, params)
        self._owner[request_id] = replica

    def abort(self, request_id: str) -> RequestOutput | None:
        replica = self._owner.pop(request_id, None)
        return replica.abort(request_id) if replica is not None else None

    # -- the loop -------------------------------------------------------------------------------
    def step(self, snapshots: bool = True) -> list[RequestOutput]:
        entries = [e.step_begin() for e in self.replicas]
        outs: list[RequestOutput] = []
        for e, entry in zip(self.replicas, entries):
            outs.extend(e.step_end(entry, snapshots))
        for o in outs:
            if o.finished:
                self._owner.pop(o.request_id, None)
        return outs

    def has_unfinished(self) -> bool:
        return any(e.has_unfinished() for e in self.replicas)

    # -- introspection --------------------------------------------------------------------------
    def get_stats(self) -> dict[str, Any]:
        stats = [e.get_stats() for e in self.replicas]
        out: dict[str, Any] = {k: sum(s[k] for s in stats) for k in stats[0]
                               if k not in ("kv_cache_usage_perc", "compiles_after_warmup")}
        out["kv_cache_usage_perc"] = sum(s["kv_cache_usage_perc"] for s in stats) / len(stats)
        # every replica's counter sees the whole process's compiles
        out["compiles_after_warmup"] = max(s["compiles_after_warmup"] for s in stats)
        out["num_replicas"] = len(stats)
        return out


class _AnyScheduler:
    """What callers ask of `engine.scheduler`, answered over all replicas."""

    def __init__(self, replicas: list[EngineCore]):
        self._replicas = replicas

    def has_work(self) -> bool:
        return any(e.scheduler.has_work() for e in self._replicas)


def build_engine(model: str | LoadedModel | None, config: EngineConfig, mesh: str | dict | None = None,
                 **load_kwargs) -> tuple[LoadedModel, EngineCore | DataParallelEngine]:
    """Load (or re-place) the model for `mesh` and build its engine. Returns (model of replica 0,
    engine)."""
    from jaxserve.sharding import AXES, make_mesh, param_sharding, parse_mesh, shard_model
    from jax.sharding import Mesh

    sizes = parse_mesh(mesh)
    dp, tp = sizes["dp"], sizes["tp"]
    grid = None
    if dp * tp > 1:
        grid = make_mesh(mesh, jax.devices()[: dp * tp])
    submeshes = [None] if grid is None else [Mesh(grid.devices[i : i + 1], AXES) for i in range(dp)]
    if isinstance(model, LoadedModel):
        lm = model
        if submeshes[0] is not None:
            lm = dataclasses.replace(model, model=shard_model(model.model, submeshes[0]))
    else:
        shardings = param_sharding(submeshes[0]) if submeshes[0] is not None else None
        lm = load_model(model, shardings=shardings, **load_kwargs)
    if dp == 1:
        return lm, EngineCore(lm, config, mesh=submeshes[0] if tp > 1 else None)
    replicas = []
    for i, sub in enumerate(submeshes):
        lm_i = lm if i == 0 else dataclasses.replace(lm, model=shard_model(lm.model, sub))
        replicas.append(EngineCore(lm_i, config if i == 0 else dataclasses.replace(
            config, show_progress=False), mesh=sub))
    for e in replicas:   # the later replicas' warm-up compiles are not "after warm-up"
        e.runner.compile_counter.mark_warm()
    return lm, DataParallelEngine(replicas)
