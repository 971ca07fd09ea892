"""All-reduce over the GPUs of one process through peer memory, as one ordinary kernel.

Why: XLA runs each collective (NCCL or its one-shot kernel) as a collective thunk. On every call
of a multi-GPU executable each one costs 12-30 us of host time (the launch threads rendezvous),
and it splits the step's CUDA graph in two: a tp=2 decode step of a 28-layer model pays that 57
times (docs/benchmarks/2026-11-to-12.md, docs/scaling.md). This all-reduce is a plain Triton kernel to XLA: the
step stays one CUDA graph per GPU and the host launches it like a one-GPU step.

How: every GPU owns one "comm buffer", allocated once and kept for the life of the process, whose
address the others know (the `table` operand; peer access between the GPUs must be on). The kernel
on rank r, program b of a fixed grid G, handles the chunks c = b, b + G, ... of BLOCK elements:

  1. pushes its chunks of x into every peer's receive area [slot][r] (NVLink stores);
  2. barrier, then sets flag [slot][r][b] in every peer (release, system scope);
  3. waits for flag [slot][p][b] from every peer p (acquire), barrier;
  4. sums the n partials in rank order (own chunk from x) in float32 and stores the output.

Flags carry epoch numbers, not booleans: program b keeps a counter in its own buffer; a call
waits for `counter + 1` and stores it back at the end. The slot is the counter's parity, so a
program never writes the slot its peer may still be reading: the peer's program b can only start
call e + 2 after our program b has signalled call e + 1, i.e. after it finished reading call e
(kernels of one stream run one after the other). Programs only ever meet the same program index
on the other GPUs and a chunk always belongs to the same program (the grid is fixed), so calls of
any size may follow each other. Every rank runs the same SPMD executable, so every rank makes the
same sequence of calls; a program whose peer never arrives would wait forever, which only happens
if one GPU's executable failed, which the process does not survive anyway.

Sum in rank order in float32, one rounding: the result is the same on every rank, bit for bit,
and equals XLA's psum over two GPUs.

Comm buffer layout (bytes): counters [G] int32 at 0, flags [2][n][G] int32 at FLAGS_AT, receive
areas [2][n][capacity] at RECV_AT.
"""

from __future__ import annotations

import functools
import io
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

# programs per call (fixed for the process: a chunk always belongs to the same program) and
# elements per chunk. 2 x H100, 57 all-reduces of [64, 3584] bf16 per call (device time each):
# 32 x 2048 10.6 us, 64 x 2048 8.6, 128 x 1024 8.4, 128 x 2048 8.0; of [2, 3584]: 5.0-6.0 us for
# all (docs/benchmarks/2026-11-to-12.md). JAXSERVE_PEER_GRID / JAXSERVE_PEER_BLOCK override them (experiments).
GRID = int(os.environ.get("JAXSERVE_PEER_GRID", "128"))
BLOCK = int(os.environ.get("JAXSERVE_PEER_BLOCK", "1024"))
FLAGS_AT = 4096
RECV_AT = 65536
MAX_RANKS = 8
if not (GRID * 4 <= FLAGS_AT and FLAGS_AT + 2 * MAX_RANKS * GRID * 4 <= RECV_AT
        and BLOCK & (BLOCK - 1) == 0):
    raise ValueError(f"peer_all_reduce: GRID={GRID} does not fit the comm buffer layout or "
                     f"BLOCK={BLOCK} is not a power of two")


def fits(x, capacity_bytes: int) -> bool:
    """Whether the kernel takes `x` (an array or its aval) with buffers of `capacity_bytes`."""
    return (np.dtype(x.dtype) in (np.dtype(jnp.float32), np.dtype(jnp.bfloat16),
                                  np.dtype(jnp.float16))
            and math.prod(x.shape) * np.dtype(x.dtype).itemsize <= capacity_bytes)


def comm_buffer_bytes(num_ranks: int, capacity_bytes: int) -> int:
    """Bytes of one GPU's comm buffer for messages of up to `capacity_bytes`."""
    return RECV_AT + 2 * num_ranks * _round_up(capacity_bytes, 256)


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


