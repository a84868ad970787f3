"""The seed model used across torchkeep's examples and tests (the PyTorch CIFAR tutorial net)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SeedNet", "make_optimizer"]


class SeedNet(nn.Module):
    """conv(3,6,5) -> pool -> conv(6,16,5) -> pool -> fc 400-120-84-10."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(400, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = x.view(-1, 400)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


def make_optimizer(model: nn.Module) -> torch.optim.SGD:
    """The seed model's optimizer: SGD(lr=0.001, momentum=0.9)."""
    return torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
