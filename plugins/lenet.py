"""Model `lenet`: the MNIST network of Madry et al. (2018) that the paper uses (appendix A.2).

conv 5x5, 32 channels, 'same' padding -> ReLU -> 2x2 max pool -> conv 5x5, 64 channels -> ReLU -> 2x2 max pool
-> linear 1024 -> ReLU -> linear num_classes. Works on any input size (the flattened size follows from it)."""

from __future__ import annotations

from torch import nn

from harness.plugin import ModelPlugin


class LeNet(ModelPlugin):
    """Madry et al.'s MNIST LeNet, optionally spectrally normalized."""

    def build(self, num_classes: int, input_shape: tuple[int, int, int]) -> nn.Module:
        channels, height, width = input_shape
        model = nn.Sequential(
            nn.Conv2d(channels, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * (height // 4) * (width // 4), 1024), nn.ReLU(),
            nn.Linear(1024, num_classes),
        )
        return self.normalize(model)
