"""Starting points for training: a fresh Molmo2 assembled from a Hugging Face LLM (Qwen3ForCausalLM or
Olmo3ForCausalLM) and a SigLIP vision tower (SiglipVisionModel / SiglipModel, which also hold the fixed-
resolution SigLIP2 checkpoints such as siglip2-so400m-patch14-384, or a NaFlex Siglip2VisionModel whose
position table is resized to the 27x27 grid), as pretraining starts; or a converted / released Molmo2
checkpoint, as SFT starts.

The tables below use the format of checkpoint/table.py. The connector and the extra input-embedding rows of
the image/video tokens have no source and keep their random init. SigLIP's post-layernorm, pooling head and
blocks past the deepest feature layer are not part of Molmo2 and are skipped.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from molmo2_jax.checkpoint.hf import CheckpointError, TensorSource, import_rules
from molmo2_jax.checkpoint.table import Rule
from molmo2_jax.config import Molmo2Config

# -- tables --------------------------------------------------------------------------------------------------


def _layer(hf: str, param: str, **kw) -> Rule:
    return Rule((f"model.layers.{{i}}.{hf}",), (f"decoder/layers/{param}",), layers="text", **kw)


def _llm_table(attn_norm: str, ff_norm: str) -> tuple[Rule, ...]:
    return (
        Rule(("model.embed_tokens.weight",), ("embedding",), linear=False, matrix=True),
        Rule(("model.norm.weight",), ("decoder/final_norm/scale",), linear=False),
        _layer(f"{attn_norm}.weight", "attn_norm/scale", linear=False),
        _layer(f"{ff_norm}.weight", "ff_norm/scale", linear=False),
        *[_layer(f"self_attn.{p}_proj.weight", f"{p}/kernel") for p in "qkv"],
        _layer("self_attn.o_proj.weight", "o/kernel", in_dims=2),
        _layer("self_attn.q_norm.weight", "q_norm/scale", linear=False),
        _layer("self_attn.k_norm.weight", "k_norm/scale", linear=False),
        *[_layer(f"mlp.{p}_proj.weight", f"{p}/kernel") for p in ("gate", "up", "down")],
    )


LM_HEAD = Rule(("lm_head.weight",), ("lm_head",))
TIED_LM_HEAD = Rule(("model.embed_tokens.weight",), ("lm_head",))
# Qwen3: pre-norm (input_layernorm before attention); Olmo3: post-norm (norms on the sub-layer outputs).
QWEN3 = _llm_table("input_layernorm", "post_attention_layernorm")
OLMO3 = _llm_table("post_attention_layernorm", "post_feedforward_layernorm")


def siglip_table(prefix: str) -> tuple[Rule, ...]:
    """SigLIP vision tower names under `prefix` ("vision_model." in SiglipModel files, maybe "" otherwise)."""
    def block(hf: str, param: str, **kw) -> Rule:
        return Rule((f"{prefix}encoder.layers.{{i}}.{hf}",), (f"vision/blocks/{param}",), layers="vision", **kw)

    attention = (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("o", "out_proj"))
    return (
        Rule((f"{prefix}embeddings.patch_embedding.weight",), ("vision/patch_embed/kernel",)),
        Rule((f"{prefix}embeddings.patch_embedding.bias",), ("vision/patch_embed/bias",), linear=False),
        Rule((f"{prefix}embeddings.position_embedding.weight",), ("vision/pos_embed",), linear=False,
             matrix=True),
        *[block(f"self_attn.{theirs}.weight", f"{ours}/kernel", in_dims=2 if ours == "o" else 1)
          for ours, theirs in attention],
        *[block(f"self_attn.{theirs}.bias", f"{ours}/bias", linear=False) for ours, theirs in attention],
        *[block(f"{theirs}.{w}", f"{ours}/{p}", linear=False)
          for ours, theirs in (("ln1", "layer_norm1"), ("ln2", "layer_norm2"))
          for w, p in (("weight", "scale"), ("bias", "bias"))],
        *[block(f"mlp.{fc}.weight", f"{fc}/kernel") for fc in ("fc1", "fc2")],
        *[block(f"mlp.{fc}.bias", f"{fc}/bias", linear=False) for fc in ("fc1", "fc2")],
    )


def siglip_unused(prefix: str, num_layers: int) -> Callable[[str], bool]:
    """SigLIP tensors Molmo2 has no place for: post-layernorm, pooling head, blocks past the deepest feature
    layer, and the text tower of a full SiglipModel."""
    p = re.escape(prefix)
    fixed = re.compile(rf"{p}(post_layernorm|head)\..*|{p}embeddings\.position_ids|text_model\..*|logit_(scale|bias)")
    block = re.compile(rf"{p}encoder\.layers\.(\d+)\.")

    def unused(name: str) -> bool:
        m = block.match(name)
        return bool(fixed.fullmatch(name)) or (m is not None and int(m.group(1)) >= num_layers)
    return unused


def _patch_to_dense(weight: np.ndarray) -> np.ndarray:
    """SigLIP's Conv2d kernel `[D, 3, p, p]` -> `[D, p*p*3]` in our patch vector order (row, column, channel).
    SigLIP2's Linear `[D, p*p*3]` already uses that order and passes through."""
    if weight.ndim != 4:
        return weight
    return weight.transpose(0, 2, 3, 1).reshape(weight.shape[0], -1)


