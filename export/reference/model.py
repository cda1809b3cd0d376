"""The whole trained model as the original saves it: ``backbone`` (encoder) + ``nformer`` (refinement)."""
from __future__ import annotations

from torch import nn

from export.contract.config import ModelConfig
from export.reference.encoder import Encoder
from export.reference.nformer import NFormer


class NFormerModel(nn.Module):
    """Top-level module whose ``state_dict`` keys are the original checkpoint's (minus classifiers)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.backbone = Encoder(config.arch, config.last_stride, config.feature_dim, config.widths,
                                config.stem_width)
        self.nformer = NFormer(config.n_layer, config.n_embd, config.n_head, config.topk,
                               config.num_classes)
