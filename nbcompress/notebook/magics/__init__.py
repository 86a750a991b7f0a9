"""IPython magics of nbcompress; registered by ``%load_ext nbcompress``."""

from __future__ import annotations

from typing import Any

__all__ = ["register"]


def _magic_classes() -> list[type]:
    # Imported here so that `import nbcompress` never imports IPython.
    from nbcompress.notebook.magics._core import CoreMagics
    from nbcompress.notebook.magics._factorize import FactorizeMagics
    from nbcompress.notebook.magics._finetune import FinetuneMagics
    from nbcompress.notebook.magics._quantize import QuantizeMagics
    from nbcompress.notebook.magics._search import SearchMagics
    from nbcompress.notebook.magics._sensitivity import SensitivityMagics
    from nbcompress.notebook.magics._speedup import SpeedupMagics
    from nbcompress.notebook.magics._undo import UndoMagics

    return [
        CoreMagics,
        UndoMagics,
        SensitivityMagics,
        QuantizeMagics,
        SpeedupMagics,
        FactorizeMagics,
        FinetuneMagics,
        SearchMagics,
    ]


def register(ipython: Any) -> None:
    """Register every nbcompress magic with ``ipython`` (idempotent)."""
    for cls in _magic_classes():
        ipython.register_magics(cls)
