"""Measuring leaves the model as it was: eval mode, then every flag and buffer restored."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

from nbcompress.engine.core.history import trial
from nbcompress.engine.core.validation import eval_mode

__all__ = ["unchanged"]


@contextlib.contextmanager
def unchanged(model: nn.Module) -> Iterator[None]:
    """Run ``model`` for measurement only: eval mode, then every flag and buffer as before.

    In training mode a forward pass updates BatchNorm statistics and draws Dropout masks;
    measuring must change nothing, so the model runs in eval mode (each module's own flag
    is restored afterwards) inside a trial that restores every buffer bit-exactly, in case
    a forward pass updates one even in eval mode.
    """
    with eval_mode(model), trial(model) as guard:
        for buf in model.buffers():
            guard.save_tensor(buf)
        yield
