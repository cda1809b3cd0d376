"""``runtime parity``: every backend and precision of a model directory against the fp32 reference.

Place in the flow: after ``runtime build``.  For each way of running the model that is present
(the PyTorch fp32 reference, ONNX Runtime fp32 / FP16 / INT8 files -- TensorRT's ``int8`` and the
CPU's ``int8-cpu`` --, TensorRT engines listed in the manifest), on the query/gallery split of a
Market-1501-layout directory, at the three levels of DESIGN.md section 3:

* elementwise -- cosine of each raw encoder embedding (and each refined embedding) to the
  reference's, min and mean;
* neighbour level -- overlap of the reciprocal top-k neighbour sets that the refinement uses
  (mean Jaccard index per row, and the fraction of rows whose set is identical), computed from each
  variant's own embeddings with the one numpy implementation (``runtime.neighbors``);
* task level -- mAP and Rank-1 of the encoder and refined embeddings, and their difference to the
  reference in points.

Results are data first (a JSON report), a table second.  Tolerances are named, printed, and decide
``ok`` per row (defaults: the issue's INT8 acceptance: cosine mean >= 0.99, min >= 0.95, refined mAP
within 1.0 point).  The PyTorch reference needs torch and the checkpoint (``--checkpoint``, or the
manifest's source file found beside the model directory, or the shipped checkpoint when its sha256
matches); without them ONNX Runtime fp32 is the reference and the report says so.

The runners come from ``runtime.evaluation.runners`` and the encode -> refine -> score pass from
``runtime.evaluation.loop`` (images read once, in chunks, every runner's encoder sees each chunk,
so memory stays bounded on the real Market-1501's 19,732 test crops); this module adds the
neighbour-level comparison and the rows.  Imports torch only for the reference row.
"""
from __future__ import annotations

import datetime
import platform
from pathlib import Path
from typing import Callable

import numpy as np

from export.contract.errors import NFormerError
from export.contract.files import sha256_file
from export.contract.manifest import load_manifest, model_config
from export.contract.parity import cosine_rows
from export.contract.variants import PRECISIONS

from export.contract.market1501 import read_market1501
from runtime.evaluation.loop import image_chunks, run_loop
from runtime.evaluation.runners import find_checkpoint, onnxruntime_runner, pytorch_runner, tensorrt_runners

TOLERANCES = {"min_cosine_mean": 0.99, "min_cosine_min": 0.95, "max_map_drop_points": 1.0}
COLUMNS = ["backend", "precision", "refinement", "cosine_min", "cosine_mean", "refined_cosine_mean",
           "neighbor_overlap", "mAP", "mAP_diff", "rank1", "rank1_diff", "ok"]


def _neighbor_sets(idx: np.ndarray, valid: np.ndarray) -> list[frozenset]:
    return [frozenset(row[v.astype(bool)].tolist()) for row, v in zip(idx, valid)]


def neighbor_overlap(sets_a: list[frozenset], sets_b: list[frozenset]) -> tuple[float, float]:
    """(mean Jaccard index per row, fraction of identical rows) of two lists of neighbour sets."""
    jac = [len(a & b) / len(a | b) if (a or b) else 1.0 for a, b in zip(sets_a, sets_b)]
    same = [a == b for a, b in zip(sets_a, sets_b)]
    return float(np.mean(jac)), float(np.mean(same))


