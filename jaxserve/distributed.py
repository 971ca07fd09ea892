"""Multi-host serving with JAX's multi-controller runtime (`jax.distributed`).

Every process runs the same program: it joins the job (`initialize`), loads its shards of the
weights for a mesh that spans all processes' devices, and builds the same engine. Process 0 is the
leader: it serves HTTP (or runs the library calls) and schedules. Before each step it broadcasts the
step's `SchedulerOutput` to the followers, which dispatch the identical jitted step, so every
process enters the same collectives in the same order. Followers run `follow(engine)` until the
leader sends STOP (`engine.shutdown_followers()`, called on shutdown).

The broadcast is `jax.experimental.multihost_utils.broadcast_one_to_all` of the pickled step,
padded to a power-of-two size so only a few shapes are ever compiled (all at start-up).
"""

from __future__ import annotations

import os
import pickle

import jax
import numpy as np

_MIN_PAYLOAD = 1 << 12
_MAX_WARM_PAYLOAD = 1 << 20
_STOP = "__jaxserve_stop__"


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    """Join the job. Arguments left None are read by JAX from its environment variables (or a
    cluster scheduler such as SLURM). On CPU the collectives go over gloo."""
    if coordinator_address is None and num_processes is None and "JAX_COORDINATOR_ADDRESS" not in os.environ:
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")   # CPU devices only
    jax.distributed.initialize(coordinator_address, num_processes, process_id)


def is_leader() -> bool:
    return jax.process_index() == 0


class StepBroadcast:
    """Leader -> followers: one Python object per call, in the same order on every process."""

    def __init__(self):
        from jax.experimental import multihost_utils
        self._bcast = multihost_utils.broadcast_one_to_all

    def warmup(self) -> None:
        """Compile the broadcast for every payload size up to 1 MiB (larger steps compile late)."""
        size = _MIN_PAYLOAD
        while size <= _MAX_WARM_PAYLOAD:
            self._bcast(np.zeros(size, np.uint8), is_source=is_leader())
            size *= 2
        self._bcast(np.zeros(1, np.int64), is_source=is_leader())

    def send(self, obj) -> None:
        data = np.frombuffer(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL), np.uint8)
        self._bcast(np.array([data.size], np.int64), is_source=True)
        buf = np.zeros(_padded(data.size), np.uint8)
        buf[: data.size] = data
        self._bcast(buf, is_source=True)

    def recv(self):
        n = int(np.asarray(self._bcast(np.zeros(1, np.int64), is_source=False))[0])
        buf = np.asarray(self._bcast(np.zeros(_padded(n), np.uint8), is_source=False))
        return pickle.loads(buf[:n].tobytes())


def _padded(n: int) -> int:
    size = _MIN_PAYLOAD
    while size < n:
        size *= 2
    return size


def attach(engine) -> StepBroadcast | None:
    """Make a multi-process engine broadcast its steps (leader) or able to follow (followers)."""
    if jax.process_count() == 1:
        return None
    if hasattr(engine, "replicas"):
        raise NotImplementedError("a mesh over several processes supports tp only (dp=1) for now")
    bc = StepBroadcast()
    bc.warmup()
    engine.runner.compile_counter.mark_warm()
    if is_leader():
        engine.step_listener = bc.send
    engine.broadcast = bc
    return bc


def follow(engine) -> int:
    """Follower loop: replay the leader's steps until STOP. Returns the number of steps run."""
    bc: StepBroadcast | None = getattr(engine, "broadcast", None)
    if bc is None or is_leader():
        raise RuntimeError("follow() runs on processes other than 0 of a multi-process job "
                           "(jax.distributed); process 0 calls generate() and shutdown()")
    steps = 0
    last = None
    while True:
        out = bc.recv()
        if isinstance(out, str) and out == _STOP:
            break
        handle = engine.runner.dispatch(out)
        if last is not None:          # keep at most two steps queued, like the leader
            jax.block_until_ready(last[1])
        last = handle
        steps += 1
    if last is not None:
        jax.block_until_ready(last[1])
    return steps


def stop_followers(engine) -> None:
    bc = getattr(engine, "broadcast", None)
    if bc is not None and is_leader():
        bc.send(_STOP)
        engine.broadcast = None
