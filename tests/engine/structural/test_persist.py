"""nbcompress.save / load: a removed model's weights load into a freshly built original."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from nbcompress.engine.structural.persist import FORMAT, load, save
from nbcompress.kernels.modules import SparseLinear


class Net(nn.Module):
    """A small CNN with BatchNorm and a Linear head, built fresh by every test."""

    def __init__(self, norm: type = nn.BatchNorm2d, drop: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = norm(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(16 * 4, 10)
        if drop:
            self.drop = nn.Dropout(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(self.pool(x).flatten(1))


def _keep(t: torch.Tensor, dim: int, keep: list[int]) -> torch.Tensor:
    return t.index_select(dim, torch.tensor(keep)).clone()


def _remove(model: Net) -> Net:
    """Remove channels by slicing, as structural removal does (attributes included)."""
    k1, k2 = [0, 2, 3, 5, 7], [1, 2, 4, 5, 6, 8, 9, 11, 12, 15]
    with torch.no_grad():
        c1, b1, c2, b2, fc = model.conv1, model.bn1, model.conv2, model.bn2, model.fc
        c1.weight, c1.bias = (
            nn.Parameter(_keep(c1.weight, 0, k1)),
            nn.Parameter(_keep(c1.bias, 0, k1)),
        )
        c1.out_channels = len(k1)
        for bn, k in ((b1, k1), (b2, k2)):
            bn.weight, bn.bias = (
                nn.Parameter(_keep(bn.weight, 0, k)),
                nn.Parameter(_keep(bn.bias, 0, k)),
            )
            bn.running_mean, bn.running_var = (
                _keep(bn.running_mean, 0, k),
                _keep(bn.running_var, 0, k),
            )
            bn.num_features = len(k)
        c2.weight = nn.Parameter(_keep(_keep(c2.weight, 1, k1), 0, k2))
        c2.in_channels, c2.out_channels = len(k1), len(k2)
        c2.bias = nn.Parameter(torch.randn(len(k2)))  # as fold_constants creates one
        flat = [c * 4 + p for c in k2 for p in range(4)]
        fc.weight = nn.Parameter(_keep(fc.weight, 1, flat))
        fc.in_features = len(flat)
    return model


def _trained() -> Net:
    model = Net()
    model(torch.randn(8, 3, 8, 8))  # running statistics away from their initial values
    return model.eval()


X = torch.randn(2, 3, 8, 8)


def test_save_then_load_into_a_fresh_model_gives_identical_outputs(tmp_path) -> None:
    model = _remove(_trained())
    save(model, tmp_path / "m.pt")
    fresh = load(tmp_path / "m.pt", Net())
    assert torch.equal(fresh.eval()(X), model(X))
    assert fresh.conv2.in_channels == 5 and fresh.bn2.num_features == 10
    assert fresh.fc.in_features == 40 and fresh.conv2.bias is not None
    for (k, a), (k2, b) in zip(fresh.state_dict().items(), model.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b)
    loss = fresh(X).sum()  # trainable: parameters with gradients
    loss.backward()
    assert fresh.conv2.weight.grad.shape == (10, 5, 3, 3)


def test_a_file_object_works_and_the_file_is_weights_only(tmp_path) -> None:
    model = _remove(_trained())
    buffer = io.BytesIO()
    save(model, buffer)
    buffer.seek(0)
    data = torch.load(buffer, weights_only=True)
    assert data["format"] == FORMAT and data["replaced"] == {}
    assert data["structure"]["conv2"]["attrs"]["in_channels"] == 5
    buffer.seek(0)
    assert torch.equal(load(buffer, Net()).eval()(X), model(X))


def test_plain_load_state_dict_is_a_size_mismatch_and_load_says_how_to_fix_it(tmp_path) -> None:
    model = _remove(_trained())
    with pytest.raises(RuntimeError, match="size mismatch"):
        Net().load_state_dict(model.state_dict())
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    fresh = Net()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(ValueError, match="saved without its shapes") as err:
        load(tmp_path / "sd.pt", fresh)
    assert "\n" not in str(err.value) and "nbcompress.save(model, path)" in str(err.value)
    assert all(torch.equal(v, before[k]) for k, v in fresh.state_dict().items())


def test_a_plain_state_dict_that_fits_is_loaded(tmp_path) -> None:
    model = _trained()
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    assert torch.equal(load(tmp_path / "sd.pt", Net()).eval()(X), model(X))


class GroupNorm8(nn.GroupNorm):
    def __init__(self, channels: int) -> None:
        super().__init__(2, channels)


@pytest.mark.parametrize(
    ("saved", "build", "match"),
    [
        (lambda: Net(drop=True), Net, r"the file has a module 'drop' \(torch.nn.modules.dropout"),
        (Net, lambda: Net(drop=True), "it has a module 'drop' that the file lacks"),
        (Net, lambda: Net(norm=GroupNorm8), "'bn1' is a test_persist.GroupNorm8, the file holds a"),
    ],
    ids=["module-not-in-model", "module-not-in-file", "class-mismatch"],
)
def test_an_architecture_mismatch_is_one_line_and_changes_nothing(
    tmp_path, saved, build, match
) -> None:
    save(_remove(saved().eval()), tmp_path / "m.pt")
    fresh = build()
    before = dict(fresh.state_dict(keep_vars=True).items())
    with pytest.raises(ValueError, match=match) as err:
        load(tmp_path / "m.pt", fresh)
    assert "\n" not in str(err.value) and "same class and constructor arguments" in str(err.value)
    assert fresh.state_dict(keep_vars=True).keys() == before.keys()
    assert all(v is before[k] for k, v in fresh.state_dict(keep_vars=True).items())
    assert fresh.conv2.in_channels == 8


def test_another_model_class_is_refused(tmp_path) -> None:
    save(nn.Sequential(nn.Linear(2, 2)), tmp_path / "m.pt")
    with pytest.raises(ValueError, match="the model is a test_persist.Net, the file holds a torch"):
        load(tmp_path / "m.pt", Net())


def test_a_pickled_whole_model_file_is_one_line(tmp_path) -> None:
    torch.save(_remove(_trained()), tmp_path / "whole.pt")
    with pytest.raises(ValueError, match="holds pickled Python objects") as err:
        load(tmp_path / "whole.pt", Net())
    assert "\n" not in str(err.value)


def test_a_file_that_is_not_a_torch_file_is_one_line(tmp_path) -> None:
    (tmp_path / "x.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="is not a file written by torch.save") as err:
        load(tmp_path / "x.pt", Net())
    assert "\n" not in str(err.value)


def test_a_removed_model_survives_deepcopy_pickle_and_torch_save(tmp_path) -> None:
    model = _remove(_trained())
    expected = model(X)
    assert torch.equal(copy.deepcopy(model)(X), expected)
    assert torch.equal(pickle.loads(pickle.dumps(model))(X), expected)
    torch.save(model, tmp_path / "whole.pt")
    assert torch.equal(torch.load(tmp_path / "whole.pt", weights_only=False)(X), expected)


# torch.ao's quantize_dynamic and quantized tensors are deprecated (and warn).
@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")
def test_replaced_modules_are_stored_whole(tmp_path) -> None:
    model = _remove(_trained())
    model.bn1 = nn.Identity()  # as fusion leaves it
    quantized = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    expected = quantized(X)
    save(quantized, tmp_path / "q.pt")
    data = torch.load(tmp_path / "q.pt", weights_only=True)  # the outer file stays safe
    assert data["replaced"]["bn1"] == "identity" and isinstance(data["replaced"]["fc"], bytes)
    assert not any(k.startswith("fc.") for k in data["state_dict"])
    fresh = load(tmp_path / "q.pt", Net()).eval()
    assert type(fresh.fc) is type(quantized.fc) and isinstance(fresh.bn1, nn.Identity)
    assert torch.equal(fresh(X), expected)
    # Saved again from the loaded model, the replaced modules are still stored whole.
    save(fresh, tmp_path / "q2.pt")
    assert torch.equal(load(tmp_path / "q2.pt", Net()).eval()(X), expected)


class Heads(nn.Module):
    """Stores widths as attributes, like torchvision ViT and Hugging Face attention."""

    def __init__(self) -> None:
        super().__init__()
        self.num_heads, self.head_dim = 4, 3
        self.hidden_dim = self.num_heads * self.head_dim
        self.pruned_heads: set[int] = set()
        self.qkv = nn.Linear(6, 3 * self.hidden_dim)
        self.out = nn.Linear(self.hidden_dim, 6)
        self.register_buffer("scale", torch.ones(self.num_heads))
        self.register_buffer("cache", torch.zeros(self.num_heads), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).view(x.shape[0], 3, self.num_heads, self.head_dim).unbind(1)
        att = (q * k).sum(-1, keepdim=True).sigmoid() * self.scale[:, None]
        return self.out((att * v).reshape(x.shape[0], self.hidden_dim))


def test_width_attributes_and_buffers_are_restored(tmp_path) -> None:
    model = Heads()
    keep = [0, 1, 2, 6, 7, 8]  # heads 0 and 2 of 4
    with torch.no_grad():
        rows = [p * 12 + i for p in range(3) for i in keep]
        model.qkv.weight = nn.Parameter(model.qkv.weight[rows])
        model.qkv.bias = nn.Parameter(model.qkv.bias[rows])
        model.qkv.out_features = 18
        model.out.weight = nn.Parameter(model.out.weight[:, keep])
        model.out.in_features = 6
        model.scale = torch.tensor([0.5, 2.0])
    model.num_heads, model.hidden_dim, model.pruned_heads = 2, 6, {1, 3}
    x = torch.randn(3, 6)
    save(model, tmp_path / "h.pt")
    fresh = load(tmp_path / "h.pt", Heads())
    assert (fresh.num_heads, fresh.hidden_dim, fresh.pruned_heads) == (2, 6, {1, 3})
    assert torch.equal(fresh(x), model(x))


def test_tied_weights_stay_tied(tmp_path) -> None:
    def build() -> nn.Sequential:
        model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 10, bias=False))
        model[1].weight = model[0].weight
        return model

    model = build()
    model[0].weight = model[1].weight = nn.Parameter(model[0].weight[:, :5].clone())
    model[0].embedding_dim, model[1].in_features = 5, 5
    save(model, tmp_path / "t.pt")
    fresh = load(tmp_path / "t.pt", build())
    assert fresh[0].weight is fresh[1].weight and fresh[0].weight.shape == (10, 5)
    ids = torch.tensor([[1, 2, 3]])
    assert torch.equal(fresh(ids), model(ids))


def test_a_sparse_module_is_stored_whole(tmp_path) -> None:
    model = _remove(_trained())
    with torch.no_grad():
        model.fc.weight[model.fc.weight.abs() < 0.1] = 0
    model.fc = SparseLinear.from_dense(model.fc)
    save(model, tmp_path / "s.pt")
    fresh = load(tmp_path / "s.pt", Net()).eval()
    assert isinstance(fresh.fc, SparseLinear)
    with torch.no_grad():  # SparseLinear is inference-only
        assert torch.equal(fresh(X), model(X))


def _bert():
    transformers = pytest.importorskip("transformers")
    sizes = dict(vocab_size=50, hidden_size=32, intermediate_size=64)
    config = transformers.BertConfig(**sizes, num_hidden_layers=2, num_attention_heads=4)
    return transformers.BertModel(config).eval()


def test_hugging_face_heads_and_ffn_neurons_removed_load_into_a_fresh_bert(tmp_path) -> None:
    model = _bert()
    attention = model.encoder.layer[0].attention
    keep = [i for i in range(32) if i // 8 not in (0, 2)]  # heads 0 and 2 of 4 (head size 8)
    with torch.no_grad():
        for lin in (attention.self.query, attention.self.key, attention.self.value):
            lin.weight = nn.Parameter(lin.weight[keep])
            lin.bias = nn.Parameter(lin.bias[keep])
            lin.out_features = len(keep)
        dense = attention.output.dense
        dense.weight, dense.in_features = nn.Parameter(dense.weight[:, keep]), len(keep)
        ffn_in, ffn_out = (
            model.encoder.layer[1].intermediate.dense,
            model.encoder.layer[1].output.dense,
        )
        ffn_in.weight, ffn_in.bias = (
            nn.Parameter(ffn_in.weight[:40]),
            nn.Parameter(ffn_in.bias[:40]),
        )
        ffn_out.weight = nn.Parameter(ffn_out.weight[:, :40])
        ffn_in.out_features = ffn_out.in_features = 40
    attention.self.num_attention_heads, attention.self.all_head_size = 2, 16
    ids = torch.randint(0, 50, (2, 7))
    save(model, tmp_path / "bert.pt")
    fresh = load(tmp_path / "bert.pt", _bert())
    assert fresh.encoder.layer[0].attention.self.num_attention_heads == 2
    assert torch.equal(fresh(ids).last_hidden_state, model(ids).last_hidden_state)


def test_a_model_with_kept_pruning_masks_is_refused_in_one_line(tmp_path) -> None:
    model = _trained()
    torch_prune.l1_unstructured(model.fc, "weight", 0.5)
    with pytest.raises(ValueError, match="'fc' still holds pruning masks") as err:
        save(model, tmp_path / "m.pt")
    assert "\n" not in str(err.value) and "remove_masks_" in str(err.value)
    assert not (tmp_path / "m.pt").exists()


def test_a_newer_format_is_refused_in_one_line(tmp_path) -> None:
    save(_trained(), tmp_path / "m.pt")
    data = torch.load(tmp_path / "m.pt", weights_only=True)
    torch.save({**data, "format": "nbcompress/9"}, tmp_path / "m.pt")
    with pytest.raises(ValueError, match="'nbcompress/9'; this nbcompress reads 'nbcompress/1'"):
        load(tmp_path / "m.pt", Net())


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")
def test_a_statically_quantized_model_loads_into_a_fresh_float_model(tmp_path) -> None:
    from nbcompress.engine.quantize.quantize import quantize_

    def build() -> nn.Sequential:
        layers = [nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(288, 4)]
        return nn.Sequential(*layers).eval()

    model, x = build(), torch.randn(8, 3, 8, 8)
    quantize_(model, "static", calibrate=x, example_inputs=x, repeats=2)
    save(model, tmp_path / "q.pt")
    fresh = load(tmp_path / "q.pt", build())
    assert [type(m) for m in fresh] == [type(m) for m in model]  # regions, fused Identity
    assert torch.equal(fresh(x), model(x))


def test_a_plain_state_dict_with_bitmask_packed_int8_weights_loads_into_a_dense_int8_model(
    tmp_path,
) -> None:
    from nbcompress.engine.quantize.modules import Int8DynamicLinear

    torch.manual_seed(0)
    pruned, dense = nn.Linear(64, 32), nn.Linear(64, 32)
    with torch.no_grad():
        pruned.weight.mul_(torch.rand_like(pruned.weight) < 0.1)
    saved = nn.Sequential(Int8DynamicLinear(pruned))
    assert saved.state_dict()["0.qweight"].dim() == 1  # packed as a bitmask
    torch.save(saved.state_dict(), tmp_path / "sd.pt")
    x = torch.randn(5, 64)
    assert torch.equal(
        load(tmp_path / "sd.pt", nn.Sequential(Int8DynamicLinear(dense)))(x), saved(x)
    )
