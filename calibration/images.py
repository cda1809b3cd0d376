"""Calibration crops: which images, read exactly as the runtime reads them.

Place in the flow: ``calibration/`` reads crops here and hands them to ONNX Runtime's calibrators
(``calibration.quantize``).  Images go through ``export.contract.preprocess`` (the one preprocessing) and
a Market-1501-layout directory through ``export.contract.market1501`` (the one reader), so the activation
ranges are measured on exactly what the deployed encoder will see.

Two layouts are accepted:

* a Market-1501-layout directory (``bounding_box_train/`` present): its **training** split is used,
  so the query/gallery split stays unseen by calibration and can judge the result;
* any other directory: every file below it (recursively, sorted by path).

Files that are not images (by suffix) and images that do not decode are reported and skipped.
A directory with no readable image is an :class:`InputError`; one with fewer readable images than
asked for is calibrated on all of them, with a note saying how many.  Selection is deterministic:
a seeded permutation of the candidates, decoded in that order until ``count`` images are read; the
next readable ones in that order (when the folder has them) are the accuracy check's crops, which
the ranges never saw (``read_held_out``).

Imports no torch.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from export.contract.errors import InputError
from export.contract.market1501 import SPLITS, read_market1501
from export.contract.preprocess import IMAGE_SUFFIXES, load_image, preprocess

LAYOUT_MARKET = "market1501-train"
LAYOUT_FOLDER = "folder"
#: skipped files listed by name in a message; the rest are counted
SHOWN_SKIPS = 5


@dataclass(frozen=True)
class Skipped:
    path: Path
    reason: str

    def to_json(self, root: Path) -> dict:
        return {"path": _relative(self.path, root), "reason": self.reason}


@dataclass
class Candidates:
    """The files a calibration could read, found by listing only (nothing decoded yet)."""
    root: Path
    layout: str
    files: list[Path]
    skipped: list[Skipped] = field(default_factory=list)

    def digest(self) -> str:
        """sha256 over (relative path, size, mtime) of every candidate: the cache key's image list.

        A changed, added or removed file changes it; computing it reads no image."""
        h = hashlib.sha256(self.layout.encode())
        for path in self.files:
            st = path.stat()
            # os.fsencode: a name that is not UTF-8 (surrogate escapes) is hashed as its bytes
            h.update(b"\0" + os.fsencode(_relative(path, self.root)) + f"\0{st.st_size}\0{st.st_mtime_ns}".encode())
        return h.hexdigest()


@dataclass
class CalibrationImages:
    """Preprocessed crops float32 [count, 3, H, W] and where they came from."""
    root: Path
    layout: str
    files: list[Path]
    images: np.ndarray
    skipped: list[Skipped]

    def summary(self) -> dict:
        return {"source": str(self.root), "layout": self.layout, "images": len(self.files),
                "skipped": [s.to_json(self.root) for s in self.skipped]}


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def describe_skipped(skipped: list[Skipped], root: Path) -> str:
    shown = "; ".join(f"{_relative(s.path, root)} ({s.reason})" for s in skipped[:SHOWN_SKIPS])
    more = f"; and {len(skipped) - SHOWN_SKIPS} more" if len(skipped) > SHOWN_SKIPS else ""
    return f"skipped {len(skipped)} file(s): {shown}{more}"


def check_calib_dir(data_dir: str | Path) -> Path:
    """``data_dir`` as a Path, or the one error that it is no directory (checked before any file is written)."""
    root = Path(data_dir)
    if not root.is_dir():
        raise InputError(f"calibration data not found: {root} is not a directory; pass --calib-data with a "
                         "Market-1501-layout directory or a folder of person crops")
    return root


def list_candidates(data_dir: str | Path) -> Candidates:
    """The calibration candidates under ``data_dir`` (see the module docstring for the layouts)."""
    root = check_calib_dir(data_dir)
    market = root / "Market-1501-v15.09.15" if (root / "Market-1501-v15.09.15").is_dir() else root
    if (market / SPLITS["train"]).is_dir():
        try:
            items = read_market1501(market, splits=("train",)).train
        except InputError as err:
            raise InputError(f"no calibration images: {err}") from None
        return Candidates(market, LAYOUT_MARKET, [item.path for item in items])
    files, skipped = [], []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        if path.suffix.lower() in IMAGE_SUFFIXES:
            files.append(path)
        else:
            skipped.append(Skipped(path, f"not an image file (suffix {path.suffix or 'none'!r})"))
    if not files:
        found = f"; found only {len(skipped)} other file(s)" if skipped else " (the folder is empty)"
        raise InputError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {root}{found}: calibration needs person "
                         "crops; point --calib-data at a folder of crops or a Market-1501-layout directory")
    return Candidates(root, LAYOUT_FOLDER, files, skipped)


#: fewer calibration crops than this get a note: ranges (and the accuracy check) rest on too little
FEW_IMAGES = 32


def seeded_order(candidates: Candidates, seed: int = 0) -> np.ndarray:
    """The order in which candidates are tried (indices into ``candidates.files``): the calibration
    selection is its first readable ``count``, the accuracy check's crops the readable ones after."""
    return np.random.default_rng(seed).permutation(len(candidates.files))


