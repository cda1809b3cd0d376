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


def test_16_bit_greyscale_is_scaled_and_32_bit_images_are_refused(tmp_path):
    """A 16-bit PNG (thermal cameras) was clipped by PIL's convert: 30000 of 65535 (46% grey) became
    white.  16-bit samples are scaled to 8 bits (v / 257); 32-bit integer and float TIFFs, which have
    no defined range, are refused with the file named."""
    import io

    import numpy as np
    from PIL import Image

    from export.contract.errors import InputError
    from export.contract.preprocess import decode_image, load_image

    grey = np.array([[0, 257, 30000, 65535]], np.uint16).repeat(4, axis=0)
    buf = io.BytesIO()
    Image.fromarray(grey).save(buf, format="PNG")
    img = decode_image(buf.getvalue())
    assert img.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(img)[0, :, 0], [0, 1, 117, 255])
    assert (np.asarray(img)[..., 0] == np.asarray(img)[..., 2]).all()
    pgm = tmp_path / "g16.pgm"                                  # P5 with maxval 65535: Pillow's mode I
    pgm.write_bytes(b"P5 4 4 65535\n" + grey.astype(">u2").tobytes())
    assert Image.open(pgm).mode == "I"
    np.testing.assert_array_equal(np.asarray(load_image(pgm))[0, :, 0], [0, 1, 117, 255])
    tiff = tmp_path / "g16.tif"
    Image.fromarray(grey).save(tiff)
    np.testing.assert_array_equal(np.asarray(load_image(tiff))[0, :, 1], [0, 1, 117, 255])
    # 8-bit images convert exactly as before
    rgb = np.random.default_rng(0).integers(0, 256, (5, 6, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    np.testing.assert_array_equal(np.asarray(load_image(tmp_path / "rgb.png")), rgb)
    for name, arr in (("f.tif", np.full((4, 4), 0.5, np.float32)), ("i.tif", np.full((4, 4), 70000, np.int32))):
        Image.fromarray(arr).save(tmp_path / name)
        with pytest.raises(InputError, match=f"{name}.*no defined 0..255 range"):
            load_image(tmp_path / name)


def test_a_pil_image_is_read_as_its_file_is(tmp_path):
    """A PIL image handed over directly (Image.open(path), or made in memory) went through PIL's
    convert: a 16-bit greyscale crop was clipped to white (another embedding than the same file
    given by path) and float or 32-bit integer images were accepted with no defined range."""
    from export.contract.preprocess import as_image

    grey = np.array([[0, 257, 30000, 65535]], np.uint16).repeat(4, axis=0)
    Image.fromarray(grey).save(tmp_path / "g16.png")
    by_path = np.asarray(load_image(tmp_path / "g16.png"))
    with Image.open(tmp_path / "g16.png") as opened:
        assert opened.mode.startswith("I;16")
        np.testing.assert_array_equal(np.asarray(as_image(opened)), by_path)
    np.testing.assert_array_equal(np.asarray(as_image(Image.fromarray(grey))), by_path)
    np.testing.assert_array_equal(preprocess(Image.open(tmp_path / "g16.png")), preprocess(tmp_path / "g16.png"))
    for img in (Image.fromarray(np.full((4, 4), 0.5, np.float32)), Image.fromarray(np.full((4, 4), 70000, np.int32))):
        with pytest.raises(InputError, match="no defined 0..255 range"):
            preprocess(img)
    # a 16-bit PGM opens as mode I (scaled); cropped, it loses its format: refused with the way out
    Image.fromarray(grey).save(tmp_path / "g16.pgm")
    with Image.open(tmp_path / "g16.pgm") as opened:
        assert opened.mode == "I"
        np.testing.assert_array_equal(np.asarray(as_image(opened)), by_path)
        cropped = opened.crop((0, 0, 4, 4))
    with pytest.raises(InputError, match=r"img.convert\('I;16'\)"):
        as_image(cropped)
    np.testing.assert_array_equal(np.asarray(as_image(cropped.convert("I;16"))), by_path)
    # 8-bit modes convert as before (the original's reader)
    rgb = np.random.default_rng(0).integers(0, 256, (5, 6, 3), dtype=np.uint8)
    for mode in ("RGB", "L", "P", "LA", "RGBA", "CMYK", "1"):
        img = Image.fromarray(rgb).convert(mode)
        np.testing.assert_array_equal(np.asarray(as_image(img)), np.asarray(img.convert("RGB")))


def test_every_kind_of_path_is_read_as_a_path(tmp_path):
    """os.DirEntry (os.scandir), PurePath and other os.PathLike crops were taken for arrays:
    "a crop array must be uint8 RGB, found dtype object"."""
    import os
    from pathlib import PurePosixPath

    rgb = np.random.default_rng(0).integers(0, 256, (6, 4, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "c.png")
    want = preprocess(str(tmp_path / "c.png"))

    class Named:
        def __fspath__(self):
            return os.fsencode(str(tmp_path / "c.png"))

    entry = next(os.scandir(tmp_path))
    for crop in (entry, PurePosixPath(tmp_path / "c.png"), Named()):
        np.testing.assert_array_equal(preprocess(crop), want)
    with pytest.raises(InputError, match="crop not found"):
        preprocess(PurePosixPath(tmp_path / "missing.png"))
