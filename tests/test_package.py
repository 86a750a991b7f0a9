import subprocess
import sys
from pathlib import Path

import nbcompress


def test_engine_import_leaves_ipython_out():
    code = (
        "import sys, nbcompress, nbcompress.engine.prune.prune, nbcompress.engine.core.summary, "
        "nbcompress.engine.core.history; nbcompress.summary; "
        "assert 'IPython' not in sys.modules and 'ipywidgets' not in sys.modules, "
        "sorted(m for m in sys.modules if 'IPython' in m)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_public_name_resolves():
    for name in nbcompress.__all__:
        assert getattr(nbcompress, name) is not None, name


def test_version_is_defined_once():
    from importlib.metadata import version

    assert nbcompress.__version__ == version("nbcompress")


def test_cli_help():
    out = subprocess.run(
        [sys.executable, "-m", "nbcompress", "--help"], capture_output=True, text=True, check=True
    )
    assert "demo" in out.stdout


def test_code_is_ruff_clean():
    root = Path(__file__).parents[1]
    for args in (["check", "."], ["format", "--check", "."]):
        out = subprocess.run(
            [sys.executable, "-m", "ruff", *args], cwd=root, capture_output=True, text=True
        )
        assert out.returncode == 0, out.stdout + out.stderr
