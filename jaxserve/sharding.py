"""Device meshes and the one table of sharding rules every model uses.

Mesh axes: `dp` (data parallel replicas) and `tp` (tensor parallel). `--mesh tp=2`, `dp=2,tp=4`.

Parameters carry logical axes by name (below); `RULES` maps logical axes to mesh axes. Column-
parallel q/k/v/gate/up (output features over tp), row-parallel o/down (input features over tp),
vocab-parallel embedding and LM head. A dimension that tp does not divide is replicated instead
(NOTE: this is the rule for tp > num_kv_heads: the fused q/k/v projection and the KV cache are then
replicated on every tp shard, while the o projection stays split over q heads). The KV cache is
split over kv heads like k/v. Everything else (activations, attention inside the jitted step) is left to XLA's sharding
propagation from these placements.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("dp", "tp")

# logical axis -> mesh axis (None: replicated)
RULES: dict[str, str | None] = {
    "vocab": "tp", "embed": None, "heads": "tp", "kv_heads": "tp", "head_dim": None, "mlp": "tp",
    "norm": None,
}

# parameter leaf name -> logical axes of its dimensions
PARAM_AXES: dict[str, tuple[str, ...]] = {
    "embed": ("vocab", "embed"), "lm_head": ("vocab", "embed"),
    # fused q/k/v [D, K, G+2, H]: split over kv heads, each shard keeps its kv heads' q heads
    "wqkv": ("embed", "kv_heads", None, "head_dim"), "bqkv": ("kv_heads", None, "head_dim"),
    "wo": ("heads", "head_dim", "embed"),
    "w_gate_up": ("embed", None, "mlp"), "w_down": ("mlp", "embed"),
    "scale": ("norm",),
}


class MeshError(ValueError):
    """A --mesh specification that cannot be built on the available devices."""


def parse_mesh(spec: str | dict | None) -> dict[str, int]:
    if spec is None or spec == "":
        return {"dp": 1, "tp": 1}
    if isinstance(spec, dict):
        items = spec.items()
    else:
        items = []
        for part in str(spec).split(","):
            if "=" not in part:
                raise MeshError(f"mesh {spec!r}: expected entries like tp=2 or dp=2,tp=4")
            k, v = part.split("=", 1)
            items.append((k.strip(), v.strip()))
    out = {"dp": 1, "tp": 1}
    for k, v in items:
        if k not in AXES:
            raise MeshError(f"mesh {spec!r}: unknown axis {k!r} (axes: {', '.join(AXES)})")
        try:
            n = int(v)
        except (TypeError, ValueError):
            raise MeshError(f"mesh {spec!r}: {k} must be a positive integer") from None
        if n < 1:
            raise MeshError(f"mesh {spec!r}: {k} must be >= 1")
        out[k] = n
    return out


def make_mesh(spec: str | dict | None, devices: list | None = None) -> Mesh:
    sizes = parse_mesh(spec)
    devices = list(devices if devices is not None else jax.devices())
    need = math.prod(sizes.values())
    if need != len(devices):
        raise MeshError(f"mesh {spec!r} needs {need} devices (dp={sizes['dp']} x tp={sizes['tp']}) "
                        f"but {len(devices)} are available")
    return Mesh(np.array(devices).reshape(sizes["dp"], sizes["tp"]), AXES)


def spec_for(logical: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh) -> P:
    parts = []
    for axis, dim in zip(logical, shape):
        mesh_axis = RULES.get(axis) if axis else None
        if mesh_axis is not None and dim % mesh.shape[mesh_axis] != 0:
            mesh_axis = None  # not divisible: replicate this dimension
        parts.append(mesh_axis)
    return P(*parts)


def param_sharding(mesh: Mesh):
    """A `shardings(path, shape)` function for the loaders: each parameter is placed (and only
    its shard sent to each device) as it loads."""

    def shardings(path: tuple, shape: tuple[int, ...]) -> NamedSharding:
        name = path[-1]
        logical = PARAM_AXES.get(name, (None,) * len(shape))
        return NamedSharding(mesh, spec_for(logical, shape, mesh))

    return shardings


def splits_heads(cfg, tp: int) -> bool:
    """Whether tp splits both the q and the kv heads: then each shard runs the whole forward on
    its own heads (explicit SPMD under shard_map, collectives written in the model); otherwise
    the KV cache is replicated and XLA partitions the step."""
    return cfg.num_heads % tp == 0 and cfg.num_kv_heads % tp == 0


def kv_cache_sharding(mesh: Mesh, num_kv_heads: int) -> NamedSharding:
    """[P, B, K, H] split over kv heads when tp divides them, else replicated."""
    return NamedSharding(mesh, spec_for((None, None, "kv_heads", None), (1, 1, num_kv_heads, 1), mesh))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def shard_model(model, mesh: Mesh):
    """Re-place an already built NNX model's parameters with the mesh's rules (for models that
    were created in user code rather than loaded with `shardings=`)."""
    from flax import nnx

    fn = param_sharding(mesh)
    graphdef, state = nnx.split(model)
    pure = nnx.to_pure_dict(state)

    def place(path, x):
        keys = tuple(getattr(k, "key", getattr(k, "idx", None)) for k in path)
        if jax.process_count() > 1:
            x = np.asarray(x)   # every process holds the whole value and keeps its own shards
        return jax.device_put(x, fn(keys, x.shape))

    nnx.replace_by_pure_dict(state, jax.tree_util.tree_map_with_path(place, pure))
    return nnx.merge(graphdef, state)
