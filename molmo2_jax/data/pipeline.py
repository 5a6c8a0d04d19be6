"""The Grain input pipeline: sources -> per-host shard -> shuffle / repeat -> weighted mixture -> decode and
preprocess (in worker processes) -> skip bad examples -> pack into static-shape batches.

Sources are TFDS datasets in array_record files (tfds random-access data sources, no TensorFlow) or JSONL
manifests (docs/data.md). Every step is deterministic given the seed, and the iterator's
`get_state()` / `set_state()` resume a run at exactly the next batch.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import signal
from collections.abc import Mapping
from typing import Any

import grain
import numpy as np

from molmo2_jax.data.conversation import tokenize_conversation
from molmo2_jax.data.errors import BadExampleError, DataError, TooManyBadExamplesError
from molmo2_jax.data.manifest import ManifestSource, check_clip, parse_line
from molmo2_jax.data.packing import PackingConfig, PackIterDataset, check_fits, largest
from molmo2_jax.preprocessing.collate import Bucket

log = logging.getLogger(__name__)
BAD = "__bad_example__"  # key of the marker a worker returns instead of an example it could not convert
_skipped: collections.Counter[str] = collections.Counter()  # bad example's message -> times skipped (this process)


@dataclasses.dataclass(frozen=True)
class Source:
    """One dataset of the mixture: a TFDS dataset directory (`.../name/version`) or a `.jsonl` manifest."""

    path: str
    split: str = "train"  # TFDS split (manifests have one)
    weight: float = 1.0  # mixture rate (normalised over the sources)
    loss_multiplier: float = 1.0  # scales this source's loss weights (e.g. 0.2 for pointing in Molmo2 SFT)

    @property
    def is_manifest(self) -> bool:
        return self.path.endswith(".jsonl")


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    processor_dir: str  # tokenizer + processor configs (e.g. the synthetic set's tokenizer/)
    sources: tuple[Source, ...]
    batch_size: int = 8  # packed rows per batch (per host)
    # static batch shapes; the vision limits are per row (packed sequence)
    buckets: tuple[Bucket, ...] = (Bucket(seq_len=1024, max_crops=8, max_image_tokens=1024, max_frames=12,
                                          max_video_tokens=972),)
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = None  # None: repeat forever
    num_workers: int = 0  # decoding / preprocessing processes (0: in this process)
    worker_buffer_size: int = 2  # examples each worker prepares ahead
    read_threads: int = 1  # threads per process reading and preprocessing
    read_buffer_size: int = 4
    lookahead: int = 16  # examples the packer considers for a batch's free space
    max_crops: int | None = None  # image tiling limit (None: the processor's)
    max_bad_fraction: float = 0.05  # fail when more than this share of examples is bad ...
    min_examples_before_failing: int = 50  # ... once at least this many were seen (or at the end)
    process_index: int | None = None  # host shard; None: jax.process_index()
    process_count: int | None = None


def _host(config: PipelineConfig) -> tuple[int, int]:
    if config.process_index is not None and config.process_count is not None:
        index, count = config.process_index, config.process_count
    else:
        import jax

        index, count = jax.process_index(), jax.process_count()
    if not 0 <= index < count:
        raise DataError(f"process_index {index} must be in [0, process_count={count})")
    return index, count


def _open_source(source: Source):
    if source.is_manifest:
        return ManifestSource(source.path)
    from molmo2_jax.data.tfds_builder import data_source

    return data_source(source.path, source.split)


class _Tag(grain.transforms.Map):
    """Attach the source index to each raw record."""

    def __init__(self, index: int):
        self.index = index

    def map(self, record):
        return self.index, record


def records(config: PipelineConfig) -> grain.MapDataset:
    """The host's shard of every source, shuffled, repeated and mixed: `(source index, raw record)` items."""
    if not config.sources:
        raise DataError("the pipeline needs at least one source")
    index, count = _host(config)
    parts = []
    for i, source in enumerate(config.sources):
        if not source.weight > 0:
            raise DataError(f"source {source.path}: weight must be positive, got {source.weight}")
        ds = grain.MapDataset.source(_open_source(source))
        if len(ds) < count:
            raise DataError(f"source {source.path} has {len(ds)} examples, fewer than the {count} hosts")
        ds = ds[index::count]  # disjoint per-host shards that together cover the source
        if config.shuffle:
            ds = ds.shuffle(seed=config.seed + 7919 * i)
        ds = ds.repeat(config.num_epochs)
        parts.append(ds.map(_Tag(i)))
    if len(parts) == 1:
        return parts[0]
    return grain.MapDataset.mix(parts, weights=[s.weight for s in config.sources])


def raw_example(source: Source, record: Mapping[str, Any]) -> dict[str, Any]:
    """A TFDS record or a manifest line -> `id`, `images`, `video`, `clip`, `messages`, `loss_multiplier`."""
    if source.is_manifest:
        raw = parse_line(record)
    else:
        text = lambda v: v.decode() if isinstance(v, bytes) else str(v)  # noqa: E731
        try:
            messages = json.loads(text(record["messages"]))
        except (KeyError, json.JSONDecodeError) as e:
            raise BadExampleError(f"{source.path}: record {text(record.get('id', '?'))}: bad messages: {e}") from None
        video = record.get("video", b"")
        name = f"{source.path}[{text(record.get('id', '?'))}]"
        clip = np.asarray(record.get("clip", ())).tolist()  # empty, or absent in records built before clips: all
        raw = {"id": name, "messages": messages, "images": [bytes(b) for b in record.get("images", [])],
               "video": bytes(video) if len(video) else None, "clip": check_clip(clip, name) if clip else None,
               "loss_multiplier": 1.0}
    raw["loss_multiplier"] *= source.loss_multiplier
    return raw


