"""Reference models: LeNet-5 exactly as in Condensa's LeNet-5 tutorial, so results compare one to one.

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

__all__ = ["LeNet5"]


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
