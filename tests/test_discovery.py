"""Layer discovery: the executed order finds the classifier and the deep linear head."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from nccli import zoo
from nccli.errors import DataError, UsageError
from nccli.extract import discover_layers


def layout(disc):
    return [(c.name, c.io, c.depth, c.role, c.dim) for c in disc.layers]


def probe(*shape):
    return torch.randn(4, *shape, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("head_depth", [0, 1, 3])
def test_mlp_heads(head_depth):
    m = zoo.build(f"mlp:in_dim=6,widths=12-10,num_classes=3,head_depth={head_depth},head_width=7")
    disc = discover_layers(m, probe(6))
    assert disc.classifier == "classifier"
    assert disc.num_logits == 3
    assert disc.head_depth == head_depth
    if head_depth == 0:
        assert layout(disc) == [("classifier", "input", 0, "penultimate", 10)]
    else:
        names = [f"head.{i}" for i in range(head_depth)] + ["classifier"]
        assert [c.name for c in disc.layers] == names
        assert [c.depth for c in disc.layers] == list(range(head_depth + 1))
        roles = ["penultimate"] + ["linear"] * (head_depth - 1) + ["classifier"]
        assert [c.role for c in disc.layers] == roles
        assert [c.dim for c in disc.layers] == [10] + [7] * head_depth
    # every head layer stores its own module's parameters
    mods = dict(m.named_modules())
    for c in disc.layers:
        assert torch.equal(torch.from_numpy(c.weight), mods[c.module].weight.detach())
        assert torch.equal(torch.from_numpy(c.bias), mods[c.module].bias.detach())
    # the body's linear layers are not part of the head (a ReLU follows them)
    assert "body.2" in disc.executed and all(not c.name.startswith("body") for c in disc.layers)


def test_resnet18_penultimate_is_pooled_feature():
    m = zoo.build("resnet18:num_classes=5,width=4,head_depth=2")
    disc = discover_layers(m, probe(3, 8, 8))
    assert layout(disc) == [
        ("head.0", "input", 0, "penultimate", 32),
        ("head.1", "input", 1, "linear", 32),
        ("classifier", "input", 2, "classifier", 32),
    ]
    # executed order: the stem runs first, the classifier last
    assert disc.executed[0] == "conv1" and disc.executed[-1] == "classifier"


class ClassifierFirst(nn.Module):
    """Registers the classifier before the body; only the executed order is right."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 3)
        self.proj = nn.Linear(8, 8)
        self.body = nn.Sequential(nn.Linear(5, 8), nn.Tanh())

    def forward(self, x):
        return self.fc(self.proj(self.body(x)))


def test_classifier_registered_before_body():
    disc = discover_layers(ClassifierFirst(), probe(5))
    assert layout(disc) == [
        ("proj", "input", 0, "penultimate", 8),
        ("fc", "input", 1, "classifier", 8),
    ]
    assert disc.classifier == "fc"


class Passthrough(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 6), nn.ReLU())
        self.head = nn.Sequential(
            nn.Dropout(0.5), nn.Linear(6, 6), nn.Flatten(), nn.Identity(), nn.Dropout(0.1)
        )
        self.out = nn.Linear(6, 2)

    def forward(self, x):
        return self.out(self.head(self.body(x)))


def test_dropout_flatten_identity_pass_through():
    m = Passthrough().eval()
    disc = discover_layers(m, probe(4))
    assert [c.name for c in disc.layers] == ["head.1", "out"]
    assert [c.role for c in disc.layers] == ["penultimate", "classifier"]


def test_bias_free_head_and_fixed_etf_classifier():
    m = zoo.build(
        "mlp:in_dim=5,widths=9,num_classes=4,head_depth=2,head_bias=false,etf_classifier=true"
    )
    disc = discover_layers(m, probe(5))
    assert [c.role for c in disc.layers] == ["penultimate", "linear", "classifier"]
    assert all(c.bias is None for c in disc.layers)
    W = disc.layers[-1].weight
    G = W @ W.T
    off = G[~torch.eye(4, dtype=torch.bool).numpy()]
    assert abs(G.diagonal() - 1).max() < 1e-5 and abs(off + 1 / 3).max() < 1e-5


