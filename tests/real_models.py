"""Small instances of the architectures users bring: torch transformers, attention, LSTM.

Issue 11 asks every verb to run on ``nn.TransformerEncoder``, ``nn.TransformerDecoder``,
``nn.MultiheadAttention`` models and an LSTM. Each builder returns ``(model, example_input)``
in eval mode, seeded, small enough for unit tests.
"""

from __future__ import annotations

import torch
from torch import nn


class TransformerClassifier(nn.Module):
    """Token embedding → ``nn.TransformerEncoder`` → mean pool → Linear logits."""

    def __init__(self, vocab: int = 50, width: int = 32, classes: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        layer = nn.TransformerEncoderLayer(width, 4, 64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(width, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(tokens)).mean(dim=1))


class AttentionClassifier(nn.Module):
    """Linear in → one ``nn.MultiheadAttention`` (self-attention) → Linear out."""

    def __init__(self, features: int = 12, width: int = 32, classes: int = 4) -> None:
        super().__init__()
        self.proj = nn.Linear(features, width)
        self.attn = nn.MultiheadAttention(width, 4, batch_first=True)
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x)
        out, _ = self.attn(h, h, h, need_weights=False)
        return self.head(out.mean(dim=1))


class DecoderModel(nn.Module):
    """``nn.TransformerDecoder`` over a target sequence with a memory sequence."""

    def __init__(self, width: int = 32, classes: int = 4) -> None:
        super().__init__()
        layer = nn.TransformerDecoderLayer(width, 4, 64, dropout=0.0, batch_first=True)
        self.decoder = nn.TransformerDecoder(layer, 2)
        self.head = nn.Linear(width, classes)

    def forward(self, tgt: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        return self.head(self.decoder(tgt, memory).mean(dim=1))


class LSTMClassifier(nn.Module):
    """Embedding → 2-layer ``nn.LSTM`` → last step → Linear logits."""

    def __init__(self, vocab: int = 50, width: int = 32, classes: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, 16)
        self.lstm = nn.LSTM(16, width, num_layers=2, batch_first=True)
        self.head = nn.Linear(width, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.embed(tokens))
        return self.head(out[:, -1])


def transformer_encoder() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return TransformerClassifier().eval(), torch.randint(0, 50, (4, 10))


def attention() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return AttentionClassifier().eval(), torch.randn(4, 10, 12)


def transformer_decoder() -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(0)
    return DecoderModel().eval(), (torch.randn(4, 6, 32), torch.randn(4, 8, 32))


def lstm() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return LSTMClassifier().eval(), torch.randint(0, 50, (4, 10))


#: Every builder, by name (for parametrised tests).
BUILDERS = {
    "transformer_encoder": transformer_encoder,
    "transformer_decoder": transformer_decoder,
    "attention": attention,
    "lstm": lstm,
}
