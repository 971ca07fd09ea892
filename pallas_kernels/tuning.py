"""Tuned launch parameters for the Pallas kernels, keyed by card, head config and page size.

`decode_params` returns (splits, pages_per_block, num_warps, num_stages). Entries measured with
scripts/bench_attention.py go in TABLE; anything else falls back to a heuristic that gives the GPU
enough programs (S x K x splits) to give every SM about two (one split once S x K reaches the SM
count).
"""

from __future__ import annotations

# (device_kind substring, q_heads, kv_heads, head_dim, page_size) -> (pages_per_block, num_warps, num_stages)
TABLE: dict[tuple[str, int, int, int, int], tuple[int, int, int]] = {
    # NVIDIA H200, 2026-11-27, scripts/bench_attention.py --quick --sweep (B=64, L=2048, bf16,
    # chained calls) after the token-row gathers, base-2 softmax and unmasked full tiles: best of
    # splits {1,2} x pages_per_block {4,8,16} x warps {2,4} x stages {2,3,4}: Qwen heads 76.5 µs
    # with 1 split, 8 pages, 4 warps, 4 stages; Llama heads (an unchained sweep of the same code)
    # 139.9 µs with 1 split, 4 pages, 4 warps, 3 stages. Before the row gathers the best had 1
    # stage; now several stages pipeline the gathers.
    ("H200", 28, 4, 128, 16): (8, 4, 4),
    ("H200", 32, 8, 128, 16): (4, 4, 3),
    # NVIDIA H100 80GB HBM3, 2026-11-27, the same sweep's grid (splits 1/2, 4/8 pages, 2-4 stages):
    # the H200's entries came first for both head shapes (Qwen 103.0 µs, Llama 190.8 µs)
    ("H100", 28, 4, 128, 16): (8, 4, 4),
    ("H100", 32, 8, 128, 16): (4, 4, 3),
}

_SMS = {"H100": 132, "H200": 132}


def _lookup(table: dict, device_kind: str, key: tuple, default):
    """The entry of `table` (keyed by (card substring, *key)) whose card `device_kind` names and
    whose other fields equal `key`; `default` where none does."""
    for (card, *rest), val in table.items():
        if card in device_kind and tuple(rest) == key:
            return val
    return default


