"""Execute example notebooks in a real kernel and save them with their outputs.

Usage: ``python tools/run_notebook.py example_notebooks/06_image.ipynb [...]``; prints each
notebook's wall time (the figure RESULTS.md quotes for "each notebook ≤ 120 s").
"""

from __future__ import annotations

import sys
import tempfile
import time

import nbformat
from nbclient import NotebookClient


def main(paths: list[str]) -> None:
    """Run each notebook top to bottom in a temporary directory; write it back with outputs."""
    for path in paths:
        nb = nbformat.read(path, as_version=4)
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as cwd:
            client = NotebookClient(
                nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": cwd}}
            )
            client.execute()
        print(f"{path}: {time.perf_counter() - start:.1f} s")
        nbformat.write(nb, path)


if __name__ == "__main__":
    main(sys.argv[1:])