def read_calibration_images(candidates: Candidates, count: int, size_hw, mean, std, seed: int = 0,
                            log: Callable[[str], None] = print) -> CalibrationImages:
    """Decode and preprocess ``count`` candidates (seeded order), skipping and reporting bad files."""
    if count < 1:
        raise InputError(f"the number of calibration images must be >= 1, got {count}")
    order = seeded_order(candidates, seed)
    images = np.empty((min(count, len(candidates.files)), 3, *size_hw), np.float32)
    used: list[Path] = []
    skipped = list(candidates.skipped)
    for i in order:
        if len(used) == count:
            break
        path = candidates.files[i]
        try:
            img = load_image(path)
        except InputError as err:
            skipped.append(Skipped(path, _skip_reason(err, path)))
            continue
        images[len(used)] = preprocess(img, size_hw, mean, std)
        used.append(path)
    if skipped:
        log(f"calibration: {describe_skipped(skipped, candidates.root)}")
    if not used:
        raise InputError(f"{candidates.root} holds no readable calibration image "
                         f"({describe_skipped(skipped, candidates.root)}); add JPEG/PNG person crops")
    if len(used) < count:
        log(f"calibration: note: {count} images asked for (--calib-images) but {candidates.root} holds "
            f"{len(used)} readable one(s): calibrating on all {len(used)}")
        images = images[:len(used)]
    if len(used) < FEW_IMAGES:
        log(f"calibration: caution: {len(used)} calibration crop(s) only; INT8 ranges from so few may not fit the crops "
            f"you serve (use {FEW_IMAGES} or more, and run `runtime parity`)")
    return CalibrationImages(candidates.root, candidates.layout, used, images, skipped)


def is_seeded_selection(candidates: Candidates, images: list, skipped: list, count: int, seed: int = 0) -> bool:
    """Whether ``images`` (relative names, as a calibration cache lists them) are what
    :func:`read_calibration_images` selects from these candidates: the first ``count`` of the seeded
    order, passing over the names in ``skipped`` (files that did not decode).  Names only, nothing is
    read.  A cache entry whose list is not the selection is not trusted: the accuracy check's
    held-out crops are the ones after the selection, and an edited list would move them."""
    order = seeded_order(candidates, seed)
    passed = set(skipped)
    want = []
    for i in order:
        if len(want) == count:
            break
        name = _relative(candidates.files[i], candidates.root)
        if name not in passed:
            want.append(name)
    return list(images) == want


def read_held_out(candidates: Candidates, calibrated: set[str], size_hw, mean, std, count: int,
                  seed: int = 0) -> tuple[list[Path], np.ndarray]:
    """The accuracy check's crops: the first ``count`` readable candidates of the seeded order (the
    calibration's order) whose relative names are not in ``calibrated`` -- crops the ranges never
    saw; fewer (or none) when the folder has no others.  Chosen here, never by a cache entry (an
    untrusted file), so an edited entry cannot pick the crops its ranges are judged on."""
    order = seeded_order(candidates, seed)
    files: list[Path] = []
    images = np.empty((count, 3, *size_hw), np.float32)
    for i in order:
        if len(files) == count:
            break
        path = candidates.files[i]
        if _relative(path, candidates.root) in calibrated:
            continue
        try:
            images[len(files)] = preprocess(load_image(path), size_hw, mean, std)
        except InputError:
            continue
        files.append(path)
    return files, images[:len(files)]


def _skip_reason(err: InputError, path: Path) -> str:
    """Why ``load_image`` refused ``path``, without the path and the advice (the skip list names the file)."""
    text = str(err)
    for advice in ("; remove it", "; crop the person"):
        text = text.split(advice)[0]
    where = str(path)
    text = text[len(where):].strip() if text.startswith(where) else text
    return f"cannot decode: {text}"


def read_check_crops(candidates: Candidates, names: list[str], size_hw, mean, std, count: int) -> np.ndarray | None:
    """The first ``count`` of ``names`` (paths relative to the candidates' root, as a calibration cache
    lists them) decoded and preprocessed, or None when one is not a current candidate or cannot be
    decoded (the cache then no longer describes the folder).  Only these files are read."""
    by_name = {_relative(p, candidates.root): p for p in candidates.files}
    chosen = [by_name.get(n) if isinstance(n, str) else None for n in names[:count]]
    if not chosen or any(p is None for p in chosen):
        return None
    images = np.empty((len(chosen), 3, *size_hw), np.float32)
    for i, path in enumerate(chosen):
        try:
            images[i] = preprocess(load_image(path), size_hw, mean, std)
        except InputError:
            return None
    return images


class ImageBatches:
    """ONNX Runtime's ``CalibrationDataReader`` protocol over preprocessed crops.

    ``__len__`` counts batches and ``set_range`` selects batches, so that ``quantize_static``'s
    strided collection (``CalibStridedMinMax``, which every calibrator honours) can hand the
    calibrator one batch at a time: ONNX Runtime's histogram calibrators otherwise keep every
    intermediate tensor of every batch in memory, and fail on a last batch of another size.
    """

    def __init__(self, images: np.ndarray, input_name: str = "images", batch_size: int = 16):
        self.images = images
        self.input_name = input_name
        self.batch_size = max(1, batch_size)
        self.set_range(0, len(self))

    def __len__(self) -> int:
        return (len(self.images) + self.batch_size - 1) // self.batch_size

    def set_range(self, start_index: int, end_index: int) -> None:
        self._next, self._end = start_index, min(end_index, len(self))

    def get_next(self) -> dict | None:
        if self._next >= self._end:
            return None
        s = self._next * self.batch_size
        self._next += 1
        return {self.input_name: np.ascontiguousarray(self.images[s:s + self.batch_size])}

    def rewind(self) -> None:
        self.set_range(0, len(self))

    def __iter__(self):
        return self

    def __next__(self):
        batch = self.get_next()
        if batch is None:
            raise StopIteration
        return batch
