"""The one declarative table between Hugging Face Molmo2 tensor names and our param tree.

A rule joins one or more HF tensors (concatenated along rows, PyTorch `[out, in]` layout) to one or more of
our params (that matrix split along its rows). `linear` rules transpose to `[in, out]` and reshape to the
param's head-split shape; `plain` rules only reshape. Per-layer rules carry `{i}` in their HF names and fill
one slice of a param stacked on a leading layer axis. The same rules drive import and export.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from molmo2_jax.config import Molmo2Config

Sizes = Callable[[Molmo2Config], tuple[int, ...]]


@dataclasses.dataclass(frozen=True)
class Rule:
    hf: tuple[str, ...]  # HF tensor names, concatenated along rows
    params: tuple[str, ...]  # our param paths ("decoder/layers/q/kernel"), split along those rows
    linear: bool = True  # [out, in] <-> [in..., out...]; else a plain reshape
    in_dims: int = 1  # how many leading dims of the param form the "in" side (2 for [heads, head_dim, out])
    matrix: bool = False  # a plain 2-D table kept as is (else plain tensors are flat vectors in HF files)
    param_rows: Sizes | None = None  # row sizes of each param (when several)
    hf_rows: Sizes | None = None  # row sizes of each HF tensor on export (when several)
    layers: str | None = None  # "text" or "vision": one slice per layer, names carry {i}
    optional: Callable[[Molmo2Config], bool] | None = None  # rule applies only when this is true


def _text(rule_hf: tuple[str, ...], params: tuple[str, ...], **kw) -> Rule:
    return Rule(rule_hf, tuple(f"decoder/layers/{p}" for p in params), layers="text", **kw)


def _vit(rule_hf: tuple[str, ...], params: tuple[str, ...], **kw) -> Rule:
    return Rule(rule_hf, tuple(f"vision/blocks/{p}" for p in params), layers="vision", **kw)


def _qkv_rows(c: Molmo2Config) -> tuple[int, ...]:
    t = c.text
    return t.num_heads * t.head_dim, t.num_kv_heads * t.head_dim, t.num_kv_heads * t.head_dim


def _mlp_rows(c: Molmo2Config) -> tuple[int, ...]:
    return c.text.intermediate_size, c.text.intermediate_size


def _embedding_rows(c: Molmo2Config) -> tuple[int, ...]:
    return c.text.vocab_size, c.text.additional_vocab_size


def _has_qkv_bias(c: Molmo2Config) -> bool:
    return c.text.qkv_bias


def _vit_attention(prefix: str, names: dict[str, str]) -> list[Rule]:
    rules = []
    for ours, theirs in names.items():
        in_dims = 2 if ours == "o" else 1
        rules.append(Rule((f"{prefix}.{theirs}.weight",), (f"{ours}/kernel",), in_dims=in_dims))
        rules.append(Rule((f"{prefix}.{theirs}.bias",), (f"{ours}/bias",), linear=False))
    return rules


def _per_layer(rules: list[Rule], make: Callable[..., Rule]) -> list[Rule]:
    return [make(r.hf, r.params, linear=r.linear, in_dims=r.in_dims) for r in rules]


# -- the released (hub) layout ------------------------------------------------------------------------

_VIT = "model.vision_backbone.image_vit"
_POOL = "model.vision_backbone.image_pooling_2d"
_PROJ = "model.vision_backbone.image_projector"
_LLM = "model.transformer"

RELEASED: tuple[Rule, ...] = (
    Rule(("lm_head.weight",), ("lm_head",)),
    Rule((f"{_LLM}.wte.embedding", f"{_LLM}.wte.new_embedding"), ("embedding",), linear=False, matrix=True,
         hf_rows=_embedding_rows),
    Rule((f"{_LLM}.ln_f.weight",), ("decoder/final_norm/scale",), linear=False),
    _text((f"{_LLM}.blocks.{{i}}.attn_norm.weight",), ("attn_norm/scale",), linear=False),
    _text((f"{_LLM}.blocks.{{i}}.ff_norm.weight",), ("ff_norm/scale",), linear=False),
    _text((f"{_LLM}.blocks.{{i}}.self_attn.att_proj.weight",), ("q/kernel", "k/kernel", "v/kernel"),
          param_rows=_qkv_rows),
    _text((f"{_LLM}.blocks.{{i}}.self_attn.att_proj.bias",), ("q/bias", "k/bias", "v/bias"), linear=False,
          param_rows=_qkv_rows, optional=_has_qkv_bias),
    _text((f"{_LLM}.blocks.{{i}}.self_attn.attn_out.weight",), ("o/kernel",), in_dims=2),
    _text((f"{_LLM}.blocks.{{i}}.self_attn.q_norm.weight",), ("q_norm/scale",), linear=False),
    _text((f"{_LLM}.blocks.{{i}}.self_attn.k_norm.weight",), ("k_norm/scale",), linear=False),
    # ff_proj rows are [up; gate] (the opposite of the common order)
    _text((f"{_LLM}.blocks.{{i}}.mlp.ff_proj.weight",), ("up/kernel", "gate/kernel"), param_rows=_mlp_rows),
    _text((f"{_LLM}.blocks.{{i}}.mlp.ff_out.weight",), ("down/kernel",)),
    Rule((f"{_VIT}.patch_embedding.weight",), ("vision/patch_embed/kernel",)),
    Rule((f"{_VIT}.patch_embedding.bias",), ("vision/patch_embed/bias",), linear=False),
    Rule((f"{_VIT}.positional_embedding",), ("vision/pos_embed",), linear=False, matrix=True),
    *_per_layer(_vit_attention(f"{_VIT}.transformer.resblocks.{{i}}.attention",
                               {"q": "wq", "k": "wk", "v": "wv", "o": "wo"}), _vit),
    _vit((f"{_VIT}.transformer.resblocks.{{i}}.attention_norm.weight",), ("ln1/scale",), linear=False),
    _vit((f"{_VIT}.transformer.resblocks.{{i}}.attention_norm.bias",), ("ln1/bias",), linear=False),
    _vit((f"{_VIT}.transformer.resblocks.{{i}}.ffn_norm.weight",), ("ln2/scale",), linear=False),
    _vit((f"{_VIT}.transformer.resblocks.{{i}}.ffn_norm.bias",), ("ln2/bias",), linear=False),
    _vit((f"{_VIT}.transformer.resblocks.{{i}}.feed_forward.w1.weight",), ("fc1/kernel",)),
    _vit((f"{_VIT}.transformer.resblocks.{{i}}.feed_forward.w1.bias",), ("fc1/bias",), linear=False),
    _vit((f"{_VIT}.transformer.resblocks.{{i}}.feed_forward.w2.weight",), ("fc2/kernel",)),
    _vit((f"{_VIT}.transformer.resblocks.{{i}}.feed_forward.w2.bias",), ("fc2/bias",), linear=False),
    *[dataclasses.replace(r, params=tuple(f"connector/{p}" for p in r.params))
      for r in _vit_attention(_POOL, {"q": "wq", "k": "wk", "v": "wv", "o": "wo"})],
    Rule((f"{_PROJ}.w1.weight",), ("connector/gate/kernel",)),
    Rule((f"{_PROJ}.w3.weight",), ("connector/up/kernel",)),
    Rule((f"{_PROJ}.w2.weight",), ("connector/down/kernel",)),
)

# -- the transformers-native layout (import only) -------------------------------------------------------

_NVIT = "model.vision_tower"
_NADP = "model.multi_modal_projector"
_NLLM = "model.language_model"

NATIVE: tuple[Rule, ...] = (
    Rule(("lm_head.weight",), ("lm_head",)),
    Rule((f"{_NLLM}.embed_tokens.weight",), ("embedding",), linear=False, matrix=True),
    Rule((f"{_NLLM}.norm.weight",), ("decoder/final_norm/scale",), linear=False),
    _text((f"{_NLLM}.layers.{{i}}.input_layernorm.weight",), ("attn_norm/scale",), linear=False),
    _text((f"{_NLLM}.layers.{{i}}.post_attention_layernorm.weight",), ("ff_norm/scale",), linear=False),
    *[_text((f"{_NLLM}.layers.{{i}}.self_attn.{p}_proj.weight",), (f"{p}/kernel",)) for p in "qkv"],
    *[_text((f"{_NLLM}.layers.{{i}}.self_attn.{p}_proj.bias",), (f"{p}/bias",), linear=False,
            optional=_has_qkv_bias) for p in "qkv"],
    _text((f"{_NLLM}.layers.{{i}}.self_attn.o_proj.weight",), ("o/kernel",), in_dims=2),
    _text((f"{_NLLM}.layers.{{i}}.self_attn.q_norm.weight",), ("q_norm/scale",), linear=False),
    _text((f"{_NLLM}.layers.{{i}}.self_attn.k_norm.weight",), ("k_norm/scale",), linear=False),
    *[_text((f"{_NLLM}.layers.{{i}}.mlp.{p}_proj.weight",), (f"{p}/kernel",)) for p in ("gate", "up", "down")],
    Rule((f"{_NVIT}.patch_embedding.weight",), ("vision/patch_embed/kernel",)),
    Rule((f"{_NVIT}.patch_embedding.bias",), ("vision/patch_embed/bias",), linear=False),
    Rule((f"{_NVIT}.positional_embedding",), ("vision/pos_embed",), linear=False, matrix=True),
    *_per_layer(_vit_attention(f"{_NVIT}.layers.{{i}}.self_attn",
                               {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"}), _vit),
    *[_vit((f"{_NVIT}.layers.{{i}}.{theirs}.{w}",), (f"{ours}/{p}",), linear=False)
      for ours, theirs in (("ln1", "layer_norm1"), ("ln2", "layer_norm2"))
      for w, p in (("weight", "scale"), ("bias", "bias"))],
    *[_vit((f"{_NVIT}.layers.{{i}}.mlp.{fc}.weight",), (f"{fc}/kernel",)) for fc in ("fc1", "fc2")],
    *[_vit((f"{_NVIT}.layers.{{i}}.mlp.{fc}.bias",), (f"{fc}/bias",), linear=False) for fc in ("fc1", "fc2")],
    *[dataclasses.replace(r, params=tuple(f"connector/{p}" for p in r.params))
      for r in _vit_attention(f"{_NADP}.image_pooling_2d",
                              {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"})],
    *[Rule((f"{_NADP}.image_projector.{p}_proj.weight",), (f"connector/{p}/kernel",))
      for p in ("gate", "up", "down")],
)

# HF tensors of ViT blocks past the deepest feature layer: present in some files, never used.
UNUSED_VIT_BLOCK = (rf"{_VIT}\.transformer\.resblocks\.(\d+)\.", rf"{_NVIT}\.layers\.(\d+)\.")


def layer_count(rule: Rule, config: Molmo2Config) -> int | None:
    return {"text": config.text.num_layers, "vision": config.vision.num_layers, None: None}[rule.layers]


def active_rules(table: tuple[Rule, ...], config: Molmo2Config) -> list[Rule]:
    return [r for r in table if r.optional is None or r.optional(config)]
