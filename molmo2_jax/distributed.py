"""Multi-host runs: joining the processes with `jax.distributed`, the slice of each global batch a host loads,
assembling global arrays from those slices, and the start-up lines every process prints.

Settings come from arguments or the environment (`MOLMO2_COORDINATOR=host:port`, `MOLMO2_NUM_PROCESSES`,
`MOLMO2_PROCESS_ID`). With none of them, `jax.distributed.initialize()` is called only where JAX detects a
cluster by itself (TPU pods, SLURM, Open MPI); otherwise the run stays single-process.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from molmo2_jax.sharding import MeshError, batch_shardings, describe_mesh

ENV = {"coordinator": "MOLMO2_COORDINATOR", "num_processes": "MOLMO2_NUM_PROCESSES",
       "process_id": "MOLMO2_PROCESS_ID"}
_CLUSTER_ENV = ("TPU_WORKER_HOSTNAMES", "SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "MEGASCALE_COORDINATOR_ADDRESS")


class DistributedError(ValueError):
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


def host_rows(mesh: Mesh, global_batch: int) -> slice:
    """The rows of a global batch (examples) that this process loads: those its devices hold under the batch
    sharding. Every host's slice has the same size."""
    sharding = batch_shardings(mesh, {"x": np.empty((global_batch,), np.int8)})["x"]
    if global_batch % jax.process_count():
        raise MeshError(f"global batch {global_batch} is not divisible by {jax.process_count()} processes")
    rows = sorted({idx[0].indices(global_batch)[:2] for idx in
                   sharding.addressable_devices_indices_map((global_batch,)).values()})
    start, stop = rows[0][0], rows[-1][1]
    if stop - start != global_batch // jax.process_count():
        raise MeshError(f"mesh {describe_mesh(mesh)} does not give each process a contiguous, equal share of the "
                        f"batch; put the batch axes (data, fsdp) across hosts")
    return slice(start, stop)


def global_batch(mesh: Mesh, local: Mapping[str, np.ndarray], global_batch_size: int) -> dict[str, jax.Array]:
    """Global arrays from this host's rows (`host_rows`) of every batch array. Arrays whose leading axis counts
    crops or pooled tokens scale with the examples, so each host passes the rows of its own examples."""
    share = global_batch_size // jax.process_count()
    out: dict[str, Any] = {}
    for key, value in local.items():
        value = np.asarray(value)
        shape = (value.shape[0] * global_batch_size // share, *value.shape[1:])
        sharding = batch_shardings(mesh, {key: np.empty(shape, np.int8)})[key]
        out[key] = jax.make_array_from_process_local_data(sharding, value, shape)
    return out
