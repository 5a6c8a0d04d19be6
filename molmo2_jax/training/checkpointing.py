"""Training checkpoints: an Orbax CheckpointManager holding, per saved step, the train state (params,
optimizer state, step), the Grain iterator state of every process and the run's config (JSON). The layout of a
step directory, which readers of checkpoints share, is in `molmo2_jax.checkpoint.formats`.

Saves are asynchronous (the state is copied off the devices before training continues; the iterator state
is written synchronously at save time) and only the last `keep` steps are kept. `restore` checks the saved
model config against the current one before touching any array, so resuming a run with a different model
shape fails with the differing params named.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from molmo2_jax.checkpoint.formats import CONFIG_ITEM, DATA_ITEM, STATE_ITEM
from molmo2_jax.checkpoint.storage import OrbaxErrorFilter, error_line, free_bytes, is_no_space, size_text
from molmo2_jax.config import Molmo2Config, from_dict, to_dict
from molmo2_jax.errors import Molmo2Error
from molmo2_jax.params import flatten, param_shapes
from molmo2_jax.training.config import CheckpointConfig, TrainConfig


class ResumeError(Molmo2Error):
    """A checkpoint cannot be resumed by this run (different model shape, missing items)."""


def shape_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """`path: saved S vs now C` for every path whose shape differs (or exists on one side only)."""
    return [f"{p}: saved {saved.get(p)} vs now {current.get(p)}"
            for p in sorted(set(saved) | set(current)) if saved.get(p) != current.get(p)]


class CheckpointSaveError(Molmo2Error):
    """A step could not be saved (e.g. the disk is full); its partial files are removed."""


class Checkpointer:
    def __init__(self, directory: str | Path, config: CheckpointConfig):
        self.directory = Path(directory).absolute()
        # cleanup_tmp_directories: a restart removes the partial step directories a failed or killed save left
        options = ocp.CheckpointManagerOptions(max_to_keep=config.keep, enable_async_checkpointing=config.async_save,
                                               create=True, cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self._saving: int | None = None  # the step whose (asynchronous) save may still fail
        self._filter = OrbaxErrorFilter()  # failures are raised in one line
        logging.getLogger("absl").addFilter(self._filter)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: dict[str, Any], model_config: Molmo2Config, train_config: TrainConfig,
             data_iterator: Any | None = None) -> None:
        """Start saving `state` (returns once the arrays are copied; call `wait()` before exiting). Raises
        CheckpointSaveError when this save or the previous one failed."""
        import grain

        items = {STATE_ITEM: ocp.args.StandardSave(state),
                 CONFIG_ITEM: ocp.args.JsonSave({"model": to_dict(model_config), "train": to_dict(train_config)})}
        if data_iterator is not None:
            items[DATA_ITEM] = grain.checkpoint.CheckpointSave(data_iterator)
        with self._reporting_failures():  # the previous step's save ends (and may fail) in here
            self.manager.wait_until_finished()
        self._check_free_space(step, state)
        self._saving = step
        with self._reporting_failures():
            self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def _check_free_space(self, step: int, state: dict[str, Any]) -> None:
        """Refuse a save that cannot fit before writing anything: a write that runs into a full disk fails in
        Orbax's writer threads, which leave tracebacks behind. The size is that of the latest saved step, or the
        state's bytes for the first save. One process only: on several, all would have to agree to skip."""
        if jax.process_count() > 1:
            return
        latest = self.latest_step()
        needed = (sum(f.stat().st_size for f in (self.directory / str(latest)).rglob("*") if f.is_file())
                  if latest is not None else sum(x.nbytes for x in jax.tree_util.tree_leaves(state)))
        free = free_bytes(self.directory)
        if free < needed:
            raise CheckpointSaveError(f"could not save step {step} to {self.directory / str(step)}: no space left on "
                                      f"device ({size_text(free)} free, a step takes about {size_text(needed)}); "
                                      "nothing was written")

    def wait(self) -> None:
        """Wait for the save in flight; raises CheckpointSaveError if it failed."""
        with self._reporting_failures():
            self.manager.wait_until_finished()
        self._saving = None

    @contextlib.contextmanager
    def _reporting_failures(self):
        try:
            yield
        except Exception as e:
            step, self._saving = self._saving, None
            if step is None:
                raise
            why = (f"no space left on device ({size_text(free_bytes(self.directory))} free)" if is_no_space(e)
                   else error_line(e))
            for partial in self.directory.glob(f"{step}{ocp.path.atomicity.TMP_DIR_SUFFIX}*"):
                shutil.rmtree(partial, ignore_errors=True)
            raise CheckpointSaveError(f"could not save step {step} to {self.directory / str(step)}: {why}; "
                                      "its partial files are removed") from None

    def restore_latest(self, abstract_state: dict[str, Any], model_config: Molmo2Config,
                       data_iterator: Any | None = None, log: Callable[[str], None] = print,
                       ) -> tuple[int, dict[str, Any]] | None:
        """The newest readable step and its state (see `restore`), or None when there is no step. An unreadable
        step is reported in one line and moved aside (`STEP.unreadable`, kept for inspection), then the step
        before it is tried. Several processes are assumed to find the same step unreadable (shared storage)."""
        steps = sorted(self.manager.all_steps(), reverse=True)
        for k, step in enumerate(steps):
            try:
                return step, self.restore(step, abstract_state, model_config, data_iterator)
            except ResumeError:
                raise
            except Exception as e:
                where = self.directory / str(step)
                aside = next(p for n in itertools.count() if not (p := where.with_name(
                    f"{step}.unreadable" + (f"-{n}" if n else ""))).exists())  # never over an earlier one
                then = f"resuming from step {steps[k + 1]}" if k + 1 < len(steps) else "no other step to resume from"
                log(f"checkpoint step {step} is unreadable ({error_line(e)}); moved it to {aside}, {then}")
                if jax.process_index() == 0:
                    where.rename(aside)
                if jax.process_count() > 1:
                    from jax.experimental import multihost_utils

                    multihost_utils.sync_global_devices(f"step {step} moved aside")
                self.manager.reload()
        if steps:
            raise ResumeError(f"{self.directory}: no readable checkpoint step ({', '.join(map(str, steps))} "
                              "unreadable); start a new run_dir or repair them")
        return None

    def saved_config(self, step: int) -> dict[str, Any]:
        """The run config saved with `step`: {"model": ..., "train": ...} as written by `save`."""
        return self.manager.restore(step, args=ocp.args.Composite(**{CONFIG_ITEM: ocp.args.JsonRestore()}))[CONFIG_ITEM]

    def _check_trained_params(self, step: int, abstract_params: dict[str, Any], saved_train: dict[str, Any]):
        """The saved state trains the same arrays as this run (a LoRA run: the same adapters), named otherwise."""
        shape = lambda tree: {p: tuple(x.shape) for p, x in flatten(tree).items()}
        with ocp.StandardCheckpointer() as reader:  # array metadata only, nothing restored
            saved = shape(reader.metadata(self.directory / str(step) / STATE_ITEM).item_metadata["params"])
        current = shape(abstract_params)
        if saved == current:
            return
        lora = saved_train.get("lora", {})
        was = (f"LoRA adapters (rank {lora.get('rank')}, targets {lora.get('targets')!r})" if lora.get("rank")
               else "every parameter (no LoRA)")
        diffs = shape_differences(saved, current)
        raise ResumeError(f"{self.directory / str(step)}: checkpoint trained {was} and this run trains other arrays "
                          f"({len(diffs)} differ: {'; '.join(diffs[:2])}); resume with the lora settings it was "
                          "started with, or use a new run_dir")

    def restore(self, step: int, abstract_state: dict[str, Any], model_config: Molmo2Config,
                data_iterator: Any | None = None) -> dict[str, Any]:
        """The state saved at `step`, placed like `abstract_state`; the data iterator is set to its saved
        position. Raises ResumeError if the saved model's param shapes differ from `model_config`'s."""
        import grain

        where = self.directory / str(step)
        saved_config = self.saved_config(step)
        saved, current = param_shapes(from_dict(Molmo2Config, saved_config["model"])), param_shapes(model_config)
        diffs = shape_differences(saved, current)
        if diffs:
            raise ResumeError(f"{where}: checkpoint is of another model shape ({len(diffs)} param(s) differ: "
                              f"{'; '.join(diffs[:3])}); use a new run_dir or the same model config")
        self._check_trained_params(step, abstract_state["params"], saved_config.get("train", {}))
        items = {STATE_ITEM: ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
            if not (where / DATA_ITEM).is_dir():
                raise ResumeError(f"{where}: checkpoint has no data iterator state to resume from")
            for file in sorted((where / DATA_ITEM).glob("*.json")):  # Grain's own error does not name the file
                try:
                    json.loads(file.read_text())
                except json.JSONDecodeError as e:
                    raise ValueError(f"{file}: not valid JSON ({e})") from None
            items[DATA_ITEM] = grain.checkpoint.CheckpointRestore(data_iterator)
        return self.manager.restore(step, args=ocp.args.Composite(**items))[STATE_ITEM]

    def close(self) -> None:
        logging.getLogger("absl").removeFilter(self._filter)
        self.manager.close()
