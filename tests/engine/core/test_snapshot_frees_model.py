"""Undo snapshots never keep a deleted model alive."""

import torch
from torch import nn


def test_a_model_whose_step_saved_the_model_itself_is_freed_when_deleted() -> None:
    """A step holding the model strongly kept the (weak) key of its own history alive."""
    import gc
    import weakref

    import nbcompress as nc

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    nc.quantize_(model, "dynamic", example_inputs=torch.randn(4, 8))
    assert nc.history(model)  # the step is recorded (and undo works, tested elsewhere)
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None
