"""`molmo2_jax.load(path)`: a released/native Hugging Face Molmo2 checkpoint or one of ours, ready to run."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from molmo2_jax import host_memory
from molmo2_jax.batch import IGNORED_KEYS, INPUT_KEYS, TOKEN_KEYS, InputError, check_rows, to_rows
from molmo2_jax.checkpoint.formats import open_checkpoint
from molmo2_jax.checkpoint.peft import read_adapter
from molmo2_jax.config import Molmo2Config
from molmo2_jax.lora import LoraConfig, abstract_adapters, applied, combine, merge
from molmo2_jax.model.molmo2 import Molmo2
from molmo2_jax.params import check_config, flatten
from molmo2_jax.sharding import activate, logical_to_spec


class Molmo2Model:
    """A config, its params and jitted entry points. Call it with a processor output dict to get logits.
    With `lora`, the params hold LoRA adapters beside their kernels (`molmo2_jax.lora`)."""

    def __init__(self, config: Molmo2Config, params: dict[str, Any], mesh: Mesh | None = None,
                 lora: LoraConfig | None = None):
        self.config = config
        self.params = params
        self.mesh = mesh
        self.lora = lora
        self.module = Molmo2(config)

    @contextlib.contextmanager
    def context(self):
        """Trace the model inside this: the mesh and rules table, and the adapters when there are any."""
        with activate(self.mesh), (applied(self.lora) if self.lora else contextlib.nullcontext()):
            yield

    @functools.cached_property
    def _forward(self):
        return jax.jit(lambda params, inputs: self.module.apply({"params": params}, **inputs)[0])

    def prepare(self, inputs: Mapping[str, Any]) -> dict[str, jax.Array]:
        """Check a processor output dict and convert it to arrays in the batch contract (torch tensors and lists
        are accepted; visual arrays in the transformers layout are moved into rows, `batch.to_rows`)."""
        unknown = sorted(set(inputs) - set(INPUT_KEYS) - set(IGNORED_KEYS))
        if unknown:
            raise InputError(f"unknown model input(s) {unknown}; expected keys among {list(INPUT_KEYS)}")
        if "input_ids" not in inputs:
            raise InputError("model inputs need 'input_ids'")
        arrays = {k: np.asarray(inputs[k]) for k in INPUT_KEYS if inputs.get(k) is not None}
        ids = arrays["input_ids"]
        if ids.ndim == 1:
            arrays = {k: (v[None] if k in TOKEN_KEYS else v) for k, v in arrays.items()}
            ids = arrays["input_ids"]
        if ids.shape[1] > self.config.text.max_position_embeddings:
            raise InputError(f"input of {ids.shape[1]} tokens exceeds the model's maximum length "
                             f"{self.config.text.max_position_embeddings}")
        patch = self.config.tokens.image_patch
        arrays = to_rows(arrays, patch, self.config.vision.num_patches)
        check_rows(arrays, patch)
        return host_memory.placed({k: jnp.asarray(v) for k, v in arrays.items()})

    def __call__(self, inputs: Mapping[str, Any]) -> jax.Array:
        """Logits `[batch, seq, vocab]` (fp32) for a processor output dict."""
        prepared = self.prepare(inputs)
        with self.context():
            return self._forward(self.params, prepared)

    def generate(self, inputs: Mapping[str, Any], **kwargs):
        """Decode new tokens for a processor output dict; see `molmo2_jax.generation.generate`."""
        from molmo2_jax.generation import generate

        return generate(self, inputs, **kwargs)

    def apply(self, *args, method=None, **kwargs):
        """`module.apply` with our params (for ViT features, pooled tokens, ...)."""
        with self.context():
            return self.module.apply({"params": self.params}, *args, method=method, **kwargs)


def load(path: str | Path, dtype: str = "float32", mesh: Mesh | None = None, adapter: str | Path | None = None,
         merge_adapter: bool = False, **config_changes) -> Molmo2Model:
    """Load a Molmo2 checkpoint: a Hugging Face directory (released or transformers-native tensor names), a
    directory written by `molmo2-jax convert`, or a training run (its latest step) or step directory.
    `dtype` sets params and compute dtype; with a `mesh` every param is placed straight into its sharding.
    `adapter`: a PEFT LoRA adapter directory for this base (read before the base), kept beside the base
    kernels or, with `merge_adapter`, added into them.
    On the CPU (`host_memory`), unless `vit_chunk` is given or the checkpoint sets it, the ViT runs over as many
    crops at a time as keep its activations within a thread's malloc heap: a larger one is faulted in again on
    every call (a 65M model's batch-8 prefill: 8.5-9.1 s in one call, 8.0-8.4 s in chunks of 11 crops)."""
    checkpoint = open_checkpoint(path)
    if "vit_chunk" not in config_changes and checkpoint.config.vit_chunk is None and host_memory.reusing():
        config_changes["vit_chunk"] = host_memory.crops_within_thread_heap(checkpoint.config.vision)
    config = checkpoint.config.replace(dtype=dtype, param_dtype=dtype, **config_changes)
    if mesh is not None:
        check_config(config, mesh)  # a mesh that does not fit fails here, before anything is read
    lora_config, adapters = read_adapter(adapter, config) if adapter is not None else (None, None)
    params = checkpoint.read_params(config, dtype, mesh)
    if adapters is None:
        return Molmo2Model(config, params, mesh)
    if merge_adapter:
        return Molmo2Model(config, merge(params, adapters, lora_config), mesh)
    # adapters stay fp32 (as PEFT keeps them); placed like their base kernels' inputs/outputs by the rules
    return Molmo2Model(config, combine(params, _place_adapters(adapters, config, lora_config, mesh)), mesh,
                       lora_config)


def _place_adapters(adapters: dict[str, Any], config: Molmo2Config, lora_config: LoraConfig,
                    mesh: Mesh | None) -> dict[str, Any]:
    if mesh is None:
        return jax.device_put(adapters)
    boxes = abstract_adapters(config, lora_config)
    return jax.tree_util.tree_map(lambda x, box: jax.device_put(x, NamedSharding(mesh, logical_to_spec(box.names))),
                                  adapters, boxes, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


__all__ = ["InputError", "Molmo2Model", "flatten", "load"]
