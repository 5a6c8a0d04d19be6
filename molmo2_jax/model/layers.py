"""Building blocks shared by the ViT, the connector and the LLM: dense layers with logical axes, the SwiGLU product,
norms, RoPE (default and YaRN), attention with an explicit mask, and the layer-stacking helper."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from molmo2_jax.config import RopeScaling

# Token embeddings: unit variance (flax's nn.Embed default), on the scale of the fan-in-initialised visual
# tokens, so at init a text token is not swamped by the first attention output averaged over the image.
EMBED_INIT = nn.initializers.normal(stddev=1.0)


def fan_in_init(contract: int) -> nn.initializers.Initializer:
    """LeCun-normal over the first `contract` (input) dims of a kernel. A fixed 0.02 equals 1/sqrt(fan_in) only
    near width 2500: at small widths it shrinks the visual signal through the connector's chain of matmuls (and
    its SwiGLU product) until an untrained tiny model's logits move by ~1e-6 of their spread with the image."""
    return lambda key, shape, dtype=jnp.float32: nn.initializers.variance_scaling(
        1.0, "fan_in", "truncated_normal", in_axis=tuple(range(contract)),
        out_axis=tuple(range(contract, len(shape))))(key, shape, dtype)


class Dense(nn.Module):
    """`x @ kernel` over the trailing `contract` dims of x; the kernel (and bias) carry logical axis names,
    `axes` naming every kernel dim (the contracted input dims, then the feature dims)."""

    features: tuple[int, ...]
    axes: tuple[str, ...]
    use_bias: bool
    dtype: Any
    param_dtype: Any
    contract: int = 1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        shape = (*x.shape[x.ndim - self.contract:], *self.features)
        kernel = self.param("kernel", nn.with_logical_partitioning(fan_in_init(self.contract), self.axes), shape,
                            self.param_dtype)
        y = project(x.astype(self.dtype), kernel.astype(self.dtype), self.contract)
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, self.axes[self.contract:]),
                              self.features, self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y


PROJECT_NAME = "project"  # the checkpoint name of every `project` output (the "dots" remat policies save it)


def project(x: jax.Array, kernel: jax.Array, contract: int) -> jax.Array:
    """`tensordot(x, kernel, contract)`, whose backward takes the kernel gradient as `x^T dy` over the leading
    (token) dims, in the kernel's own layout. Autodiff's transpose of the tensordot takes it as `dy^T x` and then
    transposes, which XLA:CPU lowers to a transposed copy of `dy` (`[tokens, features]` -> `[features, tokens]`)
    before the dot; on the decoder MLP that copy cost ~20% of the MLP's forward + backward (bench/bench_mlp.py).
    The output is named: remat policies see a custom VJP, not its dot (`remat_policy`)."""
    return checkpoint_name(_project(x, kernel, contract), PROJECT_NAME)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _project(x: jax.Array, kernel: jax.Array, contract: int) -> jax.Array:
    return jnp.tensordot(x, kernel, axes=contract)


def _project_fwd(x: jax.Array, kernel: jax.Array, contract: int):
    return _project(x, kernel, contract), (x, kernel)


def _project_bwd(contract: int, residuals, dy: jax.Array):
    x, kernel = residuals
    lead = tuple(range(x.ndim - contract))
    dx = jnp.tensordot(dy, kernel, axes=(tuple(range(len(lead), dy.ndim)), tuple(range(contract, kernel.ndim))))
    # XLA:CPU copies the dot's left operand transposed (tokens last); the kernel gradient transposes x, or dy and
    # then the `[out, in]` result, whichever moves fewer elements (dy when in >> out, e.g. the ViT's fc2)
    tokens, n_in = math.prod(x.shape[:len(lead)]), math.prod(x.shape[len(lead):])
    n_out = math.prod(dy.shape[len(lead):])
    if tokens * n_out + n_in * n_out < tokens * n_in:
        d_kernel_t = jnp.tensordot(dy, x, axes=(lead, lead))  # [*out, *in]
        n_out_dims = dy.ndim - len(lead)
        return dx, d_kernel_t.transpose(*range(n_out_dims, d_kernel_t.ndim), *range(n_out_dims))
    return dx, jnp.tensordot(x, dy, axes=(lead, lead))


