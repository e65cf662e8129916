"""The ``editlab`` command line: one subcommand per job.

Each module in ``editing/commands/`` defines ``NAME``, ``HELP``, ``add_arguments(parser)`` and ``run(args)``;
they are found automatically. Errors a user can fix (``UserError`` and the ``ValueError`` family raised on
bad input) are printed as one line, without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys

from ldm.interrupt import EXIT_INTERRUPTED, Interrupted

from . import commands
from .options import UserError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="editlab", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{commands.__name__}.{info.name}")
        command = sub.add_parser(module.NAME, help=module.HELP, description=module.HELP)
        module.add_arguments(command)
        command.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    try:
        return args.run(args) or 0
    except Interrupted as stop:  # Ctrl-C in a long run: it saved its checkpoint (ldm/interrupt.py)
        print(f"editlab {args.command}: {stop}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (UserError, ValueError, FileNotFoundError, FileExistsError) as err:
        if args.verbose:
            raise
        print(f"editlab {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