@functools.lru_cache(maxsize=None)
def _kernel_module(*, dtype, elems: int, num_ranks: int, capacity_bytes: int, name: str):
    """The Triton IR (tt dialect) module of one call's kernel, built with the MLIR bindings, as
    bytecode (cached: a step lowers the same all-reduce at every layer)."""
    from jax._src.interpreters import mlir
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import arith, scf
    from jax._src.lib.mlir.dialects import gpu as gpu_dialect
    from jax._src.lib.triton import dialect as tt

    n, cap = num_ranks, _round_up(capacity_bytes, 256)
    ctx = mlir.JaxIrContext()
    ctx.append_dialect_registry(mlir.upstream_dialects)
    tt.register_dialect(ctx)
    ctx.load_all_available_dialects()
    with ctx, ir.Location.unknown():
        i1, i32, i64 = (ir.IntegerType.get_signless(w) for w in (1, 32, 64))
        f32 = ir.F32Type.get()
        elt = mlir.dtype_to_ir_type(np.dtype(dtype))
        itemsize = np.dtype(dtype).itemsize
        ptr = functools.partial(tt.PointerType.get, address_space=1)
        vec = lambda t: ir.RankedTensorType.get([BLOCK], t)   # noqa: E731

        module = ir.Module.create()
        module.operation.attributes["sym_name"] = ir.StringAttr.get(name)
        fn_type = ir.FunctionType.get([ptr(elt), ptr(i32), ptr(elt)], [])
        fn = tt.FuncOp(name, ir.TypeAttr.get(fn_type), sym_visibility="public",
                       res_attrs=ir.DictAttr.get(dict(noinline=ir.BoolAttr.get(False))),
                       ip=ir.InsertionPoint.at_block_begin(module.body))
        fn.arg_attrs = ir.ArrayAttr.get(
            [ir.DictAttr.get({"tt.divisibility": mlir.i32_attr(16)})] * 3)
        entry = fn.body.blocks.append(*fn_type.inputs)

        def c32(v):
            return arith.constant(i32, v)

        def c64(v):
            return arith.constant(i64, v)

        def at(addr, t):             # scalar pointer to an address (i64)
            return tt.int_to_ptr(ptr(t), addr)

        def vec_ptrs(base, offs, t):  # base pointer + [BLOCK] element offsets
            return tt.addptr(vec(ptr(t)), tt.splat(vec(ptr(t)), base), offs)

        with ir.InsertionPoint(entry):
            x, table_arg, out = entry.arguments
            table = tt.bitcast(ptr(i64), table_arg)
            load64 = lambda k: tt.load(tt.addptr(ptr(i64), table, c32(k)))   # noqa: E731
            rank = load64(0)                                   # i64
            bases = [load64(1 + p) for p in range(n)]          # every rank's comm buffer
            pid = tt.get_program_id(tt.ProgramIDDim.X)         # i32
            # own buffer: bases[rank], picked without a dynamic load
            own = bases[0]
            for p in range(1, n):
                own = arith.select(arith.cmpi(arith.CmpIPredicate.eq, rank, c64(p)), bases[p], own)
            pid64 = arith.extsi(i64, pid)
            counter = at(arith.addi(own, arith.muli(pid64, c64(4))), i32)
            epoch = tt.load(counter, cache=tt.CacheModifier.CG)
            target = arith.addi(epoch, c32(1))
            slot = arith.extsi(i64, arith.andi(epoch, c32(1)))

            def flag_addr(base, sender):   # flags[slot][sender][pid] in `base`'s buffer
                idx = arith.addi(arith.muli(arith.addi(arith.muli(slot, c64(n)), sender),
                                            c64(GRID)), pid64)
                return arith.addi(base, arith.addi(c64(FLAGS_AT), arith.muli(idx, c64(4))))

            def recv_addr(base, sender):   # receive area [slot][sender] in `base`'s buffer
                idx = arith.addi(arith.muli(slot, c64(n)), sender)
                return arith.addi(base, arith.addi(c64(RECV_AT), arith.muli(idx, c64(cap))))

            not_me = [arith.cmpi(arith.CmpIPredicate.ne, rank, c64(p)) for p in range(n)]
            lanes = tt.make_range(vec(i32), 0, BLOCK)
            limit = tt.splat(vec(i32), c32(elems))

            def chunks(body):
                loop = scf.ForOp(arith.muli(pid, c32(BLOCK)), c32(elems), c32(GRID * BLOCK), [])
                with ir.InsertionPoint(loop.body):
                    offs = arith.addi(tt.splat(vec(i32), loop.induction_variable), lanes)
                    body(offs, arith.cmpi(arith.CmpIPredicate.slt, offs, limit))
                    scf.yield_([])

            # 1. push this rank's chunks into every peer's receive area [slot][rank]
            dests = [at(recv_addr(bases[p], rank), elt) for p in range(n)]

            def push(offs, mask):
                v = tt.load(vec_ptrs(x, offs, elt), mask=mask)
                for p in range(n):
                    m = arith.andi(mask, tt.splat(vec(i1), not_me[p]))
                    tt.store(vec_ptrs(dests[p], offs, elt), v, mask=m)
            chunks(push)
            gpu_dialect.barrier()
            # 2. tell every peer this program's part has landed
            for p in range(n):
                tt.atomic_rmw(i32, tt.RMWOp.XCHG, at(flag_addr(bases[p], rank), i32), target,
                              tt.MemSemantic.RELEASE, tt.MemSyncScope.SYSTEM, mask=not_me[p])
            # 3. wait for every peer's part
            for p in range(n):
                flag = at(flag_addr(own, c64(p)), i32)
                loop = scf.WhileOp([], [])
                before = loop.before.blocks.append()
                with ir.InsertionPoint(before):
                    seen = tt.atomic_rmw(i32, tt.RMWOp.ADD, flag, c32(0), tt.MemSemantic.ACQUIRE,
                                         tt.MemSyncScope.SYSTEM)
                    waiting = arith.andi(arith.cmpi(arith.CmpIPredicate.ne, seen, target),
                                         not_me[p])
                    scf.condition(waiting, [])
                after = loop.after.blocks.append()
                with ir.InsertionPoint(after):
                    scf.yield_([])
            gpu_dialect.barrier()
            # 4. sum the partials in rank order (this rank's own from x)
            x_addr = tt.ptr_to_int(i64, x)
            srcs = [at(arith.select(not_me[p], recv_addr(own, c64(p)), x_addr), elt)
                    for p in range(n)]
            zero = arith.constant(vec(f32), ir.DenseElementsAttr.get_splat(
                vec(f32), ir.FloatAttr.get(f32, 0.0)))
            other = arith.constant(vec(elt), ir.DenseElementsAttr.get_splat(
                vec(elt), ir.FloatAttr.get(elt, 0.0)))

            def reduce(offs, mask):
                acc = zero
                for p in range(n):
                    v = tt.load(vec_ptrs(srcs[p], offs, elt), mask=mask, other=other,
                                cache=tt.CacheModifier.CG)
                    acc = arith.addf(acc, v if itemsize == 4 else arith.extf(vec(f32), v))
                res = acc if itemsize == 4 else arith.truncf(vec(elt), acc)
                tt.store(vec_ptrs(out, offs, elt), res, mask=mask)
            chunks(reduce)
            tt.store(counter, target)
            tt.return_([])
        module.operation.verify()
        buf = io.BytesIO()
        module.operation.write_bytecode(buf)
        return buf.getvalue()


