"""Random paged KV caches for the kernel tests: shuffled page tables, NaN in every unused slot."""

import numpy as np


def paged_cache(rng, lens, k: int, h: int, b: int, spare_pages: int = 2):
    """K/V caches [P, B, K, H] float32 holding `lens[i]` random tokens for sequence i, its pages
    drawn at random (page 0 is the zero null page), and the page tables [S, M] int32."""
    m = max(1, -(-max(lens) // b))
    pages = len(lens) * m + spare_pages
    kc = np.full((pages, b, k, h), np.nan, np.float32)
    vc = np.full((pages, b, k, h), np.nan, np.float32)
    kc[0] = 0.0
    vc[0] = 0.0
    perm = rng.permutation(np.arange(1, pages))
    tables = np.zeros((len(lens), m), np.int32)
    used = 0
    for i, length in enumerate(lens):
        need = -(-length // b)
        tables[i, :need] = perm[used : used + need]
        used += need
        for t in range(length):
            kc[tables[i, t // b], t % b] = rng.normal(size=(k, h))
            vc[tables[i, t // b], t % b] = rng.normal(size=(k, h))
    return kc, vc, tables


def decode_step_cache(rng, lens, k: int, h: int, b: int, spare_pages: int = 3):
    """A decode step's cache: sequence i holds lens[i] - 1 tokens and its page table already
    covers slot lens[i] - 1, where the step's new token goes (a fresh page when it starts one).
    Returns (k_cache, v_cache, tables) like `paged_cache`."""
    kc, vc, tables = paged_cache(rng, [max(n - 1, 0) for n in lens], k, h, b,
                                 spare_pages=spare_pages + len(lens))
    m = max(1, -(-max(lens) // b))
    out = np.zeros((len(lens), m), np.int32)
    out[:, :tables.shape[1]] = tables[:, :m]
    free = sorted(set(range(1, kc.shape[0])) - set(tables.ravel().tolist()))
    rng.shuffle(free)
    for i, n in enumerate(lens):
        for j in range(-(-max(n - 1, 0) // b), -(-n // b)):
            out[i, j] = free.pop()
    return kc, vc, out
