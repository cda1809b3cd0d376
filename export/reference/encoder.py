"""The encoder: the original's ``Baseline`` at test time (one crop -> one 256-d neck feature).

ResNet -> global average pooling -> ``projection`` (Linear C -> 256) -> ``bottleneck``
(BatchNorm1d, eval statistics).  The output is the BNNeck feature ("neck feat after"), not yet
L2-normalised.  Names match the checkpoint keys under ``backbone.``; the training-only
``classifier`` is not built (the checkpoint filter drops it).
"""
from __future__ import annotations

import torch
from torch import nn

from export.reference.resnet import STANDARD_WIDTHS, ResNet


class Encoder(nn.Module):
    def __init__(self, arch: str = "resnet50", last_stride: int = 1, feature_dim: int = 256,
                 widths: tuple[int, int, int, int] = STANDARD_WIDTHS, stem_width: int = 64):
        super().__init__()
        self.base = ResNet(arch, last_stride, widths, stem_width)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.projection = nn.Linear(self.base.out_channels, feature_dim)
        self.bottleneck = nn.BatchNorm1d(feature_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        feat = self.gap(self.base(images)).flatten(1)
        return self.bottleneck(self.projection(feat))
