"""Undo is exact or refuses; the history counts what it keeps (issue 11: F4, F5, F14, F20)."""

import warnings

import pytest
import torch
from torch import nn
from torch.ao.nn.quantized import dynamic as qdynamic

import nbcompress as nc
from nbcompress.engine.core.compare import compare_change
from nbcompress.engine.core.history import transaction
from tests.helpers import assert_same_state, snapshot


def _dynamic_linear(lin: nn.Linear) -> nn.Module:
    lin.qconfig = torch.ao.quantization.default_dynamic_qconfig
    return qdynamic.Linear.from_float(lin)


def test_a_step_beside_a_torch_ao_dynamic_linear_is_recorded_and_counts_its_packed_weights():
    # F4: the byte count met torch.ao's packed tuple and failed after the edit: no step.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), _dynamic_linear(nn.Linear(32, 256)))
    first = model[0]
    saved = snapshot(first)
    with transaction(model, "swap") as tx:
        tx.replace("0", nn.Identity())
    assert [s.name for s in nc.history(model)] == ["swap"]
    old = model[2]
    with transaction(model, "swap") as tx:
        tx.replace("2", nn.Identity())
    # The swapped-out torch.ao layer (int8 weights: 32 * 256 bytes) is kept alive for undo.
    assert nc.history(model)[-1].nbytes >= 32 * 256
    nc.undo_(model, all=True)
    assert model[2] is old and model[0] is first
    assert_same_state(first, saved)


def test_quantize_after_a_torch_ao_layer_records_its_own_step():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 4)
    )
    model.eval()
    x = torch.randn(4, 16)
    nc.quantize_(model, "dynamic", layers="4", backend="torch", example_inputs=x)
    nc.quantize_(model, "weight", layers="0", example_inputs=x)
    assert [s.name for s in nc.history(model)] == ["quantize", "quantize"]
    nc.undo_(model)
    assert type(model[0]) is nn.Linear and type(model[4]).__module__.startswith("torch.ao")


def _fine_tune(model: nn.Module) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(8, 16)).pow(2).mean().backward()
    opt.step()


def test_undo_of_a_full_copy_step_refuses_after_fine_tuning_and_force_restores_the_saved_entries():
    # F5: prune 0.5 is stored as full copies; fine-tuning then undo gave weights back but
    # kept fine-tuned biases, silently.
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 4)
    )
    nc.prune_(model, 0.5)
    _fine_tune(model)
    with pytest.raises(ValueError, match=r"'0\.weight': its values changed.*force=True"):
        nc.undo_(model)
    assert len(nc.history(model)) == 1  # refused: nothing undone
    nc.undo_(model, force=True)
    assert nc.history(model) == []


def test_undo_refuses_after_half_instead_of_restoring_a_mix_of_dtypes():
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    nc.prune_(model, 0.5)
    model.half()
    with pytest.raises(
        ValueError, match=r"dtype or shape changed \(torch.float32 .* torch.float16"
    ):
        nc.undo_(model)
    assert {p.dtype for p in model.parameters()} == {torch.float16}


def test_undo_after_kept_masks_still_accepts_fine_tuned_values_but_not_a_new_dtype():
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    nc.prune_(model, 0.5, keep_masks=True)
    nc.remove_masks_(model)
    nc.undo_(model)
    model.double()
    with pytest.raises(ValueError, match="dtype or shape changed"):
        nc.undo_(model)


def test_remove_masks_step_reports_the_masks_and_weights_it_keeps_alive():
    # F14: the step kept the old masks alive through its module snapshot but reported 0 B.
    model = nn.Sequential(*[nn.Linear(256, 256) for _ in range(4)])
    nc.prune_(model, 0.5, keep_masks=True, include_output=True)
    masks = sum(m.weight_mask.numel() * m.weight_mask.element_size() for m in model)
    nc.remove_masks_(model)
    step = nc.history(model)[-1]
    assert step.name == "remove-masks"
    assert step.nbytes >= masks


def test_set_history_limit_refuses_a_bool():
    with pytest.raises(ValueError, match="max_bytes"):
        nc.set_history_limit(True)


def test_a_single_step_larger_than_the_limit_is_kept_with_a_warning():
    model = nn.Sequential(nn.Linear(200, 200), nn.Linear(200, 2))
    nc.set_history_limit(1000)
    try:
        with pytest.warns(UserWarning, match=r"alone holds .* more than the history limit"):
            nc.prune_(model, 0.5)
    finally:
        nc.set_history_limit(4 * 2**30)
    assert len(nc.history(model)) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        nc.prune_(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), 0.5)  # under the limit


def test_the_history_limit_is_per_model():
    models = [nn.Sequential(nn.Linear(100, 100), nn.Linear(100, 2)) for _ in range(2)]
    nc.prune_(models[0], 0.5)
    one = nc.history(models[0]).nbytes
    nc.set_history_limit(one + 1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            nc.prune_(models[1], 0.5)  # both together exceed the limit; each one does not
    finally:
        nc.set_history_limit(4 * 2**30)
    assert len(nc.history(models[0])) == len(nc.history(models[1])) == 1


def test_compare_change_measures_a_model_holding_a_torch_ao_layer():
    # compare_change sized the model from its state_dict and met the same packed tuple.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), _dynamic_linear(nn.Linear(32, 4)))
    comparison = compare_change(
        model, lambda m: nc.prune_(m[0], 0.5, include_output=True), torch.randn(2, 16), repeats=2
    )
    assert comparison.after.latency is not None
    assert [s.name for s in nc.history(model)] == ["prune"]
