"""CIFAR-style convolutional networks: ResNet-18 (two key layouts), VGG-11/13 with BN.

All end in ``flatten -> head -> classifier`` (see :mod:`nccli.zoo.heads`; the
torchvision-layout ResNet-18 calls its classifier ``fc``).  ``width`` is
the channel count of the first stage (64 in the papers); smaller values give the same
topology at a fraction of the cost, which the sample data and tests use.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from nccli.errors import UsageError
from nccli.zoo.heads import attach_head, head_out_dim, make_classifier, make_head
from nccli.zoo.layouts import adapt_resnet_state

__all__ = ["VGG", "BasicBlock", "ResNet18", "ResNet18TV", "TorchvisionBlock"]

#: the two ResNet-18 stems of ``resnet18_tv``
STEMS = ("cifar", "imagenet")

_VGG_CFG: dict[int, list[int | str]] = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    13: [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
}


def _check(name: str, num_classes: int, in_channels: int, width: int) -> None:
    if num_classes < 1 or in_channels < 1 or width < 1:
        raise UsageError(
            f"{name}: num_classes, in_channels and width must be positive integers, got "
            f"num_classes={num_classes}, in_channels={in_channels}, width={width}"
        )


def _projection(in_planes: int, planes: int, stride: int) -> nn.Sequential:
    """The 1x1 conv-BN projection of a block that changes shape, else the empty identity."""
    if stride == 1 and in_planes == planes:
        return nn.Sequential()
    return nn.Sequential(
        nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
    )


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or 1x1 conv-BN) shortcut, registered under
    :attr:`projection` (its name in the state dict)."""

    projection = "shortcut"

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        setattr(self, self.projection, _projection(in_planes, planes, stride))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Residual block forward."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + getattr(self, self.projection)(x))


class TorchvisionBlock(BasicBlock):
    """torchvision's ``BasicBlock``: the same block, its projection named ``downsample``."""

    projection = "downsample"


def _stages(width: int, block: type[nn.Module]) -> tuple[list[nn.Sequential], int]:
    """``layer1..layer4`` (two blocks each, stride 1, 2, 2, 2) and their output width."""
    planes = width
    stages: list[nn.Sequential] = []
    for i, mult in enumerate((1, 2, 4, 8)):
        out = width * mult
        stride = 1 if i == 0 else 2
        stages.append(nn.Sequential(block(planes, out, stride), block(out, out, 1)))
        planes = out
    return stages, planes


