"""Multi-host runs: joining the processes with `jax.distributed`, the start-up lines every process prints, the
small agreement of the hosts before each step (batch shapes, stop signals) and global batch arrays assembled
from each host's own examples (its data pipeline reads its own shard, see `data.pipeline.records`).

Settings come from arguments or the environment (`MOLMO2_COORDINATOR=host:port`, `MOLMO2_NUM_PROCESSES`,
`MOLMO2_PROCESS_ID`). With none of them, `jax.distributed.initialize()` is called only where JAX detects a
cluster by itself (TPU pods, SLURM, Open MPI); otherwise the run stays single-process.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Mapping, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding

from molmo2_jax.errors import Molmo2Error
from molmo2_jax.sharding import BATCH_AXES, MeshError, describe_mesh

ENV = {"coordinator": "MOLMO2_COORDINATOR", "num_processes": "MOLMO2_NUM_PROCESSES",
       "process_id": "MOLMO2_PROCESS_ID"}
_CLUSTER_ENV = ("TPU_WORKER_HOSTNAMES", "SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "MEGASCALE_COORDINATOR_ADDRESS")
_MAX_RANK = 5  # of a batch array: [micro-batches, examples, crops, patches, patch values]


class DistributedError(Molmo2Error):
    """Multi-process settings that are incomplete or inconsistent."""


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               timeout_seconds: int = 120) -> None:
    """Join this process to the others (before any other JAX call). Arguments override the environment."""
    coordinator = coordinator or os.environ.get(ENV["coordinator"])
    num_processes = _int(num_processes, "num_processes")
    process_id = _int(process_id, "process_id")
    given = {"coordinator": coordinator, "num_processes": num_processes, "process_id": process_id}
    if all(v is None for v in given.values()):
        if any(name in os.environ for name in _CLUSTER_ENV):
            jax.distributed.initialize()
        return
    missing = [f"{k} (--{k.replace('_', '-')} or {ENV[k]})" for k, v in given.items() if v is None]
    if missing:
        raise DistributedError(f"multi-process run needs all three settings; missing {', '.join(missing)}")
    if ":" not in coordinator:
        raise DistributedError(f"coordinator {coordinator!r} must be HOST:PORT")
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise DistributedError(f"process_id {process_id} is not in 0..{num_processes - 1}")
    # CPU devices need gloo for collectives across processes (the setting does not touch GPU/TPU backends)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id, initialization_timeout=timeout_seconds)


def _int(value: int | None, name: str) -> int | None:
    raw = value if value is not None else os.environ.get(ENV[name])
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:
        raise DistributedError(f"{name} {raw!r} (from {ENV[name]}) is not an integer") from None


def startup_lines(mesh: Mesh) -> list[str]:
    """What every process prints at start-up: who it is, what it sees, the mesh it runs on."""
    return [f"process {jax.process_index()}/{jax.process_count()}: {jax.local_device_count()} local of "
            f"{jax.device_count()} devices ({jax.devices()[0].platform})",
            f"process {jax.process_index()}: mesh {describe_mesh(mesh)}"]


@dataclasses.dataclass(frozen=True)
class Agreement:
    """The result of `agree`, the same on every process."""

    shapes: dict[str, tuple[int, ...]] | None  # what each batch array is padded to; None: some host has no batch
    maxima: tuple[int, ...]
    totals: tuple[int, ...]


def agree(mesh: Mesh, keys: Sequence[str], local: Mapping[str, np.ndarray] | None, maxima: Sequence[int] = (),
          totals: Sequence[int] = (), axis: int = 0) -> Agreement:
    """What all processes need to know before each step of a multi-host run, from one small all-gather.

    `local` is this process's batch (arrays of `keys`), or None when its data ran out (then `shapes` is None on
    every process). Hosts may pack their batches to different buckets, so each array is padded to the elementwise
    max shape over the processes, with `axis` (examples) rounded up to split evenly over
    the batch shards of each process. `maxima` / `totals` are small integers maxed / summed over the processes.
    """
    count = jax.process_count()
    shards = math.prod(mesh.shape[a] for a in BATCH_AXES)
    if shards % count:
        raise MeshError(f"mesh {describe_mesh(mesh)}: the batch axes (data x fsdp = {shards}) do not split over "
                        f"{count} processes; put the batch axes across hosts")
    dims = np.full((len(keys), _MAX_RANK + 1), -1, np.int32)  # per key: rank, then the shape (-1: absent)
    for i, key in enumerate(keys):
        if local is not None and key in local:
            shape = np.shape(local[key])
            if len(shape) > _MAX_RANK:
                raise DistributedError(f"batch[{key!r}] has rank {len(shape)}; at most {_MAX_RANK} is supported")
            dims[i, :len(shape) + 1] = (len(shape), *shape)
    mine = np.concatenate([[local is not None], np.asarray(maxima, np.int32), np.asarray(totals, np.int32),
                           dims.ravel()]).astype(np.int32)
    every = np.asarray(multihost_utils.process_allgather(mine))  # [processes, len(mine)]
    has_batch, rest = every[:, 0], every[:, 1:]
    agreed_maxima = tuple(int(x) for x in rest[:, :len(maxima)].max(axis=0))
    agreed_totals = tuple(int(x) for x in rest[:, len(maxima):len(maxima) + len(totals)].sum(axis=0, dtype=np.int64))
    if not has_batch.all():
        return Agreement(None, agreed_maxima, agreed_totals)
    dims = rest[:, len(maxima) + len(totals):].reshape(count, len(keys), _MAX_RANK + 1)
    if (dims[:, :, 0] != dims[0, :, 0]).any():
        differ = [k for i, k in enumerate(keys) if len(set(dims[:, i, 0])) > 1]
        raise DistributedError(f"the processes' batches differ in their keys or ranks ({differ}); every host must "
                               "run the same data pipeline")
    per_process = shards // count
    shapes = {}
    for i, key in enumerate(keys):
        rank = dims[0, i, 0]
        if rank >= 0:
            shape = [int(d) for d in dims[:, i, 1:rank + 1].max(axis=0)]
            shape[axis] = -(-shape[axis] // per_process) * per_process
            shapes[key] = tuple(shape)
    return Agreement(shapes, agreed_maxima, agreed_totals)


def global_batch(local: Mapping[str, np.ndarray],
                 shardings: Callable[[dict[str, jax.ShapeDtypeStruct]], Mapping[str, NamedSharding]],
                 axis: int = 0) -> dict[str, jax.Array]:
    """Global arrays from this process's share of every batch array: `axis` (examples) holds only this process's
    own, which become one contiguous block of the global array (its rows under the batch sharding); pooling
    indices are per row, so they stay as they are. Every process passes the same shapes (see `agree`);
    `shardings` maps the global shapes to the batch shardings."""
    count = jax.process_count()
    spec = {k: jax.ShapeDtypeStruct(_resized(np.shape(v), axis, np.shape(v)[axis] * count), np.asarray(v).dtype)
            for k, v in local.items()}
    placement = shardings(spec)
    for key, value in local.items():
        _block_start(placement[key], spec[key].shape, axis, np.shape(value)[axis])  # refuses a split of this block
    return {k: jax.make_array_from_process_local_data(placement[k], np.asarray(v), spec[k].shape)
            for k, v in local.items()}


def _resized(shape: tuple[int, ...], axis: int, size: int) -> tuple[int, ...]:
    return (*shape[:axis], size, *shape[axis + 1:])


def _block_start(sharding: NamedSharding, shape: tuple[int, ...], axis: int, size: int) -> int:
    """Where this process's block of `size` starts along `axis` of a global array of `shape`; MeshError when the
    sharding does not give this process one contiguous block of that size."""
    spans = sorted({index[axis].indices(shape[axis])[:2]
                    for index in sharding.addressable_devices_indices_map(shape).values()})
    start, stop = spans[0][0], spans[-1][1]
    if stop - start != size or any(a[1] < b[0] for a, b in zip(spans, spans[1:])):
        raise MeshError(f"mesh {describe_mesh(sharding.mesh)} does not give each process a contiguous, equal share "
                        f"of the batch; put the batch axes (data, fsdp) across hosts")
    return start
