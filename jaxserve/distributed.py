"""Multi-host serving with JAX's multi-controller runtime (`jax.distributed`).

Every process runs the same program: it joins the job (`initialize`), loads its shards of the
weights for a mesh that spans all processes' devices, and builds the same engine. Process 0 is the
leader: it serves HTTP (or runs the library calls) and schedules. Before each step it broadcasts the
step's `SchedulerOutput` to the followers, which dispatch the identical jitted step, so every
process enters the same collectives in the same order. Followers run `follow(engine)` until the
leader sends STOP (`engine.shutdown_followers()`, called on shutdown).

The broadcast goes through the key-value store of JAX's coordination service (the one
`jax.distributed.initialize` starts): the leader writes the pickled step under a sequence key and
followers block on that key. It is host to host, so the leader never waits on its devices to hand
a step over (a device collective would queue behind the step still running and undo the overlap
of scheduling with execution).
"""

from __future__ import annotations

import os
import pickle

import jax

_KEEP_STEPS = 1024      # step keys kept in the coordination service before the oldest is deleted
_WAIT_MS = 60_000        # a follower's wait per try for the next step
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

    _instances = 0   # engines built in this job, in the same order on every process

    def __init__(self):
        from jax._src import distributed as jax_distributed
        self._client = jax_distributed.global_state.client
        if self._client is None:
            raise RuntimeError("jax.distributed is not initialized in this process")
        self._prefix = f"jaxserve/steps/{StepBroadcast._instances}/"
        StepBroadcast._instances += 1
        self._seq = 0

    def warmup(self) -> None:
        """Nothing to compile; one round trip checks that every process reaches the store."""
        if is_leader():
            self.send("__jaxserve_hello__")
        elif self.recv() != "__jaxserve_hello__":
            raise RuntimeError("multi-process step broadcast: unexpected first message")

    def send(self, obj) -> None:
        self._client.key_value_set_bytes(self._prefix + str(self._seq),
                                         pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))
        if self._seq >= _KEEP_STEPS:   # followers trail by ~2 steps: old keys are long read
            self._client.key_value_delete(self._prefix + str(self._seq - _KEEP_STEPS))
        self._seq += 1

    def recv(self):
        key = self._prefix + str(self._seq)
        while True:   # an idle server sends nothing for as long as it is idle
            try:
                data = self._client.blocking_key_value_get_bytes(key, _WAIT_MS)
                break
            except Exception as e:  # noqa: BLE001 - jaxlib raises its runtime error type
                if "DEADLINE_EXCEEDED" not in str(e):
                    raise
        self._seq += 1
        return pickle.loads(data)


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
