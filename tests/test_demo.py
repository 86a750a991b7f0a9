import pytest

from nbcompress.demo import run_demo


def test_demo_prunes_half_and_reports_measured_figures(capsys):
    figures = run_demo(epochs=2, amount=0.5, threads=1)
    out = capsys.readouterr().out
    assert figures["sparsity"] == pytest.approx(0.495, abs=0.01)  # classifier left dense
    assert figures["csr_bytes_after"] < 0.6 * figures["csr_bytes_before"]
    assert figures["accuracy_dense"] > 0.5  # learned something from real digits
    assert figures["accuracy_finetuned"] >= figures["accuracy_pruned"] - 0.05
    assert figures["latency_before"] > 0 and figures["latency_after"] > 0
    assert "Test accuracy: dense" in out and "Model summary" in out
