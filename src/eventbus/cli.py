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


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    """The parser of subcommand ``name`` (``parser`` itself if there is none)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and name in action.choices:
            return action.choices[name]
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``eventbus`` console script."""
    parser, handlers = _build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args, extras = parser.parse_known_args(argv)
    if not args.command:
        if extras:
            parser.error(f"unrecognized arguments: {' '.join(extras)}")
        parser.print_help()
        return 2
    if extras:
        # Unknown arguments after the command are that command's to report, with its
        # own usage line; those before it (`eventbus --bogus train`) are ours.
        before = argv[: argv.index(args.command)]
        owner = parser if any(a in before for a in extras) else _subparser(parser, args.command)
        owner.error(f"unrecognized arguments: {' '.join(extras)}")
    return int(handlers[args.command](args) or 0)


if __name__ == "__main__":
    sys.exit(main())
