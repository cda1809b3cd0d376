"""Crops from disk: hostile files end in one clear error (and calibration skips them)."""
from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from export.contract.errors import InputError
from export.contract.preprocess import MAX_CROP_PIXELS, load_image, preprocess


def _png_bomb(path, w, h):
    """A valid PNG header for a w x h grey image whose (tiny, compressed) data would expand hugely."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    raw = zlib.compress(b"\x00" * (w + 1) * 16)   # only a few rows: the decoder never gets that far
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", raw) + chunk(b"IEND", b""))


def test_a_huge_png_is_refused_before_decoding(tmp_path):
    bomb = tmp_path / "bomb.png"
    _png_bomb(bomb, 20000, 20000)
    with pytest.raises(InputError, match="larger than a crop may be"):
        load_image(bomb)
    with pytest.raises(InputError):
        preprocess(bomb)


def test_a_crop_at_the_limit_shape_still_loads(tmp_path):
    ok = tmp_path / "ok.png"
    Image.fromarray(np.zeros((256, 128, 3), np.uint8)).save(ok)
    assert load_image(ok).size == (128, 256)
    assert MAX_CROP_PIXELS >= 4096 * 4096


def test_calibration_skips_a_bomb_with_a_note(tmp_path):
    from calibration.images import list_candidates, read_calibration_images

    for i in range(3):
        Image.fromarray(np.full((64, 32, 3), 40 * i, np.uint8)).save(tmp_path / f"c{i}.png")
    _png_bomb(tmp_path / "zz_bomb.png", 20000, 20000)
    notes = []
    # ask for every file: the bomb is tried, skipped with its reason, and the three crops are used with a note
    got = read_calibration_images(list_candidates(tmp_path), 4, (64, 32), (0.5, 0.5, 0.5), (0.2, 0.2, 0.2),
                                  log=notes.append)
    assert len(got.images) == 3
    assert any("zz_bomb.png" in n and "larger than a crop may be" in n for n in notes)
    assert any("4 images asked for" in n for n in notes)