# -- the JAX primitive: a Triton custom call that XLA compiles like Pallas's Triton kernels -------
def _make_primitive():
    from jax.extend.core import Primitive
    from jax._src.interpreters import mlir

    prim = Primitive("peer_all_reduce")
    prim.def_abstract_eval(lambda x, table, **_: jax.core.ShapedArray(x.shape, x.dtype))

    def lowering(ctx, x, table, *, num_ranks: int, capacity_bytes: int):
        from jax._src.lib.mlir import ir
        [x_aval, _] = ctx.avals_in
        elems = math.prod(x_aval.shape)
        name = f"peer_all_reduce_{np.dtype(x_aval.dtype).name}_{elems}_{num_ranks}"
        module = _kernel_module(dtype=x_aval.dtype, elems=elems, num_ranks=num_ranks,
                                capacity_bytes=capacity_bytes, name=name)
        grid = min(GRID, -(-elems // BLOCK))
        config = dict(name=ir.StringAttr.get(name), ir=ir.StringAttr.get(module),
                      num_stages=mlir.i32_attr(1), num_warps=mlir.i32_attr(4),
                      grid_x=mlir.i32_attr(grid), grid_y=mlir.i32_attr(1),
                      grid_z=mlir.i32_attr(1), debug=ir.BoolAttr.get(False))
        out_type = ir.RankedTensorType.get(x_aval.shape, mlir.dtype_to_ir_type(x_aval.dtype))
        return mlir.custom_call("__gpu$xla.gpu.triton", result_types=[out_type],
                                operands=[x, table], backend_config=config, api_version=4).results

    mlir.register_lowering(prim, lowering, platform="cuda")
    return prim


_PRIM = None


def peer_all_reduce(x: jax.Array, table: jax.Array, *, num_ranks: int,
                    capacity_bytes: int) -> jax.Array:
    """Sum of `x` over the ranks, called per device (inside `shard_map`) on each rank's local
    partial. x: [...] float32 / bfloat16 / float16 with at most `capacity_bytes` bytes;
    table: [2 * (1 + num_ranks)] int32, this rank's row of the comm table (its rank, then every
    rank's comm buffer address, as little-endian int64 pairs; see `comm_table_row`)."""
    global _PRIM
    if not fits(x, capacity_bytes):
        raise ValueError(f"peer_all_reduce: {x.dtype} {x.shape} is not a float32/bfloat16/float16 "
                         f"array within the comm buffers' capacity of {capacity_bytes} bytes")
    if not 1 <= num_ranks <= MAX_RANKS:
        raise ValueError(f"peer_all_reduce: 1..{MAX_RANKS} ranks, not {num_ranks}")
    if _PRIM is None:
        _PRIM = _make_primitive()
    out = _PRIM.bind(x.reshape(-1), table.reshape(-1), num_ranks=num_ranks,
                     capacity_bytes=capacity_bytes)
    return out.reshape(x.shape)


def comm_table_row(rank: int, addresses: list[int]) -> np.ndarray:
    """One rank's table row: [rank, address of rank 0's buffer, ...] as int64, viewed as int32."""
    return np.asarray([rank, *addresses], np.int64).view(np.int32)


def peer_all_reduce_reference(partials: jax.Array) -> jax.Array:
    """[n, ...] partials of n ranks -> their sum as every rank gets it (rank order, float32)."""
    acc = jnp.zeros(partials.shape[1:], jnp.float32)
    for p in range(partials.shape[0]):
        acc = acc + partials[p].astype(jnp.float32)
    return acc.astype(partials.dtype)
