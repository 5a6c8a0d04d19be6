"""Device mesh and the one table that maps logical axis names to mesh axes.

Every param is declared with logical names (model/layers.py) and key activations are constrained with
`nn.with_logical_constraint`; this table decides where each name lands on the mesh
`("data", "fsdp", "sequence", "tensor")`. All four axes always exist (size 1 when unused).

Flax resolves the table by priority and silently skips a rule whose mesh axis is already taken by another
dim of the same array; `logical_to_spec` instead refuses such a collision, and `params.check_config` runs it over
every param together with the divisibility checks, so a bad mesh fails in one line before any compilation.
This module knows nothing of the model: the params' shapes and names come from `molmo2_jax.params`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from molmo2_jax.errors import Molmo2Error

MESH_AXES = ("data", "fsdp", "sequence", "tensor")
BATCH_AXES = ("data", "fsdp")  # the batch is split over both; fsdp also splits the params
# Params are split over fsdp and sequence (FSDP over both: a sequence shard holds no weights of its own to
# keep whole), and the ViT's crops over the batch axes and sequence, so each sequence shard runs the ViT on its
# own part of the crops instead of all of them. The pooled tokens are per row (batch axes only): every sequence
# shard of a row still runs the connector on all of the row's tokens.
PARAM_AXES = ("fsdp", "sequence")
CROP_AXES = (*BATCH_AXES, "sequence")

# logical name -> mesh axis (or tuple of axes, or None for replicated). Params first, then activations.
LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # LLM params
    ("vocab", "tensor"),
    ("embed", PARAM_AXES),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
    # vision + connector params
    ("vit_embed", PARAM_AXES),
    ("vit_mlp", "tensor"),
    ("vit_heads", "tensor"),
    ("vit_features", PARAM_AXES),  # 2304 concatenated ViT features entering the connector's q/k/v
    ("vit_in", None),  # 588 patch values / 729 positions (not divisible by typical mesh sizes)
    ("lora_rank", None),  # LoRA adapters: their other dims are their base kernel's
    # activations
    ("act_batch", BATCH_AXES),
    ("act_length", "sequence"),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("act_crops", CROP_AXES),  # the ViT has no sequence axis to split: its crops take it
    ("act_patches", None),
    ("act_visual", None),  # a row's pooled visual tokens (the row is on the batch axes)
    # KV cache [layers, batch, length, kv_heads, head_dim]
    ("cache_batch", BATCH_AXES),
    ("cache_length", "sequence"),
    ("cache_heads", "tensor"),
)


class MeshError(Molmo2Error):
    """A mesh specification does not fit the available devices or the model."""


def check_table(rules: Sequence[tuple[str, Any]]) -> dict[str, tuple[str, ...]]:
    """The rules as `{logical: (mesh axes...)}`; each logical name once, only known mesh axes."""
    table: dict[str, tuple[str, ...]] = {}
    for name, target in rules:
        if name in table:
            raise MeshError(f"sharding rules name logical axis {name!r} twice")
        axes = () if target is None else (target,) if isinstance(target, str) else tuple(target)
        unknown = [a for a in axes if a not in MESH_AXES]
        if unknown:
            raise MeshError(f"sharding rule {name!r} -> {target!r} uses unknown mesh axes {unknown}")
        table[name] = axes
    return table


_TABLE = check_table(LOGICAL_RULES)


def logical_to_spec(names: Sequence[str | None]) -> PartitionSpec:
    """PartitionSpec for an array whose dims carry `names`; a mesh axis used by two dims is an error."""
    used: dict[str, str] = {}
    spec = []
    for name in names:
        if name is None:
            spec.append(None)
            continue
        if name not in _TABLE:
            raise MeshError(f"logical axis {name!r} has no sharding rule; known: {sorted(_TABLE)}")
        axes = _TABLE[name]
        for axis in axes:
            if axis in used:
                raise MeshError(f"logical axes {used[axis]!r} and {name!r} of {tuple(names)} both map to "
                                f"mesh axis {axis!r}")
            used[axis] = name
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*spec)


# ----------------------------------------------------------------------------------------------------
# Meshes


def parse_mesh(text: str) -> dict[str, int]:
    """`"fsdp=64,tensor=2"` -> `{"fsdp": 64, "tensor": 2}` (axes not named get size 1; one may be -1)."""
    spec: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        axis, _, size = item.partition("=")
        if axis not in MESH_AXES or not size.strip().lstrip("-").isdigit():
            raise MeshError(f"mesh {text!r}: {item!r} is not AXIS=SIZE with AXIS one of {list(MESH_AXES)}")
        value = int(size)
        if value == 0 or value < -1:
            raise MeshError(f"mesh {text!r}: size of {axis!r} must be positive or -1")
        spec[axis] = value
    return spec


def mesh_shape(spec: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
    """Resolve a `{axis: size}` spec (one size may be -1) against a device count."""
    unknown = sorted(set(spec) - set(MESH_AXES))
    if unknown:
        raise MeshError(f"unknown mesh axes {unknown}; valid axes: {list(MESH_AXES)}")
    sizes = [int(spec.get(axis, 1)) for axis in MESH_AXES]
    fills = [i for i, size in enumerate(sizes) if size == -1]
    if len(fills) > 1:
        raise MeshError(f"mesh {dict(spec)}: at most one axis may be -1")
    known = math.prod(size for size in sizes if size != -1)
    if fills:
        if num_devices % known:
            raise MeshError(f"mesh {dict(spec)}: {num_devices} devices are not divisible by {known}")
        sizes[fills[0]] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise MeshError(f"mesh {dict(spec)} has {math.prod(sizes)} devices but {num_devices} are available")
    return tuple(sizes)


def make_mesh(spec: Mapping[str, int] | str | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with all four axes (Auto axis types, which the linen logical-partitioning style needs).

    Devices are laid out by `jax.make_mesh`'s topology-aware order when all devices are used, and split between
    TPU slices over the data axes when they span several (`multislice_grid`).
    """
    if isinstance(spec, str):
        spec = parse_mesh(spec)
    all_devices = devices is None
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(spec or {"fsdp": -1}, len(devices))
    types = (AxisType.Auto,) * len(MESH_AXES)
    if num_slices(devices) > 1:
        return Mesh(multislice_grid(shape, devices), MESH_AXES, axis_types=types)
    if all_devices:
        return jax.make_mesh(shape, MESH_AXES, axis_types=types)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=types)


