"""The ``editlab`` command line: one subcommand per job.

Each module in ``editing/commands/`` defines ``NAME``, ``HELP``, ``add_arguments(parser)`` and ``run(args)``;
they are found automatically. Every command also gets ``--threads`` and ``-v``, and every option's default is
shown in its ``--help``. Before a command runs, ``check_before_work`` checks its inputs and outputs (weights
kind, device, embeddings and the tokens of the prompts, output path, sizes and their memory). Errors a user
can fix (``UserError``, the ``ValueError`` and ``OSError`` families, a NaN loss, running out of memory) are
printed as one line without a traceback; ``-v`` shows the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys

from ldm.interrupt import EXIT_INTERRUPTED, Interrupted

from . import commands
from .checks import default_threads
from .errors import UserError

USER_ERRORS = (UserError, ValueError, OSError, FloatingPointError, MemoryError)


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("editlab")
    except PackageNotFoundError:
        return "unknown (not installed)"


def show_defaults(parser: argparse.ArgumentParser) -> None:
    """Append "(default: X)" to the help of every option with a default its help does not already state."""
    for action in parser._actions:
        if action.help == argparse.SUPPRESS or any(action.default is v for v in (None, False, argparse.SUPPRESS)) \
                or action.default == []:
            continue
        if action.help and "default" in action.help:
            continue
        action.help = f"{action.help} (default: %(default)s)" if action.help else "default: %(default)s"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="editlab", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details; show tracebacks")
    parser.add_argument("--version", action="version", version=f"editlab {version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{commands.__name__}.{info.name}")
        command = sub.add_parser(module.NAME, help=module.HELP, description=module.HELP)
        module.add_arguments(command)
        command.add_argument("--threads", type=int, default=default_threads(),
                             help="CPU threads for torch, recorded in the outputs (default: %(default)s, half of this "
                                  "machine's cores: fast when other jobs share it)")
        command.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                             help="log debug details; show tracebacks")
        show_defaults(command)
        command.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    try:
        from .preflight import check_before_work

        check_before_work(args)
        return args.run(args) or 0
    except Interrupted as stop:  # Ctrl-C in a long run: it saved its checkpoint (ldm/interrupt.py)
        print(f"editlab {args.command}: {stop}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:  # Ctrl-C in a short command: nothing to save
        if args.verbose:
            raise
        print(f"editlab {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:
        message = user_error_message(args.command, err)
        if args.verbose or message is None:
            raise
        print(message, file=sys.stderr)
        return 2


def user_error_message(command: str, err: Exception) -> str | None:
    """The one line shown for an error a user can fix, or None for a bug (which keeps its traceback)."""
    out_of_memory = isinstance(err, RuntimeError) and "out of memory" in str(err)
    if not (isinstance(err, USER_ERRORS) or out_of_memory):
        return None
    message = str(err).strip().splitlines()[0] if str(err).strip() else err.__class__.__name__
    return f"editlab {command}: error: {message}"


if __name__ == "__main__":
    sys.exit(main())
