"""Built-in architectures: structure, the ETF classifier and the spec strings."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nccli import zoo
from nccli.errors import UsageError


def test_available_lists_every_builtin() -> None:
    assert zoo.available() == ["mlp", "resnet18", "resnet18_tv", "vgg11", "vgg13"]


def test_mlp_structure_and_deep_linear_head() -> None:
    model = zoo.build("mlp", in_dim=12, widths=[32, 16], num_classes=5, head_depth=3, head_width=8)
    assert isinstance(model.body, nn.Sequential)
    kinds = [type(m) for m in model.body]
    assert kinds == [nn.Linear, nn.ReLU, nn.Linear, nn.ReLU]
    assert [m.out_features for m in model.body if isinstance(m, nn.Linear)] == [32, 16]
    # The head is purely linear: three Linear layers and nothing between them.
    assert [type(m) for m in model.head] == [nn.Linear] * 3
    assert [(m.in_features, m.out_features) for m in model.head] == [(16, 8), (8, 8), (8, 8)]
    assert isinstance(model.classifier, nn.Linear)
    assert (model.classifier.in_features, model.classifier.out_features) == (8, 5)
    assert not model.training
    out = model(torch.randn(7, 3, 4))  # any trailing shape is flattened
    assert out.shape == (7, 5)


def test_mlp_head_is_linear_map() -> None:
    torch.manual_seed(0)
    model = zoo.build("mlp", in_dim=6, widths=[10], num_classes=3, head_depth=2, head_bias=False)
    a, b = torch.randn(4, 10), torch.randn(4, 10)
    assert torch.allclose(model.head(a + 2 * b), model.head(a) + 2 * model.head(b), atol=1e-6)
    assert all(layer.bias is None for layer in model.head)


def test_mlp_without_head_or_body() -> None:
    model = zoo.build("mlp", in_dim=6, widths=[], num_classes=3)
    assert len(model.body) == 0 and len(model.head) == 0
    assert model.classifier.in_features == 6
    assert zoo.build("mlp", in_dim=6, widths=9, num_classes=3).classifier.in_features == 9


@pytest.mark.parametrize(("k", "d"), [(2, 1), (4, 3), (10, 9), (10, 64), (100, 512)])
def test_simplex_etf_geometry(k: int, d: int) -> None:
    m = zoo.simplex_etf(k, d).double()
    assert m.shape == (k, d)
    gram = m @ m.T
    expected = torch.full((k, k), -1.0 / (k - 1), dtype=torch.float64)
    expected.fill_diagonal_(1.0)
    assert torch.allclose(gram, expected, atol=1e-5)
    assert torch.allclose(m.sum(0), torch.zeros(d, dtype=torch.float64), atol=1e-5)


def test_simplex_etf_is_seeded_and_checked() -> None:
    assert torch.equal(zoo.simplex_etf(5, 8, seed=3), zoo.simplex_etf(5, 8, seed=3))
    assert not torch.equal(zoo.simplex_etf(5, 8, seed=3), zoo.simplex_etf(5, 8, seed=4))
    with pytest.raises(UsageError, match="dim >= 9"):
        zoo.simplex_etf(10, 8)
    with pytest.raises(UsageError, match="at least 2"):
        zoo.simplex_etf(1, 8)


@pytest.mark.parametrize("name", ["mlp", "resnet18", "vgg11", "vgg13"])
def test_etf_classifier_is_fixed_and_saved(name: str) -> None:
    extra = {"in_dim": 3 * 32 * 32, "widths": [16]} if name == "mlp" else {"width": 4}
    model = zoo.build(name, num_classes=4, etf_classifier=True, head_depth=1, **extra)
    w = model.classifier.weight
    assert not w.requires_grad
    assert model.classifier.bias is None
    assert "classifier.weight" in model.state_dict()
    assert torch.allclose(w, zoo.simplex_etf(4, w.shape[1]))
    assert "classifier.weight" not in {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(
    ("name", "params"), [("resnet18", 11_173_962), ("vgg11", 9_231_114), ("vgg13", 9_416_010)]
)
def test_cnn_parameter_counts_match_the_standard_cifar_models(name: str, params: int) -> None:
    model = zoo.build(name, num_classes=10)
    assert sum(p.numel() for p in model.parameters()) == params


@pytest.mark.parametrize("name", ["resnet18", "vgg11", "vgg13"])
@pytest.mark.parametrize(("in_channels", "head_depth", "etf"), [(1, 2, True), (3, 0, False)])
def test_cnn_forward_and_head(name: str, in_channels: int, head_depth: int, etf: bool) -> None:
    model = zoo.build(
        name,
        num_classes=7,
        in_channels=in_channels,
        width=4,
        head_depth=head_depth,
        head_width=12 if head_depth else None,
        etf_classifier=etf,
    )
    out = model(torch.randn(2, in_channels, 32, 32))
    assert out.shape == (2, 7)
    assert len(model.head) == head_depth
    assert all(isinstance(m, nn.Linear) for m in model.head)
    assert model.classifier.in_features == (12 if head_depth else 32)  # 8 * width


def test_resnet_is_the_cifar_variant() -> None:
    model = zoo.build("resnet18", num_classes=10, width=4)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    assert [len(s) for s in (model.layer1, model.layer2, model.layer3, model.layer4)] == [2] * 4


def test_vgg_has_batchnorm_and_five_pools() -> None:
    model = zoo.build("vgg11", num_classes=10, width=8)
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.features) == 5
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.features) == 8


def test_parse_arch_values() -> None:
    name, kwargs = zoo.parse_arch(
        "MLP:in_dim=64,widths=256-256-128,num_classes=10,head_depth=2,head_bias=false,"
        "head_width=none,lr=1e-3,one=5-,empty=,neg=-2,act=relu"
    )
    assert name == "mlp"
    assert kwargs == {
        "in_dim": 64,
        "widths": [256, 256, 128],
        "num_classes": 10,
        "head_depth": 2,
        "head_bias": False,
        "head_width": None,
        "lr": 0.001,
        "one": [5],
        "empty": [],
        "neg": -2,
        "act": "relu",
    }
    assert zoo.parse_arch("resnet18") == ("resnet18", {})


@pytest.mark.parametrize(
    "spec", ["mlp:in_dim", "mlp:in_dim=1,in_dim=2", ":in_dim=3", "mlp:1x=2", "mlp:w=1-a"]
)
def test_parse_arch_rejects_malformed_specs(spec: str) -> None:
    with pytest.raises(UsageError):
        zoo.parse_arch(spec)


def test_format_arch_round_trips() -> None:
    kwargs = {"in_dim": 8, "widths": [4], "num_classes": 3, "head_width": None, "x": False}
    text = zoo.format_arch("mlp", kwargs)
    assert text == "mlp:in_dim=8,widths=4-,num_classes=3,head_width=none,x=false"
    assert zoo.parse_arch(text) == ("mlp", kwargs)
    with pytest.raises(UsageError):
        zoo.format_arch("mlp", {"widths": [-1, 2]})


def test_build_from_spec_records_arch_and_rebuilds_identically() -> None:
    model = zoo.build("vgg11:num_classes=5,width=8,head_depth=2,etf_classifier=true")
    assert model.nccli_arch == "vgg11:num_classes=5,width=8,head_depth=2,etf_classifier=true"
    again = zoo.build(model.nccli_arch)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    assert shapes == {k: v.shape for k, v in again.state_dict().items()}
    # explicit keyword arguments override the spec
    assert (
        zoo.build("mlp:in_dim=4,widths=8,num_classes=3", num_classes=6).classifier.out_features == 6
    )


def test_build_errors_are_usage_errors() -> None:
    with pytest.raises(UsageError, match="available: mlp, resnet18, resnet18_tv, vgg11, vgg13"):
        zoo.build("resnet50", num_classes=10)
    with pytest.raises(UsageError, match="depth_of_head"):
        zoo.build("resnet18", num_classes=10, depth_of_head=2)
    with pytest.raises(UsageError, match="num_classes"):
        zoo.build("vgg11")
    with pytest.raises(UsageError, match="bad arguments"):
        zoo.build("resnet18", num_classes="ten")
    with pytest.raises(UsageError, match="head_depth"):
        zoo.build("mlp", in_dim=4, widths=[4], num_classes=2, head_depth=-1)
