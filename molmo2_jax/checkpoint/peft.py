"""LoRA adapters <-> PEFT adapter directories (`adapter_config.json` + `adapter_model.safetensors`).

Module names are those of transformers' `Molmo2ForConditionalGeneration`, derived from the transformers-native
rules of the conversion table (one HF linear per kernel): our `decoder/layers/q/kernel` slice i is
`model.language_model.layers.{i}.self_attn.q_proj`. PEFT computes `x @ (B_t @ A_t).T * scale` with
`A_t [r, in]`, `B_t [out, r]`; ours is `x @ a @ b * scale` with `a [*in, r]`, `b [r, *out]`, so
`A_t = a.reshape(in, r).T` and `B_t = b.reshape(r, out).T`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from molmo2_jax.checkpoint.formats import TRAINING, Checkpoint, open_checkpoint, restore_step_params
from molmo2_jax.checkpoint.hf import CheckpointError
from molmo2_jax.checkpoint.table import NATIVE, Rule, active_rules, layer_count
from molmo2_jax.config import Molmo2Config
from molmo2_jax.lora import LoraConfig
from molmo2_jax.params import flatten, param_shapes, unflatten

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."


def linear_modules(config: Molmo2Config) -> dict[str, Rule]:
    """`{our Dense path ("decoder/layers/q"): its native rule}` for every linear layer with one HF tensor."""
    return {r.params[0].removesuffix("/kernel"): r for r in active_rules(NATIVE, config)
            if r.linear and len(r.params) == 1 and r.params[0].endswith("/kernel")}


def _module_name(rule: Rule, i: int | None) -> str:
    return rule.hf[0].removesuffix(".weight").format(i=i)


def _sizes(shape: tuple[int, ...], rule: Rule, stacked: bool) -> tuple[int, int]:
    dims = shape[1:] if stacked else shape
    return math.prod(dims[:rule.in_dims]), math.prod(dims[rule.in_dims:])


def export_adapter(adapters: Mapping[str, Any], model_config: Molmo2Config, config: LoraConfig, dst: str | Path,
                   base_model: str = "") -> list[str]:
    """Write `adapters` (our tree) as a PEFT LoRA adapter directory; returns the adapted module names."""
    dst = Path(dst)
    modules, flat, tensors = linear_modules(model_config), flatten(adapters), {}
    for path in sorted({p.rsplit("/", 1)[0] for p in flat}):
        rule = modules[path]
        a, b = np.asarray(flat[f"{path}/lora_a"], np.float32), np.asarray(flat[f"{path}/lora_b"], np.float32)
        n = layer_count(rule, model_config)
        for i in range(n) if n is not None else [None]:
            ai, bi = (a, b) if i is None else (a[i], b[i])
            name = PREFIX + _module_name(rule, i)
            tensors[f"{name}.lora_A.weight"] = np.ascontiguousarray(ai.reshape(-1, config.rank).T)
            tensors[f"{name}.lora_B.weight"] = np.ascontiguousarray(bi.reshape(config.rank, -1).T)
    names = sorted({k.removeprefix(PREFIX).rsplit(".lora_", 1)[0] for k in tensors})
    peft_config = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model, "inference_mode": True,
        "r": config.rank, "lora_alpha": config.alpha, "lora_dropout": config.dropout,
        "use_rslora": config.rslora, "target_modules": names, "bias": "none", "fan_in_fan_out": False,
        "init_lora_weights": True, "modules_to_save": None, "use_dora": False,
    }
    dst.mkdir(parents=True, exist_ok=True)
    tmp = dst / f".{WEIGHTS_FILE}.tmp"
    save_file(tensors, tmp, metadata={"format": "pt"})
    tmp.replace(dst / WEIGHTS_FILE)
    (dst / CONFIG_FILE).write_text(json.dumps(peft_config, indent=2) + "\n")
    return names


def read_adapter(src: str | Path, model_config: Molmo2Config) -> tuple[LoraConfig, dict[str, Any]]:
    """A PEFT LoRA adapter directory -> (our LoraConfig, adapter tree in fp32). Layers of a stacked module that
    the adapter leaves out get zero adapters (no change). Raises CheckpointError naming the first problems: an
    unsupported PEFT option, a module that is not a Molmo2 linear layer, or shapes that do not fit this model."""
    src = Path(src)
    try:
        peft = json.loads((src / CONFIG_FILE).read_text())
        tensors = load_file(src / WEIGHTS_FILE)
    except (OSError, json.JSONDecodeError, SafetensorError) as e:
        raise CheckpointError(f"{src}: not a PEFT adapter directory ({CONFIG_FILE} + {WEIGHTS_FILE}): {e}") from None
    unsupported = [k for k in ("use_dora", "rank_pattern", "alpha_pattern", "modules_to_save") if peft.get(k)]
    if peft.get("peft_type") != "LORA" or unsupported or peft.get("bias", "none") != "none":
        raise CheckpointError(f"{src}: only plain LoRA adapters are supported (peft_type {peft.get('peft_type')}, "
                              f"bias {peft.get('bias')}, options {unsupported})")
    rank = int(peft["r"])
    by_name = {}
    for path, rule in linear_modules(model_config).items():
        n = layer_count(rule, model_config)
        for i in range(n) if n is not None else [None]:
            by_name[_module_name(rule, i)] = (path, rule, i)
    shapes = param_shapes(model_config)
    found: dict[str, dict[int | None, tuple[np.ndarray, np.ndarray]]] = {}
    problems = []
    for key in sorted(k for k in tensors if k.endswith(".lora_A.weight")):
        name = re.sub(r"^base_model\.model\.", "", key).removesuffix(".lora_A.weight")
        if name not in by_name:
            problems.append(f"{name} is not a linear layer of this Molmo2 model")
            continue
        path, rule, i = by_name[name]
        a_t, b_t = tensors[key], tensors.get(key.replace(".lora_A.", ".lora_B."))
        n_in, n_out = _sizes(shapes[f"{path}/kernel"], rule, i is not None)
        if b_t is None or a_t.shape != (rank, n_in) or b_t.shape != (n_out, rank):
            problems.append(f"{name}: lora_A {list(a_t.shape)} / lora_B {None if b_t is None else list(b_t.shape)}, "
                            f"this model needs [{rank}, {n_in}] / [{n_out}, {rank}]")
            continue
        found.setdefault(path, {})[i] = (a_t, b_t)
    if not found and not problems:
        problems.append("no lora_A / lora_B tensors")
    if problems:
        raise CheckpointError(f"{src}: adapter does not fit this base model ({len(problems)} problem(s)): "
                              + "; ".join(problems[:3]))
    modules, flat = linear_modules(model_config), {}
    for path, slices in found.items():
        kernel, rule = shapes[f"{path}/kernel"], modules[path]
        layers = kernel[:1] if layer_count(rule, model_config) is not None else ()
        in_dims, out_dims = kernel[len(layers):len(layers) + rule.in_dims], kernel[len(layers) + rule.in_dims:]
        a = np.zeros((*layers, *in_dims, rank), np.float32)  # layers the adapter leaves out: zero (no change)
        b = np.zeros((*layers, rank, *out_dims), np.float32)
        for i, (a_t, b_t) in slices.items():
            index = () if i is None else (i,)
            a[index] = a_t.T.reshape(*in_dims, rank)
            b[index] = b_t.T.reshape(rank, *out_dims)
        flat[f"{path}/lora_a"], flat[f"{path}/lora_b"] = a, b
    targets = "|".join(re.escape(f"{p}/kernel") for p in sorted(found))
    config = LoraConfig(rank=rank, alpha=float(peft["lora_alpha"]), dropout=float(peft.get("lora_dropout") or 0.0),
                        rslora=bool(peft.get("use_rslora")), targets=targets)
    return config, unflatten(flat)


def import_adapter(src: str | Path, model_config: Molmo2Config, config: LoraConfig) -> dict[str, Any]:
    """The adapters of a PEFT directory to continue training with `config` (same rank and scaling)."""
    found, adapters = read_adapter(src, model_config)
    if (found.rank, found.alpha, found.rslora) != (config.rank, config.alpha, config.rslora):
        raise CheckpointError(f"{src}: adapter has rank {found.rank}, alpha {found.alpha}, rslora {found.rslora}; "
                              f"the lora section says {config.rank}, {config.alpha}, {config.rslora}")
    return adapters


def export_merged(base: str | Path, adapter: str | Path, dst: str | Path, **export_args) -> list[str]:
    """The base with the adapter merged into its kernels, written in the released layout by the existing export
    path (`export.export_to_hf`, through a temporary converted checkpoint beside `dst`; `export_args` go to it)."""
    import tempfile

    from molmo2_jax.checkpoint import converted
    from molmo2_jax.checkpoint.export import export_to_hf
    from molmo2_jax.lora import merge

    converted.prepare_destination(Path(dst).absolute(), export_args.get("overwrite", False))  # before the work
    checkpoint = open_checkpoint(base)
    lora_config, adapters = read_adapter(adapter, checkpoint.config)  # checked before the base is read
    params = merge(checkpoint.read_params(checkpoint.config), adapters, lora_config)
    with tempfile.TemporaryDirectory(dir=Path(dst).absolute().parent, prefix=".merged-") as tmp:
        (Path(tmp) / "jax").mkdir()
        converted.save(Path(tmp) / "jax", checkpoint.config, params)
        return export_to_hf(Path(tmp) / "jax", dst, side_files_from=base, **export_args)


def lora_run(src: str | Path, step: int | None = None) -> tuple[Checkpoint, LoraConfig, dict[str, Any]] | None:
    """(checkpoint, LoRA config, saved train config) of a LoRA training run or step; None for any other
    checkpoint."""
    from molmo2_jax.config import from_dict

    checkpoint = open_checkpoint(src, step)
    if checkpoint.kind != TRAINING:
        return None
    train = checkpoint.train_config or {}
    lora = from_dict(LoraConfig, train.get("lora"), "lora.")
    return (checkpoint, lora, train) if lora.enabled else None


def _required_lora_run(src: str | Path, step: int | None) -> tuple[Checkpoint, LoraConfig, dict[str, Any]]:
    run = lora_run(src, step)
    if run is None:
        raise CheckpointError(f"{src}: not a LoRA training run or step (a run whose lora.rank is above 0)")
    return run


def export_run_adapter(src: str | Path, dst: str | Path, step: int | None = None) -> list[str]:
    """The adapters of a LoRA training run (its latest or given step) as a PEFT adapter directory."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from molmo2_jax.lora import abstract_adapters

    checkpoint, lora_config, train = _required_lora_run(src, step)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])  # adapters are trained (and saved) in fp32
    abstract = jax.tree_util.tree_map(lambda box: jax.ShapeDtypeStruct(box.value.shape, jnp.float32, sharding=device),
                                      abstract_adapters(checkpoint.config, lora_config),
                                      is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    adapters = restore_step_params(checkpoint.path, abstract)
    return export_adapter(adapters, checkpoint.config, lora_config, dst, base_model=_base_of(train) or "")


def _base_of(train: dict[str, Any]) -> str | None:
    """The checkpoint a training run started from (its `init.checkpoint`)."""
    return (train.get("init") or {}).get("checkpoint")


def export_run_merged(src: str | Path, dst: str | Path, step: int | None = None, **export_args) -> list[str]:
    """A LoRA run's adapters merged into the base it trained on (its `init.checkpoint`), in the released layout."""
    import tempfile

    checkpoint, _, train = _required_lora_run(src, step)
    if not _base_of(train):
        raise CheckpointError(f"{checkpoint.path}: the run has no init.checkpoint to merge its adapters into; export "
                              "the adapter alone (--adapter-only)")
    with tempfile.TemporaryDirectory(dir=Path(dst).absolute().parent, prefix=".adapter-") as adapter:
        export_run_adapter(checkpoint.path, adapter)
        return export_merged(_base_of(train), adapter, dst, **export_args)
