"""LoRA: low-rank adapters on the Dense layers whose kernel path fully matches a regex.

A targeted Dense with kernel `[*in, *out]` gains `lora_a [*in, rank]` (fan-in init) and `lora_b [rank, *out]`
(zeros) next to its kernel, and computes `x @ kernel + scale * dropout(x) @ lora_a @ lora_b` with PEFT's
`scale = alpha / rank` (rsLoRA: `alpha / sqrt(rank)`). The adapters carry the logical axes of the kernel's in and
out dims (plus `lora_rank`, replicated), so they are sharded by the same rules as their base; under the layer
scan they are stacked on the leading "layers" axis like the kernel.

The model code is untouched: the adapter term is added by a Flax method interceptor (`applied`) around
`Dense.__call__`, active while a model with adapters is initialised or applied. Base and adapter params are
separate trees (`combine` joins them for `apply`), so training differentiates and updates only the adapters.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
from collections.abc import Iterator, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from molmo2_jax.config import ConfigError, Molmo2Config
from molmo2_jax.model.layers import Dense, fan_in_init, project

ADAPTER_LEAVES = ("lora_a", "lora_b")
LLM_TARGETS = r"decoder/layers/(q|k|v|o|gate|up|down)/kernel"


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """The `lora:` section of a training config. `rank: 0` trains every parameter (no adapters)."""

    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    rslora: bool = False  # scale alpha / sqrt(rank) instead of alpha / rank
    targets: str = LLM_TARGETS  # regex fully matching our kernel paths; add e.g. |vision/blocks/.*|connector/.*
    lr: float = 2e-4
    warmup_steps: int = 100
    adapter: str | None = None  # a PEFT adapter directory to start from instead of B = 0

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def validate(self) -> LoraConfig:
        if self.rank < 0 or not 0 <= self.dropout < 1 or self.lr < 0 or self.warmup_steps < 0:
            raise ConfigError(f"lora: rank, lr and warmup_steps must be >= 0 and dropout in [0, 1); got rank "
                              f"{self.rank}, dropout {self.dropout}, lr {self.lr}, warmup_steps {self.warmup_steps}")
        try:
            re.compile(self.targets)
        except re.error as e:
            raise ConfigError(f"lora.targets {self.targets!r} is not a valid regex ({e})") from None
        return self


@dataclasses.dataclass
class _Mode:
    config: LoraConfig
    create: bool  # initialising: add adapters to the Dense layers the targets match
    deterministic: bool  # no dropout (evaluation, inference)
    seen: dict[str, tuple[int, int]] = dataclasses.field(default_factory=dict)  # kernel path -> (in, out) sizes


def _intercept(mode: _Mode):
    pattern = re.compile(mode.config.targets)

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        y = next_fun(*args, **kwargs)
        if not isinstance(module, Dense) or context.method_name != "__call__":
            return y
        path = "/".join(module.path) + "/kernel"
        x = args[0]
        in_shape, axes = x.shape[x.ndim - module.contract:], module.axes
        if mode.create and pattern.fullmatch(path):
            mode.seen[path] = (math.prod(in_shape), math.prod(module.features))
            module.param("lora_a", nn.with_logical_partitioning(
                fan_in_init(module.contract), (*axes[:module.contract], "lora_rank")),
                (*in_shape, mode.config.rank), jnp.float32)
            module.param("lora_b", nn.with_logical_partitioning(
                nn.initializers.zeros, ("lora_rank", *axes[module.contract:])),
                (mode.config.rank, *module.features), jnp.float32)
        if not module.has_variable("params", "lora_a"):
            return y
        a = nn.unbox(module.get_variable("params", "lora_a")).astype(module.dtype)
        b = nn.unbox(module.get_variable("params", "lora_b")).astype(module.dtype)
        x = x.astype(module.dtype)
        if mode.config.dropout and not mode.deterministic:
            keep = jax.random.bernoulli(module.make_rng("dropout"), 1 - mode.config.dropout, x.shape)
            x = jnp.where(keep, x / (1 - mode.config.dropout), 0).astype(x.dtype)
        delta = project(project(x, a, module.contract), b, 1)
        return y + (mode.config.scale * delta).astype(y.dtype)

    return interceptor


@contextlib.contextmanager
def applied(config: LoraConfig, deterministic: bool = True) -> Iterator[None]:
    """Trace the model inside this context to add the adapters present in its params (dropout needs a "dropout"
    rng when not `deterministic`)."""
    with nn.intercept_methods(_intercept(_Mode(config, create=False, deterministic=deterministic))):
        yield


def abstract_adapters(model_config: Molmo2Config, config: LoraConfig) -> dict[str, Any]:
    """The boxed (LogicallyPartitioned) adapter tree as ShapeDtypeStructs, nothing allocated.

    Raises ConfigError, before anything is compiled, when the targets match no Dense kernel or match other
    params, or the rank exceeds a target's in or out size."""
    from molmo2_jax.params import flatten, trace_params, unflatten

    mode = _Mode(config, create=True, deterministic=True)
    with nn.intercept_methods(_intercept(mode)):
        flat = flatten(trace_params(model_config))
    pattern = re.compile(config.targets)
    if not mode.seen:
        raise ConfigError(f"lora.targets {config.targets!r} matches no linear layer; kernel paths look like "
                          f"'decoder/layers/q/kernel', 'vision/blocks/fc1/kernel', 'connector/up/kernel'")
    others = sorted(p for p in flat if pattern.fullmatch(p) and p not in mode.seen)
    if others:
        raise ConfigError(f"lora.targets {config.targets!r} matches params that are not linear-layer kernels: "
                          f"{others[:3]}")
    small = {p: s for p, s in mode.seen.items() if config.rank > min(s)}
    if small:
        path, sizes = next(iter(small.items()))
        raise ConfigError(f"lora.rank {config.rank} exceeds the in/out sizes {sizes} of {path} "
                          f"({len(small)} target(s) too small); use a rank <= {min(min(s) for s in small.values())}")
    return unflatten({p: box for p, box in flat.items() if p.rsplit("/", 1)[-1] in ADAPTER_LEAVES})


