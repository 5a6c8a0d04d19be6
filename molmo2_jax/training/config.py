"""The training configuration: one YAML file (a packaged recipe, molmo2_jax/configs/train/NAME.yaml, or a
user's own) plus dotted command-line overrides.

A YAML file holds only what differs from the defaults below; it is deep-merged onto them before parsing, so
`optimizer.llm.lr=1e-5` changes one value and keeps the rest of its group. Unknown keys are an error that
lists the valid ones; every section is typed, so an unknown key at any depth fails at load, before anything is
built. The `model` section is `preset` (molmo2_jax/configs/NAME.yaml), optionally `vocab_from` (a tokenizer
directory whose vocabulary and special-token ids the model takes, for a model trained from scratch), and any
`Molmo2Config` fields to change (`dtype`, `remat_policy`, `text.num_layers`, ...). `data` / `eval_data` are
`molmo2_jax.data.PipelineConfig`s (sources, buckets, batch_size, ...).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from molmo2_jax.config import ConfigError, Molmo2Config, apply_overrides, from_dict, load_preset, read_yaml, to_dict
from molmo2_jax.data.pipeline import PipelineConfig
from molmo2_jax.lora import LoraConfig


class TrainConfigError(ConfigError):
    """A training configuration value, key or file is invalid."""


@dataclasses.dataclass(frozen=True)
class GroupConfig:
    """One learning-rate group: the params whose path ("decoder/layers/q/kernel") fully matches `pattern`."""

    pattern: str
    lr: float
    warmup_steps: int


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with per-module peak learning rates, linear warmup then cosine decay to `final_lr_ratio * lr`.

    Defaults are the released pretraining stage (connector 2e-4 / ViT 6e-6 / LLM 2e-5, warmup 200/2000/2000).
    """

    connector: GroupConfig = GroupConfig("connector/.*", 2e-4, 200)
    vit: GroupConfig = GroupConfig("vision/.*", 6e-6, 2000)
    llm: GroupConfig = GroupConfig("decoder/.*|embedding|lm_head", 2e-5, 2000)
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-6
    weight_decay: float = 0.0
    final_lr_ratio: float = 0.1
    max_grad_norm: float = 1.0
    z_loss_scale: float = 1e-4
    freeze: str | None = None  # params whose path fully matches this regex are not trained

    @property
    def groups(self) -> dict[str, GroupConfig]:
        return {"connector": self.connector, "vit": self.vit, "llm": self.llm}


@dataclasses.dataclass(frozen=True)
class InitConfig:
    """Where the weights start: `random`, a Molmo2 checkpoint (`molmo2`: a released / HF dir, a converted dir,
    or a step directory of a training run such as `runs/NAME/checkpoints/31000`, for SFT), or an LLM + a vision
    encoder (`llm_vit`: Qwen3/Olmo3 HF dir + SigLIP/SigLIP2 HF dir, for pretraining)."""

    kind: str = "random"
    checkpoint: str | None = None
    llm: str | None = None
    vit: str | None = None
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every: int = 1000  # steps between saves (0: only at the end)
    keep: int = 3
    async_save: bool = True


@dataclasses.dataclass(frozen=True)
class LogConfig:
    every: int = 10
    tensorboard: bool = True
    peak_tflops_per_device: float | None = None  # for MFU; None: guessed from the device kind


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    every: int = 0  # steps between evaluations (0: never)
    batches: int = 10


@dataclasses.dataclass(frozen=True)
class ModelSection:
    """What model to train: a `preset`, optionally `vocab_from`, and `changes` to Molmo2Config fields. In the
    YAML the changes stand beside `preset` (`model: {preset: tiny, text: {num_layers: 2}}`)."""

    preset: str | None = None
    vocab_from: str | None = None
    changes: dict = dataclasses.field(default_factory=dict)


