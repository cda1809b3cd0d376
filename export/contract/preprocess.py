"""Crop preprocessing, identical to the original's test transform; the one place images are read.

The original applies torchvision's ``Resize((256, 128))`` (bilinear, on a PIL image: PIL's own
resize), ``ToTensor`` (float32 / 255) and ``Normalize(mean, std)`` to ``Image.open(p).convert('RGB')``.
This module does the same with PIL and numpy, in the same float32 arithmetic, so calibration,
evaluation and serving all see exactly what the model was trained to see.
"""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from export.contract.config import INPUT_SIZE_HW, PIXEL_MEAN, PIXEL_STD
from export.contract.errors import InputError, as_path

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
#: largest crop decoded (pixels): a person crop is far smaller; a larger file is refused before its
#: pixels are decoded (a decompression bomb would otherwise take gigabytes)
MAX_CROP_PIXELS = 50_000_000


def load_image(path, name: str | None = None) -> Image.Image:
    """Decode ``path`` (a file name, or a binary file object such as ``io.BytesIO``) as an RGB image
    or raise InputError naming it (``name``, default the path)."""
    where = path if name is None else name
    try:
        with Image.open(path) as img:
            w, h = img.size
            if w * h > MAX_CROP_PIXELS:
                raise InputError(f"{where} is larger than a crop may be ({w}x{h} pixels, limit {MAX_CROP_PIXELS:,}); "
                                 "crop the person out of the frame first")
            return _to_rgb(img, where)
    except FileNotFoundError:
        raise InputError(f"crop not found: {where}") from None
    except Image.DecompressionBombError as err:
        raise InputError(f"{where} is larger than a crop may be (PIL: {err}); crop the person out of the frame "
                         "first") from None
    except UnidentifiedImageError:
        raise InputError(f"{where} is not an image in a format PIL reads (JPEG, PNG, ...); remove it or replace it "
                         "with a JPEG/PNG crop") from None
    except (OSError, ValueError, SyntaxError) as err:
        raise InputError(f"{where} is not a decodable image ({type(err).__name__}: {err}); remove it or "
                         "replace it with a JPEG/PNG crop") from None


def _to_rgb(img: Image.Image, where) -> Image.Image:
    """RGB of a decoded image.  8-bit modes (RGB, L, P, CMYK, LA, ...) convert as PIL does (the
    original's reader).  16-bit greyscale (PNG, TIFF: modes I;16*; I from a PNG or a PGM, whose samples
    are at most 16 bits) is scaled to 8 bits (v / 257): ``convert`` would clip every value above 255 to
    white.  32-bit integer and float images (I, F from TIFF) have no defined range: refused."""
    mode = img.mode
    if mode.startswith("I;16") or (mode == "I" and img.format in ("PNG", "PPM")):
        v = np.asarray(img)
        if v.min() < 0 or v.max() > 65535:
            raise InputError(f"{where} holds {mode} samples outside 0..65535; convert the crop to 8-bit RGB")
        # round(v / 257) in integers (4 bytes a pixel, not a float64 copy); v / 257 never ends in .5
        return Image.fromarray(((v.astype(np.uint32) + 128) // 257).astype(np.uint8), "L").convert("RGB")
    if mode in ("I", "F"):
        kind = "32-bit integer" if mode == "I" else "floating-point"
        hint = (" (a 16-bit PNG/PGM in memory, cropped or resized, is mode I without its format: pass "
                "img.convert('I;16'))") if mode == "I" else ""
        raise InputError(f"{where} is a {kind} image (mode {mode}) with no defined 0..255 range; convert the crop "
                         f"to 8-bit (or 16-bit) RGB or greyscale{hint}")
    return img.convert("RGB")


def decode_image(data: bytes, name: str = "crop") -> Image.Image:
    """Encoded bytes (JPEG, PNG, ...) -> RGB image, exactly as :func:`load_image` reads a file."""
    return load_image(io.BytesIO(bytes(data)), name)


def as_image(crop) -> Image.Image:
    """An RGB PIL image from a PIL image (its mode read as :func:`load_image` reads a file's) or an
    HxWx3 uint8 RGB array."""
    if isinstance(crop, Image.Image):
        w, h = crop.size
        if w < 1 or h < 1 or w * h > MAX_CROP_PIXELS:
            raise InputError(f"a crop image must have 1..{MAX_CROP_PIXELS:,} pixels, found {w}x{h}")
        try:
            return _to_rgb(crop, "a PIL crop image")
        except (OSError, ValueError, SyntaxError, AssertionError) as err:   # truncated data; a closed file asserts
            raise InputError(f"a PIL crop image could not be decoded ({type(err).__name__}: {str(err)[:120]}); "
                             "it may be truncated or its file already closed: load it (img.load()) while the file "
                             "is open, or pass the file's path") from None
    try:
        arr = np.asarray(crop)
    except (ValueError, TypeError, NotImplementedError) as err:
        raise InputError(f"a crop must be a path, a PIL image or an HxWx3 uint8 array; numpy cannot read this "
                         f"{type(crop).__name__} as an array ({str(err)[:120]})") from None
    if arr.dtype != np.uint8:
        raise InputError(f"a crop array must be uint8 RGB (HxWx3), found dtype {arr.dtype}; convert with "
                         "arr.astype(np.uint8) from 0..255 values")
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise InputError(f"a crop array must be HxWx3 (RGB), found shape {arr.shape}")
    return Image.fromarray(arr, "RGB")


def preprocess(crop, size_hw=INPUT_SIZE_HW, mean=PIXEL_MEAN, std=PIXEL_STD) -> np.ndarray:
    """One crop (PIL image, HxWx3 uint8 array or path: str or os.PathLike) -> float32 [3, H, W], normalised."""
    if isinstance(crop, os.PathLike):     # Path, PurePath, os.DirEntry ...: a file name
        crop = str(as_path(crop, "a crop's path"))
    img = load_image(crop) if isinstance(crop, str) else as_image(crop)
    h, w = size_hw
    if img.size != (w, h):
        img = img.resize((w, h), Image.BILINEAR)
    x = np.asarray(img, dtype=np.float32) / np.float32(255.0)
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def preprocess_batch(crops, size_hw=INPUT_SIZE_HW, mean=PIXEL_MEAN, std=PIXEL_STD, first: int = 0) -> np.ndarray:
    """Crops -> float32 [n, 3, H, W]; an InputError names the crop by its position (``first`` is the
    position of ``crops[0]`` in the caller's list)."""
    if not len(crops):
        return np.zeros((0, 3, *size_hw), np.float32)
    out = []
    for i, c in enumerate(crops):
        try:
            out.append(preprocess(c, size_hw, mean, std))
        except InputError as err:
            raise InputError(f"crop #{first + i}: {err}") from None
    return np.stack(out)


def list_images(folder: str | Path) -> list[Path]:
    """Image files directly in ``folder`` (sorted by name), or InputError when there are none."""
    folder = Path(folder)
    if folder.is_file():
        raise InputError(f"{folder} is a file; give the folder that holds the crops (every image in it is read)")
    if not folder.is_dir():
        raise InputError(f"crop folder not found: {folder} (expected a directory of image crops)")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise InputError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    return files
