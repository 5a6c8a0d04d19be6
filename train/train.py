"""Train Molmo2 from one config file: `python train/train.py --config configs/train/NAME.yaml [a.b=value ...]`.

Started again with the same run_dir, it resumes from the latest checkpoint. SIGTERM or Ctrl-C saves the current
step and exits with 128 + the signal number. On several hosts, start one process per host with the same
arguments plus --coordinator / --num-processes / --process-id (or the MOLMO2_* variables, or nothing where JAX
detects the cluster: TPU pods, SLURM). See molmo2_jax/training/ and molmo2_jax/distributed.py.
"""

import argparse
import sys

from molmo2_jax import distributed
from molmo2_jax.training.config import load_train_config
from molmo2_jax.training.loop import TrainingInterrupted
from molmo2_jax.training.run import run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="configs/train/NAME.yaml (or NAME)")
    parser.add_argument("--coordinator", help="HOST:PORT of process 0 of a multi-host run")
    parser.add_argument("--num-processes", type=int, help="processes of a multi-host run")
    parser.add_argument("--process-id", type=int, help="this process's index in 0..num-processes-1")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. steps=100 optimizer.llm.lr=1e-5")
    args = parser.parse_args(argv)
    try:
        config = load_train_config(args.config, args.overrides)
        distributed.initialize(args.coordinator, args.num_processes, args.process_id)
        run(config)
    except TrainingInterrupted as e:
        print(f"train.py: {e}", file=sys.stderr)
        return e.exit_code
    except (ValueError, OSError, RuntimeError) as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
