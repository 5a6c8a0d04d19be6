"""Param trees: abstract shapes and logical names from the model, path-keyed flattening, placement on a mesh."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from molmo2_jax.config import Molmo2Config
from molmo2_jax.model.molmo2 import Molmo2
from molmo2_jax.sharding import param_shardings


def _dummy_inputs(config: Molmo2Config) -> dict[str, jax.Array]:
    v = config.vision
    return {
        "input_ids": jnp.zeros((1, 4), jnp.int32),
        "pixel_values": jnp.zeros((1, v.num_patches, v.patch_dim), jnp.float32),
        "image_token_pooling": jnp.zeros((1, 4), jnp.int32),
    }


def abstract_params(config: Molmo2Config) -> dict[str, Any]:
    """The boxed (LogicallyPartitioned) param tree as ShapeDtypeStructs; nothing is allocated."""
    model = Molmo2(config)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), **_dummy_inputs(config)))["params"]


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
    return {p: tuple(box.names) for p, box in flatten(abstract_params(config)).items()}


def param_shapes(config: Molmo2Config) -> dict[str, tuple[int, ...]]:
    return {p: tuple(box.value.shape) for p, box in flatten(abstract_params(config)).items()}


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
