"""sparsify_ without int8 never imports onnx (~0.7 s of a sparsify_ that reuses its record)."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import sys, warnings
import torch
import nbcompress as nc
torch.manual_seed(0)
m = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64))
nc.prune_(m.eval(), 0.9, include_output=True)
warnings.simplefilter("ignore")
nc.sparsify_(m, torch.randn(8, 64), repeats=3)
print("onnx" in sys.modules)
"""


def test_sparsify_without_int8_does_not_import_onnx(tmp_path):
    env = {"NBCOMPRESS_TUNING": "off", "NBCOMPRESS_WARMUP": "0", "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, check=True,
        cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert out.stdout.strip().splitlines()[-1] == "False", out.stderr[-2000:]
