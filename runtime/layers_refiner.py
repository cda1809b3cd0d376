"""The refinement with the neighbour lists as inputs (``nformer_layers.onnx``), for runtimes that
keep the lists themselves (``runtime.gallery`` maintains them with ``runtime.neighbors``).

Same contract as ``runtime.refiner.Refiner`` (whose validation it reuses): L2-normalised float32
features in, refined embeddings out (L2-normalised unless asked for the raw tensor), landmarks from
the seeded draw unless given.  The lists must be those of ``export.reference.reciprocal_neighbors`` for the
same normalised features; ``runtime.neighbors`` computes exactly those.
"""
from __future__ import annotations

import numpy as np

from export.contract.config import ModelConfig
from export.contract.errors import InputError
from export.contract.landmarks import sample_landmarks

from runtime.backends import Backend
from runtime.refiner import l2_normalize, validate_features, validate_landmarks

INPUTS = ("features", "landmarks", "neighbor_index", "neighbor_valid")


def validate_neighbor_lists(idx, valid, n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    k_eff = min(k, n)
    idx, valid = np.asarray(idx), np.asarray(valid)
    if idx.shape != (n, k_eff) or valid.shape != (n, k_eff):
        raise InputError(f"neighbour lists must be [N={n}, k_eff={k_eff}], found index {idx.shape} and "
                         f"valid {valid.shape}; compute them with runtime.neighbors for the same set")
    if not np.issubdtype(idx.dtype, np.integer) or (n and (idx.min() < 0 or idx.max() >= n)):
        raise InputError(f"neighbour index must hold integer rows 0..{n - 1}")
    return np.ascontiguousarray(idx, np.int32), np.ascontiguousarray(valid, np.int32)


class LayersRefiner:
    """Runs ``nformer_layers.onnx`` (or its engine) through the Backend interface."""

    def __init__(self, backend: Backend, config: ModelConfig):
        missing = [name for name in INPUTS if name not in backend.input_names]
        if missing:
            raise InputError(f"the refinement network {getattr(backend, 'path', '')} has no input(s) "
                             f"{', '.join(missing)}: expected nformer_layers.onnx; re-run the export")
        self.backend = backend
        self.config = config

    def landmarks_for(self, n: int, seed: int = 0) -> np.ndarray:
        return sample_landmarks(n, self.config.n_layer, self.config.landmarks, seed)

    def refine(self, features, neighbor_index, neighbor_valid, landmarks=None, seed: int = 0,
               normalize_output: bool = True, normalized_input: bool = False) -> np.ndarray:
        """Features [N, D] and their lists [N, k_eff] -> refined embeddings [N, D].

        ``normalized_input``: the features are already the L2-normalised float32 rows the lists
        were computed from (skips a second normalisation that could change the last bit).
        """
        x = validate_features(features, self.config.n_embd)
        if not normalized_input:
            x = l2_normalize(x)
        n = len(x)
        idx, valid = validate_neighbor_lists(neighbor_index, neighbor_valid, n, self.config.topk)
        lm = self.landmarks_for(n, seed) if landmarks is None else validate_landmarks(landmarks, n, self.config.n_layer)
        out = self.backend.run({"features": np.ascontiguousarray(x[None]), "landmarks": lm,
                                "neighbor_index": idx[None], "neighbor_valid": valid[None]})["refined"][0]
        return l2_normalize(out) if normalize_output else out
