"""Compile-time plans: lower and compile the real-size training step from abstract shapes (nothing allocated) on
a mesh of simulated CPU devices, or ahead of time for a real TPU topology through libtpu (no TPU needed), read
XLA's per-device memory and FLOP figures, and set them next to an analytic estimate (params, gradients,
optimizer state, activations kept under the remat policy, the largest gathered layer). See docs/plan.md for how
to read the two and why they can differ.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh

from molmo2_jax.config import Molmo2Config
from molmo2_jax.errors import Molmo2Error
from molmo2_jax.model.attention import tile_shape, tile_size, uses_blockwise
from molmo2_jax.model.connector import chunk_tokens
from molmo2_jax.params import check_config, flatten, param_shapes
from molmo2_jax.sharding import (
    MESH_AXES,
    MeshError,
    activate,
    axes_size,
    check_sequence,
    describe_mesh,
    fitting_spec,
    fsdp_across_slices,
    mesh_shape,
    multislice_grid,
)
from molmo2_jax.training.config import TrainConfig
from molmo2_jax.training.step import make_train_step

GiB = 1024**3


# ----------------------------------------------------------------------------------------------------
# Abstract inputs


@dataclasses.dataclass(frozen=True)
class Workload:
    """One optimizer step's global batch: `batch` sequences of `seq` tokens, each with `crops` ViT crops (or
    video frames) of which `tokens` pooled visual tokens enter the sequence (`pool` patches per token)."""

    batch: int
    seq: int
    crops: int = 9  # 1 global view + 8 tiles: the released image default
    tokens: int = 1162  # pooled tokens of a 2x4-tiled image; must be <= seq
    pool: int = 4  # 2x2 windows for images, 9 for 3x3 video windows


def abstract_batch(config: Molmo2Config, work: Workload) -> dict[str, jax.ShapeDtypeStruct]:
    """ShapeDtypeStructs of a padded training batch (the batch contract: visual arrays per row)."""
    v = config.vision
    b, t = work.batch, work.seq
    i32 = jnp.int32
    return {
        "input_ids": jax.ShapeDtypeStruct((b, t), i32),
        "mm_token_type_ids": jax.ShapeDtypeStruct((b, t), i32),
        "position_ids": jax.ShapeDtypeStruct((b, t), i32),
        "segment_ids": jax.ShapeDtypeStruct((b, t), i32),
        "pixel_values": jax.ShapeDtypeStruct((b, work.crops, v.num_patches, v.patch_dim), jnp.dtype(config.dtype)),
        "image_token_pooling": jax.ShapeDtypeStruct((b, work.tokens, work.pool), i32),
        "target_ids": jax.ShapeDtypeStruct((b, t), i32),
        "loss_weights": jax.ShapeDtypeStruct((b, t), jnp.float32),
    }


# ----------------------------------------------------------------------------------------------------
# TPU targets: libtpu compiles for a named topology ahead of time, with no TPU attached


class TargetError(Molmo2Error):
    """A `--target` topology that cannot be compiled for, or a step that does not fit its HBM."""


TPU_EXTRA = "pip install 'molmo2-jax[tpu]'"


@dataclasses.dataclass(frozen=True)
class Target:
    """A TPU topology to compile for: its name (`v5p:4x4x4`), devices (of `slices` such slices) and per-device HBM
    (None: unknown)."""

    name: str
    devices: tuple[Any, ...]
    hbm_bytes: int | None
    slices: int = 1

    def __str__(self) -> str:
        return self.name if self.slices == 1 else f"{self.slices} x {self.name}"


def tpu_target(name: str, slices: int = 1) -> Target:
    """The compile-only devices of `slices` slices of the TPU topology `name` (e.g. `v5p:4x4x4`, `v5e:2x2`,
    `v6e:2x2`, `v4:2x2x1`), joined by the data-center network (multi-slice) when more than one."""
    if importlib.util.find_spec("libtpu") is None:
        raise TargetError(f"--target {name} compiles for TPU through libtpu, which is not installed: {TPU_EXTRA}")
    from jax.experimental import topologies

    # libtpu looks for the TPU host it runs on and logs warnings when there is none; these only quiet that
    # search (the compile target comes from the topology name)
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    # nor does a compile-only client touch a chip: let several plans run at once (else libtpu's lockfile refuses)
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    # v4 chips hold two TensorCores: JAX runs them as one megacore device
    extra = {"chip_config_name": "megacore"} if name.startswith("v4:") else {}
    if slices < 1:
        raise TargetError(f"--slices {slices}: a target has at least one slice")
    try:
        topo = topologies.get_topology_desc(topology_name=name, platform="tpu", num_slices=slices, **extra)
    except Exception as e:  # libtpu raises plain runtime errors for names it does not know
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TargetError(f"--target {name!r}: libtpu has no such TPU topology ({first}); e.g. v5p:4x4x4, "
                          f"v5e:2x2, v6e:4x4, v4:2x2x1") from None
    return Target(name, tuple(topo.devices), _hbm_bytes(topo.devices[0].device_kind), slices)


def _hbm_bytes(device_kind: str) -> int | None:
    from jax._src.pallas.mosaic import tpu_info  # the chip table Pallas keeps (public: pltpu.get_tpu_info_for_chip)

    chip = tpu_info.chip_version_from_device_kind(device_kind)
    if chip is None:
        return None
    # the table gives HBM per TensorCore; a megacore device (v4, v5p) is both cores of a chip
    cores = chip.num_physical_tensor_cores_per_chip if chip.supports_megacore else 1
    return tpu_info.get_tpu_info_for_chip(chip, cores).hbm_capacity_bytes * cores


def target_mesh(target: Target, spec: Mapping[str, int]) -> Mesh:
    """The mesh `spec` over the topology's devices, laid out topology-aware and split between its slices as
    `sharding.make_mesh` does (Auto axes)."""
    from jax.experimental import topologies

    try:
        shape = mesh_shape(spec, len(target.devices))
        devices = (multislice_grid(shape, target.devices) if target.slices > 1 else
                   topologies.make_mesh(topologies.TopologyDescription(list(target.devices)), shape, MESH_AXES).devices)
    except MeshError as e:
        raise MeshError(f"{e} on --target {target}") from None
    return Mesh(devices, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


# ----------------------------------------------------------------------------------------------------
# Compiling the step


@dataclasses.dataclass
class Compiled:
    """XLA's view of one device: bytes of arguments, outputs (aliased with donated arguments), temporaries."""

    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    flops: float  # per device
    lower_seconds: float
    compile_seconds: float

    @property
    def peak_bytes(self) -> int:
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes


