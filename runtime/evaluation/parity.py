"""``runtime parity``: every backend and precision of a model directory against the fp32 reference.

Place in the flow: after ``runtime build``.  For each way of running the model that is present
(the PyTorch fp32 reference, ONNX Runtime fp32 / FP16 / INT8 files, TensorRT engines listed in the
manifest), on the query/gallery split of a Market-1501-layout directory, at the three levels of
DESIGN.md section 3:

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

Images are read once, in chunks, and every variant's encoder sees each chunk, so memory stays
bounded on the real Market-1501 (19,732 test crops).  Imports torch only for the reference row.
"""
from __future__ import annotations

import datetime
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from export.contract.errors import InputError, NFormerError
from export.contract.landmarks import sample_landmarks
from export.contract.manifest import load_manifest, model_config
from export.contract.files import sha256_file
from export.contract.parity import cosine_rows

from export.contract.market1501 import read_market1501
from runtime.evaluation.metrics import euclidean_distances, evaluate_rank
from export.contract.preprocess import preprocess_batch
from runtime.refiner import l2_normalize

TOLERANCES = {"min_cosine_mean": 0.99, "min_cosine_min": 0.95, "max_map_drop_points": 1.0}
COLUMNS = ["backend", "precision", "refinement", "cosine_min", "cosine_mean", "refined_cosine_mean",
           "neighbor_overlap", "mAP", "mAP_diff", "rank1", "rank1_diff", "ok"]
CHUNK = 256


@dataclass
class Runner:
    """One way of running both networks."""
    backend: str
    precision: str
    refinement: str
    encode: Callable[[np.ndarray], np.ndarray]                # images [B,3,H,W] -> raw embeddings [B,D]
    refine: Callable[[np.ndarray, np.ndarray], np.ndarray]    # (unit features [N,D], landmarks) -> refined [N,D]
    files: tuple[str, str] = ("", "")


def find_checkpoint(model_dir: Path, manifest: dict, checkpoint: str | Path | None = None) -> Path | None:
    """The checkpoint the model directory was exported from (checked by sha256), or None."""
    if checkpoint is not None:
        path = Path(checkpoint)
        if not path.is_file():
            raise InputError(f"checkpoint not found: {path}")
        return path
    source = manifest.get("source", {})
    name, digest = source.get("checkpoint"), source.get("sha256")
    if not name:
        return None
    from export.shipped import SHIPPED

    for path in (model_dir / name, model_dir.parent / name, Path.cwd() / name, SHIPPED):
        if path.is_file() and sha256_file(path) == digest:
            return path
    return None


def onnxruntime_runner(model_dir: str | Path, precision: str, threads: int | None = None,
                       providers: list[str] | None = None) -> Runner | None:
    """ONNX Runtime on ``encoder.<precision>`` and the refinement a build at that precision pairs with it
    (fp32 -> nformer.onnx; fp16 -> nformer.fp16.onnx; int8 -> nformer.fp16.onnx if present, else fp32).
    None when the precision's encoder file is absent."""
    from calibration.variants import variant_file

    from runtime.backends import OnnxRuntimeBackend
    from runtime.encoder import EncoderRunner
    from runtime.refiner import Refiner

    model_dir = Path(model_dir)
    manifest = load_manifest(model_dir)
    config = model_config(manifest)
    enc_file = variant_file("encoder", precision)
    if not (model_dir / enc_file).is_file():
        return None
    refine_precision = "fp32" if precision == "fp32" else "fp16"
    if not (model_dir / variant_file("nformer", refine_precision)).is_file():
        if precision == "fp16":
            return None
        refine_precision = "fp32"
    ref_file = variant_file("nformer", refine_precision)
    encoder = EncoderRunner(OnnxRuntimeBackend(model_dir / enc_file, providers, threads, precision=precision),
                            config, batch_size=32)
    refiner = Refiner(OnnxRuntimeBackend(model_dir / ref_file, providers, threads, precision=refine_precision,
                                         dynamic_shapes=True), config)
    return Runner("onnxruntime", precision, refine_precision, encoder.embed_images,
                  lambda x, lm: refiner.refine(x, lm, normalize_output=False), (enc_file, ref_file))


def tensorrt_runners(model_dir: Path, config, log) -> tuple[list[Runner], list[dict]]:
    """Runners for the engines in ``manifest["engines"]`` (needs TensorRT and the runtime's TensorRT
    backend); otherwise a skipped entry per engine pair saying why."""
    manifest = load_manifest(model_dir)
    engines = manifest.get("engines", {})
    encoders = {e["precision"]: e for e in engines.values() if e["network"] == "encoder"}
    if not encoders:
        return [], []
    from runtime.encoder import EncoderRunner
    from runtime.tensorrt.build import check_engine
    from runtime.refiner import Refiner

    runners, skipped = [], []
    for precision, enc in sorted(encoders.items()):
        refine_precision = "fp32" if precision == "fp32" else "fp16"
        ref = engines.get(f"nformer.{refine_precision}") or engines.get("nformer.fp32")
        if ref is None:
            skipped.append({"backend": "tensorrt", "precision": precision, "reason": "no refinement engine"})
            continue
        try:
            from runtime.tensorrt.backend import TensorRTBackend

            for entry in (enc, ref):
                check_engine(model_dir / entry["path"], model_dir=model_dir)
            enc_backend = TensorRTBackend(model_dir / enc["path"])
            ref_backend = TensorRTBackend(model_dir / ref["path"])
        except (ImportError, NFormerError, RuntimeError, OSError) as err:
            reason = f"{type(err).__name__}: {err}"
            log(f"skipping TensorRT {precision}: {reason}")
            skipped.append({"backend": "tensorrt", "precision": precision, "reason": reason})
            continue
        encoder = EncoderRunner(enc_backend, config, batch_size=32)
        refiner = Refiner(ref_backend, config)
        runners.append(Runner("tensorrt", precision, ref["precision"], encoder.embed_images,
                              lambda x, lm, r=refiner: r.refine(x, lm, normalize_output=False),
                              (enc["path"], ref["path"])))
    return runners, skipped


