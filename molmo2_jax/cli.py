"""The `molmo2-jax` command. Each subcommand is a module in molmo2_jax/commands/ exposing `HELP`,
`add_arguments(parser)` and `run(args) -> int`; the module `a_b` is the command `a-b` (`a_b` works too).
Modules are imported only when their command runs.

Errors are handled here for every subcommand: a `Molmo2Error` (an input the user can fix) or an `OSError`
(a file that cannot be read or written) is printed in one line with exit status 1 (or the command's
`ERROR_EXIT_CODE`); any other exception is a bug and shows its traceback."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

import molmo2_jax.commands as commands
from molmo2_jax.errors import Molmo2Error

EVAL_EXTRA = ("scipy", "pycocotools", "trackeval", "pyarrow")  # pyproject's `eval` extra


def command_names() -> list[str]:
    return sorted(m.name.replace("_", "-") for m in pkgutil.iter_modules(commands.__path__)
                  if not m.name.startswith("_"))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    names = command_names()
    parser = argparse.ArgumentParser(prog="molmo2-jax", description="Molmo2 vision-language models in JAX.")
    parser.add_argument("command", choices=names, help="subcommand")
    name = argv[0].replace("_", "-") if argv else None
    if name not in names:
        parser.parse_args(argv[:1] or ["--help"])
        return 2
    module = importlib.import_module(f"{commands.__name__}.{name.replace('-', '_')}")
    sub = argparse.ArgumentParser(prog=f"molmo2-jax {name}", description=module.HELP)
    module.add_arguments(sub)
    args = sub.parse_args(argv[1:])
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except ModuleNotFoundError as e:
        if e.name not in EVAL_EXTRA:
            raise
        print(f"{sub.prog}: error: {e.name} is not installed; it comes with the eval extra: "
              f"pip install 'molmo2-jax[eval]'", file=sys.stderr)
        return 1
    except (Molmo2Error, OSError) as e:
        print(f"{sub.prog}: error: {e}", file=sys.stderr)
        return getattr(module, "ERROR_EXIT_CODE", 1)


if __name__ == "__main__":
    sys.exit(main())
