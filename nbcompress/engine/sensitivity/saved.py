"""Saved sensitivity results: standard JSON written atomically, read back with every field checked.

A sweep can take hours, so its result is saved to a file and loaded in another session,
possibly from someone else's machine. Writing goes to a temporary file in the same folder,
then ``os.replace``: a crash or a full disk mid-write keeps the old file. Reading never
unpickles and checks every field, so a damaged or hand-edited file gives one ``ValueError``
naming ``path`` and what is wrong, instead of a result that fails later.

Curve points may be non-finite (a metric that became NaN at a high pruning ratio means the
model broke there); standard JSON has no NaN, so such points are written as the strings
``"nan"``, ``"inf"`` and ``"-inf"`` and read back as floats. ``null`` is an unevaluated point.
"""

from __future__ import annotations

import contextlib
import json
import math
import numbers
import os
import tempfile
from pathlib import Path
from typing import Any

from nbcompress.engine.prune.masks import GRANULARITIES

__all__ = ["FORMAT", "read_result", "write_result"]

FORMAT = "nbcompress.sensitivity/1"

_NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def _point_out(value: float | None) -> float | str | None:
    if value is None or math.isfinite(value):
        return value
    return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")


def write_result(path: str | Path, data: dict[str, Any]) -> None:
    """Write ``data`` (``SensitivityResult.to_dict()``) to ``path`` as standard JSON, atomically.

    Args:
        path: The file to write; its folder must exist.
        data: The result's fields.

    Raises:
        ValueError: A number outside the curves is not finite (e.g. a NaN baseline).
    """
    data = dict(data)
    data["curves"] = {n: [_point_out(v) for v in c] for n, c in data["curves"].items()}
    try:
        text = json.dumps(data, indent=1, allow_nan=False)
    except ValueError as err:
        raise ValueError(
            f"path: cannot save to {str(path)!r}: {err} (outside the curves)."
        ) from None
    target = Path(path)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class _Bad(ValueError):
    """What is wrong with one field (the caller adds the path)."""