def run_parity(model_dir: str | Path, data_dir: str | Path, *, checkpoint: str | Path | None = None,
               seed: int = 0, threads: int | None = None, tolerances: dict | None = None,
               include_tensorrt: bool = True, log: Callable[[str], None] = print) -> dict:
    """Evaluate every runner present; returns the report (``rows``, ``reference``, ``skipped`` ...)."""
    from runtime.neighbors import reciprocal_neighbors

    tol = {**TOLERANCES, **(tolerances or {})}
    model_dir, data_dir = Path(model_dir), Path(data_dir)
    manifest = load_manifest(model_dir)
    config = model_config(manifest)
    data = read_market1501(data_dir, splits=("query", "gallery"))
    items = data.query + data.gallery
    nq = len(data.query)

    runners, skipped = [], []
    ckpt = None
    try:
        import torch  # noqa: F401

        ckpt = find_checkpoint(model_dir, manifest, checkpoint)
        source = manifest.get("source", {})
        try:        # an unreadable file: the reference's own reader says so below (CheckpointError)
            differs = checkpoint is not None and bool(source.get("sha256")) and sha256_file(ckpt) != source["sha256"]
        except OSError:
            differs = False
        if differs:
            log(f"note: --checkpoint {ckpt} is not the file {model_dir} was exported from (its sha256 differs from "
                f"the manifest's {source.get('checkpoint')}); unless it holds the same weights, every row will "
                "be far from this reference")
        if ckpt is None:
            skipped.append({"backend": "pytorch", "precision": "fp32", "reason": "checkpoint not found (pass "
                            "--checkpoint; the manifest names " + str(manifest.get("source", {}).get("checkpoint")) + ")"})
    except ImportError:
        if checkpoint is not None:
            raise NFormerError("the PyTorch reference needs torch: pip install -e \".[export]\"") from None
        skipped.append({"backend": "pytorch", "precision": "fp32", "reason": "torch is not installed"})
    if ckpt is not None:
        runners.append(pytorch_runner(ckpt, config))
    for precision in PRECISIONS:
        runner = onnxruntime_runner(model_dir, precision, threads)
        if runner is not None:
            runners.append(runner)
    if include_tensorrt:
        trt_runners, trt_skipped = tensorrt_runners(model_dir, config, log)
        runners += trt_runners
        skipped += trt_skipped
    reference = runners[0]
    if reference.backend != "pytorch":
        log(f"reference: {reference.backend} {reference.precision} (no PyTorch reference: "
            f"{skipped[0]['reason'] if skipped else 'unavailable'})")

    log(f"encoding {len(items)} query+gallery crops of {data_dir} with {len(runners)} variant(s) ...")
    results = run_loop(runners, image_chunks([i.path for i in items], config), query=nq,
                       pids=[i.pid for i in items], camids=[i.camid for i in items], config=config, seed=seed)
    sets = [_neighbor_sets(*reciprocal_neighbors(res.encoder, config.topk)) for res in results]

    ref = results[0]
    rows = []
    for res, res_sets in zip(results, sets):
        r = res.runner
        cos = cosine_rows(res.raw, ref.raw)
        rcos = cosine_rows(res.refined, ref.refined)
        overlap, identical = neighbor_overlap(res_sets, sets[0])
        enc, fin = res.stages["encoder"], res.stages["refined"]
        ref_enc, ref_fin = ref.stages["encoder"], ref.stages["refined"]
        row = {"backend": r.backend, "precision": r.precision, "refinement": r.refinement,
               "encoder_file": r.files[0], "refinement_file": r.files[1],
               "cosine_min": float(cos.min()), "cosine_mean": float(cos.mean()),
               "refined_cosine_min": float(rcos.min()), "refined_cosine_mean": float(rcos.mean()),
               "neighbor_overlap": overlap, "neighbor_sets_identical": identical,
               "encoder_mAP": enc.mAP, "encoder_rank1": enc.rank(1),
               "encoder_mAP_diff": 100 * (enc.mAP - ref_enc.mAP),
               "mAP": fin.mAP, "rank1": fin.rank(1),
               "mAP_diff": 100 * (fin.mAP - ref_fin.mAP),
               "rank1_diff": 100 * (fin.rank(1) - ref_fin.rank(1)),
               "encoder_images_per_s": len(items) / max(res.seconds["encoder"], 1e-9),
               "refinement_seconds": res.seconds["refinement"]}
        row["ok"] = bool(row["cosine_mean"] >= tol["min_cosine_mean"] and row["cosine_min"] >= tol["min_cosine_min"]
                         and -row["mAP_diff"] <= tol["max_map_drop_points"])
        rows.append(row)
    return {
        "model_dir": str(model_dir), "data": str(data_dir), "query": nq, "gallery": len(items) - nq,
        "reference": {"backend": reference.backend, "precision": reference.precision,
                      "checkpoint": str(ckpt) if ckpt else None},
        "tolerances": tol, "landmark_seed": seed, "k": config.topk, "rows": rows, "skipped": skipped,
        "machine": platform.platform(), "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "notes": ["mAP_diff and rank1_diff are in points (percent) against the reference's refined embeddings",
                  "ONNX Runtime on a CPU runs FP16 files with fp32 arithmetic where it lacks an fp16 kernel "
                  "(tensors are still rounded to fp16 between nodes)"],
    }
