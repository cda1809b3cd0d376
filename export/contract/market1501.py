"""Reading re-identification data in the Market-1501 layout: the one reader everything uses.

Market-1501 (and the synthetic sets of ``runtime synth``) hold ``bounding_box_train/``,
``bounding_box_test/`` (the gallery) and ``query/``, with file names ``PPPP_cCsS_FFFFFF_NN.jpg``:
person id, camera, sequence, frame, box.  As in the original's data loader, junk images
(person id ``-1``) are skipped and distractors (person id ``0000``) stay in the gallery as
negatives; camera ids become 0-based.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from export.contract.errors import InputError
from export.contract.preprocess import IMAGE_SUFFIXES

NAME_PATTERN = re.compile(r"^(-1|\d+)_c(\d+)")   # -1: junk; "12-3_c1..." is no Market name
SPLITS = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}
JUNK_PID = -1
DISTRACTOR_PID = 0


@dataclass(frozen=True)
class Item:
    path: Path
    pid: int
    camid: int


@dataclass
class ReidDataset:
    root: Path
    train: list[Item] = field(default_factory=list)
    query: list[Item] = field(default_factory=list)
    gallery: list[Item] = field(default_factory=list)
    #: per split, image files left out because their names are not Market-1501 names
    unnamed: dict = field(default_factory=dict)

    def summary(self) -> dict:
        return {name: {"images": len(items), "identities": len({i.pid for i in items}),
                       "cameras": len({i.camid for i in items}), "unnamed_skipped": self.unnamed.get(name, 0)}
                for name, items in (("train", self.train), ("query", self.query), ("gallery", self.gallery))}

    def notes(self) -> list[str]:
        """One line per split whose folder held image files that are not Market-1501 names."""
        return [f"{SPLITS[name]}: {count} image file(s) skipped, their names are not PPPP_cC... Market-1501 names"
                for name, count in self.unnamed.items() if count]


def parse_name(name: str) -> tuple[int, int] | None:
    """``(pid, camid)`` (camid 0-based) of a Market-1501 file name, or None if it is not one."""
    m = NAME_PATTERN.match(name)
    if not m or len(m.group(1)) > 9 or len(m.group(2)) > 9:     # ids past 10^9 are no Market names (nor int64-safe)
        return None
    return int(m.group(1)), int(m.group(2)) - 1


def read_split(folder: Path, keep_junk: bool = False, unnamed: list | None = None) -> list[Item]:
    """The items of one split folder: image files (``IMAGE_SUFFIXES``, any case, as ``runtime embed``
    reads folders) with Market-1501 names, sorted by name; image files with other names are left
    out (appended to ``unnamed`` when given)."""
    items = []
    for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
        parsed = parse_name(path.name)
        if parsed is None:
            if unnamed is not None:
                unnamed.append(path)
            continue
        pid, camid = parsed
        if pid == JUNK_PID and not keep_junk:
            continue
        items.append(Item(path, pid, camid))
    return items


def read_market1501(root: str | Path, splits=("train", "query", "gallery")) -> ReidDataset:
    """Read a Market-1501-layout directory (the real data set or a synthetic one)."""
    root = Path(root)
    if (root / "Market-1501-v15.09.15").is_dir():
        root = root / "Market-1501-v15.09.15"
    missing = [SPLITS[s] for s in splits if not (root / SPLITS[s]).is_dir()]
    if missing:
        raise InputError(f"{root} is not a Market-1501-layout directory: missing {', '.join(missing)} "
                         f"(expected {', '.join(SPLITS[s] for s in splits)}; make one with `runtime synth DIR`)")
    data = ReidDataset(root)
    for split in splits:
        unnamed: list = []
        items = read_split(root / SPLITS[split], unnamed=unnamed)
        data.unnamed[split] = len(unnamed)
        if not items:
            raise InputError(f"no images named like PPPP_cC..._NN.jpg ({', '.join(IMAGE_SUFFIXES)}, any case) in "
                             f"{root / SPLITS[split]}")
        setattr(data, split, items)
    return data
