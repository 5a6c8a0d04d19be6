"""Param trees: abstract shapes and logical names from the model, path-keyed flattening, and their layout on a
mesh (which param goes where, whether a config fits a mesh at all, placement of arrays as they are read)."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from molmo2_jax.config import Molmo2Config
from molmo2_jax.model.molmo2 import Molmo2
from molmo2_jax.sharding import MeshError, axes_size, describe_mesh, logical_to_spec


def _dummy_inputs(config: Molmo2Config) -> dict[str, jax.Array]:
    v = config.vision
    return {
        "input_ids": jnp.zeros((1, 4), jnp.int32),
        "pixel_values": jnp.zeros((1, 1, v.num_patches, v.patch_dim), jnp.float32),
        "image_token_pooling": jnp.zeros((1, 1, 4), jnp.int32),
    }


def trace_params(config: Molmo2Config) -> dict[str, Any]:
    """The boxed param tree from a fresh trace of the model (under method interceptors, e.g. LoRA's, their
    params appear too); nothing is allocated. Without interceptors use the cached `abstract_params`."""
    model = Molmo2(config)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), **_dummy_inputs(config)))["params"]


@functools.lru_cache(maxsize=16)
def _abstract_flat(config: Molmo2Config) -> tuple[tuple[str, Any], ...]:
    """Traced once per config: one start asks for the shapes and names of the same config many times."""
    return tuple(flatten(trace_params(config)).items())


def abstract_params(config: Molmo2Config) -> dict[str, Any]:
    """The boxed (LogicallyPartitioned) param tree as ShapeDtypeStructs; nothing is allocated."""
    return unflatten(dict(_abstract_flat(config)))


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict -> `{"a/b/c": leaf}` (LogicallyPartitioned boxes count as leaves)."""
    out = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, path + "/"))
        else:
            out[path] = value
    return out


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def logical_names(config: Molmo2Config) -> dict[str, tuple[str, ...]]:
    """`{path: logical axis names}` for every param."""
    return {p: tuple(box.names) for p, box in _abstract_flat(config)}


def param_shapes(config: Molmo2Config) -> dict[str, tuple[int, ...]]:
    return {p: tuple(box.value.shape) for p, box in _abstract_flat(config)}


def check_config(config: Molmo2Config, mesh: Mesh) -> None:
    """Fail fast, before any compilation, when `config` cannot be laid out on `mesh`: head counts not divisible
    by the tensor axis, a param dim not divisible by the mesh axes the rules give it, or a rules collision."""
    tensor = mesh.shape["tensor"]
    heads = {"text.num_heads": config.text.num_heads, "text.num_kv_heads": config.text.num_kv_heads,
             "vision.num_heads": config.vision.num_heads, "adapter.num_heads": config.adapter.num_heads}
    for field, count in heads.items():
        if count % tensor:
            raise MeshError(f"{field} = {count} is not divisible by the tensor axis of the mesh (tensor={tensor}); "
                            f"choose a tensor size that divides every head count")
    problems = []
    for path, box in _abstract_flat(config):
        for dim, axes in zip(box.value.shape, logical_to_spec(box.names)):
            size = axes_size(mesh, axes)
            if dim % size:
                problems.append(f"{path} dim {dim} over {axes} (size {size})")
    if problems:
        raise MeshError(f"{len(problems)} param(s) cannot be split evenly on mesh {describe_mesh(mesh)}: "
                        + "; ".join(problems[:3]) + ("; ..." if len(problems) > 3 else ""))


def param_shardings(config: Molmo2Config, mesh: Mesh) -> dict[str, Any]:
    """The nested tree of `NamedSharding`s of every param (after `check_config`)."""
    check_config(config, mesh)
    return unflatten({p: NamedSharding(mesh, logical_to_spec(n)) for p, n in logical_names(config).items()})


def init_params(config: Molmo2Config, seed: int = 0, mesh: Mesh | None = None) -> dict[str, Any]:
    """Random params (each born in its sharding when a mesh is given)."""
    model = Molmo2(config)
    init = lambda: nn.unbox(model.init(jax.random.key(seed), **_dummy_inputs(config))["params"])
    if mesh is None:
        return jax.jit(init)()
    return jax.jit(init, out_shardings=param_shardings(config, mesh))()


def placer(config: Molmo2Config, mesh: Mesh | None):
    """`place(path, numpy array) -> jax.Array` putting each param straight into its sharding."""
    if mesh is None:
        return lambda path, value: jax.device_put(value)
    shardings = flatten(param_shardings(config, mesh))
    return lambda path, value: jax.device_put(value, shardings[path])


def count_params(params: Mapping[str, Any]) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))