def decode_params(device_kind: str, num_seqs: int, q_heads: int, kv_heads: int, head_dim: int,
                  page_size: int, max_pages: int) -> tuple[int, int, int, int]:
    ppb, warps, stages = _lookup(TABLE, device_kind, (q_heads, kv_heads, head_dim, page_size),
                                 (8, 4, 2))
    ppb = max(1, min(ppb, max_pages))
    sms = next((v for c, v in _SMS.items() if c in device_kind), 108)
    programs = max(1, num_seqs * kv_heads)
    if programs >= sms:
        # one split once every SM has a program: the sweeps' best at B=64 (256 and 512 programs);
        # a split costs a log-sum-exp merge after the kernel
        return 1, ppb, warps, stages
    # few sequences (e.g. batch 1): ~2 programs per SM over the splits, and the earlier kernel
    # parameters, since each split walks a few tiles and a deep pipeline's prologue costs more
    # than it hides (engine-shaped H200 A/B at batch 1, 200 tokens, the kernel of 7bd62d0: 4 pages
    # and 1 stage 7.8 µs per layer, 2 or 3 stages 8.4, 8 pages 9.2)
    splits = max(1, min(-(-2 * sms // programs), max(1, max_pages // 4)))
    return splits, 4, warps, 1


# (device_kind substring, q_heads per kv head, head_dim, page_size)
#     -> (block_q, pages_per_block, num_warps, num_stages)
PREFILL_TABLE: dict[tuple[str, int, int, int], tuple[int, int, int, int]] = {
    # NVIDIA H200, 2026-11-27, bench_attention.py --prefill --sweep's grid on one 2048-token
    # chunk, bf16, heavy-first work order: Qwen2.5-7B heads
    # (group 7): best of block_q {8,16,32} x pages {4,8} x warps {4,8} x stages {1,2,3}, 181.2 µs
    # (3 stages; 2 stages 183.4 µs); Llama-3-8B heads (group 4): block_q 16 x pages {4,8} x warps
    # {4,8} at 2 stages, 192.4 µs. 4 warps beat 8 everywhere. Measured before the query rows
    # were packed without padding the group (same rows per program; not re-swept since).
    ("H200", 7, 128, 16): (8, 4, 4, 3),
    ("H200", 4, 128, 16): (16, 4, 4, 2),
    # H100: taken from the H200 sweep until measured on an H100
    ("H100", 7, 128, 16): (8, 4, 4, 3),
    ("H100", 4, 128, 16): (16, 4, 4, 2),
}


def prefill_params(device_kind: str, group: int, head_dim: int,
                   page_size: int) -> tuple[int, int, int, int]:
    """Launch parameters of the ragged prefill kernel. Untuned default: 128 query rows per
    program (block_q x the group size rounded up to a power of two; the rows themselves are
    packed without padding) against 64 keys, 4 warps."""
    gp = 1 << (group - 1).bit_length()
    return _lookup(PREFILL_TABLE, device_kind, (group, head_dim, page_size),
                   (max(1, 128 // gp), max(1, 64 // page_size), 4, 2))


# (device_kind substring, q_heads per kv head, head_dim, page_size)
#     -> (block_kv, stages, pingpong) of the Mosaic GPU prefill kernel (paged_prefill_mgpu)
MGPU_PREFILL_TABLE: dict[tuple[str, int, int, int], tuple[int, int, bool]] = {
    # NVIDIA H200, 2026-11-27, one 2048-token chunk, bf16 (docs/benchmarks/2026-11-to-12.md, "Ragged paged
    # prefill in Mosaic GPU"): ping-pong with 2 stages of 128 keys beat 4 x 64 (Qwen heads) and
    # 3 x 64 (Llama heads), and ping-pong off, by device time and per call; 3 x 128 does not fit
    # in shared memory at head_dim 128
    ("H200", 7, 128, 16): (128, 2, True),
    ("H200", 4, 128, 16): (128, 2, True),
    # NVIDIA H100 80GB HBM3, 2026-11-27: ping-pong on vs off alternated three times (Qwen heads,
    # 1 x 2048): 85.6-86.6 vs 87.0-87.1 µs device time; 2 x 128 keys led the sweep either way
    ("H100", 7, 128, 16): (128, 2, True),
    ("H100", 4, 128, 16): (128, 2, True),
}


def mgpu_prefill_params(device_kind: str, group: int, head_dim: int,
                        page_size: int) -> tuple[int, int, bool]:
    """Launch parameters of the Mosaic GPU prefill kernel. Untuned default: the measured best
    shape (2 stages of 128 keys, ping-pong); page sizes above 128 take tiles of one page."""
    return _lookup(MGPU_PREFILL_TABLE, device_kind, (group, head_dim, page_size),
                   (max(128, page_size), 2, True))


def mgpu_prefill_choice(device_kind: str, dtype, q_heads: int, kv_heads: int, head_dim: int,
                        page_size: int, sliding_window=None, soft_cap=None,
                        kv_dtype=None) -> tuple[int, int, bool] | None:
    """Launch parameters of the Mosaic GPU prefill kernel when it runs here (a compute capability
    9.x GPU) and covers the configuration at its tuned parameters; None: use the Triton-lowered
    kernel. The one decision the engine and the benchmark share."""
    from pallas_kernels.paged_prefill_mgpu import available, supported

    if not available() or kv_heads <= 0:
        return None
    block_kv, stages, pingpong = mgpu_prefill_params(device_kind, q_heads // kv_heads, head_dim,
                                                     page_size)
    if not supported(dtype, q_heads, kv_heads, head_dim, page_size, block_kv=block_kv,
                     stages=stages, sliding_window=sliding_window, soft_cap=soft_cap,
                     kv_dtype=kv_dtype):
        return None
    return block_kv, stages, pingpong


# (device_kind substring, rows tile, K, N) -> (block_n, block_k, splits, num_warps, num_stages) of
# the skinny matmul (rows tile: the activation's rows rounded up to a power of two >= 16)
MATMUL_TABLE: dict[tuple[str, int, int, int], tuple[int, int, int, int, int]] = {
    # NVIDIA H100 80GB HBM3, 2026-11-28, scripts/bench_matmul.py --quick (device time, each call
    # over >= 256 MB of weight copies so that none comes from L2): Qwen2.5-7B's projections whole
    # and as tp=2 shards, the shapes where the kernel beat XLA's GEMM by >= 3% (µs: XLA -> kernel).
    # Whole gate/up (3584 x 37888) is not listed: XLA's GEMM reads it at 88-93% and the kernel
    # was no faster at any rows tile.
    ("H100 80GB HBM3", 64, 3584, 4608): (64, 128, 1, 4, 4),     # qkv        18.5 -> 15.4
    ("H100 80GB HBM3", 64, 3584, 3584): (32, 128, 1, 4, 4),     # o          17.1 -> 13.4
    ("H100 80GB HBM3", 64, 18944, 3584): (64, 128, 2, 4, 4),    # down       55.8 -> 49.3
    ("H100 80GB HBM3", 64, 3584, 2304): (128, 128, 4, 4, 3),    # qkv/2      11.5 -> 10.6
    ("H100 80GB HBM3", 64, 1792, 3584): (32, 128, 1, 4, 4),     # o/2         9.9 -> 8.0
    ("H100 80GB HBM3", 64, 3584, 18944): (256, 64, 1, 4, 4),    # gate_up/2  57.0 -> 47.6
    ("H100 80GB HBM3", 64, 9472, 3584): (64, 128, 2, 4, 4),     # down/2     32.1 -> 28.0
    ("H100 80GB HBM3", 32, 3584, 4608): (128, 128, 2, 4, 4),    # qkv        16.3 -> 15.7
    ("H100 80GB HBM3", 32, 3584, 3584): (128, 64, 4, 4, 4),     # o          13.6 -> 12.7
    ("H100 80GB HBM3", 32, 18944, 3584): (128, 128, 4, 4, 3),   # down       53.2 -> 48.4
    ("H100 80GB HBM3", 32, 3584, 2304): (128, 128, 4, 4, 4),    # qkv/2      10.8 -> 9.9
    ("H100 80GB HBM3", 32, 1792, 3584): (32, 128, 1, 4, 4),     # o/2         8.9 -> 8.0
    ("H100 80GB HBM3", 32, 3584, 18944): (256, 64, 1, 4, 4),    # gate_up/2  52.7 -> 47.2
    ("H100 80GB HBM3", 32, 9472, 3584): (128, 64, 4, 4, 4),     # down/2     29.1 -> 26.8
    ("H100 80GB HBM3", 16, 3584, 4608): (64, 128, 1, 4, 4),     # qkv        15.2 -> 14.6
    ("H100 80GB HBM3", 16, 18944, 3584): (128, 128, 4, 4, 3),   # down       49.8 -> 47.2
    ("H100 80GB HBM3", 16, 3584, 2304): (64, 64, 8, 4, 3),      # qkv/2       9.7 -> 9.4
    ("H100 80GB HBM3", 16, 1792, 3584): (32, 128, 1, 4, 4),     # o/2         8.2 -> 7.6
    ("H100 80GB HBM3", 16, 3584, 18944): (256, 64, 1, 4, 4),    # gate_up/2  50.0 -> 46.4
    ("H100 80GB HBM3", 16, 9472, 3584): (128, 64, 4, 4, 4),     # down/2     27.2 -> 26.1
}
MATMUL_TABLE.update({
    # NVIDIA H200, 2026-11-28, the same sweep at 64 rows (µs: XLA -> kernel); whole gate/up again
    # not listed (XLA 67.9, kernel 68.9)
    ("H200", 64, 3584, 4608): (128, 128, 2, 4, 4),    # qkv        15.2 -> 13.1
    ("H200", 64, 3584, 3584): (64, 128, 2, 4, 4),     # o          14.4 -> 10.9
    ("H200", 64, 18944, 3584): (128, 128, 4, 4, 3),   # down       41.1 -> 36.8
    ("H200", 64, 3584, 2304): (128, 128, 4, 4, 4),    # qkv/2      10.2 -> 9.0
    ("H200", 64, 1792, 3584): (32, 128, 1, 4, 4),     # o/2        10.4 -> 7.3
    ("H200", 64, 3584, 18944): (256, 64, 1, 4, 4),    # gate_up/2  41.2 -> 34.9
    ("H200", 64, 9472, 3584): (64, 128, 2, 4, 4),     # down/2     24.8 -> 22.1
})
MATMUL_TABLE.update({
    # NVIDIA H200, 2026-12-02, the same sweep (bench_matmul.py --quick, now with 1-16 splits) at
    # 64 rows for the other presets (µs: XLA -> kernel). Llama-3-8B's shapes serve Llama-3/3.1-8B
    # and Mistral-7B, and Qwen3-8B's attention (same q/k/v and o). Whole gate/up's plain
    # products were within 1% of XLA's: see below for it with its SwiGLU
    ("H200", 64, 4096, 6144): (64, 128, 1, 4, 4),     # qkv        21.0 -> 16.6  (Llama-3-8B)
    ("H200", 64, 4096, 4096): (64, 128, 2, 4, 4),     # o          16.5 -> 12.4
    ("H200", 64, 14336, 4096): (64, 128, 2, 4, 4),    # down       36.4 -> 32.1
    ("H200", 64, 4096, 3072): (128, 128, 4, 4, 4),    # qkv/2      13.8 -> 11.1
    ("H200", 64, 2048, 4096): (32, 128, 1, 4, 4),     # o/2         9.8 -> 8.4
    ("H200", 64, 4096, 14336): (128, 128, 1, 4, 3),   # gate_up/2  37.0 -> 29.6
    ("H200", 64, 7168, 4096): (64, 128, 2, 4, 4),     # down/2     23.8 -> 19.0
    ("H200", 64, 12288, 4096): (64, 128, 2, 4, 4),    # down       33.4 -> 28.3  (Qwen3-8B)
    ("H200", 64, 4096, 12288): (128, 128, 1, 4, 4),   # gate_up/2  33.7 -> 26.5
    ("H200", 64, 6144, 4096): (64, 128, 2, 4, 4),     # down/2     21.7 -> 17.1
    ("H200", 64, 5120, 7168): (64, 128, 1, 4, 4),     # qkv        26.2 -> 20.9  (Qwen2.5-14B)
    ("H200", 64, 5120, 5120): (64, 128, 1, 4, 4),     # o          20.2 -> 18.2
    ("H200", 64, 13824, 5120): (128, 64, 3, 4, 4),    # down       41.9 -> 38.2
    ("H200", 64, 5120, 3584): (64, 128, 2, 4, 4),     # qkv/2      17.8 -> 13.8
    ("H200", 64, 2560, 5120): (64, 128, 1, 4, 4),     # o/2        12.6 -> 11.0
    ("H200", 64, 5120, 13824): (128, 128, 1, 4, 3),   # gate_up/2  41.8 -> 35.3
    ("H200", 64, 6912, 5120): (64, 64, 3, 4, 4),      # down/2     27.6 -> 22.6
    # whole gate/up, judged as the MLP runs it: XLA's product + its SwiGLU fusion against the
    # kernel's SwiGLU epilogue (the plain products were within 1%; Qwen2.5-14B 70.0 vs 68.7 and
    # Qwen3-8B 52.8 vs 54.9 are not listed)
    ("H200", 64, 3584, 37888): (128, 64, 1, 4, 3),    # gate_up+act 72.0 -> 68.3  (Qwen2.5-7B)
    ("H200", 64, 4096, 28672): (256, 64, 1, 4, 4),    # gate_up+act 59.5 -> 57.5  (Llama-3-8B)
    ("H200", 16, 4096, 28672): (256, 64, 1, 4, 4),    # gate_up+act 56.7 -> 54.1
    # 16 rows (batch 1-16), Llama-3-8B: whole o and down, and down/2, within 3% of XLA
    ("H200", 16, 4096, 6144): (64, 64, 4, 4, 4),      # qkv        16.3 -> 15.7
    ("H200", 16, 4096, 3072): (128, 64, 5, 4, 4),     # qkv/2      10.5 -> 9.5 (64 pieces, 5 splits)
    ("H200", 16, 2048, 4096): (64, 64, 4, 4, 4),      # o/2         8.2 -> 7.6
    ("H200", 16, 4096, 14336): (128, 128, 1, 4, 4),   # gate_up/2  31.5 -> 28.7
})
MATMUL_TABLE.update({
    # NVIDIA H200, 2026-12-02, Qwen2.5-7B at 32 and 16 rows (the same sweep; until then these were
    # the H100's entries, which the H200 times within 0-5% of its best); whole gate/up with its
    # SwiGLU was within 3% of XLA's product + activation at both (67.2 vs 66.0, 65.9 vs 64.0 µs)
    ("H200", 32, 3584, 4608): (128, 64, 3, 4, 4),     # qkv        14.4 -> 12.7
    ("H200", 32, 3584, 3584): (128, 128, 4, 4, 4),    # o          11.0 -> 10.6
    ("H200", 32, 18944, 3584): (128, 128, 4, 4, 4),   # down       39.2 -> 35.2
    ("H200", 32, 3584, 2304): (128, 128, 6, 4, 3),    # qkv/2       9.3 -> 8.6
    ("H200", 32, 1792, 3584): (32, 128, 1, 4, 4),     # o/2         7.9 -> 7.4
    ("H200", 32, 3584, 18944): (256, 64, 1, 4, 4),    # gate_up/2+act 37.7 -> 35.3
    ("H200", 32, 9472, 3584): (128, 128, 4, 4, 4),    # down/2     22.9 -> 20.8
    ("H200", 16, 3584, 4608): (128, 128, 2, 4, 4),    # qkv        12.7 -> 11.9
    ("H200", 16, 18944, 3584): (128, 128, 4, 4, 3),   # down       35.7 -> 34.5
    ("H200", 16, 3584, 2304): (64, 128, 6, 4, 3),     # qkv/2       8.4 -> 7.9
    ("H200", 16, 1792, 3584): (128, 64, 4, 4, 4),     # o/2         7.4 -> 6.9
    ("H200", 16, 3584, 18944): (256, 64, 1, 4, 4),    # gate_up/2+act 36.9 -> 33.2
    ("H200", 16, 9472, 3584): (64, 64, 6, 4, 4),      # down/2     21.0 -> 20.0
})


def matmul_params(device_kind: str, m: int, k: int, n: int, *, tuned_only: bool = False,
                  dtype="bfloat16") -> tuple[int, int, int, int, int] | None:
    """Launch parameters of the skinny matmul for x [m, k] @ w [k, n], or None where it does not
    take the shape (or, `tuned_only`, where the table has no entry for it: the shapes where it
    measured faster than XLA's GEMM). Untuned default: 64-column tiles of 128-row pieces over 4
    stages, split over K until every SM has about two programs."""
    from pallas_kernels.skinny_matmul import supports

    rows = max(16, 1 << (max(m, 1) - 1).bit_length())
    params = _lookup(MATMUL_TABLE, device_kind, (rows, k, n), None)
    if params is not None:
        bn, bk, splits, _, _ = params
        ok = supports(m, k, n, block_n=bn, block_k=bk, splits=splits, dtype=dtype)
        return params if ok else None
    if tuned_only:
        return None
    sms = next((v for c, v in _SMS.items() if c in device_kind), 108)
    for bn, bk in ((64, 128), (64, 64), (32, 64)):
        if not supports(m, k, n, block_n=bn, block_k=bk, splits=1, dtype=dtype):
            continue
        splits = 1
        while (n // bn) * splits < 2 * sms and k % (2 * splits * bk) == 0 and splits < 8:
            splits *= 2
        return bn, bk, splits, 4, 4
    return None
