"""Training checkpoints: an Orbax CheckpointManager holding, per saved step, the train state (params,
optimizer state, step), the Grain iterator state of every process and the run's config (JSON).

Saves are asynchronous (the state is copied off the devices before training continues; the iterator state
is written synchronously at save time) and only the last `keep` steps are kept. `restore` checks the saved
model config against the current one before touching any array, so resuming a run with a different model
shape fails with the differing params named.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from molmo2_jax.config import Molmo2Config, from_dict, to_dict
from molmo2_jax.errors import Molmo2Error
from molmo2_jax.params import param_shapes
from molmo2_jax.training.config import CheckpointConfig, TrainConfig


class ResumeError(Molmo2Error):
    """A checkpoint cannot be resumed by this run (different model shape, missing items)."""


def is_training_checkpoint(path: Path) -> bool:
    """A step directory written by Checkpointer (`runs/NAME/checkpoints/STEP`)."""
    return (path / "state").is_dir() and (path / "config").is_dir()


def find_step_dir(path: Path, step: int | None = None) -> Path | None:
    """The training step directory `path` names: itself, or the given (default: latest) step of a run directory
    (`run/checkpoints/STEP`) or of its `checkpoints/` directory. None when `path` holds no training checkpoint."""
    if is_training_checkpoint(path):
        return path
    for root in (path / "checkpoints", path):
        steps = {int(p.name): p for p in root.glob("*") if p.name.isdigit() and is_training_checkpoint(p)}
        if steps:
            if step is None:
                return steps[max(steps)]
            if step not in steps:
                raise ResumeError(f"{path}: training run has no step {step} (saved steps: {sorted(steps)})")
            return steps[step]
    return None


def read_step_config(path: Path) -> Molmo2Config:
    """The model config saved with a training checkpoint's step directory."""
    try:
        saved = json.loads((path / "config" / "metadata").read_text())
        return from_dict(Molmo2Config, saved["model"]).validate()
    except (OSError, json.JSONDecodeError, KeyError, ValueError, TypeError) as e:
        raise ResumeError(f"{path}: unreadable training checkpoint config ({e})") from None


def restore_step_params(path: Path, abstract_params: dict[str, Any]) -> dict[str, Any]:
    """Only the params of a training checkpoint's step directory, placed like `abstract_params` (e.g. to
    start SFT from a pretraining run); the optimizer state is not read."""
    item = {"params": abstract_params}
    args = jax.tree_util.tree_map(lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding, dtype=s.dtype), item)
    with ocp.PyTreeCheckpointer() as checkpointer:
        restored = checkpointer.restore((path / "state").absolute(),
                                        args=ocp.args.PyTreeRestore(item=item, restore_args=args,
                                                                    partial_restore=True))
    return restored["params"]


class Checkpointer:
    def __init__(self, directory: str | Path, config: CheckpointConfig):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=config.keep,
                                               enable_async_checkpointing=config.async_save, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: dict[str, Any], model_config: Molmo2Config, train_config: TrainConfig,
             data_iterator: Any | None = None) -> None:
        """Start saving `state` (returns once the arrays are copied; call `wait()` before exiting)."""
        import grain

        items = {"state": ocp.args.StandardSave(state),
                 "config": ocp.args.JsonSave({"model": to_dict(model_config), "train": to_dict(train_config)})}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def saved_model_config(self, step: int) -> Molmo2Config:
        saved = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
        return from_dict(Molmo2Config, saved["model"])

    def restore(self, step: int, abstract_state: dict[str, Any], model_config: Molmo2Config,
                data_iterator: Any | None = None) -> dict[str, Any]:
        """The state saved at `step`, placed like `abstract_state`; the data iterator is set to its saved
        position. Raises ResumeError if the saved model's param shapes differ from `model_config`'s."""
        import grain

        where = self.directory / str(step)
        saved, current = param_shapes(self.saved_model_config(step)), param_shapes(model_config)
        diffs = [f"{p}: saved {saved.get(p)} vs now {current.get(p)}"
                 for p in sorted(set(saved) | set(current)) if saved.get(p) != current.get(p)]
        if diffs:
            raise ResumeError(f"{where}: checkpoint is of another model shape ({len(diffs)} param(s) differ: "
                              f"{'; '.join(diffs[:3])}); use a new run_dir or the same model config")
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
            if not (where / "data").is_dir():
                raise ResumeError(f"{where}: checkpoint has no data iterator state to resume from")
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        return self.manager.restore(step, args=ocp.args.Composite(**items))["state"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
