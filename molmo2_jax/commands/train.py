"""`molmo2-jax train --config NAME_OR_YAML [a.b=value ...]`: train Molmo2 from one config file (a packaged recipe
by name, e.g. `tiny` or `molmo2-4b-sft`, or a path to your own YAML).

Started again with the same run_dir, it resumes from the latest checkpoint. SIGTERM or Ctrl-C saves the current
step and exits with 128 + the signal number. On several hosts, start one process per host with the same
arguments plus --coordinator / --num-processes / --process-id (or the MOLMO2_* variables, or nothing where JAX
detects the cluster: TPU pods, SLURM). See molmo2_jax/training/ and molmo2_jax/distributed.py."""

from __future__ import annotations

import argparse
import sys

HELP = "train Molmo2 from a config file (resumes a run_dir; SIGTERM / Ctrl-C save the step and stop)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True,
                        help="a packaged recipe NAME (molmo2_jax/configs/train/NAME.yaml) or a YAML path")
    parser.add_argument("--coordinator", help="HOST:PORT of process 0 of a multi-host run")
    parser.add_argument("--num-processes", type=int, help="processes of a multi-host run")
    parser.add_argument("--process-id", type=int, help="this process's index in 0..num-processes-1")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. steps=100 optimizer.llm.lr=1e-5")


def run(args: argparse.Namespace) -> int:
    from molmo2_jax import distributed
    from molmo2_jax.training.config import load_train_config
    from molmo2_jax.training.loop import TrainingInterrupted
    from molmo2_jax.training.run import run as train

    config = load_train_config(args.config, args.overrides)
    distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    try:
        train(config)
    except TrainingInterrupted as e:  # a requested stop, not an error: the step is saved
        print(f"molmo2-jax train: {e}", file=sys.stderr)
        return e.exit_code
    return 0
