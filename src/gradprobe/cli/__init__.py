"""The ``gradprobe`` command line: one module per subcommand, each with ``add_parser`` and ``run``.

Exit codes: 0 success (or healthy), 1 a problem found, 2 a usage error (message, no traceback).
"""
from __future__ import annotations

import argparse
import sys
import traceback

from gradprobe._version import __version__
from gradprobe.cli import demo, doctor, env, experiment, export, report
from gradprobe.errors import GradprobeError

__all__ = ["main", "build_parser"]

#: one module per subcommand, each with ``add_parser(sub)`` and ``run(args)``
_SUBCOMMANDS = (demo, doctor, report, export, env, experiment)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gradprobe",
        description="See, explain, predict and fix vanishing and exploding gradients in PyTorch models.",
    )
    parser.add_argument("--version", action="version", version=f"gradprobe {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in _SUBCOMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(args.run(args) or 0)
    except GradprobeError as exc:
        if getattr(args, "traceback", False):
            traceback.print_exception(exc, file=sys.stderr)
        print(f"gradprobe {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
