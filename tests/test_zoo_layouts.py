"""The zoo ResNet-18s load the state dicts of kuangliu/pytorch-cifar and of torchvision's
layout exactly as those codebases save them, and still name the keys of a real mismatch.

The two reference models below are faithful copies (module names, topology, functional
ReLUs and pooling) of kuangliu/pytorch-cifar ``models/resnet.py`` and of torchvision's
``resnet18`` — with the CIFAR stem swap (3x3 stride-1 ``conv1``, ``maxpool`` an Identity)
that CIFAR codebases apply to it.  Both are fixed at width 64, so the tests stay fast by
using four 32x32 images on the CPU.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nccli import zoo
from nccli.errors import CheckpointError, UsageError
from nccli.extract import discover_layers
from nccli.io.checkpoints import load_model
from nccli.zoo.layouts import adapt_resnet_state

# --- kuangliu/pytorch-cifar models/resnet.py ------------------------------------------------


class KBasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(
            in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False
        )
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != self.expansion * planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(
                    in_planes, self.expansion * planes, kernel_size=1, stride=stride, bias=False
                ),
                nn.BatchNorm2d(self.expansion * planes),
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        out = F.relu(out)
        return out


class KResNet(nn.Module):
    def __init__(self, block, num_blocks, num_classes=10):
        super().__init__()
        self.in_planes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = self._make_layer(block, 64, num_blocks[0], stride=1)
        self.layer2 = self._make_layer(block, 128, num_blocks[1], stride=2)
        self.layer3 = self._make_layer(block, 256, num_blocks[2], stride=2)
        self.layer4 = self._make_layer(block, 512, num_blocks[3], stride=2)
        self.linear = nn.Linear(512 * block.expansion, num_classes)

    def _make_layer(self, block, planes, num_blocks, stride):
        strides = [stride] + [1] * (num_blocks - 1)
        layers = []
        for stride in strides:
            layers.append(block(self.in_planes, planes, stride))
            self.in_planes = planes * block.expansion
        return nn.Sequential(*layers)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer1(out)
        out = self.layer2(out)
        out = self.layer3(out)
        out = self.layer4(out)
        out = F.avg_pool2d(out, 4)
        out = out.view(out.size(0), -1)
        out = self.linear(out)
        return out


def kuangliu_resnet18(num_classes=10):
    return KResNet(KBasicBlock, [2, 2, 2, 2], num_classes)


def kuangliu_resnet34(num_classes=10):
    return KResNet(KBasicBlock, [3, 4, 6, 3], num_classes)


# --- torchvision.models.resnet (BasicBlock, resnet18) ---------------------------------------


def conv3x3(in_planes, out_planes, stride=1):
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes, out_planes, stride=1):
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class TVBasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        identity = x
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        out = self.relu(out)
        return out


class TVResNet(nn.Module):
    def __init__(self, block, layers, num_classes=1000):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)

    def _make_layer(self, block, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * block.expansion, stride),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(block(self.inplanes, planes))
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.relu(x)
        x = self.maxpool(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        x = self.fc(x)
        return x


def torchvision_resnet18(num_classes=10, stem="cifar"):
    model = TVResNet(TVBasicBlock, [2, 2, 2, 2], num_classes)
    if stem == "cifar":  # the CIFAR adaptation of SimCLR-style and NC codebases
        model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    return model


# --- helpers --------------------------------------------------------------------------------


def trained(model: nn.Module, seed: int) -> nn.Module:
    """``model`` with every BatchNorm parameter and running statistic away from its
    initial value (so a swapped BN would change the logits), in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(1 + 0.2 * torch.randn(n, generator=gen))
                m.bias.copy_(0.1 * torch.randn(n, generator=gen))
                m.running_mean.copy_(0.1 * torch.randn(n, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(n, generator=gen))
                m.num_batches_tracked.fill_(7)
    return model.eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def kuangliu(tmp_path_factory) -> tuple[Path, nn.Module]:
    """kuangliu/pytorch-cifar's main.py checkpoint: DataParallel keys, {'net', 'acc', 'epoch'}."""
    torch.manual_seed(1)
    net = trained(kuangliu_resnet18(), seed=1)
    wrapped = torch.nn.DataParallel(net)  # main.py wraps the net before training
    path = tmp_path_factory.mktemp("kuangliu") / "ckpt.pth"
    state = wrapped.state_dict()
    assert next(iter(state)).startswith("module.")
    torch.save({"net": state, "acc": 93.5, "epoch": 41}, path)
    return path, net


@pytest.fixture(scope="module")
def tv_cifar(tmp_path_factory) -> tuple[Path, nn.Module]:
    """A torchvision-layout CIFAR ResNet-18 saved as a bare state dict."""
    torch.manual_seed(2)
    net = trained(torchvision_resnet18(10, "cifar"), seed=2)
    path = tmp_path_factory.mktemp("tv") / "resnet18_epoch3.pt"
    torch.save(net.state_dict(), path)
    return path, net


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


# --- loading through nccli's public loader ---------------------------------------------------


@pytest.mark.parametrize("arch", ["resnet18:num_classes=10", "resnet18_tv:num_classes=10"])
def test_kuangliu_checkpoint_loads_as_saved(kuangliu, images, arch) -> None:
    path, net = kuangliu
    got = load_model(path, arch=arch)
    assert got.arch == arch and got.epoch == 41
    assert not got.module.training
    torch.testing.assert_close(logits(got.module, images), logits(net, images), atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["resnet18:num_classes=10", "resnet18_tv:num_classes=10"])
def test_torchvision_cifar_checkpoint_loads_as_saved(tv_cifar, images, arch) -> None:
    path, net = tv_cifar
    got = load_model(path, arch=arch)
    assert got.arch == arch
    torch.testing.assert_close(logits(got.module, images), logits(net, images), atol=1e-5, rtol=0)


def test_torchvision_imagenet_stem_loads_into_resnet18_tv(tmp_path, images) -> None:
    torch.manual_seed(3)
    net = trained(torchvision_resnet18(10, "imagenet"), seed=3)
    path = tmp_path / "imagenet_stem.pt"
    torch.save({"state_dict": net.state_dict(), "epoch": 2}, path)
    got = load_model(path, arch="resnet18_tv:num_classes=10,stem=imagenet")
    assert got.module.nccli_input_shape == (3, 224, 224)
    torch.testing.assert_close(logits(got.module, images), logits(net, images), atol=1e-5, rtol=0)
    # the CIFAR-stem models cannot take it: the stem's shape is reported by name
    with pytest.raises(CheckpointError, match=r"conv1\.weight \(64, 3, 7, 7\) vs \(64, 3, 3, 3\)"):
        load_model(path, arch="resnet18:num_classes=10")


def test_nccli_layouts_load_each_other_with_their_heads(tmp_path, images) -> None:
    spec = "num_classes=5,width=8,head_depth=2,head_width=16"
    torch.manual_seed(4)
    ours = trained(zoo.build(f"resnet18:{spec}"), seed=4)
    tv = trained(zoo.build(f"resnet18_tv:{spec}"), seed=5)
    for source, arch in ((ours, f"resnet18_tv:{spec}"), (tv, f"resnet18:{spec}")):
        path = tmp_path / f"{arch.split(':')[0]}.pt"
        torch.save(source.state_dict(), path)
        got = load_model(path, arch=arch)
        assert got.module.nccli_arch == arch
        torch.testing.assert_close(
            logits(got.module, images), logits(source, images), atol=1e-5, rtol=0
        )


def test_mismatched_depth_is_reported_by_key(tmp_path) -> None:
    torch.manual_seed(6)
    path = tmp_path / "ckpt.pth"
    torch.save({"net": torch.nn.DataParallel(kuangliu_resnet34()).state_dict(), "epoch": 1}, path)
    for arch in ("resnet18:num_classes=10", "resnet18_tv:num_classes=10"):
        with pytest.raises(CheckpointError) as err:
            load_model(path, arch=arch)
        text = str(err.value)
        assert "\n" not in text
        assert "unexpected keys" in text and "layer1.2.conv1.weight" in text
        assert "missing keys" not in text  # every ResNet-18 key was found, renamed or not


def test_wrong_num_classes_is_reported_by_key(kuangliu) -> None:
    path, _ = kuangliu
    with pytest.raises(CheckpointError) as err:
        load_model(path, arch="resnet18:num_classes=100")
    text = str(err.value)
    assert "\n" not in text
    assert "classifier.weight (10, 512) vs (100, 512)" in text
    with pytest.raises(CheckpointError, match=r"fc\.weight \(10, 512\) vs \(100, 512\)"):
        load_model(path, arch="resnet18_tv:num_classes=100")


def test_foreign_head_is_not_renamed(tmp_path) -> None:
    """A state dict whose ``fc`` is a two-layer MLP keeps its names in the error."""
    state = dict(zoo.build("resnet18:num_classes=3,width=4").state_dict())
    for key in ("classifier.weight", "classifier.bias"):
        del state[key]
    state["fc.0.weight"] = torch.zeros(3, 32)
    path = tmp_path / "mlp_head.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as err:
        load_model(path, arch="resnet18:num_classes=3,width=4")
    text = str(err.value)
    assert "unexpected keys: fc.0.weight" in text and "missing keys: classifier.weight" in text


# --- the adapter itself ----------------------------------------------------------------------


def test_adapter_maps_each_layout_and_leaves_the_rest(kuangliu, tv_cifar, images) -> None:
    k_state = {k.removeprefix("module."): v for k, v in kuangliu[1].state_dict().items()}
    for target in (zoo.build("resnet18", num_classes=10), zoo.build("resnet18_tv", num_classes=10)):
        own = target.state_dict()
        assert target.nccli_adapt_state(own) is own  # its own layout: unchanged
        for source, state in ((kuangliu[1], k_state), (tv_cifar[1], tv_cifar[1].state_dict())):
            target.load_state_dict(target.nccli_adapt_state(state), strict=True)
            torch.testing.assert_close(
                logits(target, images), logits(source, images), atol=1e-5, rtol=0
            )
    # ambiguous: two classifier names in one file, nothing is renamed
    both = {"linear.weight": 1, "fc.weight": 2, "conv1.weight": 3}
    assert adapt_resnet_state(both, {"classifier.weight", "conv1.weight"}) is both
    # a rename onto a key the file already has is not made
    clash = {"linear.weight": 1, "classifier.weight": 2}
    assert adapt_resnet_state(clash, {"classifier.weight"}) is clash
    # a module.-prefixed state is the loader's to strip first
    prefixed = {"module.linear.weight": 1}
    assert adapt_resnet_state(prefixed, {"classifier.weight"}) is prefixed


# --- the resnet18_tv architecture ------------------------------------------------------------


def test_resnet18_tv_topology_and_parameter_counts() -> None:
    cifar = zoo.build("resnet18_tv", num_classes=10)
    assert cifar.conv1.kernel_size == (3, 3) and cifar.conv1.stride == (1, 1)
    assert isinstance(cifar.maxpool, nn.Identity)
    assert sum(p.numel() for p in cifar.parameters()) == 11_173_962  # = resnet18
    imagenet = zoo.build("resnet18_tv", num_classes=1000, stem="imagenet")
    assert imagenet.conv1.kernel_size == (7, 7) and imagenet.conv1.stride == (2, 2)
    assert isinstance(imagenet.maxpool, nn.MaxPool2d)
    assert sum(p.numel() for p in imagenet.parameters()) == 11_689_512  # torchvision's count
    ref = torchvision_resnet18(1000, "imagenet").state_dict()
    assert {k: v.shape for k, v in imagenet.state_dict().items()} == {
        k: v.shape for k, v in ref.items()
    }
    k_ref = kuangliu_resnet18(10).state_dict()
    ours = zoo.build("resnet18", num_classes=10).state_dict()
    assert {k: v.shape for k, v in ours.items()} == {
        k.replace("linear.", "classifier."): v.shape for k, v in k_ref.items()
    }


def test_resnet18_tv_arguments_and_recorded_arch() -> None:
    model = zoo.build(
        "resnet18_tv:num_classes=4,in_channels=1,width=4,stem=imagenet,head_depth=1,"
        "head_width=6,etf_classifier=true"
    )
    assert model.nccli_arch == (
        "resnet18_tv:num_classes=4,in_channels=1,width=4,stem=imagenet,head_depth=1,"
        "head_width=6,etf_classifier=true"
    )
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 4)
    assert model.fc.bias is None and not model.fc.weight.requires_grad
    assert torch.allclose(model.fc.weight, zoo.simplex_etf(4, 6))
    again = zoo.build(model.nccli_arch)
    assert {k: v.shape for k, v in again.state_dict().items()} == {
        k: v.shape for k, v in model.state_dict().items()
    }
    assert zoo.build("resnet18_tv:num_classes=3,width=4,classifier_bias=false").fc.bias is None
    with pytest.raises(UsageError, match="stem must be one of cifar, imagenet"):
        zoo.build("resnet18_tv:num_classes=3,stem=tiny")


@pytest.mark.parametrize("head_depth", [0, 2])
def test_resnet18_tv_discovery_finds_fc_and_head(head_depth) -> None:
    model = zoo.build(f"resnet18_tv:num_classes=5,width=4,head_depth={head_depth}")
    disc = discover_layers(model, torch.randn(3, 3, 16, 16))
    assert disc.classifier == "fc" and disc.executed[-1] == "fc"
    got = [(c.name, c.depth, c.role, c.dim) for c in disc.layers]
    if head_depth == 0:
        assert got == [("fc", 0, "penultimate", 32)]  # 512 * width / 64
    else:
        assert got == [
            ("head.0", 0, "penultimate", 32),
            ("head.1", 1, "linear", 32),
            ("fc", 2, "classifier", 32),
        ]
