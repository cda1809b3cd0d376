"""The encoder at serving time: crops -> 256-d embeddings, in batches."""
from __future__ import annotations

import os
from typing import Callable, Sequence

import numpy as np

from export.contract.config import ModelConfig
from export.contract.errors import InputError, check_count
from export.contract.preprocess import preprocess_batch
from runtime.backends import Backend


def as_crop_list(crops) -> list:
    """``crops`` as a list of single crops: a list, tuple, generator or [N, H, W, 3] array of
    them, or one crop given alone (a path, a PIL image, an HxWx3 array), which is a list of one
    (a path string would otherwise be read as one crop per character).  Paths given as bytes are
    file-system names (``os.fsdecode``)."""
    if isinstance(crops, (str, bytes, os.PathLike)) or hasattr(crops, "getbands"):     # a path, a PIL image
        return [os.fsdecode(crops) if isinstance(crops, bytes) else crops]
    if isinstance(crops, np.ndarray):
        if crops.ndim == 1 and crops.dtype.kind in "USO":          # paths, e.g. a DataFrame column's values
            return [os.fsdecode(p) if isinstance(p, (bytes, np.bytes_)) else p for p in crops.tolist()]
        if crops.ndim == 3:
            return [crops]
        if crops.ndim == 4:
            return list(crops)
        raise InputError(f"an array of crops must be [N, H, W, 3] (or one crop [H, W, 3]), found shape {crops.shape}")
    try:
        return [os.fsdecode(p) if isinstance(p, bytes) else p for p in crops]
    except TypeError:
        raise InputError(f"crops must be a list of paths, PIL images or HxWx3 uint8 arrays, found "
                         f"{type(crops).__name__}") from None


class EncoderRunner:
    def __init__(self, backend: Backend, config: ModelConfig, batch_size: int = 32):
        batch_size = check_count(batch_size, "batch size")
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
        crops = as_crop_list(crops)
        c = self.config
        out = np.zeros((len(crops), c.feature_dim), np.float32)
        for s in range(0, len(crops), self.batch_size):
            chunk = crops[s:s + self.batch_size]
            images = preprocess_batch(chunk, c.input_size_hw, c.pixel_mean, c.pixel_std)
            out[s:s + len(chunk)] = self.backend.run({"images": images})["embeddings"]
            if progress:
                progress(len(chunk))
        return out
