import io
import re
import subprocess
import sys
import warnings

import pytest
import torch

import nbcompress
from nbcompress.demo import run_demo
from nbcompress.demo.arc import MAX_LOSS_POINTS, _verdict
from nbcompress.demo.engines import EngineTrial, pick, tradeoff
from nbcompress.demo.final import FinalTable
from nbcompress.zoo import accuracy, load_digits

STEPS = [
    "Train the seed CNN",
    "Sensitivity sweep and its suggestion for 90% sparsity",
    "Prune to the suggestion, masks kept",
    "Fine-tune",
    "Sparse kernels where measured faster at batch 64",
    "int8: quantize_ static, engine (",
    "Measure dense vs compressed",
]


@pytest.fixture(scope="module")
def demo():
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        mp.setattr(sys, "stdout", out)
        figures = run_demo(quick=True, threads=1)
    figures["warnings"] = [str(w.message) for w in seen]
    return figures, out.getvalue()


def _saved_bytes(model):
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell()


def test_every_step_is_announced_in_order_with_its_elapsed_time(demo):
    _, out = demo
    headings = re.findall(r"^\[(\d)/7 · [\d.]+ s\] (.*) …$", out, flags=re.M)
    assert [int(n) for n, _ in headings] == list(range(1, 8))
    for (_, title), expected in zip(headings, STEPS, strict=True):
        assert title.startswith(expected), (title, expected)
    assert len(re.findall(r"^  \([\d.]+ s\)$", out, flags=re.M)) == 7  # each step's duration


def test_final_table_has_accuracy_size_and_latency_rows_with_ratios(demo):
    _, out = demo
    table = out[out.index("Dense vs compressed (every figure measured") :]
    assert re.search(
        r"^test accuracy +\d+\.\d\d% +\d+\.\d\d% +[\d.]+ points? (lost|gained)", table, re.M
    )
    assert re.search(r"^size \(torch\.save\) +[\d.]+ KiB +[\d.]+ KiB +[\d.]+× smaller", table, re.M)
    for batch in (64, 1):
        assert re.search(rf"^latency, batch {batch} +\S+ \S+ +\S+ \S+ +[\d.]+× ", table, re.M)
    assert "Compressed: " in table and "× smaller" in table


def test_compressed_model_is_smaller_by_serialized_bytes_and_accurate_within_the_bound(demo):
    figures, _ = demo
    model, dense = figures["model"], figures["dense"]
    # Measured again here, independently of the demo's own helpers.
    assert _saved_bytes(model) < _saved_bytes(dense) / 2
    assert figures["bytes_compressed"] < figures["bytes_dense"] / 2
    assert figures["speedup_report"].rows  # the sparse-kernel step measured every layer
    assert figures["quantize_report"].quantized  # int8 converted some layers
    data = load_digits(28)
    acc = accuracy(model, data.x_test, data.y_test)
    assert acc == figures["accuracy_compressed"]
    assert 100 * (figures["accuracy_dense"] - acc) <= MAX_LOSS_POINTS
    assert figures["accuracy_dense"] > 0.7  # the dense model learned the real digits
    for batch in (64, 1):
        assert figures["speedup"][batch] > 0
        assert all(t.median > 0 for t in figures["latency"][batch])


def test_suggestion_is_pruned_to_the_target_and_undo_returns_the_dense_model(demo):
    figures, _ = demo
    ratios = figures["ratios"]
    sizes = {n: m.weight.numel() for n, m in figures["dense"].named_modules() if n in ratios}
    pruned = sum(ratios[n] * sizes[n] for n in ratios) / sum(sizes.values())
    assert pruned == pytest.approx(0.9, abs=0.01)
    model = figures["model"]
    nbcompress.undo_(model, all=True)
    dense = figures["dense"].state_dict()
    assert model.state_dict().keys() == dense.keys()
    assert all(torch.equal(v, dense[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--target", "1.5"], "--target: expected a sparsity in (0, 1) such as 0.9, got 1.5."),
        (["--epochs", "0"], "--epochs: expected a positive integer, got 0."),
        (["--batch", "1000"], "--batch: at most 449 (the test images it is timed on), got 1000."),
        (["--threads", "0"], "--threads: expected a positive integer such as 1, got 0."),
    ],
)
def test_cli_refuses_a_bad_option_in_one_line_before_training(args, message):
    out = subprocess.run(
        [sys.executable, "-m", "nbcompress", "demo", *args],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].endswith(message)
    assert "Traceback" not in out.stderr and "Train the seed CNN" not in out.stdout


def test_api_names_the_bad_argument():
    with pytest.raises(ValueError, match=r"^target: expected a sparsity in \(0, 1\)"):
        run_demo(target=0)
    with pytest.raises(ValueError, match=r"^batch: expected a positive integer, got 0\.$"):
        run_demo(batch=0)


def test_cli_help_lists_the_demo_options():
    out = subprocess.run(
        [sys.executable, "-m", "nbcompress", "demo", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    for option in ("--epochs", "--target", "--batch", "--threads", "--quick"):
        assert option in out.stdout


def test_torch_internal_deprecation_warnings_do_not_reach_the_user(demo):
    figures, _ = demo
    # torch.save of torch.ao modules warns "TypedStorage is deprecated" (torch internals).
    assert not [w for w in figures["warnings"] if "TypedStorage" in w]


def test_int8_engine_is_timed_at_both_batches_and_the_choice_is_printed(demo):
    figures, out = demo
    chosen = figures["engine"]
    assert set(chosen.speedup) == {64, 1} and all(g > 0 for g in chosen.speedup.values())
    assert re.search(r"^  timed \w+: [\d.]+× at batch 64, [\d.]+× at batch 1$", out, re.M)
    assert f"  → {chosen.engine}: " in out
    assert f"torch.ao[{chosen.engine}]" in out  # the layers are packed for the chosen engine


def test_the_engine_not_slower_at_any_batch_wins_else_the_fastest_at_the_serving_batch():
    fast_big = EngineTrial("x86", {64: 7.9, 1: 0.71})
    even = EngineTrial("fbgemm", {64: 2.7, 1: 0.97})  # within 5% of dense at batch 1
    assert pick([fast_big, even], 64) is even
    slow_both = EngineTrial("fbgemm", {64: 2.7, 1: 0.80})
    assert pick([fast_big, slow_both], 64) is fast_big
    assert tradeoff([fast_big, even], even, 64) == (
        "The x86 int8 engine measured 7.90× at batch 64 but 0.71× at batch 1; fbgemm was kept "
        "because it is not slower than dense at any batch."
    )
    assert tradeoff([fast_big, slow_both], fast_big, 64) is None


def _table(speed_at_1: float) -> FinalTable:
    return FinalTable((0.93, 0.94), (377_000, 106_000), {}, {64: 5.0, 1: speed_at_1}, 449)


@pytest.mark.parametrize(
    ("speed", "said"),
    [
        (0.7, "At batch 1 it is SLOWER than dense (0.70×)"),
        (0.97, "At batch 1 it is about as fast as dense (0.97×, within noise)."),
        (1.02, None),
    ],
)
def test_the_verdict_says_plainly_how_batch_1_compares(speed, said):
    line = _verdict(_table(speed), 64, sparse=False)
    assert "1.02× the speed at batch 1" in line if said is None else said in line
    if said is None:
        assert "At batch 1" not in line


def test_a_speed_within_the_noise_band_is_not_called_slower():
    from nbcompress.demo.final import _speed

    assert _speed(0.996) == "1.00× (same, within noise)"
    assert _speed(0.79) == "0.79× (slower)" and _speed(2.43) == "2.43× faster"
