"""Dense speed after structural removal: resnet18 at 50% (and vit_b_16 heads + FFN, if present).

resnet18 (random init, seed 0), ``remove_(model, --ratio, example_inputs=x)`` with
``x = 1x3x224x224``; a deep copy taken before removal is the dense baseline. Reported: params
and MACs (hook estimate over Conv/Linear/norm layers, theoretical) before/after, and the
measured latency of both models at batch 1 and 8, one thread, timed side by side with
``nbcompress.timing.race`` (interleaved rounds, each candidate once per round in rotating
order, per-round paired ratios; median and the 25% quantile of the per-round speed-up).
The machine is shared (2 cores, other jobs running): paired ratios hold up under that load,
raw times less so.

vit_b_16 with ``heads=`` and ``ffn=`` is run only when ``remove_`` accepts them (the
attention work of issue 13); otherwise a note is printed.

Run: ``PYTHONPATH=$PWD python benchmarks/bench_structural_speed.py [--rounds 20] [--quick]``;
markdown on stdout (and ``--out`` file if given).
"""

from __future__ import annotations

import argparse
import copy
import inspect
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torchvision  # noqa: E402

from nbcompress.engine.structural.remove import remove_  # noqa: E402
from nbcompress.timing import race  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from bench_structural import count_macs  # noqa: E402


def params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def compare(name: str, dense, removed, args: argparse.Namespace) -> list[str]:
    """Rows: params, MACs, and paired latency at each batch size."""
    x1 = torch.randn(1, 3, 224, 224)
    p0, p1 = params(dense), params(removed)
    m0, m1 = count_macs(dense, x1), count_macs(removed, x1)
    rows = [
        f"| {name} | params | {p0 / 1e6:.2f} M | {p1 / 1e6:.2f} M | {p0 / p1:.2f}x fewer | |",
        f"| {name} | MACs (hook estimate) | {m0 / 1e9:.2f} G | {m1 / 1e9:.2f} G "
        f"| {m0 / m1:.2f}x fewer | |",
    ]
    for batch in args.batches:
        x = torch.randn(batch, 3, 224, 224)
        with torch.inference_mode():
            result = race(
                {"dense": lambda x=x: dense(x), "removed": lambda x=x: removed(x)},
                rounds=args.rounds,
                warmup=2,
                min_sample=args.min_sample,
            )
        t0, t1 = result.times["dense"], result.times["removed"]
        speedup = 1 / result.ratio("removed")
        q25 = result.speedup_quantile("removed", 0.25)
        rows.append(
            f"| {name} | latency, batch {batch} | {t0.ms:.1f} ms | {t1.ms:.1f} ms "
            f"| {speedup:.2f}x faster (median paired) | {q25:.2f}x in 3 of 4 rounds |"
        )
        print(rows[-1], flush=True)
    return rows


def resnet18(args: argparse.Namespace) -> list[str]:
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    dense = copy.deepcopy(model)
    x = torch.randn(1, 3, 224, 224)
    remove_(model, args.ratio, example_inputs=x, round_to=args.round_to)
    label = f"resnet18 {args.ratio:.0%}" + (f" round_to={args.round_to}" if args.round_to else "")
    return compare(label, dense, model, args)


def vit(args: argparse.Namespace) -> list[str]:
    accepted = inspect.signature(remove_).parameters
    if "heads" not in accepted or "ffn" not in accepted:
        return ["(vit_b_16: remove_ takes no heads=/ffn= in this build; skipped)"]
    torch.manual_seed(0)
    model = torchvision.models.vit_b_16().eval()
    dense = copy.deepcopy(model)
    x = torch.randn(1, 3, 224, 224)
    try:
        remove_(model, 0.0, example_inputs=x, heads=args.heads, ffn=args.ffn)
    except (ValueError, NotImplementedError) as err:
        return [f"(vit_b_16 heads={args.heads} ffn={args.ffn}: {err})"]
    return compare(f"vit_b_16 heads {args.heads:.0%} ffn {args.ffn:.0%}", dense, model, args)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--round-to", type=int, default=None)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--min-sample", type=float, default=0.05, help="seconds per sample")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--heads", type=float, default=0.25)
    p.add_argument("--ffn", type=float, default=0.5)
    p.add_argument("--no-vit", action="store_true")
    p.add_argument("--quick", action="store_true", help="5 rounds, batch 1 only, no ViT")
    p.add_argument("--out", help="also write the markdown here")
    args = p.parse_args()
    if args.quick:
        args.rounds, args.batches, args.no_vit = 5, [1], True
    torch.set_num_threads(1)
    lines = [
        f"Dense latency after structural removal, 1 thread, {args.rounds} interleaved rounds "
        f"(torch {torch.__version__}, {sys.platform}).",
        "",
        "| model | measure | dense | removed | ratio | spread |",
        "|---|---|---|---|---|---|",
    ]
    lines += resnet18(args)
    if not args.no_vit:
        lines += vit(args)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
