"""Every kind of checkpoint directory, recognised in one place; every loader (`load`, `init.checkpoint`, export,
convert, verify) opens its source with `open_checkpoint`.

- Hugging Face: `config.json` + `*.safetensors` (released or transformers-native tensor names).
- converted: `molmo2_jax_config.json` + an Orbax `params/` tree (`molmo2-jax convert`).
- training step: a step directory the training loop's Checkpointer writes, `RUN/checkpoints/STEP/`, holding the
  Orbax `state/` item (params, optimizer state, step) and the `config/` JSON item (model and train configs).
- training run: `RUN/` or `RUN/checkpoints/`; its latest step, or the one asked for.

The step layout is defined here, not in `training/`, so readers of checkpoints need nothing from the trainer.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from molmo2_jax.checkpoint import converted, hf
from molmo2_jax.checkpoint.hf import CheckpointError
from molmo2_jax.config import Molmo2Config, from_dict
from molmo2_jax.params import flatten, param_shapes, param_shardings, placer, unflatten

HF, CONVERTED, TRAINING = "Hugging Face", "converted", "training"
STATE_ITEM, CONFIG_ITEM, DATA_ITEM = "state", "config", "data"  # the items of a training step directory
LOOKED_FOR = (f"a Hugging Face directory (config.json + *.safetensors), a converted one ({converted.CONFIG_FILE} + "
              f"{converted.PARAMS_DIR}/) or a training run or step (checkpoints/STEP/ with {STATE_ITEM}/ and "
              f"{CONFIG_ITEM}/)")


def is_training_step(path: Path) -> bool:
    return (path / STATE_ITEM).is_dir() and (path / CONFIG_ITEM).is_dir()


def training_steps(path: Path) -> dict[int, Path]:
    """`{step: directory}` of a training run directory or of its `checkpoints/` directory (empty: not a run)."""
    for root in (path / "checkpoints", path):
        steps = {int(p.name): p for p in root.glob("*") if p.name.isdigit() and is_training_step(p)}
        if steps:
            return steps
    return {}


class Checkpoint:
    """One recognised checkpoint: its `kind`, the directory holding it (`path`; for a training run, the chosen
    step's directory) and the directory the user named (`given`)."""

    def __init__(self, kind: str, path: Path, given: Path):
        self.kind, self.path, self.given = kind, path, given

    @functools.cached_property
    def config(self) -> Molmo2Config:
        if self.kind == HF:
            return hf.read_config(self.path)
        if self.kind == CONVERTED:
            return converted.read_config(self.path)
        try:
            return from_dict(Molmo2Config, self._saved_configs["model"]).validate()
        except (KeyError, ValueError, TypeError) as e:
            raise CheckpointError(f"{self.path}: unreadable training checkpoint config ({e})") from None

    @property
    def train_config(self) -> dict[str, Any] | None:
        """A training checkpoint's saved TrainConfig, as a plain dict."""
        return self._saved_configs.get("train") if self.kind == TRAINING else None

    @functools.cached_property
    def _saved_configs(self) -> dict[str, Any]:
        file = self.path / CONFIG_ITEM / "metadata"
        try:
            return json.loads(file.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{file}: unreadable training checkpoint config ({e})") from None

    @property
    def orbax_params(self) -> tuple[Path, str]:
        """The Orbax tree holding the params and the prefix of their keys in it (not for Hugging Face ones)."""
        if self.kind == CONVERTED:
            return self.path / converted.PARAMS_DIR, ""
        if self.kind == TRAINING:
            return self.path / STATE_ITEM, "params."
        raise CheckpointError(f"{self.path}: a Hugging Face checkpoint has no Orbax params")

    def read_params(self, config: Molmo2Config, dtype: str = "float32", mesh: jax.sharding.Mesh | None = None
                    ) -> dict[str, Any]:
        """The params of `config`'s shapes as `dtype` jax arrays, each placed straight into its sharding on `mesh`
        (the default device without one). A training checkpoint's optimizer state is not read."""
        if self.kind == HF:
            return unflatten(hf.import_params(self.path, config, param_shapes(config), dtype=dtype,
                                              place=placer(config, mesh)))
        abstract = abstract_params_on(config, dtype, mesh)
        if self.kind == CONVERTED:
            return converted.restore_params(self.path, abstract)
        return restore_step_params(self.path, abstract)


def open_checkpoint(path: str | Path, step: int | None = None) -> Checkpoint:
    """The checkpoint `path` names, of any kind; `step` picks a step of a training run (default: the latest).
    CheckpointError (one line, naming `path` and the formats looked for) when it is none of them."""
    given = Path(path)
    if not given.is_dir():
        raise CheckpointError(f"{given}: checkpoint directory does not exist")
    if step is None:
        if converted.is_converted(given):
            return Checkpoint(CONVERTED, given, given)
        if hf.is_hf_checkpoint(given):
            return Checkpoint(HF, given, given)
        if is_training_step(given):
            return Checkpoint(TRAINING, given, given)
    steps = training_steps(given)
    if steps:
        if step is None:
            return Checkpoint(TRAINING, steps[max(steps)], given)
        if step not in steps:
            raise CheckpointError(f"{given}: training run has no step {step} (saved steps: {sorted(steps)})")
        return Checkpoint(TRAINING, steps[step], given)
    if step is not None:
        raise CheckpointError(f"{given}: --step {step} needs a training run directory (checkpoints/STEP/ with "
                              f"{STATE_ITEM}/ and {CONFIG_ITEM}/)")
    raise CheckpointError(f"{given}: not a Molmo2 checkpoint; expected {LOOKED_FOR}")


def abstract_params_on(config: Molmo2Config, dtype: str, mesh: jax.sharding.Mesh | None) -> dict[str, Any]:
    """ShapeDtypeStructs to restore `config`'s params into: their shardings on `mesh`, or the default device (so
    leaves come back as jax arrays whatever array type was saved)."""
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = flatten(param_shardings(config, mesh)) if mesh is not None else {}
    return unflatten({p: jax.ShapeDtypeStruct(shape, jnp.dtype(dtype), sharding=shardings.get(p, device))
                      for p, shape in param_shapes(config).items()})


def restore_step_params(path: Path, abstract: dict[str, Any]) -> dict[str, Any]:
    """Only the params of a training step directory, placed like `abstract` (ShapeDtypeStructs with shardings);
    the optimizer state is not read."""
    item = {"params": abstract}
    args = jax.tree_util.tree_map(lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding, dtype=s.dtype), item)
    with ocp.PyTreeCheckpointer() as checkpointer:
        restored = checkpointer.restore((path / STATE_ITEM).absolute(),
                                        args=ocp.args.PyTreeRestore(item=item, restore_args=args,
                                                                    partial_restore=True))
    return restored["params"]
