"""The model configuration: what a checkpoint's shapes and the user's options say about the model.

Plain data (no torch): the manifest stores it and the runtime reads it on machines without PyTorch.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

#: the original's test transform (DESIGN.md section 1)
INPUT_SIZE_HW = (256, 128)
#: the crop sizes an export accepts, per side: below 32 the ResNet's feature map vanishes; 4096 is
#: far beyond any person re-identification crop (the original: 256x128) and bounds what the
#: export's checks allocate
MIN_INPUT_SIDE = 32
MAX_INPUT_SIDE = 4096
#: the largest encoder batch anything here takes: the serving batchers (`runtime serve --max-batch`)
#: and TensorRT profiles (a larger value would reach TensorRT's 32-bit dimensions)
MAX_BATCH = 4096
PIXEL_MEAN = (0.485, 0.456, 0.406)
PIXEL_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "resnet50"
    last_stride: int = 1
    #: ResNet stage widths and stem width (standard: 64/128/256/512 and 64; read from the shapes)
    widths: tuple[int, int, int, int] = (64, 128, 256, 512)
    stem_width: int = 64
    feature_dim: int = 256
    num_classes: int = 751
    n_layer: int = 4
    n_embd: int = 256
    n_head: int = 2
    topk: int = 20
    landmarks: int = 5
    input_size_hw: tuple[int, int] = INPUT_SIZE_HW
    pixel_mean: tuple[float, float, float] = PIXEL_MEAN
    pixel_std: tuple[float, float, float] = PIXEL_STD

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "ModelConfig":
        known = {f for f in cls.__dataclass_fields__}
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in known}
        return cls(**values)