def pytorch_runner(checkpoint: Path, config) -> Runner:
    import torch

    from export.reference.checkpoint import load_checkpoint

    model = load_checkpoint(checkpoint, n_head=config.n_head, topk=config.topk, landmarks=config.landmarks,
                            last_stride=config.last_stride, input_size_hw=tuple(config.input_size_hw))

    def encode(images):
        with torch.no_grad():
            return model.backbone(torch.from_numpy(np.ascontiguousarray(images))).numpy()

    def refine(x, lm):
        with torch.no_grad():
            return model.nformer(torch.from_numpy(x)[None], torch.from_numpy(lm))[0].numpy()

    return Runner("pytorch", "fp32", "fp32", encode, refine, (checkpoint.name, checkpoint.name))


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
    pids = np.array([i.pid for i in items])
    cams = np.array([i.camid for i in items])

    runners, skipped = [], []
    ckpt = None
    try:
        import torch  # noqa: F401

        ckpt = find_checkpoint(model_dir, manifest, checkpoint)
        if ckpt is None:
            skipped.append({"backend": "pytorch", "precision": "fp32", "reason": "checkpoint not found (pass "
                            "--checkpoint; the manifest names " + str(manifest.get("source", {}).get("checkpoint")) + ")"})
    except ImportError:
        if checkpoint is not None:
            raise NFormerError("the PyTorch reference needs torch: pip install -e \".[export]\"") from None
        skipped.append({"backend": "pytorch", "precision": "fp32", "reason": "torch is not installed"})
    if ckpt is not None:
        runners.append(pytorch_runner(ckpt, config))
    for precision in ("fp32", "fp16", "int8"):
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
    raw = [np.zeros((len(items), config.feature_dim), np.float32) for _ in runners]
    enc_seconds = [0.0] * len(runners)
    for s in range(0, len(items), CHUNK):
        images = preprocess_batch([i.path for i in items[s:s + CHUNK]], config.input_size_hw, config.pixel_mean,
                                  config.pixel_std)
        for j, r in enumerate(runners):
            t = time.perf_counter()
            raw[j][s:s + len(images)] = r.encode(images)
            enc_seconds[j] += time.perf_counter() - t
    landmarks = sample_landmarks(len(items), config.n_layer, config.landmarks, seed)

    results = []
    for j, r in enumerate(runners):
        feats = l2_normalize(raw[j])
        t = time.perf_counter()
        refined = l2_normalize(r.refine(feats, landmarks))
        ref_seconds = time.perf_counter() - t
        idx, valid = reciprocal_neighbors(feats, config.topk)
        stages = {}
        for stage, emb in (("encoder", feats), ("refined", refined)):
            cmc, mAP = evaluate_rank(euclidean_distances(emb[:nq], emb[nq:]), pids[:nq], pids[nq:], cams[:nq], cams[nq:])
            stages[stage] = {"mAP": float(mAP), "rank1": float(cmc[0])}
        results.append({"runner": r, "raw": raw[j], "refined": refined, "sets": _neighbor_sets(idx, valid),
                        "stages": stages, "seconds": {"encoder": enc_seconds[j], "refinement": ref_seconds}})

    ref = results[0]
    rows = []
    for res in results:
        r = res["runner"]
        cos = cosine_rows(res["raw"], ref["raw"])
        rcos = cosine_rows(res["refined"], ref["refined"])
        overlap, identical = neighbor_overlap(res["sets"], ref["sets"])
        enc, fin = res["stages"]["encoder"], res["stages"]["refined"]
        row = {"backend": r.backend, "precision": r.precision, "refinement": r.refinement,
               "encoder_file": r.files[0], "refinement_file": r.files[1],
               "cosine_min": float(cos.min()), "cosine_mean": float(cos.mean()),
               "refined_cosine_min": float(rcos.min()), "refined_cosine_mean": float(rcos.mean()),
               "neighbor_overlap": overlap, "neighbor_sets_identical": identical,
               "encoder_mAP": enc["mAP"], "encoder_rank1": enc["rank1"],
               "encoder_mAP_diff": 100 * (enc["mAP"] - ref["stages"]["encoder"]["mAP"]),
               "mAP": fin["mAP"], "rank1": fin["rank1"],
               "mAP_diff": 100 * (fin["mAP"] - ref["stages"]["refined"]["mAP"]),
               "rank1_diff": 100 * (fin["rank1"] - ref["stages"]["refined"]["rank1"]),
               "encoder_images_per_s": len(items) / max(res["seconds"]["encoder"], 1e-9),
               "refinement_seconds": res["seconds"]["refinement"]}
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