def _resize_axis(size_in: int, size_out: int) -> np.ndarray:
    """`[out, in]` weights of a 1-D linear resize with half-pixel centres; when shrinking, the triangle filter
    widens by the scale (antialiasing), as the SigLIP2 reference resizes its position table."""
    scale = size_in / size_out
    support = max(scale, 1.0)
    center = (np.arange(size_out, dtype=np.float64) + 0.5) * scale - 0.5
    w = np.clip(1 - np.abs(np.arange(size_in)[None] - center[:, None]) / support, 0, None)
    return w / w.sum(-1, keepdims=True)


def _position_table(side: int) -> Callable[[np.ndarray], np.ndarray]:
    """SigLIP2 (NaFlex) learns a g x g position table and resizes it to each image's patch grid; ours is the
    table resized once to the fixed `side x side` grid. A table of the right size passes through."""
    def resize(table: np.ndarray) -> np.ndarray:
        grid = int(round(table.shape[0] ** 0.5))
        if table.shape[0] == side * side or grid * grid != table.shape[0]:
            return table
        rows, cols = _resize_axis(grid, side), _resize_axis(grid, side)
        square = table.reshape(grid, grid, -1).astype(np.float64)
        return np.einsum("ri,cj,ijd->rcd", rows, cols, square).reshape(side * side, -1).astype(table.dtype)
    return resize


# -- reading ------------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    file = path / "config.json"
    if not file.is_file():
        raise CheckpointError(f"{path}: not a Hugging Face checkpoint (no config.json)")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from None


# -- configs ------------------------------------------------------------------------------------------------

LLM_FAMILIES = {"qwen3": ("qwen3", False, QWEN3), "olmo3": ("olmo", True, OLMO3)}


def llm_family(hf: dict[str, Any], src: Path) -> str:
    family = hf.get("model_type")
    if family not in LLM_FAMILIES:
        raise CheckpointError(f"{src}: LLM model_type {family!r} is not supported; expected one of "
                              f"{sorted(LLM_FAMILIES)} (Qwen3ForCausalLM / Olmo3ForCausalLM)")
    return family


