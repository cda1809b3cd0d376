"""``Pipeline``: the exported files of one model directory, ready to embed and refine.

``Pipeline.load("build/")`` reads the manifest (the interface written by ``export.to_onnx``) and
opens each network on the best backend available (ONNX Runtime: CUDA, then CPU).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from export.manifest import load_manifest, model_config

from .backends import OnnxRuntimeBackend
from .encoder import EncoderRunner
from .refiner import Refiner


class Pipeline:
    def __init__(self, model_dir: Path, manifest: dict, encoder: EncoderRunner, refiner: Refiner):
        self.model_dir = model_dir
        self.manifest = manifest
        self.config = model_config(manifest)
        self.encoder = encoder
        self.refiner = refiner

    @classmethod
    def load(cls, model_dir: str | Path, batch_size: int = 32, providers: list[str] | None = None,
             threads: int | None = None) -> "Pipeline":
        model_dir = Path(model_dir)
        manifest = load_manifest(model_dir)
        config = model_config(manifest)
        files = manifest["files"]
        encoder = EncoderRunner(OnnxRuntimeBackend(model_dir / files["encoder"]["path"], providers, threads),
                                config, batch_size)
        refiner = Refiner(OnnxRuntimeBackend(model_dir / files["nformer"]["path"], providers, threads,
                                             dynamic_shapes=True), config)
        return cls(model_dir, manifest, encoder, refiner)

    def embed(self, crops, progress=None) -> np.ndarray:
        """Crops (paths, PIL images or HxWx3 uint8 arrays) -> raw encoder embeddings [N, 256]."""
        return self.encoder.embed(crops, progress)

    def refine(self, embeddings, landmarks=None, seed: int = 0, normalize_output: bool = True) -> np.ndarray:
        return self.refiner.refine(embeddings, landmarks, seed, normalize_output)
