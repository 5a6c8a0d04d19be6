"""One training run from a TrainConfig: mesh, model config, data, starting point or resume, then the loop.

    molmo2-jax train --config tiny steps=20 optimizer.llm.lr=1e-4

Layout of `run_dir`: `checkpoints/<step>/` (Orbax: state, data iterator of every process, config) and
`tensorboard/`. A run started again with the same run_dir resumes from its latest checkpoint. On several
processes each reads its own shard of the data (`data.batch_size` rows per host; the step sees all of them).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np

from molmo2_jax.checkpoint.formats import open_checkpoint
from molmo2_jax.config import to_dict
from molmo2_jax.data.pipeline import PipelineConfig
from molmo2_jax.distributed import startup_lines
from molmo2_jax.params import flatten, init_params, param_shapes, unflatten
from molmo2_jax.sharding import describe_mesh, fsdp_across_slices, make_mesh
from molmo2_jax.training.checkpointing import Checkpointer
from molmo2_jax.training.config import TrainConfig, TrainConfigError, model_config
from molmo2_jax.training.loop import Trainer, initial_state
from molmo2_jax.training.metrics import EventWriter
from molmo2_jax.training.step import TrainStep, make_train_step


def resolve_model_config(train: TrainConfig):
    """The model config of this run: from the init checkpoint (SFT), from the LLM + ViT configs on top of the
    preset (pretraining) or the preset alone (random init), then the `model` section's changes."""
    init = train.init
    tokens = None
    if train.model.vocab_from:
        from molmo2_jax.data import model_token_settings

        tokens = model_token_settings(train.model.vocab_from)
    if init.kind == "molmo2":
        return model_config(train, open_checkpoint(init.checkpoint).config, tokens)
    if init.kind == "llm_vit":
        from molmo2_jax.checkpoint.init_from import starting_config
        from molmo2_jax.config import load_preset

        return model_config(train, starting_config(load_preset(train.model.preset), init.llm, init.vit), tokens)
    return model_config(train, None, tokens)


def starting_state(ts: TrainStep) -> dict[str, Any]:
    """A fresh train state at the configured starting point (LoRA: the adapters, from `lora.adapter` or new)."""
    if ts.lora is None:
        return ts.init_state(starting_params(ts))
    if ts.lora.adapter:
        from molmo2_jax.checkpoint.peft import import_adapter

        return ts.init_state(import_adapter(ts.lora.adapter, ts.model_config, ts.lora))
    return ts.init_state(ts.train_config.init.seed)


def starting_params(ts: TrainStep) -> int | dict[str, Any]:
    """The configured starting weights (a seed for random init)."""
    init, config, mesh = ts.train_config.init, ts.model_config, ts.mesh
    if init.kind == "random":
        return init.seed
    if init.kind == "molmo2":  # a frozen LoRA base in the compute dtype, trained params in fp32
        return open_checkpoint(init.checkpoint).read_params(config, config.dtype if ts.lora else "float32", mesh)
    from molmo2_jax.checkpoint.init_from import params_from_llm_vit

    shardings = flatten(ts.base_shardings or ts.param_shardings)
    random = flatten(init_params(config, init.seed, mesh))
    params = params_from_llm_vit(config, init.llm, init.vit, random, param_shapes(config),
                                 place=lambda path, x: jax.device_put(x, shardings[path]))
    return unflatten(params)


def data_iterator(config: PipelineConfig | None, *, evaluation: bool = False):
    """A Grain iterator of packed batches for a `data` / `eval_data` section."""
    from molmo2_jax.data import dataset

    if config is None:
        raise TrainConfigError("the config has no data section (processor_dir and sources, see docs/data.md)")
    if evaluation:  # the same held-out batches at every evaluation
        config = dataclasses.replace(config, shuffle=False, num_epochs=1)
    return iter(dataset(config))


def run(train: TrainConfig, batches: Iterator[dict[str, np.ndarray]] | None = None,
        eval_batches: Callable[[], Iterator[dict[str, np.ndarray]]] | None = None,
        log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train (or resume) the run described by `train`; returns the final state. `batches` / `eval_batches`
    replace the config's data sections (e.g. an in-memory Grain iterator)."""
    from molmo2_jax.data.pipeline import take_bad_example_summary

    primary = jax.process_index() == 0
    log = log or ((lambda line: print(line, flush=True)) if primary else (lambda _: None))
    train = train.with_absolute_paths()
    take_bad_example_summary()  # counts from now on
    mesh = make_mesh(to_dict(train.mesh))
    if jax.process_count() > 1:
        for line in startup_lines(mesh):
            print(line, flush=True)
    config = resolve_model_config(train)
    ts = make_train_step(config, train, mesh)
    log(f"mesh {describe_mesh(mesh)}; model {config.text.num_layers} LLM layers x {config.text.hidden_size}, "
        f"{config.vision.num_layers} ViT layers; compute {config.dtype}, remat {config.remat_policy}")
    if warning := fsdp_across_slices(mesh.devices):
        log(warning)
    if batches is None:
        batches = data_iterator(train.data)
    if eval_batches is None and train.eval_data and train.eval.every:
        eval_batches = lambda: data_iterator(train.eval_data, evaluation=True)
    run_dir = Path(train.run_dir)
    checkpointer = Checkpointer(run_dir / "checkpoints", train.checkpoint)
    events = EventWriter(run_dir / "tensorboard") if train.log.tensorboard and primary else None
    grain_state = batches if hasattr(batches, "get_state") else None
    if ts.lora:  # the frozen base is not in the checkpoints: it is read again on resume
        ts.set_base(starting_params(ts))
    try:
        state = initial_state(ts, checkpointer, lambda: starting_state(ts), grain_state, log)
        return Trainer(ts, checkpointer, events, log).run(state, batches, grain_state, eval_batches)
    finally:
        checkpointer.close()
        if events:
            events.close()
        if summary := take_bad_example_summary():
            log(summary)
