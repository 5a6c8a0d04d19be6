"""The training loop: draw `grad_accum` micro-batches, run the step, log, evaluate, checkpoint, stop on NaN,
on SIGTERM / SIGINT save and stop.

Takes any iterator of host batches (the training batch contract, numpy) and optionally the Grain iterator
behind it for checkpointing (anything Grain's checkpoint handler accepts: a `DatasetIterator` or a
`DataLoaderIterator`). Batches are drawn synchronously right before each step, so the iterator state saved
with step k is exactly the position after the batches of step k; resuming replays the same batches.

On several processes each iterator yields that host's own examples; before each step the hosts exchange a few
integers (batch shapes, token counts, a stop signal) so all pad to the same shapes and stop at the same step.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np

from molmo2_jax import distributed
from molmo2_jax.batch import fill_value
from molmo2_jax.data.errors import TooManyBadExamplesError
from molmo2_jax.errors import Molmo2Error
from molmo2_jax.training.checkpointing import Checkpointer, CheckpointSaveError
from molmo2_jax.training.metrics import EventWriter, peak_tflops, progress_line, train_flops
from molmo2_jax.training.step import MODEL_KEYS, TARGET_KEYS, TrainStep

STEP_KEYS = MODEL_KEYS + TARGET_KEYS


class NanLossError(Molmo2Error):
    """The loss became NaN or infinite; the run stopped."""


class DataExhaustedError(Molmo2Error):
    """The training data ran out before the last step."""


class TrainingInterrupted(Molmo2Error):
    """SIGTERM or SIGINT stopped the run after a step, saved (`checkpoint`) or whose save failed (`save_error`);
    `exit_code` is 128 + signal."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None, save_error: str | None = None):
        where = save_error or (f"saved {checkpoint}" if checkpoint else "no checkpointer, nothing saved")
        super().__init__(f"{signal.Signals(signum).name} received: stopped after step {step}; {where} (run again "
                         "with the same run_dir to resume)")
        self.signum, self.step, self.checkpoint = signum, step, checkpoint

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopSignals:
    """While active, SIGTERM and SIGINT only record the first signal (the loop then finishes its step, saves it
    and stops); later ones are ignored, so they cannot cut the save short. Python delivers signals to the main
    thread only, so elsewhere this does nothing."""

    def __init__(self):
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _record(self, signum, frame) -> None:
        if self.received is None:
            self.received = signum

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._record) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():  # None: a handler set outside Python, not restorable
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)


