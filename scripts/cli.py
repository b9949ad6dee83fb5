"""The `slimtune` command: one subcommand per job, each defined in its own module here.

Each module `scripts/<name>.py` defines `add_parser(subparsers)` (which registers the
subcommand and sets `func=run` on it) and `run(args) -> int`. This file only dispatches; no
method logic lives in `scripts/`.
"""

from __future__ import annotations

import argparse
import importlib
import os
import shlex
import signal
import sys

from eval.console import quiet_library_logs

# Subcommand modules, in the order `slimtune --help` lists them.
COMMANDS = [
    "bench",
    "tune",
    "prune",
    "compress_vit",
    "compress_lm",
    "lowrank_bench",
    "zero_shot",
    "codegen_eval",
    "estimate_memory",
    "reference",
    "export_task",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="slimtune",
        description="Quantized Side Tuning, DISP-LLM pruning and mixed-rank ViT compression, "
        "with one shared evaluation harness.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="show library logs and full tracebacks")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"scripts.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"scripts.{name}":
                continue  # subcommand not built yet
            raise
        module.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "-v" in argv or "--verbose" in argv:
        os.environ["SLIMTUNE_VERBOSE"] = "1"  # also seen by the fresh processes bench measures in
    quiet_library_logs()  # before the subcommands import the libraries
    parser = build_parser()
    args = parser.parse_args(argv)
    args.command_line = shlex.join(["slimtune", *argv])  # recorded in model cards
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from eval import io
    from eval.errors import UserInputError

    io.KEPT.clear()
    previous = _stop_on_sigterm()
    try:
        return int(args.func(args) or 0)
    except UserInputError as e:
        if args.verbose:
            raise
        print(f"slimtune {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (below): children and temporaries are gone by now
        kept = "; ".join(io.KEPT) or "nothing kept"
        print(f"slimtune {args.command}: {getattr(e, 'reason', 'interrupted')}; {kept}", file=sys.stderr)
        return getattr(e, "exit_status", 130)
    except Exception as e:  # a full disk or an unwritable output, met during the work
        message = io.write_failure_message(e)
        if message is None or args.verbose:
            raise
        kept = "; ".join(io.KEPT)
        print(f"slimtune {args.command}: error: {message}" + (f"; {kept}" if kept else ""), file=sys.stderr)
        return 2
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C would be, so that the same clean-up runs."""

    reason = "terminated (SIGTERM)"
    exit_status = 143


def _stop_on_sigterm():
    """Turn SIGTERM into `Terminated` for the run; returns the previous handler (None off the main thread)."""
    def handler(signum, frame):
        raise Terminated()

    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave the signal alone
        return None


if __name__ == "__main__":
    sys.exit(main())
