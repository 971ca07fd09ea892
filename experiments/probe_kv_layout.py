"""Probe (GPU machine): how fast Pallas programs stream sequences' K/V pages out of HBM, by cache
layout. The question behind the decode kernel's 76% of the read ceiling on Qwen2.5-7B heads: is
it the layout of a page in memory?

    token-major [P, B, K, H] (jaxserve's cache): one kv head's page is B rows of H*2 bytes, each
                K*H*2 bytes after the previous one (256-byte pieces 1 KB apart for Qwen heads)
    head-major  [P, K, B, H]: one kv head's page is one contiguous B*H*2-byte block (4 KB)

Each program (sequence, kv head) walks its pages `pages_per_block` at a time with one row gather
per tile, exactly as the decode kernel does, and only sums the rows (so nothing is optimised
away): no attention math. Same run: the read ceiling, then per layout the best tuning of a small
sweep, and the decode kernel on the same shape for reference.

    python experiments/probe_kv_layout.py [--batch 64] [--len 2048] [--heads qwen2.5-7b] [--interpret]

`--interpret` runs a small case on the CPU against the jnp reference (the probe's own check).
"""

from __future__ import annotations

import argparse
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

HEADS = {"qwen2.5-7b": (28, 4, 128), "llama-3-8b": (32, 8, 128)}