# The mesh axes whose collectives may cross between TPU slices, in the order they take them: the network between
# slices is far slower than the chips' own links, so slices split the data-parallel axis first (only gradients
# cross), then fsdp (its gathers of each layer's weights cross too); sequence and tensor stay within a slice.
SLICE_AXES = ("data", "fsdp")


def num_slices(devices: Sequence[Any]) -> int:
    """How many TPU slices `devices` span (their `slice_index`; 1 for devices without one, as CPUs)."""
    return len({getattr(d, "slice_index", 0) for d in devices})


def slices_per_axis(shape: Sequence[int], slices: int) -> list[int]:
    """How many of `slices` TPU slices each mesh axis of `shape` (MESH_AXES order) spans: each `SLICE_AXES` axis in
    turn takes as many as divide it."""
    per_axis, left = [], slices
    for axis, size in zip(MESH_AXES, shape):
        across = math.gcd(size, left) if axis in SLICE_AXES else 1
        per_axis.append(across)
        left //= across
    if left > 1:
        sizes = ",".join(f"{axis}={size}" for axis, size in zip(MESH_AXES, shape))
        raise MeshError(f"mesh {sizes} cannot be split between {slices} TPU slices: data x fsdp must be a multiple "
                        f"of {slices} (slices split data, then fsdp; e.g. data={slices},fsdp=-1)")
    return per_axis


