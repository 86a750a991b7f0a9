"""Saved sensitivity results: standard JSON, atomic save, every bad file refused in one line."""

from __future__ import annotations

import json
import math
import os

import pytest

from nbcompress import SensitivityResult
from nbcompress.engine.sensitivity import saved


def _result(**changes) -> SensitivityResult:
    fields = dict(
        layers=["fc1", "fc2"], ratios=[0.3, 0.6, 0.9], baseline=0.95,
        curves={"fc1": [0.95, 0.9, 0.5], "fc2": [0.94, None, None]},
        sizes={"fc1": 100, "fc2": 50}, macs={"fc1": 400, "fc2": None}, metric="accuracy",
        higher_is_better=True, proxy=False, granularity="element", evaluations=5, seconds=1.5,
        complete=False, notes=["early stop"], start={"fc1": 0.0, "fc2": 0.1},
    )  # fmt: skip
    fields.update(changes)
    return SensitivityResult(**fields)


def test_round_trip_is_exact_with_non_finite_points_as_standard_json(tmp_path):
    path = tmp_path / "r.json"
    result = _result(
        curves={"fc1": [0.95, float("nan"), float("-inf")], "fc2": [0.9, None, math.inf]}
    )
    result.save(path)
    text = path.read_text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    loaded = SensitivityResult.load(path)
    assert loaded.curves["fc1"][0] == 0.95 and math.isnan(loaded.curves["fc1"][1])
    assert loaded.curves["fc1"][2] == -math.inf and loaded.curves["fc2"] == [0.9, None, math.inf]
    plain = _result()
    plain.save(path)
    assert SensitivityResult.load(path).to_dict() == plain.to_dict()


def test_save_refuses_a_non_finite_number_outside_the_curves(tmp_path):
    path = tmp_path / "r.json"
    path.write_text("old")
    with pytest.raises(ValueError, match="path: cannot save"):
        _result(seconds=float("nan")).save(path)
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["r.json"]


def test_save_is_atomic_a_failure_mid_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "r.json"
    _result().save(path)
    old = path.read_bytes()

    def crash(fd):
        raise OSError("disk full")

    monkeypatch.setattr(saved.os, "fsync", crash)
    with pytest.raises(OSError, match="disk full"):
        _result(baseline=0.5).save(path)
    assert path.read_bytes() == old
    assert os.listdir(tmp_path) == ["r.json"]  # no temporary file left behind


def _good() -> dict:
    return json.loads(json.dumps(_result().to_dict()))


def _without(key):
    data = _good()
    del data[key]
    return data


def _with(**changes):
    data = _good()
    data.update(changes)
    return data


BAD = {
    "binary garbage": bytes(range(256)),
    "latin-1 bytes": '{"format": "nbcompress.sensitivity/1", "metric": "Genauigkeit ÿ"}'.encode(
        "latin-1"
    ),
    "deeply nested": ("[" * 100_000 + "]" * 100_000).encode(),
    "only the format": {"format": "nbcompress.sensitivity/1"},
    "missing curves": _without("curves"),
    "curves as a list": _with(curves=[[0.9, 0.8, 0.7]]),
    "ratios as a string": _with(ratios="0.3,0.6,0.9"),
    "curve length mismatch": _with(curves={"fc1": [0.9, 0.8], "fc2": [0.9, None, None]}),
    "NaN baseline": _with(baseline=float("nan")),
    "huge baseline": b"",  # filled in below: 1e999999 parses as inf
    "curve for an unknown layer": _with(curves={**_good()["curves"], "fc9": [1, 1, 1]}),
    "ratio outside (0, 1)": _with(ratios=[0.3, 0.6, 1.5]),
    "bool as a count": _with(evaluations=True),
    "string in a curve": _with(curves={"fc1": [0.9, "high", 0.7], "fc2": [0.9, None, None]}),
    "unknown granularity": _with(granularity="rows"),
    "notes as a string": _with(notes="hello"),
}
BAD["huge baseline"] = (
    json.dumps(_good()).replace('"baseline": 0.95', '"baseline": 1e999999').encode()
)


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_file_gives_one_value_error_naming_path(tmp_path, case):
    path = tmp_path / "bad.json"
    content = BAD[case]
    path.write_bytes(content if isinstance(content, bytes) else json.dumps(content).encode())
    with pytest.raises(ValueError, match=r"^path: '.*bad\.json' is not ") as err:
        SensitivityResult.load(path)
    message = str(err.value)
    assert "\n" not in message and not isinstance(err.value, (UnicodeDecodeError, RecursionError))


def test_old_files_with_nan_tokens_in_curves_still_load(tmp_path):
    path = tmp_path / "old.json"
    data = _good()
    data["curves"]["fc1"][1] = float("nan")
    path.write_text(json.dumps(data))  # written by earlier versions: a bare NaN token
    assert math.isnan(SensitivityResult.load(path).curves["fc1"][1])
