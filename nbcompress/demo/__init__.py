"""The demo behind ``python -m nbcompress demo``: the whole compression arc, measured.

Train the seed CNN on real digits → sensitivity suggestion → prune with masks → fine-tune →
sparse kernels where faster → int8 → dense vs compressed accuracy, size and latency.
"""

from __future__ import annotations

from nbcompress.demo.arc import DemoInputError, DemoSettings, run_demo

__all__ = ["DemoInputError", "DemoSettings", "run_demo"]
