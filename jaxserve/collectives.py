"""The tensor-parallel collectives the models call, and the peer-memory buffers behind them.

Models receive a `TensorParallel` (or None) and call `tp.psum(x)` after a row-parallel matmul.
Two implementations, chosen once per runner:

  * XLA's `psum` (NCCL or XLA's one-shot kernel): any backend, any number of processes;
  * `pallas_kernels.peer_all_reduce`: the GPUs of one process, through peer memory. XLA sees an
    ordinary kernel, so the step stays one CUDA graph per GPU and its launch has no per-collective
    host cost (12-30 us of host time per all-reduce with XLA's collectives; docs/benchmarks/2026-11-to-12.md).
    Needs peer access between the GPUs (NVLink or PCIe P2P) and one comm buffer per GPU, allocated
    by `PeerBuffers` and kept for the life of the runner.

`TensorParallel` is a pytree: the comm table is a (per-device) array argument of the executables,
not a constant, so compiled executables hold no addresses and the executable store can keep them.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P


class PeerAccessError(RuntimeError):
    """The GPUs of a mesh cannot read each other's memory (no NVLink / P2P between them)."""


@functools.partial(jax.tree_util.register_dataclass, data_fields=["table"],
                   meta_fields=["axis", "size", "capacity_bytes"])
@dataclasses.dataclass(frozen=True)
class TensorParallel:
    """What a model needs to know of the tensor-parallel group it runs in (inside `shard_map`)."""
    axis: str                   # mesh axis name
    size: int                   # ranks
    table: jax.Array | None = None   # this rank's comm table row (peer all-reduce), or None (XLA)
    capacity_bytes: int = 0     # largest message the comm buffers hold

    def index(self) -> jax.Array:
        return jax.lax.axis_index(self.axis)

    def psum(self, x: jax.Array) -> jax.Array:
        if self.table is not None:
            from pallas_kernels.peer_all_reduce import fits, peer_all_reduce
            if fits(x, self.capacity_bytes):
                return peer_all_reduce(x, self.table, num_ranks=self.size,
                                       capacity_bytes=self.capacity_bytes)
        return jax.lax.psum(x, self.axis)

    def all_gather(self, x: jax.Array, axis: int) -> jax.Array:
        return jax.lax.all_gather(x, self.axis, axis=axis, tiled=True)

    def gather_small(self, x: jax.Array) -> jax.Array:
        """Every rank's x [...] (float32) -> [size, ...] on every rank, rank r's at index r: for a
        few numbers per row. Through the peer all-reduce where it serves the step, as a sum of
        each rank's x placed in its own row over zeros (exact: every sum adds zeros to one
        value), so the step keeps no XLA collective; else XLA's all-gather."""
        if self.table is not None:   # (`psum` takes XLA's where the buffers are too small)
            return self.psum(stack_by_sum_input(x, self.index(), self.size))
        return jax.lax.all_gather(x, self.axis)


def stack_by_sum_input(x: jax.Array, index, size: int) -> jax.Array:
    """[size, ...] zeros with x in row `index`: summed over the ranks, every rank's x in its row."""
    return jnp.zeros((size, *x.shape), x.dtype).at[index].set(x)


def peer_all_reduce_mode(mesh) -> str:
    """"auto" where the peer all-reduce can serve `mesh` (tp > 1 over GPUs all in this process),
    "off" elsewhere or with JAXSERVE_PEER_ALL_REDUCE=0; "on" with JAXSERVE_PEER_ALL_REDUCE=1
    (then GPUs without peer access are an error instead of a fallback to XLA's collectives)."""
    flag = os.environ.get("JAXSERVE_PEER_ALL_REDUCE", "auto")
    if flag == "0" or mesh is None or mesh.shape.get("tp", 1) < 2:
        return "off"
    devices = list(mesh.devices.flat)
    if not all(d.platform == "gpu" and d.process_index == jax.process_index() for d in devices):
        return "off"
    return "on" if flag == "1" else "auto"


def peer_capacity_bytes(mesh, cfg, max_tokens: int, itemsize: int) -> int:
    """The comm buffers' capacity a runner over `mesh` asks for: the largest all-reduce of a step,
    its [T, D] activations; 0 where the peer all-reduce will not be tried (the mode is off, or tp
    does not split the heads and XLA partitions the step). One rule for the runner and the
    memory plan."""
    from jaxserve.sharding import splits_heads
    if peer_all_reduce_mode(mesh) == "off" or not splits_heads(cfg, mesh.shape["tp"]):
        return 0
    return max_tokens * cfg.hidden_size * itemsize


def peer_buffer_bytes(mesh, capacity_bytes: int) -> int:
    """Device memory one GPU's comm buffer takes for that capacity (for the memory plan)."""
    if not capacity_bytes:
        return 0
    from pallas_kernels.peer_all_reduce import comm_buffer_bytes
    return comm_buffer_bytes(mesh.shape["tp"], capacity_bytes)