def starting_config(base: Molmo2Config, llm_dir: str | Path, vit_dir: str | Path) -> Molmo2Config:
    """`base` (a Molmo2 preset: tokens, adapter, RoPE scaling layout) with the LLM's and the vision tower's
    architecture taken from their `config.json` files."""
    llm_dir, vit_dir = Path(llm_dir), Path(vit_dir)
    hf = _read_json(llm_dir)
    qk_norm_type, norm_after, _ = LLM_FAMILIES[llm_family(hf, llm_dir)]
    heads = hf["num_attention_heads"]
    rope = hf.get("rope_parameters") or {}
    rope = rope.get("full_attention", rope)  # Olmo3 keeps one entry per attention type
    text = dataclasses.replace(
        base.text, hidden_size=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"], num_heads=heads, num_kv_heads=hf.get("num_key_value_heads", heads),
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads, vocab_size=hf["vocab_size"],
        qk_norm_type=qk_norm_type, norm_after=norm_after, qkv_bias=bool(hf.get("attention_bias", False)),
        layer_norm_eps=hf.get("rms_norm_eps", base.text.layer_norm_eps),
        rope_theta=float(hf.get("rope_theta", rope.get("rope_theta", base.text.rope_theta))))
    vit = _read_json(vit_dir)
    vit = vit.get("vision_config", vit)  # a full SiglipModel config nests the vision part
    patch = vit.get("patch_size", 14)
    vision = dataclasses.replace(
        base.vision, hidden_size=vit["hidden_size"], intermediate_size=vit["intermediate_size"],
        num_heads=vit["num_attention_heads"], head_dim=vit["hidden_size"] // vit["num_attention_heads"],
        patch_size=patch, image_size=(vit.get("image_size", base.vision.image_size) // patch) * patch,
        layer_norm_eps=vit.get("layer_norm_eps", base.vision.layer_norm_eps))
    if vit.get("num_hidden_layers", vision.num_layers) < vision.num_layers:
        raise CheckpointError(f"{vit_dir}: has {vit['num_hidden_layers']} layers; the model needs "
                              f"{vision.num_layers} (adapter.vit_layers {base.adapter.vit_layers})")
    extra = (base.tokens.image_start, base.tokens.video_prompt)
    if not text.vocab_size <= min(extra) <= max(extra) < text.embedding_rows:
        raise CheckpointError(f"{llm_dir}: vocab_size {text.vocab_size} does not fit the preset's image/video "
                              f"token ids {extra[0]}..{extra[1]} (expected right after the base vocabulary); use a "
                              f"preset made for this LLM")
    adapter = dataclasses.replace(base.adapter, hidden_size=vision.hidden_size, text_hidden_size=text.hidden_size)
    return base.replace(text=text, vision=vision, adapter=adapter)


# -- starting points --------------------------------------------------------------------------------------------


def params_from_llm_vit(config: Molmo2Config, llm_dir: str | Path, vit_dir: str | Path,
                        random_params: dict[str, Any], shapes: dict[str, tuple[int, ...]],
                        place: Callable[[str, np.ndarray], Any] = lambda path, x: x) -> dict[str, Any]:
    """Flat params: the LLM and the ViT imported (each handed to `place` as soon as it is read), the rest
    (connector, extra embedding rows) from `random_params` (flat, e.g. `flatten(init_params(config))`)."""
    llm_dir, vit_dir = Path(llm_dir), Path(vit_dir)
    hf = _read_json(llm_dir)
    _, _, table = LLM_FAMILIES[llm_family(hf, llm_dir)]
    t = config.text
    llm = TensorSource(llm_dir)
    tied = "lm_head.weight" not in llm.names()
    llm_shapes = dict(shapes, embedding=(t.vocab_size, t.hidden_size))
    out = dict(random_params)
    placed = lambda path, x: x if path == "embedding" else place(path, x)
    out.update(import_rules(llm, table + ((TIED_LM_HEAD,) if tied else (LM_HEAD,)), config, llm_shapes,
                            place=placed))
    # rows of the image/video tokens keep their random init
    extra = np.asarray(random_params["embedding"][t.vocab_size:], np.float32)
    out["embedding"] = place("embedding", np.concatenate([out["embedding"], extra]))
    # The tower's names start with "vision_model." in SiglipModel files and may not in SiglipVisionModel ones.
    anchor = "embeddings.patch_embedding.weight"
    vit = TensorSource(vit_dir)
    prefix = next((n[:-len(anchor)] for n in sorted(vit.names()) if n.endswith(anchor)), "")
    out.update(import_rules(vit, siglip_table(prefix), config, shapes,
                            unused=siglip_unused(prefix, config.vision.num_layers),
                            transforms={"vision/patch_embed/kernel": _patch_to_dense,
                                        "vision/pos_embed": _position_table(config.vision.patches_per_side)},
                            place=place))
    return out
