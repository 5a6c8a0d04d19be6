"""Device mesh and the one table that maps logical axis names to mesh axes.

Every param is declared with logical names (model/layers.py) and key activations are constrained with
`nn.with_logical_constraint`; this table decides where each name lands on the mesh
`("data", "fsdp", "sequence", "tensor")`. All four axes always exist (size 1 when unused).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

MESH_AXES = ("data", "fsdp", "sequence", "tensor")

# logical name -> mesh axis (or tuple of axes, or None for replicated). Params first, then activations.
LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # LLM params
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
    # vision + connector params
    ("vit_embed", "fsdp"),
    ("vit_mlp", "tensor"),
    ("vit_heads", "tensor"),
    ("vit_in", None),  # 588 patch values / 2304 concatenated features / 729 positions
    # activations
    ("act_batch", ("data", "fsdp")),
    ("act_length", "sequence"),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("act_crops", ("data", "fsdp")),
    ("act_patches", None),
    ("act_tokens", ("data", "fsdp")),
    ("cache_batch", ("data", "fsdp")),
    ("cache_length", "sequence"),
)


class MeshError(ValueError):
    """A mesh specification does not fit the available devices."""


def mesh_shape(spec: dict[str, int], num_devices: int) -> tuple[int, ...]:
    """Resolve a `{axis: size}` spec (one size may be -1) against a device count."""
    unknown = sorted(set(spec) - set(MESH_AXES))
    if unknown:
        raise MeshError(f"unknown mesh axes {unknown}; valid axes: {list(MESH_AXES)}")
    sizes = [int(spec.get(axis, 1)) for axis in MESH_AXES]
    fills = [i for i, size in enumerate(sizes) if size == -1]
    if len(fills) > 1:
        raise MeshError(f"mesh {spec}: at most one axis may be -1")
    known = math.prod(size for size in sizes if size != -1)
    if fills:
        if num_devices % known:
            raise MeshError(f"mesh {spec}: {num_devices} devices are not divisible by {known}")
        sizes[fills[0]] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise MeshError(f"mesh {spec} has {math.prod(sizes)} devices but {num_devices} are available")
    return tuple(sizes)


def make_mesh(spec: dict[str, int] | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with all four axes (Auto axis types, which the linen logical-partitioning style needs)."""
    devices = list(devices if devices is not None else jax.devices())
    shape = mesh_shape(spec or {"fsdp": -1}, len(devices))
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
