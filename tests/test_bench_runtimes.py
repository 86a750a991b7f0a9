"""benchmarks/bench_runtimes.py: its error and ratio arithmetic, its tables, one tiny run."""

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
bench = pytest.importorskip("bench_runtimes")

from nbcompress.timing import race  # noqa: E402


def test_output_error_is_max_relative_difference_and_lowest_row_cosine():
    ref = torch.tensor([[1.0, 2.0], [3.0, -4.0]])
    out = ref.clone()
    out[1, 1] = -3.0  # Δ 1 against max |ref| 4; row 1 turns a little
    error, cosine = bench.output_error(out, ref)
    assert error == pytest.approx(0.25)
    expected = torch.nn.functional.cosine_similarity(out[1], ref[1], dim=0)
    assert cosine == pytest.approx(float(expected))
    assert bench.output_error(ref, ref) == (0.0, pytest.approx(1.0))


def test_output_error_refuses_a_wrong_shape():
    with pytest.raises(ValueError, match="shape"):
        bench.output_error(torch.zeros(2, 3), torch.zeros(3, 2))


def test_timed_cells_turn_paired_time_ratios_into_speedups():
    # Injected clock: the baseline takes 4 ticks, "fast" 1 tick, in every round.
    ticks = {"now": 0.0}
    cost = {"base": 4.0, "fast": 1.0}

    def clock() -> float:
        return ticks["now"]

    def call(name: str):
        def fn() -> None:
            ticks["now"] += cost[name]

        return fn

    result = race({n: call(n) for n in cost}, rounds=6, warmup=0, clock=clock)
    cells = bench.timed_cells(result, {"base": (0.0, 1.0), "fast": (0.01, 0.99)}, {"fast": "x"})
    assert cells["fast"].ratio == pytest.approx(4.0)
    assert cells["fast"].p10 == pytest.approx(4.0) and cells["fast"].p90 == pytest.approx(4.0)
    assert cells["fast"].seconds == pytest.approx(1.0) and cells["base"].ratio == 1.0
    assert (cells["fast"].error, cells["fast"].cosine, cells["fast"].note) == (0.01, 0.99, "x")


def test_table_shows_ratio_error_cosine_note_base_time_and_failures():
    row = bench.Row("ffn90", 2, 8)
    row.cells[bench.BASE] = bench.Cell(1.0, 1.0, 1.0, 0.002, 0.0, 1.0, spread=(0.001, 0.003))
    row.cells["ORT int8"] = bench.Cell(6.5, 6.0, 7.0, 3e-4, 4.3e-3, 0.99999, note="a|b")
    row.cells["nbc sparse"] = bench.Cell(note="RuntimeError: boom", failed=True)
    table = bench.render_table([row], [bench.BASE, "ORT int8", "nbc sparse", "torch int8"])
    lines = table.splitlines()
    assert (
        lines[0] == "| model | threads | batch | torch fp32 | ORT int8 | nbc sparse | torch int8 |"
    )
    cells = [c.strip() for c in lines[2].strip("|").split("|")]
    assert cells[:3] == ["ffn90", "2", "8"]
    assert cells[3] == "2 ms (1 ms–3 ms)"
    assert cells[4] == "**6.50×** (6.00–7.00) · 4.3e-03 · 0.99999 [a/b]"  # no stray pipe
    assert cells[5] == "failed: RuntimeError: boom"
    assert cells[6] == "—"  # not measured


def test_sizes_table_shows_a_range_when_cells_chose_differently():
    sizes = {"ffn90": {bench.BASE: {1 << 20}, "nbc sparse": {3 << 20, 1 << 20}}}
    table = bench.render_sizes(sizes, [bench.BASE, "nbc sparse", "ORT fp32"])
    assert table.splitlines()[-1] == "| ffn90 | 1.0 MiB | 1.0 MiB – 3.0 MiB | — |"


def test_targets_compare_against_ort_int8_in_the_same_row():
    row = bench.Row("ffn95", 1, 8)
    row.cells["ORT int8"] = bench.Cell(ratio=8.0)
    row.cells["nbc speedup int8"] = bench.Cell(ratio=12.0)
    row.cells["nbc sparse"] = bench.Cell(ratio=0.9, note="1/4 sparse")
    lines = bench.targets([row])
    assert any(ln.startswith("- met: ffn95") and "1.50× ORT int8" in ln for ln in lines)
    assert "NOT met" in lines[-1] and "ffn95 t1 b8 0.90×" in lines[-1]


def test_a_noisy_control_flags_the_targets_of_its_row():
    # The fp32 model raced against itself measured 0.5×: the row's ratios are load, not speed.
    row = bench.Row("ffn95", 2, 1)
    row.cells[bench.CONTROL] = bench.Cell(0.5, 0.4, 0.6, note=bench.CONTROL)
    row.cells["ORT int8"] = bench.Cell(ratio=8.0)
    row.cells["nbc speedup int8"] = bench.Cell(ratio=12.0)
    (line,) = [ln for ln in bench.targets([row]) if "ffn95" in ln]
    assert "(noisy row: fp32 against itself 0.50×)" in line
    assert bench.format_cell(row.cells[bench.CONTROL]) == "0.50× (0.40–0.60)"
    row.cells[bench.CONTROL] = bench.Cell(1.05, note=bench.CONTROL)
    assert "noisy" not in bench.targets([row])[0]


def test_bad_option_names_the_option():
    with pytest.raises(SystemExit, match="--models"):
        bench.parse(["--models", "nope"])
    with pytest.raises(SystemExit, match="--batches"):
        bench.parse(["--batches", "0"])


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None, reason="no onnxruntime")
def test_tiny_run_measures_every_runtime_against_torch(capsys):
    torch.set_num_threads(1)
    rows = bench.main(
        ["--models", "tiny", "--batches", "2", "--threads", "1", "--rounds", "3",
         "--tune-repeats", "3", "--exporter", "legacy"]
    )  # fmt: skip
    assert [(r.model, r.threads, r.batch) for r in rows] == [("tiny", 1, 2)]
    cells = rows[0].cells
    failed = {name: c.note for name, c in cells.items() if c.failed}
    assert not failed
    assert set(cells) == set(bench.RUNTIMES)
    for name, cell in cells.items():
        assert cell.ratio > 0 and math.isfinite(cell.seconds), name
        assert cell.cosine > 0.99, name  # every runtime computes the same function
    assert cells["ORT fp32"].error < 1e-5 and cells["nbc sparse"].error < 1e-5
    out = capsys.readouterr().out
    assert "### Serialized size" in out and "| tiny |" in out
