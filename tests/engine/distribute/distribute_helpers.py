"""Worker-side functions for the Dispatch tests: importable by name in worker processes."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch

from nbcompress.engine.core.distribute import shipped_states


def where(state: Any, item: int) -> tuple[int, int]:
    """The worker's process id and how many states it has unpickled so far."""
    time.sleep(0.05)  # long enough that both workers take items
    return os.getpid(), shipped_states()


def forward(state: tuple[torch.nn.Module, torch.Tensor], item: int) -> torch.Tensor:
    """The model's output on the shipped batch scaled by the item (a real computation)."""
    model, x = state
    with torch.no_grad():
        return model(x * (item + 1))


def fail_on_two(state: Any, item: int) -> int:
    if item == 2:
        raise ValueError(f"bad item {item}")
    return item


def call_state(state: Any, item: int) -> Any:
    """The shipped state is itself a function (a closure or an object defined in a test)."""
    return state(item)


def die_once(state: str, item: int) -> int:
    """Item 2 kills its worker process the first time (a marker file remembers)."""
    marker = Path(state) / "died"
    if item == 2 and not marker.exists():
        marker.touch()
        os._exit(1)
    return item * 10


def die_always(state: str, item: int) -> int:
    if item == 1:
        os._exit(1)
    return item


def slow_mark(state: str, item: int) -> int:
    """Sleep, then leave a file: which items ran after the caller stopped listening."""
    time.sleep(0.3)
    (Path(state) / f"ran-{item}").touch()
    return item


def append_item(state: list, item: int) -> int:
    """Changes the state it is given: shows whether the caller's own object was used."""
    state.append(item)
    return len(state)


def environment(state: Any, item: str) -> str | None:
    """An environment variable as the worker process sees it."""
    return os.environ.get(item)
