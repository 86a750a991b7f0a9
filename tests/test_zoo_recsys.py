"""MovieLens loader, leave-one-out split and ranking metrics on tiny synthetic data."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
from torch import nn

from nbcompress import zoo_recsys
from nbcompress.zoo_recsys import (
    TwoTower,
    compare,
    example_pairs,
    leave_one_out,
    markdown_table,
    parse_interactions,
    ranking,
    train_two_tower,
)

# user 1 rates items 1, 2, 3 (3 latest); user 2 rates 2 then 1 (1 latest), same-time tie for user 3.
INTER = (
    "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
    "1\t3\t5\t30\n1\t1\t4\t10\n2\t1\t3\t20\n1\t2\t4\t20\n2\t2\t2\t5\n3\t2\t4\t7\n3\t1\t1\t7\n"
)


def test_parse_and_leave_one_out_take_each_users_latest_rating():
    data = leave_one_out(*parse_interactions(INTER))
    assert (data.n_users, data.n_items) == (4, 4)
    test = dict(zip(data.test_users.tolist(), data.test_items.tolist(), strict=True))
    assert test == {1: 3, 2: 1, 3: 1}  # a tie on time: the later row is the test item
    train = sorted(zip(data.train_users.tolist(), data.train_items.tolist(), strict=True))
    assert train == [(1, 1), (1, 2), (2, 2), (3, 2)]
    assert data.counts()["item"].tolist() == [0, 1, 3, 0]
    assert data.seen[1].tolist() == [False, True, True, False]


def test_parse_rejects_a_file_without_rows():
    with pytest.raises(ValueError, match="text: no interaction rows"):
        parse_interactions("user_id:token\titem_id:token\n")


class Fixed(nn.Module):
    """Scores given by a fixed user × item matrix (users(u) = one-hot, items(i) = columns)."""

    def __init__(self, scores: torch.Tensor) -> None:
        super().__init__()
        self.scores = scores

    def users(self, u):
        return torch.eye(self.scores.shape[0])[u]

    def items(self, i):
        return self.scores[:, i].T


def test_ranking_counts_hits_within_k_among_unseen_items():
    # 6 users, 6 items (id 0 never rated: excluded); each user's test item is item 5.
    users = torch.tensor([u for u in range(6) for _ in (0, 1)])
    items = torch.tensor([i for u in range(6) for i in ((u % 4) + 1, 5)])
    times = torch.arange(12.0)
    data = leave_one_out(users, items, times)
    scores = torch.zeros(6, 6)
    scores[:, 5] = torch.tensor([9.0, 9.0, -1.0, -1.0, -1.0, -1.0])  # users 0, 1 rank it first
    scores[:, 0] = 100.0  # id 0 is no item: must not push the test item down
    rec, ndcg = ranking(Fixed(scores), data, k=1)
    assert rec == pytest.approx(2 / 6)
    assert ndcg == pytest.approx(2 / 6 * (1 / math.log2(2)))
    rec4, _ = ranking(Fixed(scores), data, k=4)  # 4 unseen items per user: always in the top 4
    assert rec4 == pytest.approx(1.0)


def test_missing_recbole_is_one_line_naming_the_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError) as err:
        zoo_recsys.load_movielens()
    assert str(err.value) == zoo_recsys.INSTALL_HINT
    assert "pip install --no-deps recbole" in str(err.value) and "\n" not in str(err.value)


def test_train_and_compare_on_a_tiny_log():
    torch.manual_seed(0)
    # 20 users, each rates the 3 items of its group (1-3 or 4-6) once, in a random order: the
    # latest is the test item, and it should outrank the other group's unseen items.
    users = torch.arange(1, 21).repeat_interleave(3)
    items = torch.tensor([g * 3 + k for u in range(1, 21) for g in [u % 2] for k in (1, 2, 3)])
    data = leave_one_out(
        users, items, torch.randperm(60, generator=torch.Generator().manual_seed(0)).float()
    )
    model = TwoTower(data.n_users, data.n_items, dim=8, hidden=16)
    before = ranking(model, data, k=1)[0]
    train_two_tower(model, data, epochs=150, seed=0, lr=1e-2)
    # The test item is 1 of 4 unseen candidates: 1/4 by chance; the group structure is learnt.
    assert ranking(model, data, k=1)[0] >= 0.75 > before
    pairs = example_pairs(data, n=8)
    rows = compare({"a": model, "b": model}, data, pairs, repeats=2)
    assert rows[1]["smaller"] == "1.00×" and rows[0]["recall@10"] == "1.0000"
    table = markdown_table(rows).splitlines()
    assert table[0].startswith("| model | recall@10") and len(table) == 4
