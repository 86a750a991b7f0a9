"""Command line: ``python -m nbcompress demo``."""

from __future__ import annotations

import argparse
import sys

__all__ = ["main"]

_DEMO = (
    "Train a CNN on real digits, then prune 90%% by a checked sensitivity suggestion, "
    "fine-tune, run sparse kernels where faster and int8; report accuracy, size and "
    "latency, dense vs compressed."
)


def main(argv: list[str] | None = None) -> int:
    """Run a sub-command; return the process exit code."""
    parser = argparse.ArgumentParser(prog="python -m nbcompress", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help=_DEMO, description=_DEMO)
    demo.add_argument("--epochs", type=int, default=None, help="Training epochs (default 8).")
    demo.add_argument(
        "--target",
        "--amount",
        dest="target",
        type=float,
        default=None,
        help="Sparsity to prune to (default 0.9).",
    )
    demo.add_argument(
        "--batch", type=int, default=None, help="Batch size to choose kernels on (default 64)."
    )
    demo.add_argument(
        "--threads",
        type=int,
        default=1,
        help="Torch threads (default 1: steadier on a busy machine; e.g. 2 for two cores).",
    )
    demo.add_argument("--quick", action="store_true", help="Small settings (a few seconds).")
    args = parser.parse_args(argv)
    if args.command == "demo":
        _check(parser, args)
        from nbcompress.demo import run_demo

        run_demo(
            epochs=args.epochs,
            threads=args.threads,
            target=args.target,
            batch=args.batch,
            quick=args.quick,
        )
    return 0


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """One line naming the option and the fix, before anything is trained."""
    if args.target is not None and not 0 < args.target < 1:
        parser.error(f"--target: expected a sparsity in (0, 1) such as 0.9, got {args.target}.")
    for name in ("epochs", "batch", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name}: expected a positive integer, got {value}.")


if __name__ == "__main__":
    sys.exit(main())