MODEL_SECTION_KEYS = ("preset", "vocab_from")  # the model section's own keys; the rest are Molmo2Config fields


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh axis sizes (`sharding.MESH_AXES`); one may be -1: the devices the others leave."""

    data: int = 1
    fsdp: int = -1
    sequence: int = 1
    tensor: int = 1


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    run_dir: str = "runs/default"
    model: ModelSection = ModelSection()
    init: InitConfig = InitConfig()
    data: PipelineConfig | None = None  # None: batches are passed to `run` (e.g. an in-memory iterator)
    eval_data: PipelineConfig | None = None
    optimizer: OptimizerConfig = OptimizerConfig()
    steps: int = 1000
    grad_accum: int = 1  # micro-batches per optimizer step
    # > 0: the loss runs over token chunks of this many tokens per device (training/loss.py), never holding the
    # fp32 [B, T, vocab] logits; it must be the device's rows x a divisor of its sequence slice. 0: plain loss
    loss_chunk_tokens: int = 0
    mesh: MeshConfig = MeshConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    log: LogConfig = LogConfig()
    eval: EvalConfig = EvalConfig()
    lora: LoraConfig = LoraConfig()  # rank > 0: train low-rank adapters only (molmo2_jax/lora.py)

    def validate(self) -> TrainConfig:
        if self.steps < 1:
            raise TrainConfigError(f"steps must be >= 1, got {self.steps}")
        if self.grad_accum < 1:
            raise TrainConfigError(f"grad_accum must be >= 1, got {self.grad_accum}")
        if self.loss_chunk_tokens < 0:
            raise TrainConfigError(f"loss_chunk_tokens must be >= 0 (0: the plain loss), got {self.loss_chunk_tokens}")
        if self.init.kind not in ("random", "molmo2", "llm_vit"):
            raise TrainConfigError(f"init.kind {self.init.kind!r} is not one of ['llm_vit', 'molmo2', 'random']")
        if self.init.kind == "molmo2" and not self.init.checkpoint:
            raise TrainConfigError("init.kind 'molmo2' needs init.checkpoint (a Molmo2 checkpoint directory)")
        if self.init.kind == "llm_vit" and not (self.init.llm and self.init.vit):
            raise TrainConfigError("init.kind 'llm_vit' needs init.llm and init.vit (Hugging Face directories)")
        if self.init.kind != "molmo2" and not self.model.preset:
            raise TrainConfigError("model.preset is required (a model preset name or YAML path) unless "
                                   "init.kind is 'molmo2'")
        sizes = to_dict(self.mesh)
        if any(size == 0 or size < -1 for size in sizes.values()) or list(sizes.values()).count(-1) > 1:
            raise TrainConfigError(f"mesh {sizes}: sizes must be positive, and at most one -1 (the rest)")
        for name, group in self.optimizer.groups.items():
            if group.lr < 0 or group.warmup_steps < 0:
                raise TrainConfigError(f"optimizer.{name}: lr and warmup_steps must be >= 0")
        self.lora.validate()
        return self

    def with_absolute_paths(self) -> TrainConfig:
        """This config with every path made absolute, so a run behaves (and its saved config reads) the same
        whether it was given relative or absolute paths, whatever the working directory of a later export."""

        def absolute(path):
            return str(Path(path).absolute()) if isinstance(path, str) and path else path

        def data(section: PipelineConfig | None) -> PipelineConfig | None:
            if section is None:
                return None
            sources = tuple(dataclasses.replace(source, path=absolute(source.path)) for source in section.sources)
            return dataclasses.replace(section, processor_dir=absolute(section.processor_dir), sources=sources)

        init = {k: absolute(getattr(self.init, k)) for k in ("checkpoint", "llm", "vit")}
        return dataclasses.replace(self, run_dir=absolute(self.run_dir), init=dataclasses.replace(self.init, **init),
                                   model=dataclasses.replace(self.model, vocab_from=absolute(self.model.vocab_from)),
                                   data=data(self.data), eval_data=data(self.eval_data))


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge `update` onto `base` (dicts merge, anything else replaces)."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_train_config(data: dict[str, Any]) -> TrainConfig:
    """A (partial) plain dict -> a validated TrainConfig."""
    if not isinstance(data, dict):
        raise TrainConfigError(f"a training config must be a mapping, got {type(data).__name__}")
    merged = _merge(to_dict(TrainConfig()), data)
    try:
        if isinstance(merged.get("model"), dict):  # the Molmo2Config changes stand beside preset and vocab_from
            model = merged["model"]
            changes = {k: v for k, v in model.items() if k not in (*MODEL_SECTION_KEYS, "changes")}
            merged["model"] = {**{k: model[k] for k in MODEL_SECTION_KEYS if k in model},
                               "changes": _merge(model.get("changes") or {}, changes)}
            from_dict(Molmo2Config, merged["model"]["changes"], "model.")  # a wrong key or type fails here
        return from_dict(TrainConfig, merged).validate()
    except TrainConfigError:
        raise
    except ConfigError as e:
        raise TrainConfigError(str(e)) from None
    except (TypeError, AttributeError) as e:  # a value of a type no check above expected
        raise TrainConfigError(f"malformed training config: {e}") from None


def load_train_config(path: str | Path, overrides: list[str] = ()) -> TrainConfig:
    """A packaged training recipe by name (molmo2_jax/configs/train/NAME.yaml) or a YAML path, with `a.b=value`
    overrides."""
    try:
        data = read_yaml(path, "train", "training config")
    except ConfigError as e:
        raise TrainConfigError(str(e)) from None
    return parse_train_config(apply_overrides(data, list(overrides)))


def model_config(train: TrainConfig, base: Molmo2Config | None = None,
                 token_settings: dict[str, Any] | None = None) -> Molmo2Config:
    """The model config: `base` (e.g. read from an init checkpoint) or the preset, then `token_settings`
    (vocabulary sizes and token ids of `vocab_from`), then the `model` section's fields."""
    if base is None:
        base = load_preset(train.model.preset)
    merged = _merge(_merge(to_dict(base), token_settings or {}), train.model.changes)
    try:
        return from_dict(Molmo2Config, merged, "model.").validate()
    except ConfigError as e:
        raise TrainConfigError(str(e)) from None
