"""Runners: every way of running both networks of a model directory, behind one interface.

Place in the flow: after ``export`` (and ``runtime build`` for FP16/INT8 files and TensorRT
engines); before :mod:`runtime.evaluation.loop`, which feeds each :class:`Runner` the same images
and landmarks.  ``runtime demo``, ``runtime parity`` and ``runtime evaluate`` build their runners
here:

* :func:`pytorch_runner` -- the fp32 reference (the checkpoint through ``export.reference``; imports
  torch when called);
* :func:`onnxruntime_runner` -- ONNX Runtime on the ``encoder.<precision>`` file and the refinement
  file that precision pairs with (:func:`refinement_precision`);
* :func:`tensorrt_runners` -- the engines listed in the manifest;
* :func:`pipeline_runner` -- whatever a loaded ``runtime.pipeline.Pipeline`` opened.

Imports no torch at module level.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from export.contract.errors import InputError, NFormerError
from export.contract.files import sha256_file
from export.contract.manifest import load_manifest, model_config
from export.contract.variants import REFINE_PRECISIONS, VARIANTS_KEY, refinement_precision, variant_name


@dataclass
class Runner:
    """One way of running both networks: a backend with its encoder and refinement precisions."""
    backend: str
    precision: str                                            # the encoder's
    refinement: str                                           # the refinement's
    encode: Callable[[np.ndarray], np.ndarray]                # images [B,3,H,W] -> raw embeddings [B,D]
    refine: Callable[[np.ndarray, np.ndarray], np.ndarray]    # (unit features [N,D], landmarks) -> refined [N,D]
    files: tuple[str, str] = ("", "")                         # (encoder file, refinement file)


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


def pytorch_runner(checkpoint: Path, config) -> Runner:
    """The fp32 PyTorch reference of ``checkpoint``, built with ``config``'s options (``n_head``,
    ``topk``, ``landmarks``, ``last_stride``, ``input_size_hw``: a manifest's ``model_config``)."""
    import torch

    from export.reference.checkpoint import load_checkpoint

    checkpoint = Path(checkpoint)
    model = load_checkpoint(checkpoint, n_head=config.n_head, topk=config.topk, landmarks=config.landmarks,
                            last_stride=config.last_stride, input_size_hw=tuple(config.input_size_hw))

    def encode(images):
        with torch.no_grad():
            return model.backbone(torch.from_numpy(np.ascontiguousarray(images))).numpy()

    def refine(x, lm):
        with torch.no_grad():
            return model.nformer(torch.from_numpy(x)[None], torch.from_numpy(lm))[0].numpy()

    return Runner("pytorch", "fp32", "fp32", encode, refine, (checkpoint.name, checkpoint.name))


def _listed_file(manifest: dict, network: str, precision: str) -> str | None:
    """The file of ``network`` at ``precision`` as the manifest lists it (fp32: ``files``; others: a
    ``variants`` entry that still matches its checksum), or None: a file that merely sits in the
    folder under the variant's name is not the model's (a stale or foreign copy)."""
    if precision == "fp32":
        entry = manifest["files"].get(network)
    else:
        entry = manifest.get(VARIANTS_KEY, {}).get(variant_name(network, precision))
    return entry["path"] if entry else None


def onnxruntime_runner(model_dir: str | Path, precision: str, threads: int | None = None,
                       providers: list[str] | None = None) -> Runner | None:
    """ONNX Runtime on ``encoder.<precision>`` and the refinement file :func:`refinement_precision`
    pairs with it (fp32 -> nformer.onnx; fp16 -> nformer.fp16.onnx; int8 -> nformer.fp16.onnx if
    present, else nformer.onnx).  None when the precision's encoder file is absent, and for fp16
    when nformer.fp16.onnx is (an fp16 row is fp16 in both networks)."""

    from runtime.backends import OnnxRuntimeBackend
    from runtime.encoder import EncoderRunner
    from runtime.refiner import Refiner

    model_dir = Path(model_dir)
    manifest = load_manifest(model_dir)     # variants whose file no longer matches its checksum are left out
    config = model_config(manifest)
    enc_file = _listed_file(manifest, "encoder", precision)
    if enc_file is None:
        return None
    present = [p for p in REFINE_PRECISIONS if _listed_file(manifest, "nformer", p) is not None]
    refine_precision = refinement_precision(precision, present)
    if precision == "fp16" and refine_precision != "fp16":
        return None
    ref_file = _listed_file(manifest, "nformer", refine_precision)
    encoder = EncoderRunner(OnnxRuntimeBackend(model_dir / enc_file, providers, threads, precision=precision),
                            config, batch_size=32)
    refiner = Refiner(OnnxRuntimeBackend(model_dir / ref_file, providers, threads, precision=refine_precision,
                                         dynamic_shapes=True), config)
    return Runner("onnxruntime", precision, refine_precision, encoder.embed_images,
                  lambda x, lm: refiner.refine(x, lm, normalize_output=False), (enc_file, ref_file))


def tensorrt_runners(model_dir: Path, config, log) -> tuple[list[Runner], list[dict]]:
    """Runners for the engines in ``manifest["engines"]`` (needs TensorRT and the runtime's TensorRT
    backend), each encoder engine with the refinement engine :func:`refinement_precision` pairs with
    it; otherwise a skipped entry per engine pair saying why."""
    model_dir = Path(model_dir)
    manifest = load_manifest(model_dir)
    engines = manifest.get("engines", {})
    encoders = {e["precision"]: e for e in engines.values() if e["network"] == "encoder"}
    if not encoders:
        return [], []
    from runtime.encoder import EncoderRunner
    from runtime.tensorrt.build import check_engine
    from runtime.refiner import Refiner

    refinements = {e["precision"]: e for e in engines.values() if e["network"] == "nformer"}
    runners, skipped = [], []
    for precision, enc in sorted(encoders.items()):
        ref = refinements.get(refinement_precision(precision, refinements))
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


def pipeline_runner(pipe, backend: str | None = None) -> Runner:
    """The encoder and refinement a ``runtime.pipeline.Pipeline`` opened, as a Runner labelled
    ``backend`` (default: the encoder backend's name)."""
    enc, ref = pipe.encoder.backend, pipe.refiner.backend

    def file_name(b) -> str:
        path = getattr(b, "path", None)
        return Path(path).name if path else ""

    return Runner(backend or enc.name, getattr(enc, "precision", "fp32"), getattr(ref, "precision", "fp32"),
                  pipe.encoder.embed_images, lambda x, lm: pipe.refiner.refine(x, lm, normalize_output=False),
                  (file_name(enc), file_name(ref)))
