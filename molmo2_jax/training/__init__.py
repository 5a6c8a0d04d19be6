"""Training: config, optimizer (per-module AdamW), loss, the jitted train step, checkpoints, loop and metrics.

    from molmo2_jax.training import load_train_config, run
    run(load_train_config("tiny", ["steps=100"]))
"""

from molmo2_jax.training.checkpointing import Checkpointer, ResumeError
from molmo2_jax.training.config import TrainConfig, TrainConfigError, load_train_config, parse_train_config
from molmo2_jax.training.loop import DataExhaustedError, NanLossError, Trainer, TrainingInterrupted, initial_state
from molmo2_jax.training.run import run
from molmo2_jax.training.step import BatchError, TrainStep, make_train_step

__all__ = ["BatchError", "Checkpointer", "DataExhaustedError", "NanLossError", "ResumeError", "TrainConfig",
           "TrainConfigError", "TrainStep", "Trainer", "TrainingInterrupted", "initial_state", "load_train_config",
           "make_train_step", "parse_train_config", "run"]
