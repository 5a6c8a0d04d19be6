"""Train Molmo2 from one config file: `python train/train.py --config configs/train/NAME.yaml [a.b=value ...]`.

Started again with the same run_dir, it resumes from the latest checkpoint. See molmo2_jax/training/.
"""

import argparse
import sys

from molmo2_jax.training.config import load_train_config
from molmo2_jax.training.run import run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="configs/train/NAME.yaml (or NAME)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. steps=100 optimizer.llm.lr=1e-5")
    args = parser.parse_args(argv)
    try:
        run(load_train_config(args.config, args.overrides))
    except (ValueError, OSError, RuntimeError) as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