_project.defvjp(_project_fwd, _project_bwd)


def dense(features: int | Sequence[int], axes: Sequence[str], *, use_bias: bool, dtype, param_dtype,
          contract: int | tuple[int, ...] = -1, name: str | None = None) -> Dense:
    """A Dense layer; `contract` is -1 (the last dim of x) or (-2, -1) (the last two, e.g. heads x head_dim)."""
    features = tuple(features) if isinstance(features, Sequence) else (features,)
    n_contract = len(contract) if isinstance(contract, tuple) else 1
    return Dense(features, tuple(axes), use_bias, dtype, param_dtype, n_contract, name=name)


@jax.custom_vjp
def swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
    """`silu(gate) * up`, the SwiGLU product. Its backward keeps only `gate` and `up` and recomputes the sigmoid,
    where autodiff of the plain expression keeps three more `gate`-sized residuals per layer (silu's jvp): half the
    MLP's residuals, and with `project` 3-7% of the decoder MLP's forward + backward on CPU (bench/bench_mlp.py)."""
    return jax.nn.silu(gate) * up


def _swiglu_fwd(gate: jax.Array, up: jax.Array):
    return swiglu(gate, up), (gate, up)


def _swiglu_bwd(residuals, dy: jax.Array):
    gate, up = residuals
    sig = jax.nn.sigmoid(gate)
    silu = gate * sig
    # d silu(g) / dg = sig + g * sig * (1 - sig) = sig * (1 + g * (1 - sig))
    return dy * up * sig * (1 + gate * (1 - sig)), dy * silu


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


class RMSNorm(nn.Module):
    """RMSNorm over the trailing `len(axes)` dims, in fp32; cast back before the weight (as the reference)."""

    axes: tuple[str, ...] = ("norm",)
    eps: float = 1e-6
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        shape = x.shape[-len(self.axes):]
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, self.axes), shape,
                           self.param_dtype)
        reduce = tuple(range(x.ndim - len(self.axes), x.ndim))
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=reduce, keepdims=True) + self.eps)
        return scale.astype(self.dtype) * y.astype(self.dtype)


class LayerNorm(nn.Module):
    """Standard LayerNorm with weight and bias, statistics in fp32."""

    axis_name: str = "vit_embed"
    eps: float = 1e-6
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, (self.axis_name,)), (d,),
                           self.param_dtype)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, (self.axis_name,)), (d,),
                          self.param_dtype)
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


