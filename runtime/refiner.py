"""The refinement at serving time: a set of embeddings -> refined embeddings, in three forms.

* :class:`Refiner` runs ``nformer.onnx``, which computes the neighbour lists itself (the portable file).
* :class:`LayersRefiner` runs ``nformer_layers.onnx``, which takes the lists as inputs, for runtimes
  that keep the lists themselves (``runtime.gallery`` maintains them exactly with
  ``runtime.neighbors``, identical to ``export.reference.reciprocal_neighbors``).
* :class:`ListsLayersRefiner` is both steps for a whole set: ``runtime.neighbors``, then
  ``nformer_layers.onnx`` -- the faster path on a CPU (``choose_refine_path``).


Validates the set (width, rank, finite values, non-empty), L2-normalises it (the contract of
``nformer.onnx``), draws the landmarks with a seeded generator unless given, and L2-normalises the
output for retrieval unless asked for the raw ``refined`` tensor.
"""
from __future__ import annotations

import numpy as np

from export.contract.config import ModelConfig
from export.contract.neighbor_key import NORM_EPS
from export.contract.errors import InputError, as_array
from export.contract.landmarks import sample_landmarks

from runtime.backends import Backend
from runtime.neighbors import reciprocal_neighbors



def l2_normalize(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), NORM_EPS)).astype(np.float32)


def feature_limit(width: int) -> float:
    """The largest magnitude of an embedding value accepted: ``sqrt(float32 max / (4 * width))``.

    Rows are L2-normalised in float32, and the sum of ``width`` squares must stay finite: with
    every value at most this, it is at most a quarter of float32's largest value (room for the
    rounding of the sum), so no norm overflows to inf (which would turn every row into zeros and
    make all refined rows identical).  About 5.8e17 for 256-d, 8.1e17 for 128-d; real encoder
    embeddings are many orders of magnitude smaller."""
    return float(np.sqrt(np.finfo(np.float32).max / (4.0 * width)))


def validate_features(features, width: int) -> np.ndarray:
    """[N, width] (or [1, N, width]) finite floats, each at most :func:`feature_limit` in
    magnitude -> float32 [N, width]."""
    x = as_array(features, "embeddings")
    if x.ndim == 3 and x.shape[0] == 1:
        x = x[0]
    if x.ndim != 2:
        raise InputError(f"embeddings must be a 2-D array [N, {width}], found shape {x.shape}")
    if x.shape[1] != width:
        raise InputError(f"embeddings must be {width} wide (the model's n_embd), found [N={x.shape[0]}, "
                         f"{x.shape[1]}]; were they made by this model's encoder?")
    if x.shape[0] == 0:
        raise InputError("the set of embeddings is empty: refinement needs at least one row")
    if not np.issubdtype(x.dtype, np.floating):
        raise InputError(f"embeddings must be floating point, found dtype {x.dtype}")
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        rows = np.flatnonzero(bad)
        raise InputError(f"embeddings contain NaN or infinite values in {len(rows)} row(s), first rows "
                         f"{rows[:5].tolist()}; drop or recompute them")
    limit = feature_limit(width)
    big = np.abs(x).max(axis=1) > limit
    if big.any():
        rows = np.flatnonzero(big)
        raise InputError(f"embeddings hold values beyond +-{limit:.3g} in {len(rows)} row(s), first rows "
                         f"{rows[:5].tolist()} (largest {float(np.abs(x).max()):.3g}): their float32 norm would "
                         "overflow; these are not encoder embeddings (rescale them, or recompute them)")
    return x.astype(np.float32, copy=False)


def validate_landmarks(landmarks, n: int, n_layer: int) -> np.ndarray:
    lm = as_array(landmarks, "landmarks")
    if lm.ndim != 2 or lm.shape[0] != n_layer or lm.shape[1] < 1:
        raise InputError(f"landmarks must be [n_layer={n_layer}, l] with l >= 1, found shape {lm.shape}")
    if not np.issubdtype(lm.dtype, np.integer):
        raise InputError(f"landmarks must be integer row indices, found dtype {lm.dtype}")
    if lm.shape[1] > n:
        raise InputError(f"{lm.shape[1]} landmarks per layer but only N={n} rows; use at most N")
    if lm.min() < 0 or lm.max() >= n:
        raise InputError(f"landmarks must index rows 0..{n - 1}, found values {lm.min()}..{lm.max()}")
    return lm.astype(np.int64)


class Refiner:
    def __init__(self, backend: Backend, config: ModelConfig):
        self.backend = backend
        self.config = config

    def landmarks_for(self, n: int, seed: int = 0) -> np.ndarray:
        return sample_landmarks(n, self.config.n_layer, self.config.landmarks, seed)

    def refine(self, features, landmarks=None, seed: int = 0, normalize_output: bool = True) -> np.ndarray:
        """Encoder embeddings [N, D] -> refined embeddings [N, D] (L2-normalised unless told not to)."""
        x = l2_normalize(validate_features(features, self.config.n_embd))
        n = len(x)
        lm = self.landmarks_for(n, seed) if landmarks is None else validate_landmarks(landmarks, n, self.config.n_layer)
        refined = self.backend.run({"features": x[None], "landmarks": lm})["refined"][0]
        return l2_normalize(refined) if normalize_output else refined


