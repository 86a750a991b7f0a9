import subprocess
import sys
from pathlib import Path

import nbcompress


def test_public_engine_names_leave_the_frontend_out():
    # Every public name outside the notebook layer resolves without loading IPython,
    # ipywidgets or pyplot (tests/test_architecture.py checks every engine/kernels module).
    code = (
        "import sys, nbcompress\n"
        "frontend = ('IPython', 'ipywidgets', 'matplotlib.pyplot')\n"
        "for name, module in nbcompress._EXPORTS.items():\n"
        "    if not module.startswith('nbcompress.notebook'):\n"
        "        getattr(nbcompress, name)\n"
        "        loaded = {f for f in frontend for m in sys.modules if m.startswith(f)}\n"
        "        assert not loaded, f'nbcompress.{name} loaded {sorted(loaded)}'\n"
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
