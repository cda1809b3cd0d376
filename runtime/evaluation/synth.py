"""``runtime synth``: a deterministic synthetic re-identification data set in the Market-1501 layout.

This project cannot download Market-1501, yet calibration, evaluation and the demo need images
whose numbers mean something.  Each identity has its own clothing colours and textures, carried
objects and body proportions; each camera its own illumination, colour cast, blur, background and
preferred viewpoint; each image pose and crop jitter, and a fraction carry an occluder that makes
them outliers (the case NFormer is built for).  The gallery holds junk (``-1``) and distractor
(``0000``) entries as Market-1501 does.  Same seed, same bytes: every image draws from its own
seeded generator.  Pure numpy + Pillow (no torch).
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from numbers import Integral
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from export.contract.errors import InputError
from export.contract.files import work_dir

from export.contract.market1501 import SPLITS

HEIGHT, WIDTH = 128, 64          # Market-1501's crop size
CANVAS = (88, 168)               # (w, h): room for crop jitter around the person
CAMERAS = 6
#: identities of a data set: two for training and two for testing at least; Market-1501's person
#: ids 0001-1501 at most (file names carry four digits)
MIN_IDENTITIES, MAX_IDENTITIES = 4, 1501
VIEWS = ("front", "back", "side")
JPEG_QUALITY = 90
SKIN = [(241, 194, 167), (224, 172, 130), (198, 134, 94), (141, 85, 54), (92, 57, 35)]
HAIR = [(20, 16, 14), (60, 40, 25), (110, 80, 50), (200, 170, 110), (120, 120, 120), (160, 50, 30)]


def _colour(rng) -> tuple[int, int, int]:
    """A clothing colour: saturated or neutral, like real wardrobes."""
    if rng.random() < 0.3:
        v = int(rng.integers(20, 235))
        return (v, v, v)
    hue = rng.random()
    sat = rng.uniform(0.35, 1.0)
    val = rng.uniform(0.3, 1.0)
    i = int(hue * 6) % 6
    f = hue * 6 - int(hue * 6)
    p, q, t = val * (1 - sat), val * (1 - f * sat), val * (1 - (1 - f) * sat)
    r, g, b = [(val, t, p), (q, val, p), (p, val, t), (p, q, val), (t, p, val), (val, p, q)][i]
    return (int(r * 255), int(g * 255), int(b * 255))


@dataclass(frozen=True)
class Identity:
    skin: tuple
    hair: tuple
    hair_long: bool
    top: tuple
    top_pattern: str
    top_pattern_colour: tuple
    bottom: tuple
    bottom_kind: str
    shoes: tuple
    height: float
    shoulders: float
    legs: float
    carried: str
    carried_colour: tuple

    @classmethod
    def draw(cls, seed: int, pid: int) -> "Identity":
        rng = np.random.default_rng([seed, 1, pid])
        return cls(
            skin=SKIN[rng.integers(len(SKIN))], hair=HAIR[rng.integers(len(HAIR))], hair_long=bool(rng.random() < 0.35),
            top=_colour(rng), top_pattern=str(rng.choice(["solid", "solid", "hstripes", "vstripes", "checker", "dots"])),
            top_pattern_colour=_colour(rng), bottom=_colour(rng),
            bottom_kind=str(rng.choice(["trousers", "trousers", "shorts", "skirt"])), shoes=_colour(rng),
            height=float(rng.uniform(0.82, 1.0)), shoulders=float(rng.uniform(0.3, 0.46)),
            legs=float(rng.uniform(0.44, 0.54)),
            carried=str(rng.choice(["none", "none", "backpack", "handbag", "hat", "backpack"])),
            carried_colour=_colour(rng))


@dataclass(frozen=True)
class Camera:
    gain: float
    cast: tuple
    blur: float
    background: tuple
    texture: str
    view_weights: tuple
    noise: float

    @classmethod
    def draw(cls, seed: int, cam: int) -> "Camera":
        rng = np.random.default_rng([seed, 2, cam])
        weights = rng.dirichlet([1.5, 1.5, 1.5])
        return cls(gain=float(rng.uniform(0.65, 1.3)), cast=tuple(float(v) for v in rng.uniform(0.82, 1.18, 3)),
                   blur=float(rng.uniform(0.0, 1.3)), background=_colour(rng),
                   texture=str(rng.choice(["plain", "pavement", "wall", "grass"])),
                   view_weights=tuple(float(w) for w in weights), noise=float(rng.uniform(2, 9)))


def _background(draw: ImageDraw.ImageDraw, cam: Camera, rng) -> None:
    w, h = CANVAS
    base = np.array(cam.background)
    draw.rectangle([0, 0, w, h], fill=tuple(int(v) for v in base))
    if cam.texture == "pavement":
        for y in range(h // 2, h, 12):
            draw.line([0, y, w, y], fill=tuple(int(v) for v in base * 0.8), width=1)
    elif cam.texture == "wall":
        for y in range(0, h, 10):
            for x in range((y // 10 % 2) * 10, w, 20):
                draw.rectangle([x, y, x + 18, y + 8], outline=tuple(int(v) for v in base * 0.75))
    elif cam.texture == "grass":
        for _ in range(60):
            x, y = rng.integers(0, w), rng.integers(h // 2, h)
            draw.line([x, y, x + rng.integers(-2, 3), y - 4], fill=tuple(int(v) for v in base * 0.7))
    draw.rectangle([0, int(h * 0.78), w, h], fill=tuple(int(v) for v in base * 0.85))  # ground


def _torso_pattern(draw, box, ident: Identity) -> None:
    x0, y0, x1, y1 = box
    c = ident.top_pattern_colour
    if ident.top_pattern == "hstripes":
        for y in range(int(y0) + 2, int(y1), 6):
            draw.rectangle([x0, y, x1, y + 2], fill=c)
    elif ident.top_pattern == "vstripes":
        for x in range(int(x0) + 2, int(x1), 6):
            draw.rectangle([x, y0, x + 2, y1], fill=c)
    elif ident.top_pattern == "checker":
        for y in range(int(y0), int(y1), 6):
            for x in range(int(x0) + (int(y - y0) // 6 % 2) * 6, int(x1), 12):
                draw.rectangle([x, y, min(x + 5, x1), min(y + 5, y1)], fill=c)
    elif ident.top_pattern == "dots":
        for y in range(int(y0) + 3, int(y1), 7):
            for x in range(int(x0) + 3, int(x1), 7):
                draw.ellipse([x - 1, y - 1, x + 1, y + 1], fill=c)


def render_person(ident: Identity, cam: Camera, rng, occluded: bool) -> Image.Image:
    """One crop of ``ident`` seen by ``cam``: a walking figure with pose, viewpoint and crop jitter."""
    w, h = CANVAS
    img = Image.new("RGB", CANVAS)
    draw = ImageDraw.Draw(img)
    _background(draw, cam, rng)
    view = VIEWS[rng.choice(3, p=cam.view_weights)]
    scale = ident.height * rng.uniform(0.92, 1.06)
    cx = w / 2 + rng.normal(0, 2.5)
    top_y = 20 + (1 - scale) * 100 + rng.normal(0, 2)
    body_h = 130 * scale
    head_r = body_h * 0.075
    shoulder = w * ident.shoulders * (0.65 if view == "side" else 1.0)
    neck_y = top_y + 2 * head_r
    hip_y = neck_y + body_h * (1 - ident.legs - 0.15)
    foot_y = top_y + body_h
    phase = rng.uniform(-1, 1)  # walking phase: leg and arm swing
    # legs
    leg_w = shoulder * 0.28
    for side in (-1, 1):
        hip_x = cx + side * shoulder * 0.22
        foot_x = hip_x + side * phase * body_h * 0.08 * (2.0 if view == "side" else 0.6)
        knee_y = (hip_y + foot_y) / 2
        colour = ident.bottom if ident.bottom_kind == "trousers" else ident.skin
        draw.line([hip_x, hip_y, foot_x, foot_y - 3], fill=colour, width=int(leg_w))
        if ident.bottom_kind == "shorts":
            draw.line([hip_x, hip_y, (hip_x + foot_x) / 2, knee_y - 4], fill=ident.bottom, width=int(leg_w + 1))
        draw.ellipse([foot_x - leg_w * 0.8, foot_y - 5, foot_x + leg_w * 0.9, foot_y + 1], fill=ident.shoes)
    if ident.bottom_kind == "skirt":
        draw.polygon([(cx - shoulder * 0.4, hip_y - 4), (cx + shoulder * 0.4, hip_y - 4),
                      (cx + shoulder * 0.6, hip_y + body_h * 0.18), (cx - shoulder * 0.6, hip_y + body_h * 0.18)],
                     fill=ident.bottom)
    # backpack behind the body in front view
    if ident.carried == "backpack" and view == "front":
        draw.line([cx - shoulder * 0.3, neck_y + 2, cx - shoulder * 0.3, hip_y - 6], fill=ident.carried_colour, width=2)
        draw.line([cx + shoulder * 0.3, neck_y + 2, cx + shoulder * 0.3, hip_y - 6], fill=ident.carried_colour, width=2)
    # torso
    torso = [cx - shoulder / 2, neck_y, cx + shoulder / 2, hip_y]
    draw.rounded_rectangle(torso, radius=4, fill=ident.top)
    _torso_pattern(draw, torso, ident)
    if ident.carried == "backpack" and view in ("back", "side"):
        off = 0 if view == "back" else shoulder * 0.45
        draw.rounded_rectangle([cx - shoulder * 0.35 + off, neck_y + 4, cx + shoulder * 0.35 + off,
                                neck_y + (hip_y - neck_y) * 0.8], radius=3, fill=ident.carried_colour)
    # arms
    for side in (-1, 1):
        sx = cx + side * shoulder / 2
        hand_x = sx + side * 2 - side * phase * body_h * 0.05
        hand_y = hip_y + body_h * 0.02
        draw.line([sx, neck_y + 3, hand_x, hand_y], fill=ident.top, width=int(leg_w * 0.8))
        draw.ellipse([hand_x - 2, hand_y - 2, hand_x + 2, hand_y + 2], fill=ident.skin)
    if ident.carried == "handbag":
        bx = cx + shoulder / 2 + 3
        draw.rectangle([bx, hip_y - 4, bx + shoulder * 0.35, hip_y + body_h * 0.1], fill=ident.carried_colour)
    # head
    draw.ellipse([cx - head_r, top_y, cx + head_r, top_y + 2 * head_r], fill=ident.skin)
    hair_box = [cx - head_r, top_y - 1, cx + head_r, top_y + (2.3 if view == "back" else 0.9) * head_r]
    draw.ellipse(hair_box, fill=ident.hair)
    if ident.hair_long:
        draw.rectangle([cx - head_r, top_y + head_r, cx + head_r, top_y + 3.2 * head_r] if view == "back" else
                       [cx - head_r - 1, top_y + head_r * 0.5, cx - head_r * 0.5, top_y + 3 * head_r], fill=ident.hair)
    if ident.carried == "hat":
        draw.rectangle([cx - head_r * 1.3, top_y - 2, cx + head_r * 1.3, top_y + 2], fill=ident.carried_colour)
        draw.rectangle([cx - head_r * 0.8, top_y - head_r * 0.9, cx + head_r * 0.8, top_y], fill=ident.carried_colour)
    if occluded:  # a car, a pole, another pedestrian: an outlier crop
        kind = rng.integers(3)
        colour = _colour(rng)
        if kind == 0:
            y = rng.uniform(0.45, 0.7) * h
            draw.rounded_rectangle([-5, y, w + 5, h + 5], radius=8, fill=colour)
        elif kind == 1:
            x = rng.uniform(0.2, 0.6) * w
            draw.rectangle([x, 0, x + rng.uniform(0.25, 0.45) * w, h], fill=colour)
        else:
            x = cx + rng.choice([-1, 1]) * rng.uniform(0.1, 0.3) * w
            draw.ellipse([x - 16, top_y + 10, x + 16, h + 20], fill=colour)
    # camera: crop jitter, optics, sensor
    jx, jy = rng.normal(0, 3, 2)
    left = (w - WIDTH * 1.15) / 2 + jx
    top = (h - HEIGHT * 1.15) / 2 + jy
    img = img.crop((int(left), int(top), int(left + WIDTH * 1.15), int(top + HEIGHT * 1.15)))
    img = img.resize((WIDTH, HEIGHT), Image.BILINEAR)
    if cam.blur > 0.15:
        img = img.filter(ImageFilter.GaussianBlur(cam.blur * rng.uniform(0.7, 1.3)))
    arr = np.asarray(img, np.float32) * cam.gain * np.asarray(cam.cast, np.float32) * rng.uniform(0.9, 1.1)
    arr += rng.normal(0, cam.noise, arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _name(pid: int, cam: int, seq: int, frame: int, box: int) -> str:
    pid_text = "-1" if pid < 0 else f"{pid:04d}"
    return f"{pid_text}_c{cam + 1}s{seq}_{frame:06d}_{box:02d}.jpg"


def check_identities(identities: int) -> None:
    if isinstance(identities, bool) or not isinstance(identities, Integral) or not (
            MIN_IDENTITIES <= identities <= MAX_IDENTITIES):
        raise InputError(f"--identities must be {MIN_IDENTITIES}..{MAX_IDENTITIES} (2 for training, 2 for testing at "
                         f"least; Market-1501's person ids 0001-{MAX_IDENTITIES} at most), got {identities}")


def plan(identities: int, seed: int) -> dict[str, list[tuple[int, int, int, bool]]]:
    """What to draw: per split, (pid, camera, image number, occluded) tuples; deterministic."""
    check_identities(identities)
    rng = np.random.default_rng([seed, 0])
    pids = np.sort(rng.choice(np.arange(1, MAX_IDENTITIES + 1), size=identities, replace=False))
    train_ids, test_ids = pids[: identities // 2], pids[identities // 2:]
    out = {"train": [], "query": [], "gallery": []}
    for pid in train_ids:
        cams = rng.choice(CAMERAS, size=int(rng.integers(2, 5)), replace=False)
        for cam in cams:
            for n in range(int(rng.integers(2, 5))):
                out["train"].append((int(pid), int(cam), n, bool(rng.random() < 0.12)))
    for pid in test_ids:
        cams = rng.choice(CAMERAS, size=int(rng.integers(2, 5)), replace=False)
        for j, cam in enumerate(cams):
            if j < 2:
                out["query"].append((int(pid), int(cam), 0, False))
            for n in range(1, int(rng.integers(2, 5))):
                out["gallery"].append((int(pid), int(cam), n, bool(rng.random() < 0.15)))
    for n in range(max(10, identities // 2)):  # distractors: people never queried
        out["gallery"].append((0, int(rng.integers(CAMERAS)), n, bool(rng.random() < 0.3)))
    for n in range(max(5, identities // 6)):  # junk: ignored by the protocol
        out["gallery"].append((-1, int(rng.integers(CAMERAS)), n, True))
    return out


def generate(out_dir: str | Path, identities: int = 300, seed: int = 0, progress=None) -> dict:
    """Write the data set into ``out_dir`` (created; must not already hold one).  Returns counts."""
    out_dir = Path(out_dir)
    check_identities(identities)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{out_dir} is a file; synth writes a directory (bounding_box_train/, query/, "
                         "bounding_box_test/): choose a new or empty directory")
    if any((out_dir / d).exists() for d in SPLITS.values()):
        raise InputError(f"{out_dir} already holds a data set; choose a new or empty directory")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        raise InputError(f"{out_dir} is not empty; synth writes a new data set (bounding_box_train/, query/, "
                         "bounding_box_test/): choose a new or empty directory")
    created = not out_dir.exists()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(f"cannot create {out_dir}: {err.strerror or err}; choose a writable directory") from None
    try:
        return _generate(out_dir, identities, seed, progress)
    except BaseException:
        if created:                  # interrupted (Ctrl-C, SIGTERM) or failed: no empty folder left behind
            with contextlib.suppress(OSError):
                out_dir.rmdir()
        raise


def _generate(out_dir: Path, identities: int, seed: int, progress) -> dict:
    cams = [Camera.draw(seed, c) for c in range(CAMERAS)]
    counts = {}
    with work_dir(out_dir, ".synth-") as work:
        for split, entries in plan(identities, seed).items():
            folder = work / SPLITS[split]
            folder.mkdir()
            for pid, cam, n, occluded in entries:
                rng = np.random.default_rng([seed, 3, pid + 2, cam, n, ("train", "query", "gallery").index(split)])
                if pid > 0:
                    ident = Identity.draw(seed, pid)
                else:  # distractors and junk: strangers, each image its own person
                    ident = Identity.draw(seed, 100000 + cam * 1000 + n + (0 if pid == 0 else 50000))
                img = render_person(ident, cams[cam], rng, occluded)
                if pid < 0:  # junk: a sliver of a box
                    img = img.crop((0, 0, WIDTH, HEIGHT // 3)).resize((WIDTH, HEIGHT))
                frame = 1000 * n + 25 * cam + (pid % 25 if pid > 0 else 7)
                img.save(folder / _name(pid, cam, 1 + (n % 6), frame, 1 + n % 8), quality=JPEG_QUALITY)
                if progress:
                    progress(1)
            counts[split] = len(entries)
        for d in SPLITS.values():
            os.replace(work / d, out_dir / d)
    return counts


def total_images(identities: int, seed: int) -> int:
    return sum(len(v) for v in plan(identities, seed).values())