def compile_step(config: Molmo2Config, mesh: Mesh, work: Workload,
                 train: TrainConfig | None = None) -> tuple[Compiled, dict[str, Any]]:
    """Lower and compile the real training step (`molmo2_jax.training.step`) on `mesh` from abstract shapes.
    Returns XLA's figures and the abstract (sharded) params, optimizer state, batch and (LoRA) frozen base it
    was compiled for."""
    check_config(config, mesh)
    _check_workload(config, mesh, work)
    ts = make_train_step(config, train or TrainConfig(), mesh)
    micro = abstract_batch(config, work)
    # one micro-batch per step: a leading accumulation axis of 1
    spec = {k: jax.ShapeDtypeStruct((1, *v.shape), v.dtype) for k, v in micro.items()}
    shardings = ts.batch_shardings(spec)
    spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shardings[k]) for k, v in spec.items()}
    state = ts.abstract_state()
    with ts.context():
        start = time.perf_counter()
        lowered = ts.jit_step(spec).lower(state, spec, ts.abstract_base())
        lowered_at = time.perf_counter()
        compiled = lowered.compile()
        done = time.perf_counter()
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    figures = Compiled(
        argument_bytes=int(mem.argument_size_in_bytes), output_bytes=int(mem.output_size_in_bytes),
        alias_bytes=int(mem.alias_size_in_bytes), temp_bytes=int(mem.temp_size_in_bytes),
        flops=float(cost.get("flops", 0.0)), lower_seconds=lowered_at - start, compile_seconds=done - lowered_at)
    return figures, {"params": state["params"], "opt_state": state["opt_state"], "batch": spec,
                     "base": ts.abstract_base()}


