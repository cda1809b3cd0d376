"""``runtime demo``: the first thing a new user runs.

Makes (or reuses) the synthetic Market-1501-layout data set, exports the small NFormer shipped in
``export/data/``, evaluates encoder-only and refined embeddings on every backend and precision this
machine can run, prints one table, and draws the CMC curves and a 2-D projection of embeddings
before and after the refinement.  The PyTorch rows are the fp32 reference (this command imports
torch when it runs: `pip install -e ".[demo]"`).

Place in the flow: the whole flow in one command -- ``runtime synth`` (:mod:`runtime.evaluation.synth`),
``export.to_onnx``, ``calibration.variants`` (FP16 files, INT8 encoders: TensorRT's and the CPU's),
then the runners of :mod:`runtime.evaluation.runners` through the one loop of
:mod:`runtime.evaluation.loop`; this module adds only the rows (``REPORT_KEYS``) and the figure.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from export.contract.errors import InputError, NFormerError
from export.contract.files import WORK_MARKER
from export.contract.manifest import load_manifest, model_config
from export.contract.variants import PRECISIONS
from export.shipped import SHIPPED, shipped_card, shipped_training_split

from export.contract.market1501 import read_market1501
from runtime.evaluation.loop import STAGES, image_chunks, run_loop
from runtime.evaluation.runners import Runner, onnxruntime_runner, pytorch_runner, tensorrt_runners

REPORT_KEYS = ("backend", "precision", "stage", "mAP", "rank1", "images_per_s", "cosine_to_reference_mean")


def split_note(identities: int, seed: int) -> str | None:
    """Why the shipped model's scores on ``runtime synth --identities I --seed S`` data mean less
    than on its own held-out split, or None for that split.  The synthetic people and cameras are
    drawn from (seed, person id) and (seed, camera): another seed has other cameras and people,
    which this small model never saw; another size of the same seed puts some of the people it was
    trained on into the test split."""
    from runtime.evaluation.synth import plan

    trained = shipped_training_split()
    if trained is None or (identities, seed) == trained:
        return None
    t_identities, t_seed = trained
    own = f"--identities {t_identities} --seed {t_seed} is its held-out split"
    if seed != t_seed:
        return (f"note: the shipped model was trained on synthetic data of seed {t_seed}; seed {seed} draws other "
                f"cameras and people, on which this small model is not expected to work (scores near chance); {own}")
    seen = {e[0] for e in plan(t_identities, t_seed)["train"]}
    tested = {e[0] for e in plan(identities, seed)["query"]}
    if not tested & seen:
        return None
    return (f"note: {len(tested & seen)} of the {len(tested)} queried identities of --identities {identities} were in the "
            f"shipped model's training data, so its scores here are optimistic; {own}")


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
    from export.contract.files import sha256_file
    from export.to_onnx import export_checkpoint

    build = work_dir / "build"
    card = shipped_card()
    manifest, problem = None, None
    try:
        manifest = load_manifest(build)
    except NFormerError as err:
        problem = str(err)
    if manifest is not None:
        source = manifest.get("source", {})
        if source.get("sha256") == sha256_file(SHIPPED):
            log(f"reusing exported files in {build}")
            return build
        if Path(str(source.get("checkpoint"))).name != SHIPPED.name:
            raise InputError(f"{build} holds the export of another checkpoint ({source.get('checkpoint')}); the demo "
                             "would replace it with the shipped model's: give another --work-dir")
        log(f"{build} holds an earlier version of {SHIPPED.name}: exporting it again")
    elif build.exists() and (not build.is_dir() or any(not (p / WORK_MARKER).exists() for p in build.iterdir())):
        # (a killed export leaves only its marked work folder, which the next export sweeps)
        raise InputError(f"{build} exists and is not an export of the shipped model ({problem}); the demo would "
                         "replace it: give another --work-dir, or remove it")
    log(f"exporting {SHIPPED.name} to {build} ...")
    result = export_checkpoint(SHIPPED, build, input_size_hw=tuple(card["export_options"]["input_size_hw"]),
                               batches=(1, 8), sizes=(1, 64), log=lambda *a: None)
    if not result["ok"]:
        raise NFormerError("the shipped checkpoint's export failed its parity check; see `python -m export.to_onnx`")
    return build


def demo_runners(build: Path, data_dir: Path | None = None, log=print) -> list[Runner]:
    """Every backend and precision this machine can run (the PyTorch fp32 reference first).

    With ``data_dir`` (the synthetic set) the FP16 and INT8 files (``int8``: TensorRT's format,
    ``int8-cpu``: ONNX Runtime's x86 format) are written through ``calibration`` (INT8 calibrated on
    the training split) and run in ONNX Runtime; TensorRT rows follow for engines that `runtime
    build` put in ``build`` (when they run here).
    """
    config = model_config(load_manifest(build))  # its input_size_hw is the card's: ensure_export used it
    precisions = ("fp32",)
    if data_dir is not None:
        from calibration.variants import write_variants

        write_variants(build, "fp16", log=log)
        write_variants(build, "int8", calib_data=data_dir, log=log)  # cached ranges on a rerun
        write_variants(build, "int8-cpu", calib_data=data_dir, log=log)
        precisions = PRECISIONS
    runners = [pytorch_runner(SHIPPED, config)]
    runners += [r for r in (onnxruntime_runner(build, p) for p in precisions) if r is not None]
    if data_dir is not None:
        runners += tensorrt_runners(build, config, log)[0]
    return runners


def evaluate_variants(data_dir: Path, build: Path, seed: int, log) -> tuple[list[dict], dict]:
    """Rows of REPORT_KEYS (one per runner and stage) and the figure's data (CMC curves, and the
    PyTorch reference's embeddings for the projection)."""
    from tqdm import tqdm

    data = read_market1501(data_dir, splits=("query", "gallery"))
    items = data.query + data.gallery
    config = model_config(load_manifest(build))
    runners = demo_runners(build, data_dir, log)
    log("evaluating " + ", ".join(f"{r.backend} {r.precision}" for r in runners) + " ...")
    with tqdm(total=len(items), desc="embedding crops", unit="img") as bar:
        results = run_loop(runners, image_chunks([i.path for i in items], config, progress=bar.update),
                           query=len(data.query), pids=[i.pid for i in items], camids=[i.camid for i in items],
                           config=config, seed=seed)
    rows, curves = [], {}
    for res in results:
        r = res.runner
        for stage in STAGES:
            emb, reference = res.embeddings(stage), results[0].embeddings(stage)
            seconds = res.seconds["encoder"] + (res.seconds["refinement"] if stage == "refined" else 0.0)
            scores = res.stages[stage]
            rows.append({"backend": r.backend, "precision": r.precision, "stage": stage, "mAP": scores.mAP,
                         "rank1": scores.rank(1), "images_per_s": len(items) / seconds,
                         "cosine_to_reference_mean": float(np.mean(np.sum(emb * reference, axis=1)))})
            curves[(r.backend, r.precision, stage)] = (scores.cmc, scores.mAP)
    ref = next(res for res in results if res.runner.backend == "pytorch")
    projection = {"encoder": ref.encoder, "refined": ref.refined, "pids": np.array([i.pid for i in items])}
    return rows, {"curves": curves, "projection": projection}


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
    from export.contract.files import staged_file

    with staged_file(path) as tmp:          # a new file renamed into place: never written through a link
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def run_demo(work_dir: str | Path = "nformer-demo", report: str | Path | None = None,
             figure: str | Path | None = None, identities: int = 600, seed: int = 0,
             log=print) -> tuple[list[dict], Path]:
    """Make the data and the export in ``work_dir`` (reused on a rerun), evaluate every runner, draw
    the figure and write the report (``REPORT_KEYS`` per row) when asked.

    Returns ``(rows, figure path)``: the rows are dicts with at least ``REPORT_KEYS``.
    """
    try:
        import torch  # noqa: F401
    except ImportError:
        raise NFormerError("runtime demo compares with the PyTorch reference and needs torch: "
                           "pip install -e \".[demo]\"") from None
    work_dir = Path(work_dir)
    try:
        work_dir.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise InputError(f"--work-dir {work_dir} is a file (or lies under one); give a directory") from None
    except OSError as err:
        raise InputError(f"cannot create --work-dir {work_dir}: {err.strerror or err}") from None
    note = split_note(identities, seed)
    if note:
        log(note)
    data_dir = ensure_data(work_dir, identities, seed, log)
    build = ensure_export(work_dir, log)
    rows, figure_data = evaluate_variants(data_dir, build, seed, log)
    figure = Path(figure) if figure else work_dir / "demo.png"
    draw_figure(figure, figure_data)
    if report:
        from export.contract.files import write_json_atomic

        write_json_atomic(Path(report), [{k: r[k] for k in REPORT_KEYS} for r in rows])
    return rows, figure