def _real(value: Any, what: str, *, finite: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise _Bad(f"{what} is {type(value).__name__} {value!r}, not a number")
    try:
        number = float(value)
    except OverflowError:  # a 400-digit JSON integer
        number = math.inf
    if finite and not math.isfinite(number):
        raise _Bad(f"{what} is {value!r}, not a finite number")
    return number


def _count(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _Bad(f"{what} is {value!r}, not a count (an integer >= 0)")
    return value


def _typed(data: dict, key: str, kind: type | tuple[type, ...], name: str) -> Any:
    if key not in data:
        raise _Bad(f"the field {key!r} is missing")
    value = data[key]
    if not isinstance(value, kind):
        raise _Bad(f"{key} is {type(value).__name__}, not {name}")
    return value


def _point_in(value: Any, what: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, str) and value in _NONFINITE:
        return _NONFINITE[value]
    return _real(value, what, finite=False)


def _per_layer(data: dict, key: str, layers: list[str], *, required: bool = True) -> dict:
    value = _typed(data, key, dict, "a dict layer → value") if required or key in data else {}
    unknown = [n for n in value if n not in layers]
    if unknown:
        raise _Bad(f"{key} names {unknown[0]!r}, which is not among the layers")
    return value


def _layers_and_ratios(data: dict) -> tuple[list[str], list[float]]:
    layers = _typed(data, "layers", list, "a list of layer names")
    if not layers or not all(isinstance(n, str) for n in layers) or len(set(layers)) < len(layers):
        raise _Bad("layers must be a non-empty list of distinct layer names")
    ratios = _typed(data, "ratios", list, "a list of fractions")
    ratios = [_real(r, f"ratios[{i}]") for i, r in enumerate(ratios)]
    if not ratios or any(not 0 < r < 1 for r in ratios) or ratios != sorted(set(ratios)):
        raise _Bad("ratios must be a non-empty ascending list of distinct fractions in (0, 1)")
    return layers, ratios


def _curves(data: dict, layers: list[str], ratios: list[float]) -> dict[str, list]:
    curves = _per_layer(data, "curves", layers)
    missing = [n for n in layers if n not in curves]
    if missing:
        raise _Bad(f"curves has no curve for layer {missing[0]!r}")
    out = {}
    for n in layers:
        curve = curves[n]
        if not isinstance(curve, list) or len(curve) != len(ratios):
            got = len(curve) if isinstance(curve, list) else type(curve).__name__
            raise _Bad(
                f"curves[{n!r}] must be a list of {len(ratios)} values (one per ratio), got {got}"
            )
        out[n] = [_point_in(v, f"curves[{n!r}][{i}]") for i, v in enumerate(curve)]
    return out


def _fields(data: dict) -> dict[str, Any]:
    layers, ratios = _layers_and_ratios(data)
    sizes = _per_layer(data, "sizes", layers)
    if any(n not in sizes for n in layers):
        raise _Bad("sizes must give the parameter count of every layer")
    macs = _per_layer(data, "macs", layers)
    start = _per_layer(data, "start", layers, required=False)
    notes = data.get("notes", [])
    if not isinstance(notes, list) or not all(isinstance(s, str) for s in notes):
        raise _Bad("notes must be a list of strings")
    granularity = _typed(data, "granularity", str, "a string")
    if granularity not in GRANULARITIES:
        raise _Bad(f"granularity {granularity!r} is not one of {GRANULARITIES}")
    seconds = _real(_typed(data, "seconds", numbers.Real, "a number"), "seconds")
    method = data.get("method", "l1")  # files from before wanda have no method: L1
    if method not in ("l1", "wanda"):
        raise _Bad(f"method {method!r} is not 'l1' or 'wanda'")
    filled = data.get("filled", {})
    if not isinstance(filled, dict) or not all(
        n in layers and isinstance(v, list) and all(
            isinstance(i, int) and not isinstance(i, bool) and 0 <= i < len(ratios) for i in v)
        for n, v in filled.items()
    ):  # fmt: skip
        raise _Bad("filled must map analysed layers to lists of ratio indices")
    reconstruct = data.get("reconstruct", False)
    if not isinstance(reconstruct, bool):
        raise _Bad("reconstruct must be true or false")
    remove = data.get("remove", False)  # files from before group sweeps: per-layer
    if not isinstance(remove, bool):
        raise _Bad("remove must be true or false")
    return {
        "layers": layers, "ratios": ratios,
        "baseline": _real(_typed(data, "baseline", numbers.Real, "a number"), "baseline"),
        "curves": _curves(data, layers, ratios),
        "sizes": {n: _count(sizes[n], f"sizes[{n!r}]") for n in layers},
        "macs": {n: None if v is None else _count(v, f"macs[{n!r}]") for n, v in macs.items()},
        "metric": _typed(data, "metric", str, "a string"),
        "higher_is_better": _typed(data, "higher_is_better", bool, "true or false"),
        "proxy": _typed(data, "proxy", bool, "true or false"),
        "granularity": granularity,
        "evaluations": _count(_typed(data, "evaluations", int, "an integer"), "evaluations"),
        "seconds": max(seconds, 0.0), "complete": _typed(data, "complete", bool, "true or false"),
        "notes": list(notes),
        "start": {n: _real(v, f"start[{n!r}]") for n, v in start.items()},
        "method": method, "reconstruct": reconstruct, "filled": filled, "remove": remove,
    }  # fmt: skip


def read_result(path: str | Path) -> dict[str, Any]:
    """Read and check a file written by :func:`write_result`; the result's fields.

    Args:
        path: The file to read.

    Returns:
        Keyword arguments of ``SensitivityResult``.

    Raises:
        ValueError: One line naming ``path`` and what is wrong (not UTF-8, not JSON, nested
            too deeply, not a saved result, a field missing or of the wrong kind).
        OSError: The file cannot be read (missing, a directory, no permission).
    """
    where = f"path: {str(path)!r}"
    raw = Path(path).read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{where} is not a saved sensitivity result: not UTF-8 text (byte "
            f"{raw[err.start]:#04x} at offset {err.start})."
        ) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where} is not JSON: {err}.") from None
    except RecursionError:
        raise ValueError(f"{where} is not a saved sensitivity result: nested too deeply.") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"{where} is not a saved nbcompress sensitivity result.")
    try:
        return _fields(data)
    except _Bad as err:
        raise ValueError(f"{where} is not a valid saved sensitivity result: {err}.") from None