def _check_workload(config: Molmo2Config, mesh: Mesh, work: Workload) -> None:
    for flag, value, least in (("--batch", work.batch, 1), ("--seq", work.seq, 1), ("--crops", work.crops, 0),
                               ("--tokens", work.tokens, 0), ("--pool", work.pool, 1)):
        if value < least:
            raise MeshError(f"{flag} must be >= {least}, got {value}")
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if work.batch % shards:
        raise MeshError(f"--batch {work.batch} is not divisible by data x fsdp = {shards}")
    check_sequence(mesh, work.seq, "--seq")
    if work.tokens > work.seq:
        raise MeshError(f"--tokens {work.tokens} visual tokens do not fit in --seq {work.seq}")
    if work.seq > config.text.max_position_embeddings:
        raise MeshError(f"--seq {work.seq} exceeds the model's max_position_embeddings "
                        f"{config.text.max_position_embeddings}")


# ----------------------------------------------------------------------------------------------------
# The analytic estimate


def _nbytes(tree: Any) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs."""
    total = 0
    for leaf in jax.tree_util.tree_leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if getattr(leaf, "sharding", None) is not None else leaf.shape
        total += math.prod(shape) * jnp.dtype(leaf.dtype).itemsize
    return total


@dataclasses.dataclass
class Estimate:
    """Per-device bytes by category, from shapes, shardings and the remat policy."""

    params: int
    grads: int
    opt_state: int
    batch: int
    saved_activations: int  # kept across the layer loop for the backward pass
    layer_working_set: int  # one layer's recomputed activations and their gradients
    logits: int  # logits, their softmax and gradient (fp32); with a chunked loss one chunk's, plus the lse kept
    connector: int  # the ViT features it reads (fp32 copy) and their gradient (one call: its windows too), kept
    largest_gathered_layer: int  # one scanned layer's params gathered over fsdp (plus its gradient)

    @property
    def total(self) -> int:
        return sum(dataclasses.asdict(self).values())


def _attention_elements(config: Molmo2Config, batch: int, queries: int, keys: int, heads: int,
                        head_dim: int) -> list[tuple[int, str]]:
    """What one attention call of the path that runs materialises, as (elements, kind): dense: fp32 logits and
    softmax `[B, H, T, S]` and the boolean mask; blockwise: the log-sum-exp `[B, H, T]`, one tile pair's fp32
    logits, probabilities and (backward) their gradients, and the fp32 dQ accumulator."""
    if not uses_blockwise(config.attention, keys):
        return [(batch * heads * queries * keys * 2, "bdot32"), (batch * queries * keys, "mask")]
    tile = tile_size(queries, config.attention_block_q) * tile_size(keys, config.attention_block_kv)
    return [(batch * heads * queries, "bdot32"), (batch * heads * tile * 4, "tile32"),
            (batch * heads * queries * head_dim, "tile32")]


def _tiles(config: Molmo2Config, queries: int, keys: int, masked: bool) -> tuple[int, int]:
    """The blockwise path's tile rows (unmasked: the ViT, whose heads are not grouped)."""
    return tile_shape(queries, keys, 1, config.attention_block_q, config.attention_block_kv, masked)


