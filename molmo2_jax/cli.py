"""The `molmo2-jax` command. Each subcommand is a module in molmo2_jax/commands/ exposing `HELP`,
`add_arguments(parser)` and `run(args) -> int`; modules are imported only when their command runs."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

import molmo2_jax.commands as commands


EVAL_EXTRA = ("scipy", "pycocotools", "trackeval", "pyarrow")  # pyproject's `eval` extra


def _command_names() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(commands.__path__) if not m.name.startswith("_"))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    names = _command_names()
    parser = argparse.ArgumentParser(prog="molmo2-jax", description="Molmo2 vision-language models in JAX.")
    parser.add_argument("command", choices=names, help="subcommand")
    if not argv or argv[0] not in names:
        parser.parse_args(argv[:1] or ["--help"])
        return 2
    module = importlib.import_module(f"molmo2_jax.commands.{argv[0]}")
    sub = argparse.ArgumentParser(prog=f"molmo2-jax {argv[0]}", description=module.HELP)
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
        print(f"molmo2-jax {argv[0]}: error: {e.name} is not installed; it comes with the eval extra: "
              f"pip install 'molmo2-jax[eval]'", file=sys.stderr)
        return 1
    except (ValueError, OSError) as e:  # our error classes derive from ValueError; file problems from OSError
        print(f"molmo2-jax {argv[0]}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
