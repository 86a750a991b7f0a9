"""The CPU's int8 capabilities: one decision, overridable; both paths tested on any machine."""

import copy
import pickle

import pytest
import torch
from torch import nn

import nbcompress as nc
from nbcompress.engine.quantize.config import DynamicInt8Config
from nbcompress.engine.quantize.cpu import ENV_VNNI, cpu_has_vnni, forced_int8_cpu, int8_cpu
from nbcompress.engine.quantize.modules import Int8DynamicLinear
from tests.helpers import assert_same_state, snapshot


def layer():
    torch.manual_seed(0)
    return nn.Linear(64, 32).eval()


def test_env_var_overrides_detection_and_the_context_manager_overrides_both(monkeypatch):
    monkeypatch.setenv(ENV_VNNI, "1")
    assert int8_cpu().vnni and int8_cpu().source == ENV_VNNI
    monkeypatch.setenv(ENV_VNNI, "0")
    assert not int8_cpu().vnni
    with forced_int8_cpu(True) as cpu:
        assert cpu.vnni and int8_cpu().source == "forced" and cpu.weight_max == 127
    assert int8_cpu().weight_max == 63
    monkeypatch.delenv(ENV_VNNI)
    assert int8_cpu().source == "detected" and isinstance(int8_cpu().capability, str)


@pytest.mark.parametrize("vnni", [False, True])
def test_int8_linear_never_saturates_and_keeps_8bit_activations_where_it_can(vnni):
    lin, x = layer(), torch.randn(8, 64)
    with forced_int8_cpu(vnni):
        q = Int8DynamicLinear(lin)
        _, reduce_range = q._pack()
    assert int(q.qweight.abs().max()) == (127 if vnni else 63)
    assert reduce_range is False  # 8-bit activations on both paths
    with torch.no_grad():
        err = float((q(x) - lin(x)).norm() / lin(x).norm())
        if not vnni or cpu_has_vnni():  # forced VNNI on a CPU without it saturates for real
            assert err < 0.03
        with forced_int8_cpu(vnni):  # unpickled modules repack for the CPU path they run on
            assert torch.equal(pickle.loads(pickle.dumps(q))(x), q(x))


def test_wide_weights_loaded_on_a_cpu_without_vnni_fall_back_to_7bit_activations():
    with forced_int8_cpu(True):
        wide = Int8DynamicLinear(layer())  # as packed on a VNNI machine
    with forced_int8_cpu(False):
        twin = copy.deepcopy(wide)  # the copy repacks for the CPU it runs on
        assert twin._pack()[1] is True
        assert "int8" in repr(twin)


@pytest.mark.parametrize("vnni", [False, True])
def test_both_paths_quantize_an_mlp_close_to_float(vnni):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)).eval()
    x = torch.randn(16, 64)
    with forced_int8_cpu(vnni):
        nc.quantize_(model, "dynamic", example_inputs=x, repeats=3)
    assert nc.quantize_report(model).cosine > 0.995


def test_accuracy_budget_moves_the_least_accurate_layers_to_weight_only_and_undo_is_exact():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)).eval()
    x, saved = torch.randn(16, 64), snapshot(model)
    strict = DynamicInt8Config(min_cosine=1.0)  # nothing int8 meets it: every layer moves
    nc.quantize_(model, strict, example_inputs=x, repeats=3)
    r = nc.quantize_report(model)
    assert {row["backend"] for row in r.rows} == {"nbcompress-dequant"}
    assert all("accuracy budget" in row["note"] for row in r.rows)
    assert any("Still below" in n for n in r.notes) and r.layer_ratio > 3  # int8 weights
    nc.undo_(model)
    assert_same_state(model, saved)


def test_accuracy_budget_respects_the_backend_family_and_can_be_turned_off():
    torch.manual_seed(0)
    x = torch.randn(16, 64)
    for budget, backend, said in ((1.0, "torch", True), (None, "auto", False)):
        model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)).eval()
        config = DynamicInt8Config(min_cosine=budget)
        nc.quantize_(model, config, example_inputs=x, backend=backend, repeats=3)
        r = nc.quantize_report(model)
        assert "nbcompress-dequant" not in {row["backend"] for row in r.rows}
        assert any("no more accurate backend allowed" in n for n in r.notes) is said