def attention_pairs(config: Molmo2Config, length: int, visual: int | None) -> int:
    """(query, key) pairs one head's attention over a sequence of `length` computes: all `length**2` on the dense
    path; on the blockwise path the area of the tiles it visits (padded rows included). `visual=None`: no mask
    (ViT), every tile; else causal with the first `visual` tokens forming the bidirectional block (each query
    tile visits key tiles up to the last one holding an allowed pair)."""
    if not uses_blockwise(config.attention, length):
        return length * length
    bq, bk = _tiles(config, length, length, visual is not None)
    q_start = np.arange(0, length, bq)[:, None]
    k_start = np.arange(0, length, bk)[None, :]
    visited = np.ones((len(q_start), k_start.shape[1]), bool) if visual is None else (
        (k_start < q_start + bq) | ((q_start < visual) & (k_start < visual)))
    return int(visited.sum()) * bq * bk


def estimate(config: Molmo2Config, mesh: Mesh, work: Workload, abstract: Mapping[str, Any],
             loss_chunk_tokens: int = 0) -> Estimate:
    """What a careful FSDP/TP implementation needs per device; assumes XLA frees each layer's gathered weights
    and working set after use (the figures XLA reports should come close when it does). `loss_chunk_tokens`: the
    train config's (tokens per device of one chunk of the chunked loss; 0: the plain loss)."""
    t, v = config.text, config.vision
    act = jnp.dtype(config.dtype).itemsize
    batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    tensor, seq_shards = mesh.shape["tensor"], mesh.shape["sequence"]
    b = work.batch // batch_shards
    seq = work.seq // seq_shards
    h_l, kv_l, f_l = t.num_heads // tensor, t.num_kv_heads // tensor, t.intermediate_size // tensor
    d, hd, L = t.hidden_size, t.head_dim, t.num_layers

    # Decoder layer intermediates for the local batch: (elements, kind). "dot" = a matmul output without
    # batch dims in the contraction (Dense), "bdot" = attention einsums (batch dims), "other" = elementwise.
    tokens = b * seq
    full_t = b * work.seq  # keys/values all-gathered over `sequence` (context parallelism): the whole sequence
    layer = [
        (tokens * d, "other"), (tokens * d, "other"),  # norms
        (tokens * h_l * hd, "dot"), (full_t * kv_l * hd * 2, "dot"),  # q, k, v
        *_attention_elements(config, b, seq, work.seq, h_l, hd),
        (tokens * h_l * hd, "bdot"), (tokens * d, "dot"),  # attention output, o projection
        (tokens * f_l * 2, "dot"), (tokens * f_l, "other"), (tokens * d, "dot"),  # gate, up, silu*up, down
    ]
    elem_bytes = {"other": act, "dot": act, "bdot": act, "bdot32": 4, "mask": 1, "tile32": 4}
    layer_bytes = lambda kinds, items=layer: sum(n * elem_bytes[k] for n, k in items if k in kinds)
    carry = tokens * d * act
    policy = config.remat_policy
    # blockwise tiles live only inside the attention call (its VJP keeps the output and log-sum-exp)
    kept_kinds = {"none": set(elem_bytes) - {"tile32"}, "full": set(), "dots": {"dot", "bdot", "bdot32"},
                  "dots_no_batch": {"dot"}}[policy]
    saved = L * (carry + layer_bytes(kept_kinds))
    working = 2 * layer_bytes(set(elem_bytes))  # forward recompute + its gradients
    # ViT: crops on the batch axes and `sequence`; same structure, 729 tokens per crop, no mask. The block scan
    # carries (and saves per block) only the hidden state; its features are kept as the connector's copy (below).
    # With `vit_chunk`, a chunk's blocks live only while it is (re)computed.
    vit_crops = work.batch * work.crops  # split like the rules' act_crops (where the axes divide it)
    vit_crops //= axes_size(mesh, fitting_spec(mesh, ("act_crops",), (vit_crops,))[0])
    live = vit_crops if config.vit_chunk is None else min(vit_crops, config.vit_chunk)
    vh = v.num_heads // tensor
    vit_layer = live * v.num_patches * (v.hidden_size * 6 + vh * v.head_dim * 4 + v.intermediate_size // tensor
                                        * 2) * act \
        + 2 * layer_bytes(set(elem_bytes), _attention_elements(config, live, v.num_patches, v.num_patches, vh,
                                                               v.head_dim))
    vit_blocks = v.num_layers * (live * v.num_patches * v.hidden_size * act + (vit_layer if policy == "none" else 0))
    kept, connector_working = _connector_bytes(config, mesh, work, vit_crops)
    working = max(working, connector_working)
    if live == vit_crops:
        saved += vit_blocks
        working = max(working, 2 * vit_layer)
    else:
        working = max(working, vit_blocks + 2 * vit_layer)
    # fp32 logits, softmax and gradient of the device's tokens, or of one chunk plus the per-token lse it keeps
    logits = 3 * min(tokens, loss_chunk_tokens or tokens) * (t.vocab_size // tensor) * 4 \
        + (tokens * 4 if loss_chunk_tokens else 0)

    trained, base = _nbytes(abstract["params"]), abstract.get("base") or {}  # LoRA: adapters + frozen base
    # FSDP gathers a param's fsdp shards before use: one decoder layer's slice of the stacked params, or the
    # whole embedding / lm_head, whichever is larger (with its gradient, reduce-scattered afterwards).
    fsdp = mesh.shape["fsdp"]
    gathered_bytes = lambda leaf: _nbytes([leaf]) * (fsdp if "fsdp" in jax.tree_util.tree_leaves(
        tuple(leaf.sharding.spec)) else 1)
    flat = flatten(base or abstract["params"])
    layer = sum(gathered_bytes(x) // t.num_layers for p, x in flat.items() if p.startswith("decoder/layers/"))
    gathered = max(layer, gathered_bytes(flat["embedding"]), gathered_bytes(flat["lm_head"]))
    return Estimate(params=trained + _nbytes(base), grads=trained, opt_state=_nbytes(abstract["opt_state"]),
                    batch=_nbytes(abstract["batch"]), saved_activations=saved, layer_working_set=working,
                    logits=logits, connector=kept,
                    largest_gathered_layer=(1 if base else 2) * gathered if fsdp > 1 else 0)


def _connector_bytes(config: Molmo2Config, mesh: Mesh, work: Workload, vit_crops: int) -> tuple[int, int]:
    """(kept, working set) of the connector, per device, as XLA runs it. Its input, the rows' features
    `[rows, crops * 729, F * D]`, stays split like the ViT's crops (`vit_crops` per device). Kept across the
    decoder's backward: those features as the fp32 copy the window gather reads (this, not the ViT's
    compute-dtype output, is what stays for the backward) and the zeroed accumulator of their gradient (compute
    dtype). Per chunk of pooled tokens (`chunk_tokens`, split over the batch axes only; one chunk without
    `vit_chunk`): fp32 and compute-dtype windows, keys, values and the projector, which one call keeps for the
    backward and chunks recompute; their backward adds one chunk's gradient scattered into a dense fp32 copy of
    the features."""
    a, v, act = config.adapter, config.vision, jnp.dtype(config.dtype).itemsize
    rows = work.batch // (mesh.shape["data"] * mesh.shape["fsdp"])
    width = v.hidden_size * len(a.vit_layers)
    features = vit_crops * v.num_patches * width
    with activate(mesh):
        chunk = chunk_tokens(config, work.batch, work.pool)
    tokens = rows * min(work.tokens, chunk or work.tokens)
    heads = a.num_heads // mesh.shape["tensor"]
    windows = tokens * (work.pool * width * (4 + act) + width * act  # fp32 and masked windows, query
                        + heads * a.head_dim * (1 + 2 * work.pool) * act + heads * work.pool * 4 * 2  # q, k, v, attn
                        + (a.hidden_size + 3 * a.intermediate_size // mesh.shape["tensor"] + a.text_hidden_size)
                        * act)  # pooled, gate, up, silu * up, down
    kept = features * (4 + act) + (windows if chunk is None or work.tokens <= chunk else 0)
    return kept, 2 * windows + features * 4


# ----------------------------------------------------------------------------------------------------
# The report


def model_flops(config: Molmo2Config, work: Workload) -> float:
    """Forward + backward FLOPs of one step (2 per multiply-add, backward = 2x forward), without the forward
    recomputed under remat (nor the blockwise backward's recomputed logits): weight matmuls of the LLM, the
    connector and the ViT, plus both attentions over the (query, key) pairs the path that runs computes."""
    t, v = config.text, config.vision
    shapes = param_shapes(config)
    weights = lambda prefix: sum(math.prod(s) for p, s in shapes.items() if p.startswith(prefix) and p.endswith(
        "kernel"))
    tokens, crops = work.batch * work.seq, work.batch * work.crops
    llm = 2 * (weights("decoder") + t.hidden_size * t.vocab_size) * tokens \
        + 4 * t.num_layers * work.batch * attention_pairs(config, work.seq, work.tokens) * t.num_heads * t.head_dim
    vit = 2 * weights("vision") * crops * v.num_patches \
        + 4 * v.num_layers * crops * attention_pairs(config, v.num_patches, None) * v.num_heads * v.head_dim
    connector = 2 * weights("connector") * work.batch * work.tokens * (1 + work.pool)
    return 3.0 * (llm + vit + connector)


def plan(config: Molmo2Config, mesh: Mesh, work: Workload, train: TrainConfig | None = None,
         target: Target | None = None) -> dict[str, Any]:
    """Compile the step (of `train`, e.g. with a `lora` section) for `mesh`'s devices (simulated CPU devices or
    the topology of `target`) and estimate; everything per device unless named `total`. A step that overflows
    the target's HBM raises TargetError with TPU's figures."""
    try:
        figures, abstract = compile_step(config, mesh, work, train)
    except jax.errors.JaxRuntimeError as e:
        if target is None or "RESOURCE_EXHAUSTED" not in str(e):
            raise
        tpu_says = next(line for line in str(e).splitlines() if line.strip()).replace("RESOURCE_EXHAUSTED: ", "")
        raise TargetError(f"does not fit on {target}: {tpu_says}") from None
    chunk = train.loss_chunk_tokens if train is not None else 0
    return {"compiled": figures, "estimate": estimate(config, mesh, work, abstract, chunk),
            "num_params": sum(math.prod(s) for s in param_shapes(config).values()),
            "model_flops": model_flops(config, work), "devices": mesh.size, "target": target}


def _path(config: Molmo2Config, length: int, visual: int | None) -> str:
    if not uses_blockwise(config.attention, length):
        return "dense"
    if config.attention == "pallas" and visual is not None:
        from molmo2_jax.model.pallas_attention import tile_rows

        bq, bk = tile_rows(length, config.attention_block_q), tile_rows(length, config.attention_block_kv)
        return f"Pallas kernel ({bq} x {bk} tiles; memory and FLOPs counted as blockwise)"
    bq, bk = _tiles(config, length, length, visual is not None)
    return (f"blockwise ({bq} x {bk} tiles, {attention_pairs(config, length, visual) / length**2:.0%} of the "
            f"[T, S] square)")


def _loss_path(config: Molmo2Config, mesh: Mesh, work: Workload, train: TrainConfig | None) -> str:
    tokens = work.batch * work.seq // (mesh.shape["data"] * mesh.shape["fsdp"] * mesh.shape["sequence"])
    vocab = config.text.vocab_size // mesh.shape["tensor"]
    chunk = train.loss_chunk_tokens if train is not None else 0
    if not chunk:
        return f"plain (fp32 logits [{tokens:,}, {vocab:,}] per device)"
    return (f"chunked, {tokens // chunk} chunks of {chunk:,} tokens per device (fp32 logits [{chunk:,}, {vocab:,}] "
            f"each; the backward recomputes them: 2 x hidden x vocab FLOPs per token more than the model FLOPs)")


def format_report(name: str, config: Molmo2Config, mesh: Mesh, work: Workload, result: Mapping[str, Any],
                  train: TrainConfig | None = None) -> str:
    """XLA's figures next to the analytic estimate, in GiB per device."""
    c: Compiled = result["compiled"]
    e: Estimate = result["estimate"]
    v = config.vision
    g = lambda n: f"{n / GiB:8.2f}"
    temps = e.grads + e.saved_activations + e.layer_working_set + e.logits + e.connector + e.largest_gathered_layer
    lora = train.lora if train is not None and train.lora.enabled else None
    trained = (f"LoRA rank {lora.rank} on {lora.targets} (adapters float32, base frozen in {config.dtype})"
               if lora else "params float32")
    target: Target | None = result.get("target")
    who = "TPU" if target else "XLA"
    lines = [
        f"plan: {name} ({result['num_params']:,} params; compute {config.dtype}, {trained}, remat "
        f"{config.remat_policy}); mesh {describe_mesh(mesh)}"
        + (f", compiled for {target} ({mesh.devices.flat[0].device_kind}) by libtpu" if target else ""),
        f"  batch {work.batch} x seq {work.seq}; per sequence {work.crops} crops, {work.tokens} visual tokens "
        f"({work.pool} patches each)",
        f"  attention: decoder {_path(config, work.seq, work.tokens)}; ViT {_path(config, v.num_patches, None)}",
        f"  loss: {_loss_path(config, mesh, work, train)}",
        f"  lower {c.lower_seconds:.1f} s, compile {c.compile_seconds:.1f} s",
        "",
        f"per device, GiB        {who}  analytic",
        f"  arguments       {g(c.argument_bytes)}  {g(e.params + e.opt_state + e.batch)}  params {g(e.params).strip()}"
        f" + optimizer state {g(e.opt_state).strip()} + batch {g(e.batch).strip()}",
        f"  outputs         {g(c.output_bytes)}  {g(e.grads + e.opt_state)}  new state ({g(c.alias_bytes).strip()} "
        f"aliased to donated arguments)",
        f"  temporaries     {g(c.temp_bytes)}  {g(temps)}  grads {g(e.grads).strip()} + saved activations "
        f"{g(e.saved_activations).strip()} + one layer's working set {g(e.layer_working_set).strip()} + logits "
        f"{g(e.logits).strip()} + connector {g(e.connector).strip()} + gathered layer "
        f"{g(e.largest_gathered_layer).strip()}",
        f"  peak            {g(c.peak_bytes)}  {g(e.total)}",
        "",
        f"FLOPs per step: analytic {result['model_flops']:.3e} total, {result['model_flops'] / mesh.size:.3e} per "
        f"device; {who} {c.flops:.3e} per device (counts each scanned layer loop body once"
        + ("; Pallas kernels count only what they declare)" if target else ")"),
    ]
    if target and target.hbm_bytes:
        # the compiler's own check (an error when it fails) can pass a step whose reported peak exceeds HBM
        verdict = "fits" if c.peak_bytes <= target.hbm_bytes else "over HBM (compiled, but treat as not fitting)"
        lines.append(f"{verdict}: {who} peak {c.peak_bytes / GiB:.2f} GiB of {target.hbm_bytes / GiB:.2f} GiB HBM "
                     f"per device ({c.peak_bytes / target.hbm_bytes:.0%})")
    if crossing := fsdp_across_slices(mesh.devices):
        lines.append(crossing)
    ratio = c.peak_bytes / max(e.total, 1)
    if not 0.67 <= ratio <= 1.5:
        lines.append(f"warning: {who}'s peak is {ratio:.2f}x the analytic estimate; read docs/plan.md before "
                     "trusting either")
    return "\n".join(lines)


__all__ = ["Compiled", "Estimate", "Target", "TargetError", "Workload", "abstract_batch", "attention_pairs",
           "compile_step", "estimate", "format_report", "model_flops", "plan", "target_mesh", "tpu_target"]