def fsdp_across_slices(grid: np.ndarray) -> str | None:
    """A warning when a mesh's devices (`mesh.devices`) put its fsdp axis across TPU slices, whose per-layer weight
    gathers then cross the slower network between them; None otherwise."""
    slices = num_slices(grid.flat)
    across = slices_per_axis(grid.shape, slices)[MESH_AXES.index("fsdp")]
    if across == 1:
        return None
    return (f"warning: fsdp spans {across} of the {slices} TPU slices, so each layer's weight gathers cross the "
            f"network between slices; data={slices} in the mesh keeps fsdp within a slice")


def multislice_grid(shape: Sequence[int], devices: Sequence[Any]) -> np.ndarray:
    """`devices` of several slices as a `shape` array (MESH_AXES order), split between slices by
    `slices_per_axis`; within a slice the devices are laid out topology-aware."""
    per_axis = slices_per_axis(shape, num_slices(devices))
    within = [size // across for size, across in zip(shape, per_axis)]
    # a slice's axes may split a physical axis of its torus when no whole-axis assignment fits (tried first)
    return mesh_utils.create_hybrid_device_mesh(within, per_axis, devices, allow_split_physical_axes=True)


def describe_mesh(mesh: Mesh) -> str:
    """One line such as `data=1 fsdp=8 sequence=1 tensor=1 (8 devices, cpu)` (`, 2 slices` when several)."""
    sizes = " ".join(f"{axis}={mesh.shape[axis]}" for axis in MESH_AXES)
    if not isinstance(mesh, Mesh):
        return f"{sizes} ({math.prod(mesh.shape.values())} devices, abstract)"
    slices = num_slices(mesh.devices.flat)
    where = mesh.devices.flat[0].platform + (f", {slices} slices" if slices > 1 else "")
    return f"{sizes} ({math.prod(mesh.shape.values())} devices, {where})"


@contextlib.contextmanager
def activate(mesh: Mesh | None) -> Iterator[None]:
    """Make `mesh` current and the rules table active, so `nn.with_logical_constraint` in the model takes
    effect. Trace (jit) the model inside this context; without a mesh it does nothing."""
    if mesh is None:
        yield
        return
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
        yield


# ----------------------------------------------------------------------------------------------------
# Shardings of batches and the KV cache


def axes_size(mesh: Mesh, axes: str | tuple[str, ...] | None) -> int:
    """How many devices the mesh axes of one spec entry span."""
    if axes is None:
        return 1
    return math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))


def fitting_spec(mesh: Mesh, names: Sequence[str | None], shape: Sequence[int]) -> PartitionSpec:
    """The rules' spec, minus mesh axes that do not divide their dim (e.g. a batch of 1 on fsdp=8)."""
    spec = []
    for dim, axes in zip(shape, logical_to_spec(names)):
        axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
        kept, size = [], 1
        for axis in axes:
            if dim % (size * mesh.shape[axis]) == 0:
                kept.append(axis)
                size *= mesh.shape[axis]
        spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return PartitionSpec(*spec)


def check_sequence(mesh: Mesh, length: int, what: str = "sequence length") -> None:
    """Refuse a `length` the mesh's `sequence` axis does not divide (queries would not split evenly over it)."""
    shards = mesh.shape["sequence"]
    if length % shards:
        raise MeshError(f"{what} {length} is not divisible by the sequence axis of the mesh (sequence={shards})")


def batch_shardings(mesh: Mesh, batch: Mapping[str, Any]) -> dict[str, NamedSharding]:
    """Input shardings: the leading axis (examples; visual arrays are per example) over `data` x `fsdp` where
    it divides; every other axis replicated."""
    return {k: NamedSharding(mesh, fitting_spec(mesh, ("act_batch",) + (None,) * (np.ndim(v) - 1), np.shape(v)))
            for k, v in batch.items()}
