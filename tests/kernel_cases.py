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