# ----------------------------------------------------------------------------------------------------
# RoPE (rotate-half convention over the full head_dim)


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None = None) -> tuple[jax.Array, float]:
    """Inverse frequencies `[head_dim // 2]` and the cos/sin multiplier (YaRN's attention factor, else 1)."""
    exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
    pos_freqs = jnp.float32(theta) ** exponents
    inv_freq = 1.0 / pos_freqs
    if scaling is None:
        return inv_freq, 1.0

    def correction_dim(rotations: float) -> float:
        return head_dim * math.log(scaling.original_max_position_embeddings / (rotations * 2 * math.pi)) / (
            2 * math.log(theta))

    low, high = correction_dim(scaling.beta_fast), correction_dim(scaling.beta_slow)
    if scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001
    ramp = jnp.clip((jnp.arange(head_dim // 2, dtype=jnp.float32) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (scaling.factor * pos_freqs)) * (1 - extrapolation) + inv_freq * extrapolation
    factor = scaling.attention_factor
    if factor is None:
        factor = 0.1 * math.log(scaling.factor) + 1.0 if scaling.factor > 1 else 1.0
    return inv_freq, float(factor)


def rope_cos_sin(positions: jax.Array, inv_freq: jax.Array, multiplier: float) -> tuple[jax.Array, jax.Array]:
    """cos, sin `[..., head_dim]` for integer positions `[...]`, in fp32."""
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb) * multiplier, jnp.sin(emb) * multiplier


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x `[B, T, heads, head_dim]`; cos/sin `[B, T, head_dim]`."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotated * sin


# ----------------------------------------------------------------------------------------------------
# Attention


class MaskInfo(NamedTuple):
    """Small per-token vectors from which the LLM mask is built inside attention.

    allowed(q, k) = seg(k) > 0 AND seg(k) == seg(q) AND (idx(k) <= idx(q) OR (mm(q) AND mm(k)))
    `seg` is 0 for padding and one id per packed example; `idx` is the slot in the sequence (or cache);
    `mm` marks the image/video special tokens that attend to each other bidirectionally.
    """

    q_seg: jax.Array  # [B, T] int
    q_idx: jax.Array  # [B, T] int
    q_mm: jax.Array  # [B, T] bool
    k_seg: jax.Array  # [B, S] int
    k_idx: jax.Array  # [B, S] int
    k_mm: jax.Array  # [B, S] bool

    def allowed(self) -> jax.Array:
        """Boolean mask `[B, 1, T, S]`."""
        same = (self.k_seg[:, None, :] == self.q_seg[:, :, None]) & (self.k_seg[:, None, :] > 0)
        causal = self.k_idx[:, None, :] <= self.q_idx[:, :, None]
        block = self.q_mm[:, :, None] & self.k_mm[:, None, :]
        return (same & (causal | block))[:, None]


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array | None) -> jax.Array:
    """Softmax attention with fp32 logits and softmax.

    q `[B, T, H, D]`, k/v `[B, S, KV, D]` (H a multiple of KV: grouped-query), allowed `[B, 1|H, T, S]`
    boolean or None. Rows with no allowed key give zeros, never NaN. Keys and values are repeated to H heads:
    4-D dot products are several times faster on XLA:CPU than the grouped 5-D form, and cost nothing on TPU.
    """
    h, kv = q.shape[2], k.shape[2]
    if h != kv:
        k, v = jnp.repeat(k, h // kv, axis=2), jnp.repeat(v, h // kv, axis=2)
    logits = jnp.einsum("bthd,bshd->bhts", q, k, preferred_element_type=jnp.float32) * (q.shape[-1] ** -0.5)
    if allowed is not None:
        logits = jnp.where(allowed, logits, -1e30)
    weights = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bhts,bshd->bthd", weights.astype(v.dtype), v)
    if allowed is not None:  # a row with no allowed key has uniform weights: zero it
        out = out * jnp.any(allowed, axis=-1).transpose(0, 2, 1)[..., None].astype(out.dtype)
    return out


# ----------------------------------------------------------------------------------------------------
# Layer stacking


def remat_policy(name: str):
    """Map a config name to a jax.checkpoint policy; None means no rematerialisation. The "dots" policies also save
    `project` outputs (the Dense layers' products, hidden from them by its custom VJP; none has batch dims)."""
    policies = jax.checkpoint_policies
    projections = policies.save_only_these_names(PROJECT_NAME)
    return {
        "none": None,
        "full": policies.nothing_saveable,
        "dots": policies.save_from_both_policies(policies.dots_saveable, projections),
        "dots_no_batch": policies.save_from_both_policies(policies.dots_with_no_batch_dims_saveable, projections),
    }[name]


def stack_layers(layer_cls: type[nn.Module], length: int, policy_name: str, broadcast_args: int,
                 scanned_args: int, name: str, **layer_kwargs) -> nn.Module:
    """`layer_cls` applied `length` times with `nn.scan` (params stacked on a leading "layers" axis).

    The layer is called as `layer(carry, *broadcast, *scanned) -> (carry, out)`; broadcast args are the same
    for every layer, scanned args carry a leading layer axis.
    """
    policy = remat_policy(policy_name)
    cls = layer_cls if policy_name == "none" else nn.remat(layer_cls, policy=policy, prevent_cse=False)
    return nn.scan(
        cls, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
        in_axes=(nn.broadcast,) * broadcast_args + (0,) * scanned_args, length=length,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )(name=name, **layer_kwargs)
