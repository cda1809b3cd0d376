"""``runtime demo``: the first thing a new user runs.

Makes (or reuses) the synthetic Market-1501-layout data set, exports the small NFormer shipped in
``export/data/``, evaluates encoder-only and refined embeddings on every backend and precision this
machine can run, prints one table, and draws the CMC curves and a 2-D projection of embeddings
before and after the refinement.  The PyTorch rows are the fp32 reference (this command imports
torch when it runs: `pip install -e ".[demo]"`).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from export.contract.errors import NFormerError
from export.contract.landmarks import sample_landmarks
from export.shipped import SHIPPED, shipped_card

from export.contract.market1501 import read_market1501
from runtime.evaluation.metrics import euclidean_distances, evaluate_rank
from export.contract.preprocess import preprocess
from runtime.refiner import l2_normalize

REPORT_KEYS = ("backend", "precision", "stage", "mAP", "rank1", "images_per_s", "cosine_to_reference_mean")


@dataclass
class Variant:
    """One way of running both networks: a backend at a precision."""
    backend: str
    precision: str
    encode: Callable[[np.ndarray], np.ndarray]           # images [B,3,H,W] -> raw embeddings [B,D]
    refine: Callable[[np.ndarray, np.ndarray], np.ndarray]  # (unit features [N,D], landmarks) -> refined [N,D]


def ensure_data(work_dir: Path, identities: int, seed: int, log) -> Path:
    from runtime.evaluation.synth import generate, total_images

    data_dir = work_dir / f"synthetic-market1501-i{identities}-s{seed}"
    if (data_dir / "query").is_dir():
        log(f"reusing synthetic data in {data_dir}")
        return data_dir
    from tqdm import tqdm

    with tqdm(total=total_images(identities, seed), unit="img", desc="synthetic data") as bar:
        generate(data_dir, identities, seed, progress=bar.update)
    return data_dir


def ensure_export(work_dir: Path, log) -> Path:
    from export.contract.manifest import load_manifest
    from export.contract.files import sha256_file
    from export.to_onnx import export_checkpoint

    build = work_dir / "build"
    card = shipped_card()
    try:
        manifest = load_manifest(build)
        if manifest["source"]["sha256"] == sha256_file(SHIPPED):
            log(f"reusing exported files in {build}")
            return build
    except NFormerError:
        pass
    log(f"exporting {SHIPPED.name} to {build} ...")
    result = export_checkpoint(SHIPPED, build, input_size_hw=tuple(card["export_options"]["input_size_hw"]),
                               batches=(1, 8), sizes=(1, 64), log=lambda *a: None)
    if not result["ok"]:
        raise NFormerError("the shipped checkpoint's export failed its parity check; see `python -m export.to_onnx`")
    return build


def variants(build: Path, data_dir: Path | None = None, log=print) -> list[Variant]:
    """Every backend and precision this machine can run (the PyTorch fp32 reference first).

    With ``data_dir`` (the synthetic set) the FP16 and INT8 files are written through
    ``calibration`` (INT8 calibrated on the training split) and run in ONNX Runtime.
    """
    import torch

    from export.reference.checkpoint import load_checkpoint

    from runtime.pipeline import Pipeline

    model = load_checkpoint(SHIPPED, input_size_hw=tuple(shipped_card()["export_options"]["input_size_hw"]))

    def torch_encode(images):
        with torch.no_grad():
            return torch.cat([model.backbone(torch.from_numpy(images[s:s + 64]))
                              for s in range(0, len(images), 64)]).numpy()

    def torch_refine(x, lm):
        with torch.no_grad():
            return model.nformer(torch.from_numpy(x)[None], torch.from_numpy(lm))[0].numpy()

    pipe = Pipeline.load(build)
    ort_refine = lambda x, lm: pipe.refiner.refine(x, lm, normalize_output=False)  # noqa: E731
    out = [Variant("pytorch", "fp32", torch_encode, torch_refine),
           Variant("onnxruntime", "fp32", pipe.encoder.embed_images, ort_refine)]
    if data_dir is not None:
        out += precision_variants(build, data_dir, log)
    return out


def precision_variants(build: Path, data_dir: Path, log=print) -> list[Variant]:
    """ONNX Runtime rows for the FP16 files and the INT8 encoder (with the FP16 refinement), and
    TensorRT rows for engines that `runtime build` put in ``build`` (when they run here)."""
    from calibration.variants import write_variants
    from export.contract.manifest import load_manifest, model_config

    from runtime.evaluation.parity import onnxruntime_runner, tensorrt_runners

    write_variants(build, "fp16", log=log)
    write_variants(build, "int8", calib_data=data_dir, log=log)  # cached ranges on a rerun
    runners = [onnxruntime_runner(build, precision) for precision in ("fp16", "int8")]
    runners += tensorrt_runners(build, model_config(load_manifest(build)), log)[0]
    return [Variant(r.backend, r.precision, r.encode, r.refine) for r in runners]


def evaluate_variants(data_dir: Path, build: Path, seed: int, log) -> tuple[list[dict], dict]:
    from tqdm import tqdm

    data = read_market1501(data_dir, splits=("query", "gallery"))
    items = data.query + data.gallery
    config = json.loads((build / "manifest.json").read_text())["model"]
    size = tuple(config["input_size_hw"])
    images = np.stack([preprocess(i.path, size) for i in tqdm(items, desc="reading crops", unit="img")])
    pids = np.array([i.pid for i in items])
    cams = np.array([i.camid for i in items])
    nq = len(data.query)
    landmarks = sample_landmarks(len(items), config["n_layer"], config["landmarks"], seed)
    rows, curves, reference = [], {}, {}
    for v in variants(build, data_dir, log):
        log(f"evaluating {v.backend} {v.precision} ...")
        t = time.perf_counter()
        raw = v.encode(images)
        enc_seconds = time.perf_counter() - t
        feats = l2_normalize(raw)
        t = time.perf_counter()
        refined = l2_normalize(v.refine(feats, landmarks))
        ref_seconds = time.perf_counter() - t
        for stage, emb, seconds in (("encoder", feats, enc_seconds), ("refined", refined, enc_seconds + ref_seconds)):
            cmc, mAP = evaluate_rank(euclidean_distances(emb[:nq], emb[nq:]), pids[:nq], pids[nq:], cams[:nq], cams[nq:])
            reference.setdefault(stage, emb)
            cosine = float(np.mean(np.sum(emb * reference[stage], axis=1)))
            rows.append({"backend": v.backend, "precision": v.precision, "stage": stage, "mAP": float(mAP),
                         "rank1": float(cmc[0]), "images_per_s": len(items) / seconds,
                         "cosine_to_reference_mean": cosine})
            curves[(v.backend, v.precision, stage)] = (cmc, mAP)
        if v.backend == "pytorch":
            projection_data = {"encoder": feats, "refined": refined, "pids": pids}
    return rows, {"curves": curves, "projection": projection_data}


def draw_figure(path: Path, figure_data: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    for (backend, precision, stage), (cmc, mAP) in figure_data["curves"].items():
        ranks = np.arange(1, min(20, len(cmc)) + 1)
        axes[0].plot(ranks, 100 * cmc[: len(ranks)], marker="o" if stage == "refined" else ".",
                     linestyle="-" if stage == "refined" else "--",
                     label=f"{backend} {precision} {stage} (mAP {100 * mAP:.1f})")
    axes[0].set(xlabel="rank", ylabel="CMC (%)", title="CMC on the synthetic query/gallery split")
    axes[0].legend(fontsize=8)
    axes[0].grid(alpha=0.3)
    proj = figure_data["projection"]
    pids = proj["pids"]
    rng = np.random.default_rng(0)
    shown = rng.choice(np.unique(pids[pids > 0]), size=min(12, len(np.unique(pids[pids > 0]))), replace=False)
    mask = np.isin(pids, shown)
    for ax, stage in zip(axes[1:], ("encoder", "refined")):
        x = proj[stage][mask]
        x = x - x.mean(0)
        _, _, vt = np.linalg.svd(x, full_matrices=False)
        xy = x @ vt[:2].T
        for j, pid in enumerate(shown):
            sel = pids[mask] == pid
            ax.scatter(xy[sel, 0], xy[sel, 1], s=18, color=plt.cm.tab20(j % 20))
        ax.set(title=f"{stage} embeddings of 12 identities (PCA)", xticks=[], yticks=[])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_demo(work_dir: str | Path = "nformer-demo", report: str | Path | None = None,
             figure: str | Path | None = None, identities: int = 600, seed: int = 0, log=print) -> list[dict]:
    try:
        import torch  # noqa: F401
    except ImportError:
        raise NFormerError("runtime demo compares with the PyTorch reference and needs torch: "
                           "pip install -e \".[demo]\"") from None
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    data_dir = ensure_data(work_dir, identities, seed, log)
    build = ensure_export(work_dir, log)
    rows, figure_data = evaluate_variants(data_dir, build, seed, log)
    figure = Path(figure) if figure else work_dir / "demo.png"
    draw_figure(figure, figure_data)
    if report:
        from export.contract.files import write_json_atomic

        write_json_atomic(Path(report), [{k: r[k] for k in REPORT_KEYS} for r in rows])
    return rows, figure
