"""Reference models: LeNet-5 exactly as in Condensa's LeNet-5 tutorial, so results compare one to one, and a
CIFAR-style ResNet-20 for 1x28x28 images (BatchNorm and residuals: the quality benchmark's second network).

Example::

    >>> import torch
    >>> from fxcondensa.models import LeNet5
    >>> model = LeNet5()
    >>> model(torch.randn(8, 1, 28, 28)).shape
    torch.Size([8, 10])
    >>> sum(p.numel() for p in model.parameters())
    431080
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["LeNet5", "ResNet20"]


class LeNet5(nn.Module):
    """Caffe's LeNet-5 variant for 1x28x28 images and 10 classes (431080 parameters).

    The attribute names, the in-place ReLUs and the ``view`` flatten are the tutorial's, on purpose: the
    names are what schemes and reports show, and the ``view`` is the flatten the thinning pass must rewrite.

    Example::

        >>> LeNet5()(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 20, kernel_size=5, stride=1)
        self.relu_conv1 = nn.ReLU(inplace=True)
        self.pool1 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.conv2 = nn.Conv2d(20, 50, kernel_size=5, stride=1)
        self.relu_conv2 = nn.ReLU(inplace=True)
        self.pool2 = nn.MaxPool2d(kernel_size=2, stride=2)

        self.ip1 = nn.Linear(50 * 4 * 4, 500)
        self.relu_ip1 = nn.ReLU(inplace=True)
        self.ip2 = nn.Linear(500, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = self.relu_conv1(x)
        x = self.pool1(x)
        x = self.conv2(x)
        x = self.relu_conv2(x)
        x = self.pool2(x)

        x = x.view(x.size(0), -1)

        x = self.ip1(x)
        x = self.relu_ip1(x)
        x = self.ip2(x)
        return x


class _Block(nn.Module):
    """He et al.'s basic block; a 1x1 conv + BatchNorm shortcut where the shape changes (option B)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet20(nn.Module):
    """The CIFAR ResNet-20 of He et al. (3 stages of 3 basic blocks, 16/32/64 channels) for ``in_channels``
    x 28 x 28 images: 28 -> 28 -> 14 -> 7 before the global average pool.

    Example::

        >>> model = ResNet20()
        >>> model(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
        >>> sum(p.numel() for p in model.parameters())
        272186
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        layers, cin = [], 16
        for cout, stride in ((16, 1), (32, 2), (64, 2)):
            layers.append(nn.Sequential(_Block(cin, cout, stride), _Block(cout, cout, 1), _Block(cout, cout, 1)))
            cin = cout
        self.layer1, self.layer2, self.layer3 = layers
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))