class HiddenRelu(nn.Module):
    """A functional relu between two linear layers: invisible to hooks, not to the check."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.b = nn.Linear(8, 8)
        self.c = nn.Linear(8, 3)

    def forward(self, x):
        return self.c(self.b(F.relu(self.a(x))))


def test_functional_nonlinearity_ends_the_head():
    m = HiddenRelu()
    with torch.no_grad():
        m.a.bias.fill_(-0.5)  # make sure the relu clips something
    disc = discover_layers(m, probe(4))
    assert [c.name for c in disc.layers] == ["b", "c"]


class DictOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(3, 5), nn.GELU())
        self.cls = nn.Linear(5, 2)

    def forward(self, x):
        h = self.enc(x)
        return {"logits": self.cls(h), "features": h}


def test_dict_output_and_selected_modules():
    disc = discover_layers(DictOut(), probe(3), "auto,enc.*")
    assert layout(disc) == [
        ("cls", "input", 0, "penultimate", 5),
        ("enc.0", "output", -1, "other", 5),
        ("enc.1", "output", -1, "other", 5),
    ]
    assert disc.layers[1].weight is None


def test_selecting_a_head_layer_keeps_the_layers_above():
    m = zoo.build("mlp:in_dim=4,widths=6,num_classes=3,head_depth=3")
    disc = discover_layers(m, probe(4), "head.1")
    assert [c.name for c in disc.layers] == ["head.1", "head.2", "classifier"]
    assert [c.depth for c in disc.layers] == [1, 2, 3]
    only_body = discover_layers(m, probe(4), "body.0")
    assert layout(only_body) == [("body.0", "output", -1, "other", 6)]
    assert only_body.classifier is None


def test_layer_selection_errors():
    m = zoo.build("mlp:in_dim=4,widths=6,num_classes=3")
    with pytest.raises(UsageError, match=r"--layers 'nope\.\*' matches no module; modules are"):
        discover_layers(m, probe(4), "nope.*")


class NoLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(1, 3, 4)

    def forward(self, x):
        return self.conv(x[:, None]).mean(-1)


class TwiceClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        return self.fc(self.fc(x))


def test_models_without_a_usable_classifier():
    with pytest.raises(DataError, match="no nn.Linear classifier producing the 3 logits"):
        discover_layers(NoLinear(), probe(4), source="ck.pt")
    with pytest.raises(DataError, match="ck.pt: the classifier fc runs 2 times"):
        discover_layers(TwiceClassifier(), probe(3), source="ck.pt")
    # explicit layers still work without a classifier; a (B, 3, 1) output is ambiguous
    with pytest.raises(DataError, match=r"conv returns \(batch, 3, 1\).*--pool flatten"):
        discover_layers(NoLinear(), probe(4), "conv")
    disc = discover_layers(NoLinear(), probe(4), "conv", pool="flatten")
    assert layout(disc) == [("conv", "output", -1, "other", 3)]
    assert disc.layers[0].pool == "flatten"


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_torchscript_module_is_refused_with_a_fix():
    m = torch.jit.script(zoo.build("mlp:in_dim=4,widths=6,num_classes=3"))
    with pytest.raises(DataError, match="hides its layers.*pass --arch or --model"):
        discover_layers(m, probe(4), source="ts.pt")


def test_probe_failure_names_the_shape():
    m = zoo.build("mlp:in_dim=4,widths=6,num_classes=3")
    with pytest.raises(DataError, match=r"ck.pt: the probe forward pass failed .*\(5,\)"):
        discover_layers(m, probe(5), source="ck.pt")