class Convert(grain.transforms.Map):
    """Raw record -> packed-ready example, or a `{BAD: message}` marker. Runs in the pipeline workers."""

    def __init__(self, config: PipelineConfig):
        self.config = config
        self.capacity = largest(config.buckets)
        self._processor = None

    def __getstate__(self):  # the processor is rebuilt in each worker
        return {**self.__dict__, "_processor": None}

    @property
    def processor(self):
        if self._processor is None:
            from molmo2_jax.preprocessing import Molmo2Processor

            self._processor = Molmo2Processor.from_pretrained(self.config.processor_dir)
        return self._processor

    def map(self, item):
        index, record = item
        source = self.config.sources[index]
        try:
            raw = raw_example(source, record)
            example = tokenize_conversation(self.processor, raw["messages"], raw["images"], raw["video"],
                                            name=raw["id"], loss_multiplier=raw["loss_multiplier"],
                                            max_crops=self.config.max_crops, clip=raw["clip"])
            check_fits(example, self.capacity)
        except (ValueError, OSError) as e:  # our errors name the example; anything else is a bug and raises
            return {BAD: str(e)}
        return example


class SkipBadIterDataset(grain.IterDataset):
    """Drops bad-example markers with a warning, counts them, and fails past `max_bad_fraction`."""

    def __init__(self, parent: grain.IterDataset, max_bad_fraction: float, min_examples: int):
        super().__init__(parent)
        self.max_bad_fraction, self.min_examples = max_bad_fraction, min_examples

    def __iter__(self):
        return SkipBadIterator(self._parent.__iter__(), self.max_bad_fraction, self.min_examples)


class SkipBadIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, max_bad_fraction: float, min_examples: int):
        super().__init__(parent)
        self.max_bad_fraction, self.min_examples = max_bad_fraction, min_examples
        self.seen = self.bad = 0

    def _check(self, final: bool) -> None:
        if (final or self.seen >= self.min_examples) and self.seen and self.bad > self.max_bad_fraction * self.seen:
            raise TooManyBadExamplesError(
                f"{self.bad} of {self.seen} examples were bad, more than max_bad_fraction="
                f"{self.max_bad_fraction:g}; see the warnings above for each one")

    def __next__(self):
        while True:
            try:
                item = next(self._parent)
            except StopIteration:
                self._check(final=True)
                raise
            self.seen += 1
            if BAD not in item:
                return item
            self.bad += 1
            _skipped[item[BAD]] += 1
            if _skipped[item[BAD]] == 1:  # later epochs skip it silently; take_bad_example_summary() counts them
                log.warning("skipping bad example (%d of %d so far): %s", self.bad, self.seen, item[BAD])
            self._check(final=False)

    def get_state(self) -> dict[str, Any]:
        return {"parent": self._parent.get_state(), "seen": self.seen, "bad": self.bad}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self.seen, self.bad = state["seen"], state["bad"]


def take_bad_example_summary() -> str | None:
    """One line counting the bad examples skipped since the last call (None: none), e.g. at the end of a run."""
    total, distinct = sum(_skipped.values()), len(_skipped)
    _skipped.clear()
    return f"skipped {total} bad example(s), {distinct} distinct, each warned once" if total else None


def _leave_signals_to_the_parent(worker_index: int, worker_count: int) -> None:
    """Ctrl-C and SIGTERM reach a worker too when they are sent to the process group (a terminal, a scheduler);
    the training loop handles them (finishes its step, saves, stops) and then shuts the workers down itself."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)


def examples(config: PipelineConfig) -> grain.IterDataset:
    """Converted examples (bad ones skipped and counted), before packing."""
    ds = records(config).map(Convert(config))
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=config.read_threads,
                                              prefetch_buffer_size=config.read_buffer_size))
    if config.num_workers > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # Grain's worker start-up reads absl flags; outside absl.app use defaults
            flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.num_workers,
                                                         per_worker_buffer_size=config.worker_buffer_size),
                            worker_init_fn=_leave_signals_to_the_parent)
    return SkipBadIterDataset(ds, config.max_bad_fraction, config.min_examples_before_failing)


def packing_config(config: PipelineConfig) -> PackingConfig:
    """Packing settings implied by the pipeline config and its processor directory."""
    from molmo2_jax.preprocessing import Molmo2Processor

    processor = Molmo2Processor.from_pretrained(config.processor_dir)
    image = processor.image_config
    side = image.size // image.patch_size
    return PackingConfig(batch_size=config.batch_size, buckets=tuple(config.buckets),
                         patches_per_crop=side * side, patch_dim=image.patch_size ** 2 * 3,
                         lookahead=config.lookahead, pad_token_id=processor.tokenizer.pad_token_id)


def dataset(config: PipelineConfig) -> grain.IterDataset:
    """Packed training batches (see `molmo2_jax.data.packing` for the keys)."""
    if config.batch_size < 1 or not config.buckets:
        raise DataError("batch_size must be >= 1 and at least one bucket given")
    return PackIterDataset(examples(config), packing_config(config))


def mixture_counts(config: PipelineConfig, draws: int) -> np.ndarray:
    """How many of the first `draws` mixed records come from each source (for checking rates)."""
    mixed = records(config)
    counts = np.zeros(len(config.sources), np.int64)
    for i in range(draws):
        counts[mixed[i][0]] += 1
    return counts