LAYERS_INPUTS = ("features", "landmarks", "neighbor_index", "neighbor_valid")


def validate_neighbor_lists(idx, valid, n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    k_eff = min(k, n)
    idx, valid = as_array(idx, "neighbour index"), as_array(valid, "neighbour validity")
    if idx.shape != (n, k_eff) or valid.shape != (n, k_eff):
        raise InputError(f"neighbour lists must be [N={n}, k_eff={k_eff}], found index {idx.shape} and "
                         f"valid {valid.shape}; compute them with runtime.neighbors for the same set")
    if not np.issubdtype(idx.dtype, np.integer) or (n and (idx.min() < 0 or idx.max() >= n)):
        raise InputError(f"neighbour index must hold integer rows 0..{n - 1}")
    return np.ascontiguousarray(idx, np.int32), np.ascontiguousarray(valid, np.int32)


class LayersRefiner:
    """Runs ``nformer_layers.onnx`` (or its engine) through the Backend interface."""

    def __init__(self, backend: Backend, config: ModelConfig):
        missing = [name for name in LAYERS_INPUTS if name not in backend.input_names]
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
        return self.run_prepared(x, neighbor_index, neighbor_valid, landmarks, seed, normalize_output)

    def run_prepared(self, x: np.ndarray, neighbor_index, neighbor_valid, landmarks, seed: int,
                     normalize_output: bool) -> np.ndarray:
        """:meth:`refine` of rows already validated and L2-normalised (float32 [N, D]), for callers
        that computed the lists from exactly these rows (:class:`ListsLayersRefiner`); the lists and
        landmarks are still checked."""
        n = len(x)
        idx, valid = validate_neighbor_lists(neighbor_index, neighbor_valid, n, self.config.topk)
        lm = self.landmarks_for(n, seed) if landmarks is None else validate_landmarks(landmarks, n, self.config.n_layer)
        out = self.backend.run({"features": np.ascontiguousarray(x[None]), "landmarks": lm,
                                "neighbor_index": idx[None], "neighbor_valid": valid[None]})["refined"][0]
        return l2_normalize(out) if normalize_output else out


#: how ``Pipeline.refine`` computes the refinement: ``nformer.onnx`` in one call, or the exact lists
#: from ``runtime.neighbors`` and then ``nformer_layers.onnx``
REFINE_PATHS = ("one-shot", "lists+layers")


class ListsLayersRefiner:
    """The refinement in two steps: the exact lists of ``runtime.neighbors`` (the numpy form of the
    contract, identical to the lists inside ``nformer.onnx``), then ``nformer_layers.onnx``.

    Same interface and results as :class:`Refiner` on ``nformer.onnx``: identical lists, refined
    rows within float32 rounding.  On ONNX Runtime's CPU provider it is the faster path (the
    one-shot file ranks the pairs in float64 inside the graph; BENCHMARKS.md "CPU refinement")."""

    def __init__(self, layers: LayersRefiner):
        self.layers = layers
        self.backend = layers.backend
        self.config = layers.config

    def landmarks_for(self, n: int, seed: int = 0) -> np.ndarray:
        return self.layers.landmarks_for(n, seed)

    def refine(self, features, landmarks=None, seed: int = 0, normalize_output: bool = True) -> np.ndarray:
        """Encoder embeddings [N, D] -> refined embeddings [N, D] (L2-normalised unless told not to)."""
        x = l2_normalize(validate_features(features, self.config.n_embd))
        if landmarks is not None:
            landmarks = validate_landmarks(landmarks, len(x), self.config.n_layer)
        idx, valid = reciprocal_neighbors(x, self.config.topk)
        return self.layers.run_prepared(x, idx, valid, landmarks, seed, normalize_output)


def choose_refine_path(nformer_backend, manifest: dict) -> tuple[str, str]:
    """``(path, reason)`` for :data:`REFINE_PATHS`: "lists+layers" where ``nformer.onnx`` would run
    on ONNX Runtime's CPU provider and the export wrote ``nformer_layers.onnx``, else "one-shot"
    (TensorRT's plugin and CUDA rank on the GPU, faster than the numpy neighbour step)."""
    providers = list(getattr(nformer_backend, "providers", None) or [])
    if getattr(nformer_backend, "name", "") != "onnxruntime" or not providers:
        return "one-shot", f"nformer.onnx runs on {getattr(nformer_backend, 'name', 'another backend')}"
    if providers[0] != "CPUExecutionProvider":
        return "one-shot", f"nformer.onnx runs on ONNX Runtime's {providers[0]}"
    if "nformer_layers" not in manifest.get("files", {}):
        return "one-shot", "the export has no nformer_layers.onnx (re-export to get the faster CPU path)"
    return "lists+layers", ("ONNX Runtime on the CPU: runtime.neighbors' exact lists + nformer_layers.onnx are "
                            "faster than nformer.onnx's float64 ranking, with identical lists")
