"""Typed configuration for Molmo2: vision encoder, connector, language model and the whole model.

Each class translates itself from and to its section of a Hugging Face `config.json` (`from_hf` / `to_hf`):
`HF_NAMES` lists the HF names of fields named otherwise, the released checkpoints' first (`vit_config`,
`vit_layers`, `rope_theta`, `qkv_bias`, ...), then the transformers-native form's (`vision_config`,
`vision_feature_layer`, `rope_parameters`, ...); a key the HF config lacks takes the field's default.
`to_hf` writes the released form.
Presets live as YAML in molmo2_jax/configs/ and hold only what differs from the defaults here.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
import re
import typing
from pathlib import Path
from typing import Any, ClassVar

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

    # HF names of fields named otherwise: the released form's (`vit_config`) first, then transformers' own
    HF_NAMES: ClassVar[dict[str, tuple[str, ...]]] = {
        "num_layers": ("num_hidden_layers",), "num_heads": ("num_attention_heads",),
        "patch_size": ("image_patch_size", "patch_size"), "image_size": ("image_default_input_size", "image_size")}

    @classmethod
    def from_hf(cls, vit: dict[str, Any], used_layers: int | None = None) -> VisionConfig:
        """From `vit_config` / `vision_config`. `used_layers`: the blocks that run (the released files hold only
        those up to the deepest feature layer, whatever `num_hidden_layers` declares)."""
        config = _from_hf_section(cls, vit)
        size = config.image_size
        if isinstance(size, (list, tuple)):
            if size[0] != size[1]:
                raise ConfigError(f"non-square ViT input size {list(size)} is not supported")
            size = size[0]
        return dataclasses.replace(config, image_size=int(size), num_layers=used_layers or config.num_layers)

    def to_hf(self) -> dict[str, Any]:
        return {"model_type": "molmo2", **_to_hf_section(self), "num_key_value_heads": self.num_heads,
                "image_default_input_size": [self.image_size, self.image_size], "image_num_pos": self.num_patches,
                "hidden_act": "gelu_pytorch_tanh", "float32_attention": True, "attention_dropout": 0.0,
                "residual_dropout": 0.0, "initializer_range": 0.02}


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
    """Attention pooling over ViT patch windows followed by a SwiGLU projector into the LLM width."""

    vit_layers: tuple[int, ...] = (24, 18)  # 0-based ViT blocks whose outputs are concatenated, in this order
    hidden_size: int = 1152
    num_heads: int = 16
    head_dim: int = 72
    intermediate_size: int = 9728
    text_hidden_size: int = 2560

    HF_NAMES: ClassVar[dict[str, tuple[str, ...]]] = {"vit_layers": ("vit_layers", "vision_feature_layer"),
                                                      "num_heads": ("num_attention_heads",)}

    @classmethod
    def from_hf(cls, adapter: dict[str, Any], declared_vit_layers: int, text_hidden_size: int) -> AdapterConfig:
        """From `adapter_config`; negative feature layers count from the `declared_vit_layers`."""
        config = _from_hf_section(cls, adapter, text_hidden_size=text_hidden_size)
        return dataclasses.replace(config, vit_layers=tuple(int(i) % declared_vit_layers for i in config.vit_layers))

    def to_hf(self) -> dict[str, Any]:
        return {"model_type": "molmo2", **_to_hf_section(self), "num_key_value_heads": self.num_heads,
                "hidden_act": "silu", "pooling_attention_mask": True, "float32_attention": True,
                "attention_dropout": 0.0, "residual_dropout": 0.0, "image_feature_dropout": 0.0,
                "initializer_range": 0.02}


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """YaRN parameters (the only scaling the released checkpoints use)."""

    factor: float = 8.0
    original_max_position_embeddings: int = 8192
    attention_factor: float | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True

    HF_NAMES: ClassVar[dict[str, tuple[str, ...]]] = {}

    @classmethod
    def from_hf(cls, scaling: dict[str, Any]) -> RopeScaling:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind != "yarn":
            raise ConfigError(f"rope scaling type {kind!r} is not supported (only 'yarn')")
        return _from_hf_section(cls, scaling)

    def to_hf(self) -> dict[str, Any]:
        unset = ("attention_factor",) if self.attention_factor is None else ()
        return {"rope_type": "yarn", **_to_hf_section(self, skip=unset)}


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

    HF_NAMES: ClassVar[dict[str, tuple[str, ...]]] = {
        "num_layers": ("num_hidden_layers",), "num_heads": ("num_attention_heads",),
        "num_kv_heads": ("num_key_value_heads",), "qkv_bias": ("qkv_bias", "attention_bias"),
        "layer_norm_eps": ("layer_norm_eps", "rms_norm_eps")}

    @classmethod
    def from_hf(cls, text: dict[str, Any]) -> TextConfig:
        """From `text_config`: released (`rope_theta`, `rope_scaling`) or native (`rope_parameters`) rope keys."""
        if not text.get("use_qk_norm", True):
            raise ConfigError("text_config.use_qk_norm is false; Molmo2 checkpoints always use q/k RMSNorm")
        rope = dict(text.get("rope_parameters") or {})
        scaling = text.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        # no num_key_value_heads: one kv head per head; no rope_theta anywhere: transformers' default
        config = _from_hf_section(cls, text, num_kv_heads=text.get("num_attention_heads", cls.num_heads),
                                  rope_theta=rope.get("rope_theta", HF_DEFAULT_ROPE_THETA))
        layers = config.rope_scaling_layers
        if layers is not None and sorted(layers) == list(range(config.num_layers)):
            layers = None  # all layers: the same as none named
        return dataclasses.replace(config, rope_scaling=RopeScaling.from_hf(scaling) if scaling else None,
                                   rope_scaling_layers=None if layers is None else tuple(layers))

    def to_hf(self) -> dict[str, Any]:
        return {"model_type": "molmo2_text", **_to_hf_section(self, skip=("rope_scaling",)),
                "rope_scaling": self.rope_scaling.to_hf() if self.rope_scaling else None, "hidden_act": "silu",
                "use_qk_norm": True, "attention_dropout": 0.0, "residual_dropout": 0.0, "embedding_dropout": 0.0,
                "initializer_range": 0.02, "use_cache": True}

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

    # Top-level keys of the HF config; the prompt tokens are not in it.
    HF_NAMES: ClassVar[dict[str, tuple[str, ...]]] = {
        "image_start": ("image_start_token_id",), "image_end": ("image_end_token_id",),
        "image_patch": ("image_patch_id",), "image_col": ("image_col_id",),
        "low_res_image_start": ("low_res_image_start_token_id",), "image_prompt": (),
        "image_low_res": ("image_low_res_id",), "frame_start": ("frame_start_token_id",),
        "frame_end": ("frame_end_token_id",), "video_prompt": (), "bos": ("bos_token_id",),
        "eos": ("eos_token_id",), "pad": ("pad_token_id",)}
    # The ten Molmo2 tokens have consecutive ids in this order, from <im_start>.
    ORDER: ClassVar[tuple[str, ...]] = ("image_start", "image_end", "image_patch", "image_col", "low_res_image_start",
                                        "image_prompt", "image_low_res", "frame_start", "frame_end", "video_prompt")

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> TokenIds:
        """From the top level of a HF config; ids it omits (the native config names fewer) follow `ORDER`."""
        start = hf.get("image_start_token_id", cls.image_start)
        config = _from_hf_section(cls, hf, **{name: start + i for i, name in enumerate(cls.ORDER)})
        eos = config.eos
        return dataclasses.replace(config, eos=tuple(eos) if isinstance(eos, (list, tuple)) else (eos,))

    def to_hf(self) -> dict[str, Any]:
        return {**_to_hf_section(self, skip=("eos",)), "image_high_res_id": self.image_patch,
                "eos_token_id": self.eos[0] if len(self.eos) == 1 else list(self.eos)}


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
    # The ViT runs over at most this many crops (images' crops and video frames) per device at a time, a scan
    # over chunks, each rematerialised in the backward (model/vision.py `encode_in_chunks`), and the connector over
    # those crops' pooled tokens per device at a time (model/connector.py `pool_in_chunks`); None: one call each.
    vit_chunk: int | None = None
    # "zigzag": when the mesh splits the sequence over `sequence` (S > 1 shards, length a multiple of 2S), the
    # decoder runs on its tokens in zigzag order, so causal attention's work is even across the shards
    # (model/zigzag.py); the results are unchanged. None: the natural order.
    context_balance: str | None = None

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
        if self.vit_chunk is not None and (type(self.vit_chunk) is not int or self.vit_chunk <= 0):
            raise ConfigError(f"vit_chunk = {self.vit_chunk!r}: give a positive number of crops per device per ViT "
                              "call, or null for one call over all crops")
        if self.context_balance not in CONTEXT_BALANCE:
            raise ConfigError(f"context_balance {self.context_balance!r} is not one of {list(CONTEXT_BALANCE)}")
        return self

    def replace(self, **changes: Any) -> Molmo2Config:
        return dataclasses.replace(self, **changes).validate()

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> Molmo2Config:
        """From a Molmo2 `config.json` dict: the released form (`vit_config`, `vit_layers`, `rope_theta`, ...) or
        the transformers-native one (`vision_config`, `vision_feature_layer`, `rope_parameters`, ...)."""
        if hf.get("model_type") != "molmo2" or "text_config" not in hf:
            raise ConfigError("config.json is not a Molmo2 config (model_type 'molmo2' with a text_config expected)")
        vit = hf.get("vit_config") or hf.get("vision_config") or {}
        text = TextConfig.from_hf(hf["text_config"])
        adapter = AdapterConfig.from_hf(hf.get("adapter_config") or {},
                                        vit.get("num_hidden_layers", VisionConfig.num_layers), text.hidden_size)
        # the released form declares more ViT blocks than its files hold; only those up to the deepest feature
        # layer exist and run
        vision = VisionConfig.from_hf(vit, max(adapter.vit_layers) + 1 if "vit_config" in hf else None)
        return cls(vision=vision, adapter=adapter, text=text, tokens=TokenIds.from_hf(hf)).validate()

    def to_hf(self, dtype: str = "float32") -> dict[str, Any]:
        """The released (hub) form of `config.json`."""
        return {"architectures": ["Molmo2ForConditionalGeneration"], "model_type": "molmo2", "dtype": dtype,
                "vit_config": self.vision.to_hf(), "adapter_config": self.adapter.to_hf(),
                "text_config": self.text.to_hf(), **self.tokens.to_hf(), "tie_word_embeddings": False,
                "use_cache": True, "use_frame_special_tokens": True}


REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
HF_DEFAULT_ROPE_THETA = 10000.0  # what transformers assumes when a config names no rope_theta
# pallas: the TPU kernel of model/pallas_attention.py where blockwise would run (interpret mode off TPU)
ATTENTION_PATHS = ("auto", "dense", "blockwise", "pallas")
CONTEXT_BALANCE = (None, "zigzag")


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
    """Plain dict -> dataclass `cls`, rejecting unknown keys (at any depth, with the list of valid ones) and
    missing required ones. Nested dataclass fields, and tuples of them, are read from dicts and lists of dicts."""
    where = path or cls.__name__
    if not isinstance(data or {}, dict):
        raise ConfigError(f"{where.rstrip('.')}: expected a mapping of {cls.__name__} keys, got {data!r}")
    data = dict(data or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown config key(s) {unknown} in {where}; valid keys: {sorted(fields)}")
    missing = sorted(name for name, f in fields.items() if name not in data and f.default is dataclasses.MISSING
                     and f.default_factory is dataclasses.MISSING)
    if missing:
        raise ConfigError(f"missing config key(s) {missing} in {where}")
    kwargs = {}
    hints = typing.get_type_hints(cls)
    for name, value in data.items():
        field_type, item_type = _resolve(hints[name])
        if field_type is not None and value is not None:
            value = from_dict(field_type, value, f"{path}{name}.")
        elif item_type is not None and isinstance(value, (list, tuple)):
            value = tuple(from_dict(item_type, item, f"{path}{name}[{i}].") for i, item in enumerate(value))
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


def _resolve(hint: Any) -> tuple[type | None, type | None]:
    """`(dataclass, None)` for a field typed `X` or `X | None`, `(None, dataclass)` for `tuple[X, ...]`, else
    `(None, None)`."""
    for candidate in (hint, *typing.get_args(hint)):
        if dataclasses.is_dataclass(candidate):
            return candidate, None
        if typing.get_origin(candidate) is tuple:
            args = typing.get_args(candidate)
            if args and dataclasses.is_dataclass(args[0]):
                return None, args[0]
    return None, None


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
    return Molmo2Config.from_hf(hf)


def to_hf_config(config: Molmo2Config, dtype: str = "float32") -> dict[str, Any]:
    """Our config -> a `config.json` dict in the released (hub) form."""
    return config.to_hf(dtype)


def _from_hf_section(cls: type, section: dict[str, Any], **given: Any) -> Any:
    """`cls` from one section of a HF config: each field from the first of its HF names (`cls.HF_NAMES`, else the
    field's own name) that the section has, else `given`, else the field's default."""
    hints = typing.get_type_hints(cls)
    values = {name: _as_hinted(hints[name], value) for name, value in given.items()}
    for field in dataclasses.fields(cls):
        key = next((k for k in cls.HF_NAMES.get(field.name, (field.name,)) if section.get(k) is not None), None)
        if key is not None:
            values[field.name] = _as_hinted(hints[field.name], section[key])
    return cls(**values)


def _as_hinted(hint: Any, value: Any) -> Any:
    """JSON numbers and flags as the field types them (`32` for a float field is 32.0, `0` for a bool False)."""
    options = typing.get_args(hint) or (hint,)
    if bool in options:
        return bool(value)
    if float in options and isinstance(value, int):
        return float(value)
    return value


def _to_hf_section(config: Any, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """The released-form (first) HF names of `config`'s fields and their values (tuples as lists)."""
    names = type(config).HF_NAMES
    return {names.get(f.name, (f.name,))[0]: to_dict(getattr(config, f.name))
            for f in dataclasses.fields(config) if f.name not in skip and names.get(f.name, (f.name,))}
