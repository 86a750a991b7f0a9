"""Command line: ``python -m nbcompress demo`` and ``python -m nbcompress warmup``."""

from __future__ import annotations

import argparse
import sys

__all__ = ["main"]

_DEMO = (
    "Train a CNN on real digits, then prune 90%% by a checked sensitivity suggestion, "
    "fine-tune, run sparse kernels where faster and int8; report accuracy, size and "
    "latency, dense vs compressed."
)


_WARMUP = (
    "Compile (or load from numba's disk cache) the common sparse kernels now, e.g. once "
    "after installing, so that the first sparse call in a notebook does not wait for it."
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
    demo.add_argument(
        "--quick", action="store_true", help="Small settings: the same steps, shorter (for tests)."
    )
    sub.add_parser("warmup", help=_WARMUP, description=_WARMUP)
    args = parser.parse_args(argv)
    if args.command == "warmup":
        from nbcompress.kernels import warmup

        result = warmup(quiet=True)
        print(result.line())
        return 1 if result.error else 0
    if args.command == "demo":
        from nbcompress.demo import DemoInputError, run_demo

        try:
            run_demo(
                epochs=args.epochs,
                threads=args.threads,
                target=args.target,
                batch=args.batch,
                quick=args.quick,
            )
        except DemoInputError as err:
            # Raised before anything runs; the message names the argument (other errors keep
            # their traceback).
            parser.error(f"--{err}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
