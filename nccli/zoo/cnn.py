"""CIFAR-style convolutional networks: ResNet-18 and VGG-11/13 with BatchNorm.

Both end in ``flatten -> head -> classifier`` (see :mod:`nccli.zoo.heads`).  ``width`` is
the channel count of the first stage (64 in the papers); smaller values give the same
topology at a fraction of the cost, which the sample data and tests use.
"""

from __future__ import annotations

import torch
from torch import nn

from nccli.errors import UsageError
from nccli.zoo.heads import attach_head

__all__ = ["VGG", "BasicBlock", "ResNet18"]

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


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or 1x1 conv-BN) shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Residual block forward."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """CIFAR ResNet-18: 3x3 stem, no max-pool, BasicBlocks [2, 2, 2, 2], global avg-pool."""

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
        planes = width
        stages: list[nn.Sequential] = []
        for i, mult in enumerate((1, 2, 4, 8)):
            out = width * mult
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(BasicBlock(planes, out, stride), BasicBlock(out, out, 1)))
            planes = out
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