def init_adapters(model_config: Molmo2Config, config: LoraConfig, seed: int = 0,
                  shardings: Any = None) -> dict[str, Any]:
    """Fresh fp32 adapters (A random, B = 0), each born in its sharding when `shardings` is given."""
    from molmo2_jax.model.molmo2 import Molmo2
    from molmo2_jax.params import _dummy_inputs, flatten, unflatten

    def init():
        with nn.intercept_methods(_intercept(_Mode(config, create=True, deterministic=True))):
            params = Molmo2(model_config).init(jax.random.key(seed), **_dummy_inputs(model_config))["params"]
        flat = flatten(nn.unbox(params))
        return unflatten({p: v for p, v in flat.items() if p.rsplit("/", 1)[-1] in ADAPTER_LEAVES})

    return jax.jit(init, out_shardings=shardings)()


def combine(base: Mapping[str, Any], adapters: Mapping[str, Any]) -> dict[str, Any]:
    """Base params with the adapter leaves added beside their kernels (one tree for `apply`)."""
    out = dict(base)
    for key, value in adapters.items():
        out[key] = combine(base[key], value) if isinstance(value, Mapping) else value
    return out


def merge(base: Mapping[str, Any], adapters: Mapping[str, Any], config: LoraConfig) -> dict[str, Any]:
    """Base params with `scale * lora_a @ lora_b` added to each adapted kernel (in fp32, cast back to the
    kernel's dtype): the plain model that computes what the adapted one does."""
    from molmo2_jax.params import flatten, unflatten

    flat, merged = flatten(adapters), flatten(base)
    for path in {p.rsplit("/", 1)[0] for p in flat}:
        kernel, a, b = merged[f"{path}/kernel"], flat[f"{path}/lora_a"], flat[f"{path}/lora_b"]
        product = lambda a, b: jnp.tensordot(a, b, axes=1)
        if a.ndim + b.ndim - 3 == kernel.ndim:  # stacked on a leading layer axis
            product = jax.vmap(product)
        delta = config.scale * product(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32))
        merged[f"{path}/kernel"] = (jnp.asarray(kernel, jnp.float32) + delta).astype(kernel.dtype)
    return unflatten(merged)
