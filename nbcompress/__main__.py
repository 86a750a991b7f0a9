"""Command line: ``python -m nbcompress demo``."""

from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Run a sub-command; return the process exit code."""
    parser = argparse.ArgumentParser(prog="python -m nbcompress", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="Train a CNN on real digits, prune 50%%, fine-tune, report.")
    demo.add_argument("--epochs", type=int, default=8, help="Training epochs (default 8).")
    demo.add_argument("--amount", type=float, default=0.5, help="Fraction to prune (default 0.5).")
    demo.add_argument("--threads", type=int, default=None, help="Torch threads (default: all).")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from nbcompress.demo import run_demo

        run_demo(epochs=args.epochs, amount=args.amount, threads=args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
