"""Build steps kept out of the installed ``nbcompress`` package (run from the repository root)."""
