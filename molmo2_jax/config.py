"""Typed configuration for Molmo2: vision encoder, connector, language model and the whole model.

`from_hf_config` reads both the released checkpoints' `config.json` (keys `vit_config`, `vit_layers`,
`rope_theta`, `rope_scaling`, `qkv_bias`, `layer_norm_eps`, ...) and the transformers-native form
(`vision_config`, `vision_feature_layer`, `rope_parameters`, ...). `to_hf_config` writes the released form.
Presets live as YAML in molmo2_jax/configs/ and hold only what differs from the defaults here.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
import re
import typing
from pathlib import Path
from typing import Any

import yaml

from molmo2_jax.errors import Molmo2Error

CONFIGS = importlib.resources.files("molmo2_jax") / "configs"  # packaged presets; train/: training recipes


class ConfigError(Molmo2Error):
    """A configuration value or key a user supplied is invalid."""


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """SigLIP2-style ViT over 378x378 crops cut into 14x14 patches."""

    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_layers: int = 25  # blocks that exist and run (the released config declares 27, only 25 exist)
    num_heads: int = 16
    head_dim: int = 72
    patch_size: int = 14
    image_size: int = 378
    layer_norm_eps: float = 1e-6

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.patches_per_side**2

    @property
    def patch_dim(self) -> int:
        return self.patch_size * self.patch_size * 3


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
    """Attention pooling over ViT patch windows followed by a SwiGLU projector into the LLM width."""

    vit_layers: tuple[int, ...] = (24, 18)  # 0-based ViT blocks whose outputs are concatenated, in this order
    hidden_size: int = 1152
    num_heads: int = 16
    head_dim: int = 72
    intermediate_size: int = 9728
    text_hidden_size: int = 2560


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """YaRN parameters (the only scaling the released checkpoints use)."""

    factor: float = 8.0
    original_max_position_embeddings: int = 8192
    attention_factor: float | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """Decoder-only LLM: Qwen3 (pre-norm, per-head qk-norm) or Olmo3 (post-norm, full-width qk-norm)."""

    hidden_size: int = 2560
    intermediate_size: int = 9728
    num_layers: int = 36
    num_heads: int = 32
    num_kv_heads: int = 8
    head_dim: int = 128
    vocab_size: int = 151936  # rows of lm_head
    additional_vocab_size: int = 128  # extra input-embedding rows for the image/video tokens
    qk_norm_type: str = "qwen3"  # "qwen3" (RMSNorm per head) or "olmo" (over all heads at once)
    norm_after: bool = False
    qkv_bias: bool = False
    layer_norm_eps: float = 1e-6
    rope_theta: float = 5_000_000.0
    rope_scaling: RopeScaling | None = None
    rope_scaling_layers: tuple[int, ...] | None = None  # None: all layers use the scaled table
    max_position_embeddings: int = 36864

    @property
    def embedding_rows(self) -> int:
        return self.vocab_size + self.additional_vocab_size

    def layer_uses_scaled_rope(self, layer: int) -> bool:
        return self.rope_scaling is not None and (
            self.rope_scaling_layers is None or layer in self.rope_scaling_layers
        )


@dataclasses.dataclass(frozen=True)
class TokenIds:
    """Special token ids of one checkpoint (Qwen3 defaults; Olmo3 models differ)."""

    image_start: int = 151936
    image_end: int = 151937
    image_patch: int = 151938
    image_col: int = 151939
    low_res_image_start: int = 151940
    image_prompt: int = 151941  # <|image|>
    image_low_res: int = 151942
    frame_start: int = 151943
    frame_end: int = 151944
    video_prompt: int = 151945  # <|video|>
    bos: int = 151645
    eos: tuple[int, ...] = (151645,)
    pad: int = 151643

    @property
    def multimodal(self) -> tuple[int, ...]:
        """The eight tokens that form the bidirectional attention block."""
        return (self.image_patch, self.image_col, self.image_start, self.low_res_image_start,
                self.frame_start, self.image_end, self.frame_end, self.image_low_res)


@dataclasses.dataclass(frozen=True)
class Molmo2Config:
    vision: VisionConfig = dataclasses.field(default_factory=VisionConfig)
    adapter: AdapterConfig = dataclasses.field(default_factory=AdapterConfig)
    text: TextConfig = dataclasses.field(default_factory=TextConfig)
    tokens: TokenIds = dataclasses.field(default_factory=TokenIds)
    # Runtime choices (not part of the checkpoint): dtypes and rematerialisation of the scanned layers.
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    remat_policy: str = "none"  # "none", "full", "dots", "dots_no_batch" (see model/layers.py)
    # Attention path of the decoder, ViT and connector: "dense" (the reference), "blockwise" (model/attention.py),
    # "auto" (blockwise from attention.BLOCKWISE_MIN_KEYS keys on) or "pallas" (the TPU kernel of
    # model/pallas_attention.py where blockwise would run; interpreted off TPU); tiles are at most these many rows.
    attention: str = "auto"
    attention_block_q: int = 512
    attention_block_kv: int = 512

    def validate(self) -> Molmo2Config:
        t, v, a = self.text, self.vision, self.adapter
        if t.qk_norm_type not in ("qwen3", "olmo"):
            raise ConfigError(f"unknown qk_norm_type {t.qk_norm_type!r}; expected 'qwen3' or 'olmo'")
        if t.num_heads % t.num_kv_heads:
            raise ConfigError(f"num_heads {t.num_heads} is not a multiple of num_kv_heads {t.num_kv_heads}")
        if not a.vit_layers or not all(0 <= layer < v.num_layers for layer in a.vit_layers):
            raise ConfigError(f"adapter vit_layers {a.vit_layers} must index the {v.num_layers} ViT blocks")
        if a.hidden_size != v.hidden_size:
            raise ConfigError(f"adapter hidden_size {a.hidden_size} != vision hidden_size {v.hidden_size}")
        if a.text_hidden_size != t.hidden_size:
            raise ConfigError(f"adapter text_hidden_size {a.text_hidden_size} != text hidden_size {t.hidden_size}")
        if v.image_size % v.patch_size:
            raise ConfigError(f"image_size {v.image_size} is not a multiple of patch_size {v.patch_size}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in ("float32", "bfloat16", "float16"):
                raise ConfigError(f"{name} must be float32, bfloat16 or float16, not {getattr(self, name)!r}")
        if self.remat_policy not in REMAT_POLICIES:
            raise ConfigError(f"remat_policy {self.remat_policy!r} is not one of {sorted(REMAT_POLICIES)}")
        if self.attention not in ATTENTION_PATHS:
            raise ConfigError(f"attention {self.attention!r} is not one of {list(ATTENTION_PATHS)}")
        for name in ("attention_block_q", "attention_block_kv"):
            block = getattr(self, name)
            if not isinstance(block, int) or block < 8 or block % 8:
                raise ConfigError(f"{name} = {block!r} does not fit a tile: use a positive multiple of 8 (e.g. 512)")
        return self

    def replace(self, **changes: Any) -> Molmo2Config:
        return dataclasses.replace(self, **changes).validate()


REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
# pallas: the TPU kernel of model/pallas_attention.py where blockwise would run (interpret mode off TPU)
ATTENTION_PATHS = ("auto", "dense", "blockwise", "pallas")


# ----------------------------------------------------------------------------------------------------
# Plain-dict round trip, YAML presets and dotted overrides


def to_dict(config: Any) -> Any:
    """Dataclass tree -> plain dict (tuples become lists)."""
    if dataclasses.is_dataclass(config):
        return {f.name: to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, (tuple, list)):
        return [to_dict(x) for x in config]
    return config


def from_dict(cls: type, data: dict[str, Any] | None, path: str = "") -> Any:
    """Plain dict -> dataclass `cls`, rejecting unknown keys with the list of valid ones."""
    data = dict(data or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = path or cls.__name__
        raise ConfigError(f"unknown config key(s) {unknown} in {where}; valid keys: {sorted(fields)}")
    kwargs = {}
    hints = typing.get_type_hints(cls)
    for name, value in data.items():
        field_type = _resolve(cls, name)
        if dataclasses.is_dataclass(field_type) and isinstance(value, dict):
            value = from_dict(field_type, value, f"{path}{name}.")
        elif isinstance(value, list):
            value = tuple(value)
        _check_scalar(hints[name], value, f"{path}{name}")
        kwargs[name] = value
    return cls(**kwargs)


_SCALARS = {bool: (bool,), int: (int,), float: (int, float), str: (str,), dict: (dict,)}


def _check_scalar(hint: Any, value: Any, key: str) -> None:
    """Raise ConfigError naming `key` when a field typed int / float / bool / str / dict (or `X | None`) gets a
    value of another type (YAML gives `steps=abc` as a string). Other field types are left to `validate`."""
    options = [t for t in (typing.get_args(hint) or (hint,)) if t is not type(None)]
    if len(options) != 1 or typing.get_origin(options[0]) not in (None, dict):
        return
    kind = typing.get_origin(options[0]) or options[0]
    if kind not in _SCALARS or (value is None and len(typing.get_args(hint)) > 1):
        return
    if not isinstance(value, _SCALARS[kind]) or (isinstance(value, bool) and kind is not bool):
        expected = kind.__name__ + (" or null" if len(typing.get_args(hint)) > 1 else "")
        raise ConfigError(f"{key}: expected {expected}, got {value!r} ({type(value).__name__})")


def _resolve(cls: type, name: str) -> Any:
    """The dataclass type of a field (unwrapping `X | None`), or None for plain fields."""
    hint = typing.get_type_hints(cls)[name]
    for candidate in (hint, *typing.get_args(hint)):
        if dataclasses.is_dataclass(candidate):
            return candidate
    return None


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` strings (values parsed as YAML) to a nested dict, in place."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.path=value")
        key, raw = item.split("=", 1)
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
        value = yaml.safe_load(raw)
        if isinstance(value, str) and _SCIENTIFIC.fullmatch(value):  # YAML 1.1 reads 1e-3 as a string
            value = float(value)
        node[parts[-1]] = value
    return data


_SCIENTIFIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def packaged_configs(folder: str = "") -> list[str]:
    """Names of the YAML files shipped in molmo2_jax/configs/FOLDER (presets; `train`: training recipes)."""
    return sorted(f.name.removesuffix(".yaml") for f in (CONFIGS / folder).iterdir() if f.name.endswith(".yaml"))


def read_yaml(name_or_path: str | Path, folder: str, what: str) -> dict[str, Any]:
    """A YAML mapping: a packaged config by NAME (molmo2_jax/configs/FOLDER/NAME.yaml) or a file by path."""
    path = Path(name_or_path)
    file = CONFIGS / folder / f"{name_or_path}.yaml" if not path.suffix else path
    if not file.is_file():
        raise ConfigError(f"{what} {str(name_or_path)!r} not found; give a YAML file or one of the packaged "
                          f"names: {packaged_configs(folder)}")
    try:
        data = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{name_or_path}: not valid YAML ({' '.join(str(e).split())})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{name_or_path}: a {what} must be a YAML mapping, got {type(data).__name__}")
    return data


def load_preset(name_or_path: str, overrides: list[str] = ()) -> Molmo2Config:
    """A model preset by name (molmo2_jax/configs/NAME.yaml) or path, with dotted overrides."""
    data = read_yaml(name_or_path, "", "model preset")
    apply_overrides(data, list(overrides))
    return from_dict(Molmo2Config, data).validate()


# ----------------------------------------------------------------------------------------------------
# Hugging Face config.json (released and transformers-native forms)


def from_hf_config(hf: dict[str, Any] | str | Path) -> Molmo2Config:
    """Build our config from a Molmo2 `config.json` (path or dict), released or native form."""
    if not isinstance(hf, dict):
        hf = json.loads(Path(hf).read_text())
    if hf.get("model_type") != "molmo2" or "text_config" not in hf:
        raise ConfigError("config.json is not a Molmo2 config (model_type 'molmo2' with a text_config expected)")
    legacy_vision = "vit_config" in hf
    vit = hf.get("vit_config") or hf.get("vision_config") or {}
    ad = hf.get("adapter_config") or {}
    tx = hf["text_config"]

    declared_layers = int(vit.get("num_hidden_layers", 25))
    feature_layers = ad.get("vit_layers", ad.get("vision_feature_layer", [24, 18]))
    feature_layers = tuple(int(layer) % declared_layers for layer in feature_layers)
    image_size = vit.get("image_default_input_size", vit.get("image_size", [378, 378]))
    if isinstance(image_size, (list, tuple)):
        if image_size[0] != image_size[1]:
            raise ConfigError(f"non-square ViT input size {image_size} is not supported")
        image_size = image_size[0]
    vision = VisionConfig(
        hidden_size=vit.get("hidden_size", 1152),
        intermediate_size=vit.get("intermediate_size", 4304),
        # Only the blocks up to the deepest feature layer run (and exist in the released files).
        num_layers=max(feature_layers) + 1 if legacy_vision else declared_layers,
        num_heads=vit.get("num_attention_heads", 16),
        head_dim=vit.get("head_dim", 72),
        patch_size=vit.get("image_patch_size", vit.get("patch_size", 14)),
        image_size=int(image_size),
        layer_norm_eps=vit.get("layer_norm_eps", 1e-6),
    )
    adapter = AdapterConfig(
        vit_layers=feature_layers,
        hidden_size=ad.get("hidden_size", 1152),
        num_heads=ad.get("num_attention_heads", 16),
        head_dim=ad.get("head_dim", 72),
        intermediate_size=ad.get("intermediate_size", 9728),
        text_hidden_size=ad.get("text_hidden_size", tx.get("hidden_size")),
    )

    rope = dict(tx.get("rope_parameters") or {})
    rope_theta = tx.get("rope_theta", rope.get("rope_theta", 10000.0))
    scaling = tx.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    rope_scaling = None
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind != "yarn":
            raise ConfigError(f"rope scaling type {kind!r} is not supported (only 'yarn')")
        rope_scaling = RopeScaling(
            factor=float(scaling["factor"]),
            original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
            attention_factor=scaling.get("attention_factor"),
            beta_fast=float(scaling.get("beta_fast") or 32.0),
            beta_slow=float(scaling.get("beta_slow") or 1.0),
            truncate=bool(scaling.get("truncate", True)),
        )
    num_layers = tx.get("num_hidden_layers", 36)
    scaled_layers = tx.get("rope_scaling_layers")
    if scaled_layers is not None and sorted(scaled_layers) == list(range(num_layers)):
        scaled_layers = None
    if not tx.get("use_qk_norm", True):
        raise ConfigError("text_config.use_qk_norm is false; Molmo2 checkpoints always use q/k RMSNorm")
    text = TextConfig(
        hidden_size=tx.get("hidden_size", 2560),
        intermediate_size=tx.get("intermediate_size", 9728),
        num_layers=num_layers,
        num_heads=tx.get("num_attention_heads", 32),
        num_kv_heads=tx.get("num_key_value_heads", tx.get("num_attention_heads", 32)),
        head_dim=tx.get("head_dim", 128),
        vocab_size=tx.get("vocab_size", 151936),
        additional_vocab_size=tx.get("additional_vocab_size", 128),
        qk_norm_type=tx.get("qk_norm_type", "qwen3"),
        norm_after=bool(tx.get("norm_after", False)),
        qkv_bias=bool(tx.get("qkv_bias", tx.get("attention_bias", False))),
        layer_norm_eps=tx.get("layer_norm_eps", tx.get("rms_norm_eps", 1e-6)),
        rope_theta=float(rope_theta),
        rope_scaling=rope_scaling,
        rope_scaling_layers=tuple(scaled_layers) if scaled_layers is not None else None,
        max_position_embeddings=tx.get("max_position_embeddings", 36864),
    )
    defaults = TokenIds()
    patch = hf.get("image_patch_id", defaults.image_patch)
    start = hf.get("image_start_token_id", defaults.image_start)
    # Ids the native config omits follow the fixed order of the ten Molmo2 tokens from <im_start>.
    tokens = TokenIds(
        image_start=start,
        image_end=hf.get("image_end_token_id", start + 1),
        image_patch=patch,
        image_col=hf.get("image_col_id", start + 3),
        low_res_image_start=hf.get("low_res_image_start_token_id", start + 4),
        image_prompt=start + 5,
        image_low_res=hf.get("image_low_res_id", start + 6),
        frame_start=hf.get("frame_start_token_id", start + 7),
        frame_end=hf.get("frame_end_token_id", start + 8),
        video_prompt=start + 9,
        bos=hf.get("bos_token_id", defaults.bos),
        eos=_as_tuple(hf.get("eos_token_id", defaults.eos)),
        pad=hf.get("pad_token_id", defaults.pad),
    )
    return Molmo2Config(vision=vision, adapter=adapter, text=text, tokens=tokens).validate()


def _as_tuple(value: int | list[int] | tuple[int, ...]) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (list, tuple)) else (value,)


def to_hf_config(config: Molmo2Config, dtype: str = "float32") -> dict[str, Any]:
    """Our config -> a `config.json` dict in the released (hub) form."""
    v, a, t, k = config.vision, config.adapter, config.text, config.tokens
    rope_scaling = None
    if t.rope_scaling is not None:
        s = t.rope_scaling
        rope_scaling = {"rope_type": "yarn", "factor": s.factor,
                        "original_max_position_embeddings": s.original_max_position_embeddings,
                        "beta_fast": s.beta_fast, "beta_slow": s.beta_slow, "truncate": s.truncate}
        if s.attention_factor is not None:
            rope_scaling["attention_factor"] = s.attention_factor
    return {
        "architectures": ["Molmo2ForConditionalGeneration"],
        "model_type": "molmo2",
        "dtype": dtype,
        "vit_config": {
            "model_type": "molmo2", "hidden_size": v.hidden_size, "intermediate_size": v.intermediate_size,
            "num_hidden_layers": v.num_layers, "num_attention_heads": v.num_heads,
            "num_key_value_heads": v.num_heads, "head_dim": v.head_dim, "hidden_act": "gelu_pytorch_tanh",
            "image_default_input_size": [v.image_size, v.image_size], "image_patch_size": v.patch_size,
            "image_num_pos": v.num_patches, "layer_norm_eps": v.layer_norm_eps, "float32_attention": True,
            "attention_dropout": 0.0, "residual_dropout": 0.0, "initializer_range": 0.02,
        },
        "adapter_config": {
            "model_type": "molmo2", "vit_layers": list(a.vit_layers), "hidden_size": a.hidden_size,
            "num_attention_heads": a.num_heads, "num_key_value_heads": a.num_heads, "head_dim": a.head_dim,
            "hidden_act": "silu", "intermediate_size": a.intermediate_size,
            "text_hidden_size": a.text_hidden_size, "pooling_attention_mask": True, "float32_attention": True,
            "attention_dropout": 0.0, "residual_dropout": 0.0, "image_feature_dropout": 0.0,
            "initializer_range": 0.02,
        },
        "text_config": {
            "model_type": "molmo2_text", "hidden_size": t.hidden_size, "intermediate_size": t.intermediate_size,
            "num_hidden_layers": t.num_layers, "num_attention_heads": t.num_heads,
            "num_key_value_heads": t.num_kv_heads, "head_dim": t.head_dim, "vocab_size": t.vocab_size,
            "additional_vocab_size": t.additional_vocab_size, "hidden_act": "silu",
            "use_qk_norm": True, "qk_norm_type": t.qk_norm_type,
            "norm_after": t.norm_after, "qkv_bias": t.qkv_bias, "layer_norm_eps": t.layer_norm_eps,
            "rope_theta": t.rope_theta, "rope_scaling": rope_scaling,
            "rope_scaling_layers": list(t.rope_scaling_layers) if t.rope_scaling_layers is not None else None,
            "max_position_embeddings": t.max_position_embeddings, "attention_dropout": 0.0,
            "residual_dropout": 0.0, "embedding_dropout": 0.0, "initializer_range": 0.02, "use_cache": True,
        },
        "image_start_token_id": k.image_start, "image_end_token_id": k.image_end,
        "image_patch_id": k.image_patch, "image_high_res_id": k.image_patch, "image_col_id": k.image_col,
        "low_res_image_start_token_id": k.low_res_image_start, "image_low_res_id": k.image_low_res,
        "frame_start_token_id": k.frame_start, "frame_end_token_id": k.frame_end,
        "bos_token_id": k.bos, "eos_token_id": k.eos[0] if len(k.eos) == 1 else list(k.eos),
        "pad_token_id": k.pad, "tie_word_embeddings": False, "use_cache": True,
        "use_frame_special_tokens": True,
    }
