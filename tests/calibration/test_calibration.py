"""Calibration crops and the calibration cache (CPU): what is read, what is skipped, what is refused."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image

import calibration.cache as calib_cache
import calibration.images as calib_images
from calibration.images import ImageBatches, LAYOUT_FOLDER, LAYOUT_MARKET, list_candidates, read_calibration_images
from calibration.quantize import quantize_encoder
from export.contract.config import PIXEL_MEAN, PIXEL_STD
from export.contract.errors import InputError
from export.contract.preprocess import preprocess

from precision_support import SMALL, fresh_copy, random_small_export, synthetic_data

HW = SMALL.input_size_hw


def _crops(folder, n, seed=0, suffix=".png"):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (70 + i % 5, 30 + i % 7, 3), dtype=np.uint8)).save(folder / f"{i:03d}{suffix}")
    return folder


def _read(candidates, count, log=None):
    return read_calibration_images(candidates, count, HW, PIXEL_MEAN, PIXEL_STD, log=log or (lambda m: None))


def test_folder_with_unreadable_and_non_image_files_reports_and_skips_them(tmp_path):
    folder = _crops(tmp_path / "crops", 6)
    (folder / "README.txt").write_text("not an image")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    (folder / "empty.png").write_bytes(b"")
    _crops(folder / "camera2", 2, seed=1, suffix=".jpg")  # sub-folders are read too
    candidates = list_candidates(folder)
    assert candidates.layout == LAYOUT_FOLDER
    assert [s.path.name for s in candidates.skipped] == ["README.txt"]
    messages = []
    crops = _read(candidates, 8, messages.append)
    assert len(crops.files) == 8 and crops.images.shape == (8, 3, *HW)
    assert {p.name for p in crops.files}.isdisjoint({"broken.jpg", "empty.png", "README.txt"})
    skipped = {s.path.name: s.reason for s in crops.skipped}
    assert set(skipped) == {"README.txt", "broken.jpg", "empty.png"}
    assert "not an image file" in skipped["README.txt"] and skipped["broken.jpg"].startswith("cannot decode")
    assert len(messages) == 2 and "skipped 3 file(s)" in messages[0] and "broken.jpg" in messages[0]
    assert "8 calibration crop(s) only" in messages[1]          # fewer than FEW_IMAGES: said
    # exactly the runtime's preprocessing
    i = crops.files.index(folder / "000.png")
    np.testing.assert_array_equal(crops.images[i], preprocess(folder / "000.png", HW))


def test_empty_folder_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"no images .* \(the folder is empty\)"):
        list_candidates(tmp_path / "empty")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "notes.txt").write_text("x")
    with pytest.raises(InputError, match="found only 1 other file"):
        list_candidates(tmp_path / "docs")
    with pytest.raises(InputError, match="not a directory"):
        list_candidates(tmp_path / "missing")


def test_fewer_readable_images_than_asked_uses_all_of_them_with_a_note(tmp_path):
    folder = _crops(tmp_path / "crops", 3)
    (folder / "bad.jpg").write_bytes(b"junk")
    messages = []
    crops = _read(list_candidates(folder), 4, messages.append)
    assert sorted(p.name for p in crops.files) == ["000.png", "001.png", "002.png"]
    assert crops.images.shape == (3, 3, *HW)
    assert any("note: 4 images asked for" in m and "3 readable" in m for m in messages), messages
    (tmp_path / "only_bad").mkdir()
    (tmp_path / "only_bad" / "x.jpg").write_bytes(b"junk")
    with pytest.raises(InputError, match="no readable calibration image"):
        _read(list_candidates(tmp_path / "only_bad"), 1)


def test_market1501_layout_uses_the_training_split_only(tmp_path_factory):
    data = synthetic_data(tmp_path_factory)
    candidates = list_candidates(data)
    assert candidates.layout == LAYOUT_MARKET
    assert candidates.files and all(p.parent.name == "bounding_box_train" for p in candidates.files)
    a = _read(candidates, 20)
    b = _read(list_candidates(data), 20)
    assert a.files == b.files  # seeded selection: same images every time
    np.testing.assert_array_equal(a.images, b.images)


def test_image_batches_follow_the_calibration_reader_protocol():
    images = np.arange(10 * 3 * 2 * 2, dtype=np.float32).reshape(10, 3, 2, 2)
    reader = ImageBatches(images, batch_size=4)
    assert len(reader) == 3
    sizes = [len(b["images"]) for b in reader]
    assert sizes == [4, 4, 2]
    reader.set_range(1, 2)
    (only,) = list(reader)
    np.testing.assert_array_equal(only["images"], images[4:8])


def test_second_calibration_reads_no_image_and_a_changed_key_recalibrates(tmp_path_factory, tmp_path, monkeypatch):
    _, build = random_small_export(tmp_path_factory)
    model_dir = fresh_copy(build, tmp_path / "build")
    crops = _crops(tmp_path / "crops", 24)
    kw = dict(size_hw=HW, mean=PIXEL_MEAN, std=PIXEL_STD, count=16, cache_dir=model_dir, log=lambda m: None)
    first = quantize_encoder(model_dir / "encoder.onnx", tmp_path / "a.onnx", crops, method="minmax", **kw)
    assert not first["cache_hit"]
    entry = json.loads(Path(first["cache"]).read_text())
    assert entry["key"]["method"] == "minmax" and len(entry["images"]) == 16 and entry["ranges"]

    from calibration.quantize import CHECK_CROPS

    real_load, read = calib_images.load_image, []

    # the check ran on held-out crops: the next ones of the seeded order, none of them calibrated on
    assert first["check"]["held_out"] and len(entry["check_images"]) == CHECK_CROPS
    assert not set(entry["check_images"]) & set(entry["images"])

    def no_reading(path):                  # the cache hit reads the accuracy check's crops, nothing else
        if len(read) >= CHECK_CROPS or path.name != entry["check_images"][len(read)].split("/")[-1]:
            raise AssertionError(f"image {path} read despite the calibration cache")
        read.append(path)
        return real_load(path)
    monkeypatch.setattr(calib_images, "load_image", no_reading)
    second = quantize_encoder(model_dir / "encoder.onnx", tmp_path / "b.onnx", crops, method="minmax", **kw)
    assert second["cache_hit"] and second["cache"] == first["cache"] and len(read) == CHECK_CROPS
    read.clear()
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    # another method, or another image list, is another key: it has to read images
    with pytest.raises(AssertionError, match="read despite"):
        quantize_encoder(model_dir / "encoder.onnx", tmp_path / "c.onnx", crops, method="percentile", **kw)
    read.clear()
    _crops(crops, 25)  # one more file in the folder
    with pytest.raises(AssertionError, match="read despite"):
        quantize_encoder(model_dir / "encoder.onnx", tmp_path / "d.onnx", crops, method="minmax", **kw)


def test_calib_images_beyond_the_folder_calibrates_on_every_crop(tmp_path_factory, tmp_path):
    """--calib-images 512 on a folder of 449 crops: all 449, with a note (here 7 of 9 asked)."""
    _, build = random_small_export(tmp_path_factory)
    crops = _crops(tmp_path / "crops", 7)
    messages = []
    result = quantize_encoder(build / "encoder.onnx", tmp_path / "q.onnx", crops, size_hw=HW, mean=PIXEL_MEAN,
                              std=PIXEL_STD, count=9, method="minmax", cache_dir=tmp_path, log=messages.append)
    assert result["images"] == 7 and (tmp_path / "q.onnx").is_file()
    assert any("note: 9 images asked for" in m and "holds 7" in m for m in messages), messages
    assert len(json.loads(Path(result["cache"]).read_text())["images"]) == 7


def test_calibration_imports_no_torch(tmp_path_factory, tmp_path):
    """Calibrating and converting on a deployment box: ONNX Runtime, numpy, Pillow, no PyTorch."""
    _, build = random_small_export(tmp_path_factory)
    model_dir = fresh_copy(build, tmp_path / "build")
    crops = _crops(tmp_path / "crops", 8)
    code = (f"import sys; from calibration.variants import write_variants; "
            f"write_variants({str(model_dir)!r}, 'int8', calib_data={str(crops)!r}, calib_images=8, log=lambda m: None); "
            f"write_variants({str(model_dir)!r}, 'fp16', log=lambda m: None); "
            "import runtime.tensorrt.build, runtime.evaluation.parity; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "False"


# -- a damaged calibration cache is recomputed; ranges that ruin the embeddings are not published ------------------

def _build_cli(model_dir, crops, *extra):
    from click.testing import CliRunner

    from runtime.cli import main as runtime_cli

    return CliRunner().invoke(runtime_cli, ["build", str(model_dir), "--precision", "int8-cpu", "--engine-tool", "none",
                                            "--calib-data", str(crops), "--calib-images", "8", *extra])


@pytest.fixture(scope="module")
def cached_build(tmp_path_factory):
    """A small model built at int8-cpu from 8 of 16 crops (the other 8: the held-out accuracy check):
    its calibration cache holds one entry."""
    _, build = random_small_export(tmp_path_factory)
    root = tmp_path_factory.mktemp("cached_build")
    model_dir, crops = fresh_copy(build, root / "build"), _crops(root / "crops", 16)
    result = _build_cli(model_dir, crops)
    assert result.exit_code == 0, result.output
    return model_dir, crops


def _damage(entry, case):
    """``entry`` (the cache file's JSON) damaged as in ``case``; what a hand edit or a bad disk leaves."""
    ranges = entry["ranges"]
    data = ranges["data"]
    first = next(iter(data))
    if case == "json_list":
        return []
    if case == "ranges_string":
        entry["ranges"] = "x"
    elif case == "no_calibration_method":
        del ranges["calibration_method"]
    elif case == "tensor_without_lowest":
        del data[first]["lowest"]
    elif case == "nan_lowest":
        data[first]["lowest"] = float("nan")
    elif case == "lowest_above_highest":
        for td in data.values():
            td["lowest"], td["highest"] = td["highest"], td["lowest"]
    elif case == "unknown_tensor":
        data["not_a_tensor"] = data[first]
    elif case == "tensor_range_string":
        data[first]["highest"] = "1e3"
    elif case == "tensor_dropped":   # validates, but the quantiser needs that tensor's range
        # the graph input, which every quantised file quantises first (the order of ``data`` follows
        # ONNX Runtime's sets and changes between runs: its 6th tensor was sometimes one no node needs)
        del data["images"]
    elif case == "edited_ranges_checksum_kept":
        for td in data.values():
            td["highest"] = td["lowest"]
        return entry                 # the checksum (where the cache has one) no longer matches
    digest = getattr(calib_cache, "content_digest", None)
    if digest is not None and "content_sha256" in entry:  # an edit that also rewrites the checksum
        entry["content_sha256"] = digest(entry)
    return entry


def _finite_ordered(td):
    lo, hi = (np.asarray(td[k]["data"] if isinstance(td[k], dict) else td[k], float) for k in ("lowest", "highest"))
    return bool(np.isfinite([lo, hi]).all() and (lo <= hi).all())


@pytest.mark.parametrize("case", ["json_list", "ranges_string", "no_calibration_method", "tensor_without_lowest",
                                  "nan_lowest", "lowest_above_highest", "unknown_tensor", "tensor_range_string",
                                  "tensor_dropped", "edited_ranges_checksum_kept"])
def test_damaged_cache_entry_is_recomputed_with_a_note(case, cached_build, tmp_path):
    """An entry that does not validate is ignored with one note and the ranges are recomputed from
    the crops (the module's promise): no traceback, and the rewritten entry is used next time."""
    model_dir = fresh_copy(cached_build[0], tmp_path / "build")
    (path,) = (model_dir / calib_cache.CACHE_DIR).glob("encoder.cpu.*.json")
    path.write_text(json.dumps(_damage(json.loads(path.read_text()), case)))
    result = _build_cli(model_dir, cached_build[1])
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    notes = [ln for ln in result.output.splitlines() if "calibration: note:" in ln]
    assert len(notes) == 1 and str(path) in notes[0] and "recomputing" in notes[0], result.output
    assert "ranges from 8 crops" in result.output and "ranges from cache" not in result.output
    entry = json.loads(path.read_text())  # saved over the damaged one
    assert all(_finite_ordered(td) for td in entry["ranges"]["data"].values())
    again = _build_cli(model_dir, cached_build[1])
    assert again.exit_code == 0 and "ranges from cache" in again.output and "note" not in again.output, again.output


def test_ranges_that_ruin_the_embeddings_are_not_published(cached_build, tmp_path, monkeypatch):
    """Freshly calibrated ranges are checked on the crops in memory before anything is written: a
    quantised file whose embeddings are far from fp32 is refused (one error line, nothing written or
    cached).  The random test model's embeddings barely depend on its ranges (every crop's is within
    cosine 0.998 of every other's), so the bad file is made by inverting the quantiser's output."""
    import onnxruntime.quantization as ort_quantization

    real = ort_quantization.quantize_static

    def inverted(src, out, *args, **kwargs):
        real(src, out, *args, **kwargs)
        model = onnx.load(out)
        (gemm,) = [n for n in model.graph.node if "embeddings" in n.output]
        gemm.output[list(gemm.output).index("embeddings")] = "embeddings_q"
        model.graph.node.append(onnx.helper.make_node("Neg", ["embeddings_q"], ["embeddings"], name="inverted"))
        onnx.save(model, out)
    monkeypatch.setattr(ort_quantization, "quantize_static", inverted)
    model_dir = fresh_copy(cached_build[0], tmp_path / "build")
    shutil.rmtree(model_dir / calib_cache.CACHE_DIR)
    (model_dir / "encoder.int8-cpu.onnx").unlink()
    manifest = (model_dir / "manifest.json").read_bytes()
    before = sorted(p.name for p in model_dir.iterdir())
    result = _build_cli(model_dir, cached_build[1])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    (line,) = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
    assert "not written" in line and "mean cosine -1.000" in line and "expected >= 0.9" in line, line
    assert "--calib-images" in line and "--precision fp16" in line
    assert sorted(p.name for p in model_dir.iterdir()) == before  # no file, no cache, no temporary left
    assert (model_dir / "manifest.json").read_bytes() == manifest
    # the good build recorded its check: the crops it embedded and their cosines to fp32
    good = json.loads((cached_build[0] / "manifest.json").read_text())["variants"]["encoder.int8-cpu"]["calibration"]
    assert good["check"]["crops"] == 8 and good["check"]["cosine_mean"] >= 0.99, good


def test_cached_ranges_that_fail_the_accuracy_check_are_recomputed(tmp_path_factory, tmp_path, monkeypatch):
    """A cache entry edited on purpose (valid numbers, checksum recomputed) was published without a
    check; cached ranges now take the same accuracy check as fresh ones, and are recomputed if they fail."""
    import calibration.quantize as quantize_module

    _, build = random_small_export(tmp_path_factory)
    model_dir = fresh_copy(build, tmp_path / "build")
    crops = _crops(tmp_path / "crops", 24)
    notes = []
    kw = dict(size_hw=HW, mean=PIXEL_MEAN, std=PIXEL_STD, count=16, cache_dir=model_dir, log=notes.append)
    first = quantize_encoder(model_dir / "encoder.onnx", tmp_path / "a.onnx", crops, method="minmax", **kw)
    real, calls = quantize_module.check_accuracy, []

    def ruined_once(src, quantized, images):          # the cached ranges "ruin" the embeddings
        calls.append(len(images))
        result = real(src, quantized, images)
        return {**result, "cosine_mean": 0.1} if len(calls) == 1 else result
    monkeypatch.setattr(quantize_module, "check_accuracy", ruined_once)
    second = quantize_encoder(model_dir / "encoder.onnx", tmp_path / "b.onnx", crops, method="minmax", **kw)
    assert not second["cache_hit"] and len(calls) == 2 and calls[0] == quantize_module.CHECK_CROPS
    assert any("is not usable (its ranges give embeddings of mean cosine 0.100" in n for n in notes), notes
    assert second["check"]["cosine_mean"] >= quantize_module.MIN_COSINE and first["cache"] == second["cache"]


def test_held_out_crops_follow_the_calibration_order_and_are_never_calibrated_on(tmp_path):
    """The accuracy check's crops are the next readable ones of the same seeded order: a bad file
    among them is skipped, none is a calibration crop, and a folder without spare crops gives none."""
    from calibration.images import read_held_out

    folder = _crops(tmp_path / "crops", 20)
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    cands = list_candidates(folder)
    crops = read_calibration_images(cands, 12, HW, PIXEL_MEAN, PIXEL_STD, seed=3, log=lambda m: None)
    names = {p.name for p in crops.files}
    files, images = read_held_out(cands, names, HW, PIXEL_MEAN, PIXEL_STD, 8, seed=3)
    assert len(crops.files) == 12 and len(files) == 8 and images.shape == (8, 3, *HW)
    assert not names & {p.name for p in files}
    order = [cands.files[i] for i in np.random.default_rng(3).permutation(len(cands.files))]
    readable = [p for p in order if p.name != "broken.png"]
    assert crops.files + files == readable[:20]
    np.testing.assert_array_equal(images[0], preprocess(calib_images.load_image(files[0]), HW, PIXEL_MEAN, PIXEL_STD))
    every = {p.name for p in cands.files}
    none, empty = read_held_out(cands, every, HW, PIXEL_MEAN, PIXEL_STD, 8, seed=3)
    assert none == [] and empty.shape == (0, 3, *HW)


def test_accuracy_check_on_held_out_crops_and_the_note_without_them(tmp_path_factory, tmp_path, monkeypatch):
    """quantize_encoder checks the quantised file on crops it did not calibrate on (recorded in the
    check and the cache); a folder with no spare crop checks calibration crops and says so."""
    import calibration.quantize as quantize_module

    _, build = random_small_export(tmp_path_factory)
    model_dir = fresh_copy(build, tmp_path / "build")
    seen = []
    real = quantize_module.check_accuracy

    def spy(src, quantized, images):
        seen.append(np.array(images))
        return real(src, quantized, images)
    monkeypatch.setattr(quantize_module, "check_accuracy", spy)
    crops = _crops(tmp_path / "crops", 24)
    notes = []
    kw = dict(size_hw=HW, mean=PIXEL_MEAN, std=PIXEL_STD, count=16, cache_dir=model_dir, log=notes.append,
              method="minmax")
    record = quantize_encoder(model_dir / "encoder.onnx", tmp_path / "a.onnx", crops, **kw)
    assert record["check"]["held_out"] is True and record["check"]["crops"] == quantize_module.CHECK_CROPS
    entry = json.loads(Path(record["cache"]).read_text())
    from calibration.images import read_held_out

    files, held = read_held_out(list_candidates(crops), set(entry["images"]), HW, PIXEL_MEAN, PIXEL_STD,
                                quantize_module.CHECK_CROPS)
    assert entry["check_images"] == [p.name for p in files] and not set(files) & set(entry["images"])
    np.testing.assert_array_equal(seen[-1], held)
    assert not any("accuracy check embeds calibration crops" in n for n in notes)
    # a cache entry whose check_images overlap its calibration images is damaged (recomputed)
    bad = dict(entry, check_images=entry["images"][:8])
    bad["content_sha256"] = calib_cache.content_digest({k: v for k, v in bad.items() if k != "content_sha256"})
    Path(record["cache"]).write_text(json.dumps(bad))
    again = quantize_encoder(model_dir / "encoder.onnx", tmp_path / "b.onnx", crops, **kw)
    assert not again["cache_hit"] and any("check_images" in n for n in notes), notes
    # every crop calibrated on: the check embeds calibration crops, with a note
    notes.clear()
    small = _crops(tmp_path / "small", 16)
    record = quantize_encoder(model_dir / "encoder.onnx", tmp_path / "c.onnx", small, **kw)
    assert record["check"]["held_out"] is False
    assert any("accuracy check embeds calibration crops" in n for n in notes), notes
    assert json.loads(Path(record["cache"]).read_text())["check_images"] == []


def test_cached_ranges_are_checked_on_crops_chosen_here_not_by_the_entry(tmp_path_factory, tmp_path, monkeypatch):
    """The cache is untrusted: an entry re-signed to list other images than the seeded selection (so
    that the held-out crops after it would move, or its check would embed crops of the editor's
    choosing) is not used; an entry from before the held-out check (no check_images, no held_out) is
    read, and its check embeds the 8 held-out crops chosen by the seeded order."""
    from calibration.images import read_held_out
    from calibration.quantize import CHECK_CROPS

    _, build = random_small_export(tmp_path_factory)
    model_dir = fresh_copy(build, tmp_path / "build")
    crops = _crops(tmp_path / "crops", 24)
    notes = []
    kw = dict(size_hw=HW, mean=PIXEL_MEAN, std=PIXEL_STD, count=16, cache_dir=model_dir, log=notes.append,
              method="minmax")
    first = quantize_encoder(model_dir / "encoder.onnx", tmp_path / "a.onnx", crops, **kw)
    entry = json.loads(Path(first["cache"]).read_text())
    real_load = calib_images.load_image
    for edit in ("one_image", "other_images", "old_format"):
        if edit == "one_image":
            forged = dict(entry, images=entry["images"][:1], check_images=[])
            forged["check"] = dict(entry["check"], held_out=False, crops=1)
        elif edit == "other_images":             # the held-out crops listed as calibrated, and the other way round
            forged = dict(entry, images=entry["images"][8:] + entry["check_images"], check_images=entry["images"][:8])
        else:
            forged = {k: v for k, v in entry.items() if k != "check_images"}
            forged["check"] = {k: v for k, v in entry["check"].items() if k != "held_out"}
        forged.pop("content_sha256", None)
        Path(first["cache"]).write_text(json.dumps({**forged, "content_sha256": calib_cache.content_digest(forged)}))
        read, notes[:] = [], []
        monkeypatch.setattr(calib_images, "load_image", lambda p: read.append(p.name) or real_load(p))
        again = quantize_encoder(model_dir / "encoder.onnx", tmp_path / f"{edit}.onnx", crops, **kw)
        monkeypatch.setattr(calib_images, "load_image", real_load)
        if edit == "old_format":
            want, _ = read_held_out(list_candidates(crops), set(entry["images"]), HW, PIXEL_MEAN, PIXEL_STD,
                                    CHECK_CROPS)
            assert again["cache_hit"] and again["check"]["held_out"] is True
            assert read == [p.name for p in want] == entry["check_images"], read
        else:
            assert not again["cache_hit"], edit
            assert any("not the seeded selection" in n for n in notes), notes
            assert again["check"]["held_out"] is True and again["check"]["crops"] == CHECK_CROPS
        assert json.loads(Path(first["cache"]).read_text())["images"] == entry["images"]     # as recomputed


def test_odd_file_names_and_the_notes_about_skipped_files(tmp_path_factory, tmp_path):
    """A file name that is not UTF-8 was a UnicodeEncodeError traceback (the cache key's digest); a
    non-image named .jpg was reported with PIL's format list as its reason; with files skipped, the
    note said the clamped count had been asked for instead of --calib-images."""
    import os

    _, build = random_small_export(tmp_path_factory)
    model_dir = fresh_copy(build, tmp_path / "build")
    crops = _crops(tmp_path / "crops", 6)
    os.rename(crops / "005.png", os.path.join(os.fsencode(crops), b"caf\xe9.png"))
    (crops / "x.jpg").write_text("not an image at all")
    result = _build_cli(model_dir, crops)          # --calib-images 8
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    skip = [ln for ln in result.output.splitlines() if "skipped 1 file" in ln]
    assert skip and "x.jpg (cannot decode: is not an image in a format PIL reads" in skip[0], result.output
    assert "8 images asked for (--calib-images) but" in result.output and "holds 6 readable" in result.output
    assert "ranges from 6 crops" in result.output
    entry = json.loads(next((model_dir / calib_cache.CACHE_DIR).glob("encoder.cpu.*.json")).read_text())
    assert "caf\udce9.png" in entry["images"]
    again = _build_cli(model_dir, crops)           # the cache entry names it and is used
    assert again.exit_code == 0 and "ranges from cache" in again.output, again.output


def test_manifest_updates_from_two_processes_keep_each_others_entries(tmp_path_factory, tmp_path):
    """Read-merge-write of manifest.json without a lock lost entries when two builds wrote one model
    directory at once (a review's two processes kept 57 and 98 of 150 entries each)."""
    _, build = random_small_export(tmp_path_factory)
    model_dir = fresh_copy(build, tmp_path / "build")
    code = ("import sys; from calibration.variants import update_manifest_section as u\n"
            "for i in range(60): u(sys.argv[1], 'race_' + sys.argv[2], {str(i): {}})\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(model_dir), tag]) for tag in "ab"]
    for p in procs:
        assert p.wait(timeout=300) == 0
    manifest = json.loads((model_dir / "manifest.json").read_text())
    assert len(manifest["race_a"]) == 60 and len(manifest["race_b"]) == 60
