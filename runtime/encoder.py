"""The encoder at serving time: crops -> 256-d embeddings, in batches."""
from __future__ import annotations

import io
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
        return [_bytes_path(crops, 0) if isinstance(crops, bytes) else crops]
    if isinstance(crops, io.IOBase):
        raise InputError(f"crops must be paths, PIL images or HxWx3 uint8 arrays, found an open file "
                         f"({type(crops).__name__}); for encoded image data pass PIL.Image.open(that file)")
    if isinstance(crops, memoryview):
        crops = np.asarray(crops)
    if isinstance(crops, np.ndarray):
        if crops.ndim == 1 and crops.dtype.kind in "USO":          # paths, e.g. a DataFrame column's values
            return [_bytes_path(p, i) if isinstance(p, (bytes, np.bytes_)) else p for i, p in enumerate(crops.tolist())]
        if crops.ndim == 3:
            return [crops]
        if crops.ndim == 4:
            return list(crops)
        raise InputError(f"an array of crops must be [N, H, W, 3] (or one crop [H, W, 3]), found shape {crops.shape}")
    try:
        return [_bytes_path(p, i) if isinstance(p, bytes) else p for i, p in enumerate(crops)]
    except TypeError:
        raise InputError(f"crops must be a list of paths, PIL images or HxWx3 uint8 arrays, found "
                         f"{type(crops).__name__}") from None


def _bytes_path(value: bytes, position: int) -> str:
    """A crop given as bytes: a file-system name (``os.fsdecode``), unless it cannot be one (a NUL
    byte, longer than any path): then it is image data, refused without echoing it."""
    if b"\0" in value or len(value) > 4096:
        raise InputError(f"crop #{position} is {len(value):,} bytes of data, not a file name (bytes are read as "
                         "file-system paths); for encoded image data pass PIL.Image.open(io.BytesIO(data))")
    return os.fsdecode(value)


def check_progress(progress) -> None:
    if progress is not None and not callable(progress):
        raise InputError(f"progress must be a function called with the number of crops done, found "
                         f"{type(progress).__name__} {progress!r:.40}")


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
        check_progress(progress)
        c = self.config
        out = np.zeros((len(crops), c.feature_dim), np.float32)
        for s in range(0, len(crops), self.batch_size):
            chunk = crops[s:s + self.batch_size]
            images = preprocess_batch(chunk, c.input_size_hw, c.pixel_mean, c.pixel_std, first=s)
            out[s:s + len(chunk)] = self.backend.run({"images": images})["embeddings"]
            if progress:
                progress(len(chunk))
        return out
