"""A plain convolutional network for small images (digits, glyphs, icons, thumbnails of 28-64 px).

ImageNet backbones are built to shrink a 224 px photo 32 times; on a 32 px image, even with a stride-1 stem,
MobileNetV3-Small ends on a 2x2 map after a dozen depthwise blocks whose fixed cost per layer dominates a
small CPU. Three VGG-style stages of 3x3 convolutions (32, 64, 128 channels, two max-pools) keep an 8x8 map
at 32 px, train about twice as many images per second and end more accurate on digits at equal wall time
(domain README, "A template for small images").
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import UserError

WIDTHS = (32, 64, 128)


def _conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


class SmallConvNet(nn.Module):
    """conv-conv-pool, conv-conv-pool, conv-conv (widths WIDTHS x width_mult), global average pooling,
    dropout, linear. `features` is the trunk (its output is the last feature map), `classifier` the head."""

    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0, dropout: float = 0.2):
        super().__init__()
        w1, w2, w3 = (max(8, int(round(w * width_mult))) for w in WIDTHS)
        self.features = nn.Sequential(
            _conv_bn_relu(3, w1), _conv_bn_relu(w1, w1), nn.MaxPool2d(2),
            _conv_bn_relu(w1, w2), _conv_bn_relu(w2, w2), nn.MaxPool2d(2),
            _conv_bn_relu(w2, w3), _conv_bn_relu(w3, w3))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(w3, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def convnet_small(weights: None = None, **kwargs) -> SmallConvNet:
    """The factory's builder (torchvision's signature); there are no published weights to load by name."""
    if weights is not None:
        raise UserError("convnet_small has no published weights; pass a weights file with --load-weights")
    return SmallConvNet(**kwargs)


__all__ = ["SmallConvNet", "convnet_small"]