class ResNet18(nn.Module):
    """CIFAR ResNet-18: 3x3 stem, no max-pool, BasicBlocks [2, 2, 2, 2], global avg-pool.

    The topology and key names of kuangliu/pytorch-cifar's ``ResNet18`` (whose
    ``F.avg_pool2d(out, 4)`` on 32x32 inputs is this global average pool), except that
    the classifier is ``classifier`` and a deep linear ``head`` may sit before it.
    :meth:`nccli_adapt_state` lets the checkpoint loader read kuangliu's (``linear``)
    and torchvision's (``fc``, ``downsample``) key names as well.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        width: int = 64,
        head_depth: int = 0,
        head_width: int | None = None,
        head_bias: bool = True,
        etf_classifier: bool = False,
        classifier_bias: bool = True,
    ) -> None:
        super().__init__()
        _check("resnet18", num_classes, in_channels, width)
        self.nccli_input_shape = (in_channels, 32, 32)  # CIFAR-sized probe for `nccli info`
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        stages, planes = _stages(width, BasicBlock)
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        attach_head(
            self,
            planes,
            num_classes,
            head_depth=head_depth,
            head_width=head_width,
            head_bias=head_bias,
            etf_classifier=etf_classifier,
            classifier_bias=classifier_bias,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the logits ``(N, num_classes)`` for images ``(N, C, H, W)``."""
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.flatten(self.avgpool(x))
        return self.classifier(self.head(x))

    def nccli_adapt_state(self, state: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
        """``state`` with kuangliu's ``linear.*`` or torchvision's ``fc.*`` and
        ``layerN.M.downsample.*`` keys renamed to this model's, when unambiguous.

        Called by the checkpoint loader before it checks the keys; a state dict in
        another layout comes back unchanged (see :mod:`nccli.zoo.layouts`).
        """
        return adapt_resnet_state(state, self.state_dict().keys())


class ResNet18TV(nn.Module):
    """ResNet-18 with torchvision's module names: ``downsample`` projections, ``fc``.

    ``stem="cifar"`` (the default) is the CIFAR adaptation used by SimCLR-style and
    neural-collapse codebases: ``conv1`` a 3x3 stride-1 conv and ``maxpool`` an
    ``nn.Identity``, so 32x32 inputs reach ``layer1`` at full resolution.  It is the
    default because neural-collapse work trains on CIFAR-sized images, where the ImageNet
    stem would shrink a 32x32 input to 8x8 before the first block, and CIFAR training
    code that keeps torchvision's names swaps the stem exactly this way.
    ``stem="imagenet"`` is torchvision's own ``resnet18``: a 7x7 stride-2 ``conv1`` and a
    3x3 stride-2 max-pool (its probe for ``nccli info`` is 224x224).

    A deep linear ``head`` (``head_depth`` Linear layers; no keys when 0) sits between
    the pooled feature and ``fc``, so layer discovery finds ``head.0 … fc`` as it finds
    ``head.0 … classifier`` in ``resnet18``.  :meth:`nccli_adapt_state` lets the
    checkpoint loader read the ``resnet18`` and kuangliu key names (``shortcut``,
    ``classifier`` / ``linear``).
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        width: int = 64,
        stem: str = "cifar",
        head_depth: int = 0,
        head_width: int | None = None,
        head_bias: bool = True,
        etf_classifier: bool = False,
        classifier_bias: bool = True,
    ) -> None:
        super().__init__()
        _check("resnet18_tv", num_classes, in_channels, width)
        if stem not in STEMS:
            raise UsageError(f"resnet18_tv: stem must be one of {', '.join(STEMS)}, got {stem!r}")
        if stem == "cifar":
            self.nccli_input_shape = (in_channels, 32, 32)
            self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
            self.maxpool: nn.Module = nn.Identity()
        else:
            self.nccli_input_shape = (in_channels, 224, 224)
            self.conv1 = nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        stages, planes = _stages(width, TorchvisionBlock)
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.head = make_head(planes, head_depth, head_width, head_bias)
        self.fc = make_classifier(
            head_out_dim(planes, head_depth, head_width),
            num_classes,
            etf_classifier=etf_classifier,
            classifier_bias=classifier_bias,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the logits ``(N, num_classes)`` for images ``(N, C, H, W)``."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.flatten(self.avgpool(x))
        return self.fc(self.head(x))

    def nccli_adapt_state(self, state: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
        """``state`` with ``resnet18``'s ``classifier.*``, kuangliu's ``linear.*`` and
        ``layerN.M.shortcut.*`` keys renamed to torchvision's, when unambiguous.

        Called by the checkpoint loader before it checks the keys; a state dict in
        another layout comes back unchanged (see :mod:`nccli.zoo.layouts`).
        """
        return adapt_resnet_state(state, self.state_dict().keys())


class VGG(nn.Module):
    """CIFAR VGG with BatchNorm: ``features -> avgpool -> flatten -> head -> classifier``.

    ``depth`` is 11 or 13.  Five 2x2 max-pools bring 32x32 inputs to 1x1; the adaptive
    average pool makes any input of at least 32x32 work.
    """

    def __init__(
        self,
        depth: int,
        num_classes: int,
        in_channels: int = 3,
        width: int = 64,
        head_depth: int = 0,
        head_width: int | None = None,
        head_bias: bool = True,
        etf_classifier: bool = False,
        classifier_bias: bool = True,
    ) -> None:
        super().__init__()
        if depth not in _VGG_CFG:
            raise UsageError(f"vgg: depth must be one of {sorted(_VGG_CFG)}, got {depth}")
        _check(f"vgg{depth}", num_classes, in_channels, width)
        self.nccli_input_shape = (in_channels, 32, 32)  # CIFAR-sized probe for `nccli info`
        layers: list[nn.Module] = []
        c = in_channels
        for v in _VGG_CFG[depth]:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                out = int(v) * width // 64
                layers += [nn.Conv2d(c, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU()]
                c = out
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        attach_head(
            self,
            c,
            num_classes,
            head_depth=head_depth,
            head_width=head_width,
            head_bias=head_bias,
            etf_classifier=etf_classifier,
            classifier_bias=classifier_bias,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the logits ``(N, num_classes)`` for images ``(N, C, H, W)``."""
        x = self.flatten(self.avgpool(self.features(x)))
        return self.classifier(self.head(x))
