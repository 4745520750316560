"""Shared fixtures: tiny models and the path of the real datasets."""

from pathlib import Path

import pytest
import torch
from torch import nn

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


class SmallCNN(nn.Module):
    def __init__(self, num_classes: int = 5):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.fc = nn.Linear(3 * 4 * 4, num_classes)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


class SmallBN(nn.Module):
    def __init__(self, num_classes: int = 4):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x)))
        return self.fc(h.mean(dim=(2, 3)))


def small_cnn(num_classes: int = 5) -> nn.Module:
    """Factory used as 'package.module:factory' in tests."""
    return SmallCNN(num_classes)


@pytest.fixture
def cnn_pair():
    torch.manual_seed(0)
    return [SmallCNN(), SmallCNN()]


@pytest.fixture
def images():
    return torch.randn(24, 1, 6, 6, generator=torch.Generator().manual_seed(1))
