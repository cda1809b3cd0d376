"""The encoder at serving time: crops -> 256-d embeddings, in batches."""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from export.contract.config import ModelConfig
from export.contract.errors import InputError

from runtime.backends import Backend
from export.contract.preprocess import preprocess_batch


class EncoderRunner:
    def __init__(self, backend: Backend, config: ModelConfig, batch_size: int = 32):
        if batch_size < 1:
            raise InputError(f"batch size must be >= 1, got {batch_size}")
        self.backend = backend
        self.config = config
        self.batch_size = batch_size

    def embed_images(self, images: np.ndarray) -> np.ndarray:
        """Preprocessed images float32 [B, 3, H, W] -> embeddings float32 [B, feature_dim]."""
        h, w = self.config.input_size_hw
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[1:] != (3, h, w):
            raise InputError(f"images must be [batch, 3, {h}, {w}], found {images.shape}; use "
                             "export.contract.preprocess to prepare crops")
        out = np.zeros((len(images), self.config.feature_dim), np.float32)
        for s in range(0, len(images), self.batch_size):
            batch = np.ascontiguousarray(images[s:s + self.batch_size], dtype=np.float32)
            out[s:s + len(batch)] = self.backend.run({"images": batch})["embeddings"]
        return out

    def embed(self, crops: Sequence, progress: Callable[[int], None] | None = None) -> np.ndarray:
        """Crops (paths, PIL images or HxWx3 uint8 arrays of any size) -> embeddings [len, feature_dim]."""
        c = self.config
        out = np.zeros((len(crops), c.feature_dim), np.float32)
        for s in range(0, len(crops), self.batch_size):
            chunk = crops[s:s + self.batch_size]
            images = preprocess_batch(chunk, c.input_size_hw, c.pixel_mean, c.pixel_std)
            out[s:s + len(chunk)] = self.backend.run({"images": images})["embeddings"]
            if progress:
                progress(len(chunk))
        return out
