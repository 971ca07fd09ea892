"""A step's small inputs travel as one int32 array per executable.

Every numpy argument of a jitted call is its own host-to-device transfer (and, over a mesh, one per
device); a step has ~20 small ones. Packing them on the host and slicing them apart inside the
jitted function (static offsets: T tokens, S sequences, M pages per sequence) makes it one
transfer for the forward and one for the sampler. Floats and uint32 travel bit-cast as int32.
The sampler's results come back the same way: one int32 array, one device-to-host transfer.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.attention.metadata import AttentionMetadata
from jaxserve.sampling.sampler import SamplingTensors


def pack_forward(ids: np.ndarray, positions: np.ndarray, meta: AttentionMetadata,
                 logits_indices: np.ndarray, src_slot: np.ndarray) -> np.ndarray:
    return np.concatenate([ids, positions, meta.slot_mapping, meta.seq_ids, src_slot,
                           logits_indices, meta.seq_lens, meta.query_start_loc,
                           meta.block_tables.reshape(-1)]).astype(np.int32, copy=False)


def forward_size(t: int, s: int, m: int) -> int:
    return 5 * t + 2 * s + (s + 1) + s * m


def unpack_forward(buf: jax.Array, t: int, s: int, m: int):
    """-> ids [T], positions [T], AttentionMetadata, logits_indices [S], src_slot [T]."""
    if buf.shape[0] != forward_size(t, s, m):
        raise ValueError(f"packed forward inputs have {buf.shape[0]} entries, expected "
                         f"{forward_size(t, s, m)} for T={t} S={s} M={m}")
    ids, positions, slots, seq_ids, src = (buf[i * t:(i + 1) * t] for i in range(5))
    o = 5 * t
    logits_indices, seq_lens = buf[o:o + s], buf[o + s:o + 2 * s]
    o += 2 * s
    qsl = buf[o:o + s + 1]
    tables = buf[o + s + 1:].reshape(s, m)
    return ids, positions, AttentionMetadata(slots, seq_ids, tables, seq_lens, qsl), logits_indices, src


_FIELDS = [f.name for f in dataclasses.fields(SamplingTensors)]


def pack_sampling(rows: dict[str, np.ndarray]) -> np.ndarray:
    """SamplingTensors.host()-style rows -> [len(fields) * S] int32."""
    cols = []
    for name in _FIELDS:
        a = np.asarray(rows[name])
        if a.dtype == np.float32 or a.dtype == np.uint32:
            a = a.view(np.int32)
        cols.append(a.astype(np.int32, copy=False))
    return np.concatenate(cols)


def unpack_sampling(buf: jax.Array, s: int) -> SamplingTensors:
    kinds = SamplingTensors.host(1)
    out = {}
    for i, name in enumerate(_FIELDS):
        col = buf[i * s:(i + 1) * s]
        dtype = kinds[name].dtype
        if dtype == np.float32:
            col = jax.lax.bitcast_convert_type(col, jnp.float32)
        elif dtype == np.uint32:
            col = jax.lax.bitcast_convert_type(col, jnp.uint32)
        elif dtype == np.bool_:
            col = col != 0
        out[name] = col
    return SamplingTensors(**out)


def pack_result(tokens: jax.Array, logprobs: jax.Array, top_ids: jax.Array,
                top_logprobs: jax.Array) -> jax.Array:
    """A step's sampled values -> int32 [S, 2 + 2K]: token, logprob, K top ids, K top logprobs."""
    def bits(x):
        return jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
    return jnp.concatenate([tokens[:, None].astype(jnp.int32), bits(logprobs)[:, None],
                            top_ids.astype(jnp.int32), bits(top_logprobs)], axis=1)


def unpack_result(a: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """pack_result's array on the host -> tokens [S], logprobs [S], top ids [S, K], top logprobs [S, K]."""
    k = (a.shape[1] - 2) // 2
    return a[:, 0], a[:, 1].view(np.float32), a[:, 2:2 + k], a[:, 2 + k:].view(np.float32)
