"""Small recommender-shaped models for the embedding tests."""

import torch
from torch import nn


class TwoTower(nn.Module):
    """User and item tables, concatenated into an MLP scoring the pair."""

    def __init__(self, users: int = 300, items: int = 500, dim: int = 16) -> None:
        super().__init__()
        self.user = nn.Embedding(users, dim)
        self.item = nn.Embedding(items, dim)
        self.mlp = nn.Sequential(nn.Linear(2 * dim, 32), nn.ReLU(), nn.Linear(32, 1))

    def forward(self, u: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
        return self.mlp(torch.cat([self.user(u), self.item(i)], -1)).squeeze(-1)


class BagModel(nn.Module):
    """A user table and a bag of the user's history items (mean), scored by a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.user = nn.Embedding(100, 8)
        self.history = nn.EmbeddingBag(200, 8, mode="mean", padding_idx=0)
        self.out = nn.Linear(16, 1)

    def forward(self, u: torch.Tensor, hist: torch.Tensor) -> torch.Tensor:
        return self.out(torch.cat([self.user(u), self.history(hist)], -1))


def pair_batch(model: TwoTower, n: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random (user, item) ids for ``model``."""
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randint(0, model.user.num_embeddings, (n,), generator=g),
        torch.randint(0, model.item.num_embeddings, (n,), generator=g),
    )