class PeerBuffers:
    """One comm buffer per GPU of a tp group (`[1, tp]` mesh), and the table every rank reads.

    NOTE: the buffers are ordinary JAX arrays that no executable ever takes as an argument; the
    kernels reach them through the addresses in the table. They must stay alive (this object
    holds them) as long as any executable using the table may run.
    """

    def __init__(self, mesh, capacity_bytes: int, axis: str = "tp"):
        from pallas_kernels.peer_all_reduce import comm_buffer_bytes, comm_table_row
        self.devices = list(mesh.devices.flat)
        n = len(self.devices)
        allocator = os.environ.get("XLA_PYTHON_CLIENT_ALLOCATOR", "default")
        if allocator not in ("default", "bfc", "platform", ""):
            # peer access covers memory from cuMemAlloc (XLA's BFC and platform allocators);
            # other allocators' pools would need access granted per pool
            raise PeerAccessError(f"XLA_PYTHON_CLIENT_ALLOCATOR={allocator} is not supported")
        enable_peer_access(self.devices)
        words = comm_buffer_bytes(n, capacity_bytes) // 4
        self.buffers = []
        for d in self.devices:
            alloc = jax.jit(functools.partial(jnp.zeros, (words,), jnp.int32),
                            out_shardings=jax.sharding.SingleDeviceSharding(d))
            self.buffers.append(alloc())
        jax.block_until_ready(self.buffers)
        addresses = [b.unsafe_buffer_pointer() for b in self.buffers]
        rows = np.stack([comm_table_row(r, addresses) for r in range(n)])   # [n, 2 (1 + n)]
        self.table = jax.device_put(rows.reshape(-1), NamedSharding(mesh, P(axis)))
        self.tp = TensorParallel(axis, n, self.table, capacity_bytes)
        self.nbytes = words * 4
        self._self_test(mesh, axis)

    def _self_test(self, mesh, axis: str) -> None:
        """One all-reduce of known values through the buffers before any model uses them: a
        wrong sum (memory the peers cannot really reach) is an error here, not wrong tokens."""
        n, cap = self.tp.size, self.tp.capacity_bytes
        rows = max(1, min(64, cap // (4 * 1024)))

        def body(table):
            tp = TensorParallel(axis, n, table.reshape(-1), cap)
            r = jax.lax.axis_index(axis).astype(jnp.float32)
            x = (r + 1.0) * jnp.ones((rows, 1024), jnp.float32) + jnp.arange(1024, dtype=jnp.float32)
            return tp.psum(x)[None]

        got = np.asarray(jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P(axis),
                                               out_specs=P(axis), check_vma=False))(self.table))
        want = n * (n + 1) / 2 + n * np.arange(1024, dtype=np.float32)
        if not np.array_equal(got, np.broadcast_to(want, got.shape)):
            raise PeerAccessError("the peer all-reduce's self-test gave a wrong sum")


# -- peer access through the CUDA driver -----------------------------------------------------------
def enable_peer_access(devices) -> None:
    """Let every GPU of `devices` (this process's) read and write the others' memory: the CUDA
    driver's cuCtxEnablePeerAccess on each device's primary context (the one JAX uses)."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError as e:
        raise PeerAccessError(f"libcuda not found: {e}") from None

    def check(rc: int, what: str, ok=(0,)):
        if rc not in ok:
            raise PeerAccessError(f"{what} failed (CUDA driver error {rc})")

    check(cuda.cuInit(0), "cuInit")
    handles, contexts = [], []
    for d in devices:
        dev, ctx = ctypes.c_int(), ctypes.c_void_p()
        check(cuda.cuDeviceGet(ctypes.byref(dev), d.local_hardware_id), "cuDeviceGet")
        check(cuda.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev), "cuDevicePrimaryCtxRetain")
        handles.append(dev)
        contexts.append(ctx)
    popped = ctypes.c_void_p()
    for i, (dev_i, ctx_i) in enumerate(zip(handles, contexts)):
        check(cuda.cuCtxPushCurrent_v2(ctx_i), "cuCtxPushCurrent")
        try:
            for j, (dev_j, ctx_j) in enumerate(zip(handles, contexts)):
                if i == j:
                    continue
                can = ctypes.c_int()
                check(cuda.cuDeviceCanAccessPeer(ctypes.byref(can), dev_i, dev_j),
                      "cuDeviceCanAccessPeer")
                if not can.value:
                    raise PeerAccessError(f"GPU {devices[i].id} cannot access GPU {devices[j].id}'s "
                                          f"memory (no peer access between them)")
                # 704: CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED
                check(cuda.cuCtxEnablePeerAccess(ctx_j, 0), "cuCtxEnablePeerAccess", ok=(0, 704))
        finally:
            cuda.cuCtxPopCurrent_v2(ctypes.byref(popped))
