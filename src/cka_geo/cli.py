"""The ``cka-geo`` command line: one subcommand per module in :mod:`cka_geo.commands`.

Results go to stdout, progress to stderr. Exit codes: 0 success, 1 runtime error, 2 usage
error. Every :class:`~cka_geo.errors.CkaGeoError` is printed as one line, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings
from collections.abc import Sequence
from typing import NoReturn

import torch

from cka_geo import __version__
from cka_geo.errors import CkaGeoError, UsageError

# Each module defines ``NAME``, ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``.
COMMANDS = ("compare", "plot", "pretrain", "finetune", "evaluate", "demo", "probe", "study", "convert")
#: The subcommands that run under ``torchrun`` (docs/distributed.md); the others refuse it.
DISTRIBUTED = ("compare", "finetune")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit 2
        sub = self.prog.removeprefix("cka-geo").strip()
        line = f"cka-geo: error: {sub + ': ' if sub else ''}{one_line(message)}"
        from cka_geo.distributed import say_once

        self.exit(2, f"{line}\n" if say_once(line) else None)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every available subcommand."""
    parser = _Parser(
        prog="cka-geo",
        description="Where did fine-tuning change my vision transformer? Sublayer-by-sublayer CKA "
        "between a pretrained and a fine-tuned checkpoint.",
        epilog="example: cka-geo compare pre.pt ft.pt   (cka-geo COMMAND --help for its options)",
    )
    parser.add_argument("--version", action="version", version=f"cka-geo {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"cka_geo.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"cka_geo.commands.{name}":
                continue  # not built yet
            raise
        p = sub.add_parser(module.NAME, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script and of ``python -m cka_geo``."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # usage errors (2) and --help/--version (0), already printed
        return exc.code if isinstance(exc.code, int) else 2
    if not getattr(args, "_run", None):
        parser.print_help(sys.stderr)
        return 2
    from cka_geo import distributed

    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning  # one line each on stderr, restored after
            env = distributed.launcher_env()
            if env is not None and args.command not in DISTRIBUTED:
                raise UsageError(f"{args.command} does not run under torchrun (WORLD_SIZE={env.world}); "
                                 f"run it in one process (torchrun runs {' and '.join(DISTRIBUTED)})")
            if env is not None and env.rank != 0:
                warnings.simplefilter("ignore")  # rank 0 says it once
            return int(args._run(args) or 0)
    except distributed.PeerFailed as exc:  # the failed rank printed the line
        return exc.exit_code
    except CkaGeoError as exc:
        _say(f"cka-geo: error: {one_line(str(exc).strip() or type(exc).__name__)}")
        return exc.exit_code
    except KeyboardInterrupt:
        print("cka-geo: interrupted", file=sys.stderr)
        return 130
    except torch.cuda.OutOfMemoryError:
        hint = "; try a smaller --batch-size" if hasattr(args, "batch_size") else ""
        print(f"cka-geo: error: out of GPU memory{hint}", file=sys.stderr)
        return 1
    except Exception as exc:  # a bug: one line, the traceback on request
        if os.environ.get("CKA_GEO_DEBUG"):
            raise
        _say(
            f"cka-geo: internal error: {type(exc).__name__}: {_first_line(exc)} "
            "(set CKA_GEO_DEBUG=1 for the traceback, and please report it)"
        )
        return 1
    finally:
        distributed.shutdown()


def _say(line: str) -> None:
    """Print an error line on stderr, once per torchrun job when every rank fails alike."""
    from cka_geo.distributed import say_once

    if say_once(line):
        print(line, file=sys.stderr)


def one_line(text: str) -> str:
    """``text`` on one line: newlines and other control characters escaped as ``\\n``, ``\\x1b``...

    A path holding a newline still makes one line on stderr, and shows where the newline is.
    """
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return one_line(text.splitlines()[0]) if text else type(exc).__name__


def _show_warning(message: Warning | str, *args: object, **kwargs: object) -> None:
    text = _first_line(message) if isinstance(message, Warning) else one_line(str(message))
    print(f"cka-geo: warning: {text}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
