"""The ``eventbus`` command line. Each subcommand lives in its own module and registers
itself here, so importing the CLI imports no backend SDK."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Callable, Sequence

__all__ = ["main", "SUBCOMMANDS"]

# name -> "module:function" that adds the subparser; the function returns the handler.
SUBCOMMANDS: dict[str, str] = {
    "train": "trainer.cli:add_train_parser",
    "replay": "eventbus.replay:add_parser",
    "bench": "eventbus._bench_cli:add_parser",
}


def _build_parser() -> tuple[argparse.ArgumentParser, dict[str, Callable[[argparse.Namespace], int]]]:
    parser = argparse.ArgumentParser(prog="eventbus", description=__doc__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    handlers: dict[str, Callable[[argparse.Namespace], int]] = {}
    for name, target in SUBCOMMANDS.items():
        module_name, func = target.split(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and module_name.startswith(exc.name):
                continue  # that subcommand is not part of this install (yet)
            raise
        handlers[name] = getattr(module, func)(sub)
    return parser, handlers


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``eventbus`` console script."""
    parser, handlers = _build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    return int(handlers[args.command](args) or 0)


if __name__ == "__main__":
    sys.exit(main())