def _stream_kernel(k_ref, v_ref, tables_ref, lens_ref, o_ref, *, pages_per_block: int,
                   page_size: int, kv_heads: int, head_major: bool):
    s, j = pl.program_id(0), pl.program_id(1)
    b = page_size
    slot = jnp.arange(pages_per_block * b, dtype=jnp.int32)
    n_pages = (lens_ref[s] + b - 1) // b
    n_iter = (n_pages + pages_per_block - 1) // pages_per_block

    def body(i, acc):
        page = tables_ref[s, i * pages_per_block + slot // b]
        t = slot % b
        rows = (page * kv_heads + j) * b + t if head_major else (page * b + t) * kv_heads + j
        k, v = k_ref[rows], v_ref[rows]                                     # [ppb*B, H] each
        return acc + k.astype(jnp.float32).sum(axis=0) + v.astype(jnp.float32).sum(axis=0)

    o_ref[...] = jax.lax.fori_loop(0, n_iter, body, jnp.zeros((k_ref.shape[1],), jnp.float32))


@functools.partial(jax.jit, static_argnames=("head_major", "pages_per_block", "num_warps",
                                             "num_stages", "interpret"))
def stream_pages(k_cache, v_cache, tables, lens, *, head_major: bool, pages_per_block: int = 8,
                 num_warps: int = 4, num_stages: int = 2, interpret: bool = False):
    """Sum of every K and V row of each (sequence, kv head) -> [S, K, H] fp32. The caches are
    [P, B, K, H] (token-major) or [P, K, B, H] (head-major); lens must fill whole tiles."""
    p = k_cache.shape[0]
    b, k_heads = (k_cache.shape[2], k_cache.shape[1]) if head_major else k_cache.shape[1:3]
    h = k_cache.shape[3]
    s_, m = tables.shape
    mp = -(-m // pages_per_block) * pages_per_block
    tables = jnp.pad(tables.astype(jnp.int32), ((0, 0), (0, mp - m)))
    rows = p * b * k_heads
    kernel = functools.partial(_stream_kernel, pages_per_block=pages_per_block, page_size=b,
                               kv_heads=k_heads, head_major=head_major)
    params = None
    if not interpret:
        from jax.experimental.pallas import triton as plgpu
        params = plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    return pl.pallas_call(
        kernel, grid=(s_, k_heads),
        in_specs=[pl.BlockSpec((rows, h), lambda i, j: (0, 0)),
                  pl.BlockSpec((rows, h), lambda i, j: (0, 0)),
                  pl.BlockSpec((s_, mp), lambda i, j: (0, 0)),
                  pl.BlockSpec((s_,), lambda i, j: (0,))],
        out_specs=pl.BlockSpec((None, None, h), lambda i, j: (i, j, 0)),
        out_shape=jax.ShapeDtypeStruct((s_, k_heads, h), jnp.float32),
        compiler_params=params, interpret=interpret, name="jaxserve_probe_stream_pages",
    )(k_cache.reshape(rows, h), v_cache.reshape(rows, h), tables, lens.astype(jnp.int32))


def stream_pages_reference(k_cache, v_cache, tables, lens, *, head_major: bool):
    """Pure jnp: the same sums from the token-major view of the pages."""
    if head_major:
        k_cache, v_cache = k_cache.transpose(0, 2, 1, 3), v_cache.transpose(0, 2, 1, 3)
    b = k_cache.shape[1]
    kpos = jnp.arange(tables.shape[1] * b)
    ok = (kpos[None, :] < lens[:, None])[:, :, None, None]
    k = k_cache[tables].reshape(tables.shape[0], -1, *k_cache.shape[2:]).astype(jnp.float32)
    v = v_cache[tables].reshape(tables.shape[0], -1, *v_cache.shape[2:]).astype(jnp.float32)
    return (jnp.where(ok, k, 0.0) + jnp.where(ok, v, 0.0)).sum(axis=1)


def make_caches(batch: int, length: int, k_heads: int, h: int, page: int = 16, seed: int = 0):
    """Token-major caches with shuffled page tables, and the same data head-major."""
    m = length // page
    pages = batch * m + 1
    kc = jax.random.normal(jax.random.key(seed), (pages, page, k_heads, h), jnp.bfloat16)
    vc = jax.random.normal(jax.random.key(seed + 1), (pages, page, k_heads, h), jnp.bfloat16)
    rng = np.random.default_rng(seed)
    tables = jnp.asarray(rng.permutation(np.arange(1, pages))[: batch * m].reshape(batch, m), jnp.int32)
    lens = jnp.full((batch,), length, jnp.int32)
    return kc, vc, kc.transpose(0, 2, 1, 3), vc.transpose(0, 2, 1, 3), tables, lens


def check_interpret() -> None:
    kc, vc, kh, vh, tables, lens = make_caches(3, 64, 2, 16)
    for head_major, (k, v) in ((False, (kc, vc)), (True, (kh, vh))):
        got = stream_pages(k, v, tables, lens, head_major=head_major, pages_per_block=2,
                           interpret=True)
        want = stream_pages_reference(k, v, tables, lens, head_major=head_major)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-3)
    print("interpret mode: both layouts equal the reference")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--len", type=int, default=2048)
    ap.add_argument("--heads", default="qwen2.5-7b", choices=sorted(HEADS))
    ap.add_argument("--interpret", action="store_true")
    args = ap.parse_args()
    if args.interpret:
        check_interpret()
        return
    import os
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                    "scripts"))
    from bench_attention import read_ceiling, timeit, timeit_chained

    from pallas_kernels.paged_decode import bytes_read, paged_decode_attention
    from pallas_kernels.tuning import decode_params

    n, k_heads, h = HEADS[args.heads]
    ceiling, _ = read_ceiling()
    kc, vc, kh, vh, tables, lens = make_caches(args.batch, args.len, k_heads, h)
    nbytes = bytes_read([args.len] * args.batch, k_heads, h, 2)
    print(f"{jax.devices()[0].device_kind}: read ceiling {ceiling:.2f} TB/s; {args.heads} heads, "
          f"B={args.batch}, L={args.len}, page 16: {nbytes / 1e6:.0f} MB of K/V", flush=True)
    for head_major, (k, v) in ((False, (kc, vc)), (True, (kh, vh))):
        rows = []
        for ppb, warps, stages in itertools.product((4, 8, 16), (4, 8), (2, 3, 4)):
            f = functools.partial(stream_pages, head_major=head_major, pages_per_block=ppb,
                                  num_warps=warps, num_stages=stages)
            t = timeit(f, k, v, tables, lens)
            rows.append((t, ppb, warps, stages))
        rows.sort()
        label = "head-major  [P, K, B, H]" if head_major else "token-major [P, B, K, H]"
        for t, ppb, warps, stages in rows[:3]:
            tbs = nbytes / t / 1e12
            print(f"{label}: {t * 1e6:7.1f} µs {tbs:5.2f} TB/s ({100 * tbs / ceiling:4.1f}%)  "
                  f"pages/tile {ppb}, warps {warps}, stages {stages}", flush=True)
    q = jax.random.normal(jax.random.key(9), (args.batch, n, h), jnp.bfloat16)
    splits, ppb, warps, stages = decode_params(jax.devices()[0].device_kind, args.batch, n,
                                               k_heads, h, 16, tables.shape[1])
    t = timeit_chained(lambda q, kc, vc, tb, ln: paged_decode_attention(
        q, kc, vc, tb, ln, scale=h ** -0.5, splits=splits, pages_per_block=ppb, num_warps=warps,
        num_stages=stages), q, kc, vc, tables, lens)
    tbs = nbytes / t / 1e12
    print(f"decode kernel (token-major, tuning table: splits {splits}, pages/tile {ppb}, warps "
          f"{warps}, stages {stages}): {t * 1e6:7.1f} µs {tbs:5.2f} TB/s ({100 * tbs / ceiling:4.1f}%)",
          flush=True)


if __name__ == "__main__":
    main()
