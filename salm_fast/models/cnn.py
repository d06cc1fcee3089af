"""A small, fast 4-conv CNN: the default victim for tests and quick runs."""
from __future__ import annotations

from torch import Tensor, nn

from ._blocks import conv_bn_relu, init_conv_bn_linear


class SmallCNN(nn.Module):
    """conv32 -> conv64 -> pool -> conv128 -> pool -> conv128 -> global avg pool -> linear.

    About 0.24 M parameters; works at any size >= 4 px since it ends in a global pool.
    """

    def __init__(self, in_channels: int, num_classes: int, width: int = 32):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            conv_bn_relu(in_channels, w),
            conv_bn_relu(w, 2 * w),
            nn.MaxPool2d(2),
            conv_bn_relu(2 * w, 4 * w),
            nn.MaxPool2d(2),
            conv_bn_relu(4 * w, 4 * w),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(4 * w, num_classes)
        init_conv_bn_linear(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def cnn(in_channels: int, num_classes: int, image_size: int = 28) -> SmallCNN:
    del image_size  # size-agnostic (global pool)
    return SmallCNN(in_channels, num_classes)


__all__ = ["SmallCNN", "cnn"]