def stack_micro_batches(micro_batches: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """k host batches -> one batch with a leading micro-batch axis of size k, keeping the step's keys.

    Micro-batches padded to different buckets are padded to a common shape first (pooling slots with -1,
    everything else with 0: no tokens, no loss, empty crops)."""
    out = {}
    for key in micro_batches[0]:
        if key not in STEP_KEYS:
            continue  # e.g. the packer's crop_mask / frame_mask
        arrays = [np.asarray(mb[key]) for mb in micro_batches]
        shape = np.max([a.shape for a in arrays], axis=0)
        out[key] = np.stack([pad_to(key, a, shape) for a in arrays])
    return out


def pad_to(key: str, array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """`array` (batch[key]) padded at the end of each axis to `shape` with `batch.fill_value(key)`."""
    return np.pad(array, [(0, s - n) for s, n in zip(shape, array.shape)], constant_values=fill_value(key))


def _batch_counts(batch: dict[str, np.ndarray]) -> tuple[int, int, int, int]:
    """(real tokens, crops + frames, pooled visual tokens, sequence length) of a stacked host batch."""
    seg = batch.get("segment_ids")
    tokens = int(np.count_nonzero(seg)) if seg is not None else int(np.prod(batch["input_ids"].shape))
    crops = visual = 0
    for pixels, pooling in (("pixel_values", "image_token_pooling"), ("pixel_values_videos", "video_token_pooling")):
        if pooling in batch:
            idx = batch[pooling]
            visual += int(np.any(idx >= 0, axis=-1).sum())
            # crops in use = those some pooling slot of their row points into (cheaper than scanning the pixels)
            per_crop = batch[pixels].shape[-2]
            rows = idx.reshape(int(np.prod(idx.shape[:-2])), *idx.shape[-2:])  # a bucket may have no slots: -1 fails
            crops += sum(len(np.unique(row[row >= 0] // per_crop)) for row in rows)
    return tokens, crops, visual, int(batch["input_ids"].shape[-1])


def _window() -> dict[str, float]:
    """Accumulators of one logging interval."""
    return {"start": time.perf_counter(), "wait": 0.0, "tokens": 0, "flops": 0.0}


def initial_state(train_step: TrainStep, checkpointer: Checkpointer | None, fresh: Callable[[], dict[str, Any]],
                  data_iterator: Any = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Resume from the latest readable checkpoint when there is one (params, optimizer, step and data position);
    otherwise `fresh()` (the starting point)."""
    restored = checkpointer.restore_latest(train_step.abstract_state(), train_step.model_config, data_iterator,
                                           log) if checkpointer else None
    if restored is None:
        return fresh()
    log(f"resuming from {checkpointer.directory / str(restored[0])}")
    return restored[1]


class Trainer:
    """Runs a TrainStep from the state's step to `train_config.steps`."""

    def __init__(self, train_step: TrainStep, checkpointer: Checkpointer | None = None,
                 events: EventWriter | None = None, log: Callable[[str], None] = print):
        self.ts = train_step
        self.config = train_step.train_config
        self.checkpointer = checkpointer
        self.events = events
        self.log = log
        self.multihost = jax.process_count() > 1
        peak = self.config.log.peak_tflops_per_device or peak_tflops(jax.devices()[0])
        self.peak_flops = peak * 1e12 * train_step.mesh.size if peak else None
        self.history: list[tuple[int, dict[str, float]]] = []  # (step, metrics) at every log interval

    def _check(self, step: int, metrics: dict[str, Any]) -> dict[str, float]:
        values = {k: float(v) for k, v in metrics.items()}
        if not np.isfinite(values["loss"]):
            last = self.checkpointer.latest_step() if self.checkpointer else None
            where = f"{self.checkpointer.directory / str(last)}" if last is not None else "none saved"
            raise NanLossError(f"loss is {values['loss']} at step {step}; stopping. Last checkpoint: {where}")
        return values

    def _draw(self, batches: Iterator[dict[str, np.ndarray]]) -> dict[str, np.ndarray] | None:
        """The next `grad_accum` micro-batches stacked, or None when the data ran out."""
        try:
            return stack_micro_batches([next(batches) for _ in range(self.config.grad_accum)])
        except StopIteration:
            return None

    def _agree(self, batch: dict[str, np.ndarray] | None, counts: tuple[int, ...], signum: int | None):
        """Multi-host: this host's batch padded to the shapes all hosts agreed on (None when any host's data ran
        out), the global counts of `_batch_counts` and the stop signal any host received (0: none)."""
        agreement = distributed.agree(self.ts.mesh, STEP_KEYS, batch, maxima=(signum or 0,), totals=counts[:3],
                                      axis=1)
        if agreement.shapes is None:
            return None, counts, agreement.maxima[0]
        batch = {k: pad_to(k, v, agreement.shapes[k]) for k, v in batch.items()}
        return batch, (*agreement.totals, agreement.shapes["input_ids"][-1]), agreement.maxima[0]

    def _interrupt(self, signum: int, step: int, state: dict[str, Any], metrics: dict[str, Any],
                   data_iterator: Any) -> None:
        """Save `step` (with the data position after its batches), wait for the save, raise TrainingInterrupted."""
        self._check(step, metrics)  # never save a NaN state
        where = None
        if self.checkpointer:
            self.log(f"{signal.Signals(signum).name} received: saving step {step}, then stopping")
            try:
                self.checkpointer.save(step, state, self.ts.model_config, self.config, data_iterator)
                self.checkpointer.wait()
            except CheckpointSaveError as e:  # still stop as the signal asks, saying what was lost
                raise TrainingInterrupted(signum, step, None, str(e)) from None
            where = self.checkpointer.directory / str(step)
        raise TrainingInterrupted(signum, step, where)

    def _save_before_stop(self, step: int, state: dict[str, Any], pending: tuple[int, dict[str, Any]] | None,
                          data_iterator: Any, position: Any) -> None:
        """Save `step` (unless saved already) with the data position before the batches that failed, so a run
        started again (e.g. with a higher max_bad_fraction) repeats them."""
        if not self.checkpointer or self.multihost or step in (0, self.checkpointer.latest_step()):
            return  # several hosts: the others are not at this point to save with us
        if pending is not None:
            self._check(*pending)
        if position is not None:
            data_iterator.set_state(position)
        try:
            self.checkpointer.save(step, state, self.ts.model_config, self.config, data_iterator)
            self.checkpointer.wait()
        except CheckpointSaveError as e:  # the data error that stops the run stays the one raised
            self.log(str(e))
            return
        self.log(f"saved step {step} to {self.checkpointer.directory / str(step)} before stopping")

    def run(self, state: dict[str, Any], batches: Iterator[dict[str, np.ndarray]], data_iterator: Any = None,
            eval_batches: Callable[[], Iterable[dict[str, np.ndarray]]] | None = None) -> dict[str, Any]:
        """Train until `steps`; returns the final state. Checkpoints every `checkpoint.every` steps and at the
        end; raises NanLossError (naming the step and the last checkpoint) on a non-finite loss and, after saving
        the step it was in, TrainingInterrupted on SIGTERM / SIGINT."""
        c = self.config
        step = int(jax.device_get(state["step"]))
        pending: tuple[int, dict[str, Any]] | None = None  # the previous step's metrics, checked one step late
        window = _window()
        with StopSignals() as signals:
            while step < c.steps:
                t0 = time.perf_counter()
                position = data_iterator.get_state() if self.checkpointer and data_iterator is not None else None
                try:
                    batch = self._draw(batches)
                except TooManyBadExamplesError:
                    self._save_before_stop(step, state, pending, data_iterator, position)
                    raise
                window["wait"] += time.perf_counter() - t0
                counts = _batch_counts(batch) if batch is not None else (0, 0, 0, 0)
                stop = None
                if self.multihost:  # all hosts stop after this step if any of them got a signal before it
                    batch, counts, stop = self._agree(batch, counts, signals.received)
                if batch is None:
                    raise DataExhaustedError(f"training data ran out at step {step} of {c.steps}")
                tokens, crops, visual, seq_len = counts
                window["tokens"] += tokens
                window["flops"] += train_flops(self.ts.model_config, tokens, crops, visual, seq_len)
                state, metrics = self.ts.step(state, batch)
                step += 1
                if pending is not None:
                    self._check(*pending)
                pending = (step, metrics)

                if step % c.log.every == 0 or step == c.steps:
                    values = self._check(step, metrics)
                    self.history.append((step, values))
                    elapsed = time.perf_counter() - window["start"]
                    mfu = window["flops"] / elapsed / self.peak_flops if self.peak_flops else None
                    self.log(progress_line(step, c.steps, values, window["tokens"] / elapsed, mfu,
                                           window["wait"] / elapsed))
                    if self.events:
                        extra = {"perf/tokens_per_s": window["tokens"] / elapsed,
                                 "perf/data_wait_fraction": window["wait"] / elapsed}
                        if mfu is not None:
                            extra["perf/mfu"] = mfu
                        self.events.scalars(step, {f"train/{k}": v for k, v in values.items()} | extra)
                    window = _window()
                if not self.multihost:
                    stop = signals.received  # including one that came during the step
                if stop and step < c.steps:
                    self._interrupt(stop, step, state, metrics, data_iterator)
                if eval_batches is not None and c.eval.every and step % c.eval.every == 0:
                    self.evaluate(step, state["params"], eval_batches())
                if self.checkpointer and ((c.checkpoint.every and step % c.checkpoint.every == 0)
                                          or step == c.steps):
                    self._check(step, metrics)  # never save a NaN state
                    self.checkpointer.save(step, state, self.ts.model_config, c, data_iterator)
            if pending is not None:
                self._check(*pending)
            if self.checkpointer:
                self.checkpointer.wait()  # a signal now does not cut the last save short
        return state

    def evaluate(self, step: int, params: dict[str, Any], batches: Iterable[dict[str, np.ndarray]]) -> dict[str, float]:
        """Loss and accuracy over `eval.batches` held-out batches (each drawn as grad_accum micro-batches)."""
        c = self.config
        totals: dict[str, float] = {}
        it = iter(batches)
        for _ in range(c.eval.batches):
            batch = self._draw(it)
            if self.multihost:  # the same shapes on every host, and all stop when one host's data runs out
                batch, _, _ = self._agree(batch, (0, 0, 0), None)
            if batch is None:
                break
            for k, v in self.ts.evaluate(params, batch).items():
                totals[k] = totals.get(k, 0.0) + float(v)
        if not totals:
            return {}
        norm = totals["weight"] if totals["weight"] > 0 else 1.0
        z = c.optimizer.z_loss_scale
        result = {"loss": (totals["ce"] + z * totals["z"]) / norm, "ce_loss": totals["ce"] / norm,
                  "accuracy": totals["correct"] / norm}
        self.log(f"eval step {step} | loss {result['loss']:.4f} | accuracy {result['accuracy']:.4f}")
        if self.events:
            self.events.scalars(step, {f"eval/{k}": v for k, v in result.items()})
        return result
