"""``Pipeline``: the exported files of one model directory, ready to embed and refine.

``Pipeline.load("build/")`` reads the manifest (the interface written by ``export.to_onnx``) and
opens each network on the best backend available: a TensorRT engine listed in the manifest when
it is usable here, else ONNX Runtime (CUDA, then CPU).  With ``backend="auto"`` every reason a
listed engine is not used -- its build record does not match, TensorRT or pycuda is missing, the
plugin library does not load, TensorRT refuses to deserialise it -- is logged (``logging``, logger
``runtime.pipeline``) and kept in ``pipe.backend_choice``, and that network runs on ONNX Runtime;
``backend="tensorrt"`` turns the same reasons into one error.  ``dynamic_batching=True`` routes
``embed`` through ``runtime.batching`` (many producer threads, batched encoder calls);
``gallery()`` gives a ``runtime.gallery.Gallery`` bound to the refinement.  ``refine`` takes the
faster exact path by itself (``set_refine_path``: on ONNX Runtime's CPU provider the lists of
``runtime.neighbors`` and then ``nformer_layers.onnx``), logged and kept in ``refine_path``.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from export.contract.errors import InputError, NFormerError, as_path, check_count
from export.contract.manifest import load_manifest, model_config
from export.contract.ops import OP_TYPE
from export.contract.variants import CPU_PRECISIONS, PRECISIONS, VARIANTS_KEY, variant_name

from runtime.backends import Backend, OnnxRuntimeBackend, session_threads
from runtime.encoder import EncoderRunner
from runtime.refiner import Refiner

BACKENDS = ("auto", "onnxruntime", "tensorrt")

log = logging.getLogger(__name__)


def open_network(model_dir: Path, manifest: dict, network: str, backend: str = "auto", providers=None,
                 threads=None, dynamic_shapes: bool = False, precision: str | None = None) -> tuple[Backend, list[str]]:
    """``network`` ("encoder", "nformer", "nformer_layers") on ``backend``; with "auto", a usable
    TensorRT engine from the manifest (of ``precision`` if given), else ONNX Runtime.  Returns the
    backend and the reasons engines were passed over (empty when the manifest lists none)."""
    opened, notes, _ = choose_backend(model_dir, manifest, network, backend, providers, threads, dynamic_shapes,
                                      precision)
    return opened, notes


def choose_backend(model_dir: Path, manifest: dict, network: str, backend: str = "auto", providers=None,
                   threads=None, dynamic_shapes: bool = False, precision: str | None = None
                   ) -> tuple[Backend, list[str], dict]:
    """:func:`open_network` plus what was chosen and why: ``{"backend": "tensorrt" | "onnxruntime",
    "engine": engine file | None, "reason": why ONNX Runtime | None}``.

    "auto" falls back to ONNX Runtime, logging the reason, when no listed engine passes
    ``check_engine`` here or the chosen one does not open (:class:`EngineUnusable`: TensorRT, pycuda
    or a GPU missing, plugin library not loadable, deserialisation refused; or ImportError);
    "tensorrt" raises instead (InputError when no engine is usable, EngineUnusable when it does not open).
    """
    if backend not in BACKENDS:
        raise InputError(f"backend must be one of {', '.join(BACKENDS)}, found {backend!r}")
    if precision is not None and precision not in PRECISIONS:
        raise InputError(f"precision must be one of {', '.join(PRECISIONS)} (or None: the best available), found "
                         f"{precision!r}")
    notes: list[str] = []
    reason = "backend='onnxruntime' was asked for"
    if precision in CPU_PRECISIONS:
        # a file for ONNX Runtime on x86 CPUs (uint8 activations): TensorRT has no engine of it
        if backend == "tensorrt":
            raise InputError(f"precision {precision!r} is an ONNX Runtime file for x86 CPUs, which TensorRT cannot "
                             "build; use backend='onnxruntime' (or 'auto'), or precision='int8' for TensorRT's INT8")
        reason = f"precision {precision!r} was asked for (an ONNX Runtime file for x86 CPUs)"
    elif backend != "onnxruntime":
        from runtime.tensorrt.backend import TensorRTBackend, find_engine, listed_engines
        from runtime.tensorrt.lib import EngineUnusable

        entry, notes = find_engine(manifest, model_dir, network, precision) if listed_engines(manifest) else (None, [])
        notes = list(notes)
        if entry is not None:
            path = model_dir / entry["path"]
            try:
                opened = TensorRTBackend(path, precision=entry.get("precision", "fp32"))
            except (EngineUnusable, ImportError) as err:
                if backend == "tensorrt":
                    raise EngineUnusable(f"the TensorRT engine {entry['path']} for {network} cannot be used here: "
                                         f"{err}") from err
                notes.append(f"{entry['path']}: {err}")
            else:
                return opened, notes, {"backend": "tensorrt", "engine": entry["path"], "reason": None}
        if backend == "tensorrt":
            why = "; ".join(notes) or "the manifest lists no TensorRT engine for it (build one first)"
            raise InputError(f"no usable TensorRT engine for {network} in {model_dir}: {why}")
        if notes:
            reason = "no listed TensorRT engine is usable here: " + "; ".join(notes)
        else:
            reason = f"the manifest lists no TensorRT engine for {network}"
    engine_precision = precision not in (None, "fp32") and precision not in CPU_PRECISIONS
    if engine_precision:
        # a precision was asked for that only an engine gives: the fp32 file runs, and the log says so loudly
        reason += (f"; precision {precision!r} needs a TensorRT engine, so the fp32 file runs"
                   + (" (on a CPU, precision 'int8-cpu' is the INT8 file for ONNX Runtime)"
                      if network == "encoder" and precision == "int8" else ""))
    if engine_precision or notes:
        log.warning("%s: using ONNX Runtime, %s", network, reason)
    elif backend == "auto" and precision not in CPU_PRECISIONS:
        log.info("%s: using ONNX Runtime, %s", network, reason)
    files = manifest["files"]
    if network not in files:
        raise InputError(f"{model_dir} has no {network} file in its manifest: re-run the export with this "
                         "version of nformer-trt")
    path, label = files[network]["path"], "fp32"
    if precision in CPU_PRECISIONS:  # its variant file (TensorRT precisions choose engines above)
        entry = manifest.get(VARIANTS_KEY, {}).get(variant_name(network, precision))
        if entry is None:
            raise InputError(f"{model_dir} lists no {variant_name(network, precision)} file (or it no longer matches "
                             f"its checksum); write it with `runtime build {model_dir} --precision {precision} "
                             "--calib-data DIR`")
        path, label = entry["path"], precision
    opened = OnnxRuntimeBackend(model_dir / path, providers, threads, precision=label, dynamic_shapes=dynamic_shapes)
    try:
        _check_file_interface(opened, manifest, network, model_dir / path)
    except BaseException:
        _close_backend(opened)
        raise
    return opened, notes, {"backend": "onnxruntime", "engine": None, "reason": reason}


def _check_file_interface(opened, manifest: dict, network: str, path: Path) -> None:
    """The file the manifest names must be the network the model section describes: its inputs and
    outputs (an entry swapped with another network's, or a model section edited after the export,
    would otherwise fail deep inside ONNX Runtime or, for topk, compute other lists than the file);
    for ``nformer``, the k of its neighbour node too."""
    from export.contract.manifest import interface_mismatch, network_interface

    want = network_interface(manifest["model"], network)
    if want is None:
        return
    problem = interface_mismatch(want, opened.interface())
    if problem is None and network == "nformer":
        found = _custom_op_k(path)
        if found is not None and found != manifest["model"]["topk"]:
            problem = f"its {OP_TYPE} node has k = {found}, the manifest's topk is {manifest['model']['topk']}"
    if problem:
        raise InputError(f"{path} is not the {network} network that the manifest beside it describes: {problem}; "
                         "the manifest or the file was changed after the export: re-export it")


def _custom_op_k(path: Path) -> int | None:
    """The ``k`` attribute of the file's reciprocal-neighbour node (None when it has none)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    for node in model.graph.node:
        if node.op_type == OP_TYPE:
            for attr in node.attribute:
                if attr.name == "k":
                    return int(attr.i)
    return None


def _close_backend(backend) -> None:
    close = getattr(backend, "close", None)
    if close:
        try:
            close()
        except NFormerError as err:  # a backend still in use elsewhere: it says so; nothing to undo here
            log.warning("closing %s: %s", getattr(backend, "path", backend), err)


class Pipeline:
    def __init__(self, model_dir: Path, manifest: dict, encoder: EncoderRunner, refiner: Refiner):
        self.model_dir = model_dir
        self.manifest = manifest
        self.config = model_config(manifest)
        self.encoder = encoder
        self.refiner = refiner
        self.backend = "auto"
        self.providers = None
        self.threads = None
        self.notes: list[str] = []          # why listed TensorRT engines were not used
        #: per network: {"backend": "tensorrt" | "onnxruntime", "engine": file | None, "reason": str | None}
        self.backend_choice: dict[str, dict] = {}
        self.batcher = None                 # runtime.batching.DynamicBatcher when enabled
        self._layers = None
        #: how refine() runs: "one-shot" (nformer.onnx) or "lists+layers" (set_refine_path)
        self.refine_path = "one-shot"

    @classmethod
    def load(cls, model_dir: str | Path, batch_size: int = 32, providers: list[str] | None = None,
             threads: int | None = None, backend: str = "auto", dynamic_batching: bool = False,
             max_batch: int | None = None, max_wait_ms: float = 2.0, precision: str | None = None) -> "Pipeline":
        """``backend``: "auto" (TensorRT engines from the manifest where usable, else ONNX Runtime),
        "onnxruntime" or "tensorrt" (an error when no engine is usable); ``precision`` picks the
        encoder engine's precision (default: fp16, then fp32, then int8), or ``"int8-cpu"`` the
        encoder file for ONNX Runtime on x86 CPUs (never chosen unless asked for: INT8 moves
        the embeddings).  ``dynamic_batching``:
        group concurrent ``embed`` calls into batches of up to ``max_batch`` (default
        ``batch_size``) rows, waiting at most ``max_wait_ms`` for a batch to fill."""
        from runtime.batching import DynamicBatcher

        check_count(batch_size, "batch_size")           # before any session or engine is opened
        session_threads(threads)
        if not isinstance(dynamic_batching, (bool, np.bool_)):
            raise InputError(f"dynamic_batching must be True or False, found {dynamic_batching!r}")
        if dynamic_batching:
            DynamicBatcher.check_options(batch_size if max_batch is None else max_batch, max_wait_ms)
        model_dir = as_path(model_dir, "the model directory")
        manifest = load_manifest(model_dir)
        config = model_config(manifest)
        enc, notes, enc_choice = choose_backend(model_dir, manifest, "encoder", backend, providers, threads,
                                                precision=precision)
        try:
            ref, more, ref_choice = choose_backend(model_dir, manifest, "nformer", backend, providers, threads,
                                                   dynamic_shapes=True,
                                                   precision="fp32" if precision == "fp32" else None)
            pipe = cls(model_dir, manifest, EncoderRunner(enc, config, batch_size), Refiner(ref, config))
        except BaseException:
            _close_backend(enc)  # the encoder's engine and device memory are not left behind
            raise
        pipe.backend, pipe.providers, pipe.threads, pipe.notes = backend, providers, threads, notes + more
        pipe.backend_choice = {"encoder": enc_choice, "nformer": ref_choice}
        pipe.set_refine_path("auto")
        if dynamic_batching:
            pipe.enable_dynamic_batching(batch_size if max_batch is None else max_batch, max_wait_ms)
        return pipe

    @property
    def encoder_precision(self) -> str:
        """The precision the encoder runs at ("fp32", "fp16", "int8" or "int8-cpu"): what galleries
        and open-set thresholds record, since each precision moves the embeddings a little."""
        return getattr(self.encoder.backend, "precision", None) or "fp32"

    @property
    def backend_names(self) -> dict[str, str]:
        names = {"encoder": self.encoder.backend.name, "nformer": self.refiner.backend.name}
        if self._layers is not None:
            names["nformer_layers"] = self._layers.backend.name
        return names

    def enable_dynamic_batching(self, max_batch: int | None = None, max_wait_ms: float = 2.0):
        """Route ``embed`` through a DynamicBatcher (returned); safe to call embed from many threads."""
        from runtime.batching import DynamicBatcher

        if self.batcher is not None:
            self.batcher.close()
        self.batcher = DynamicBatcher(self.encoder.embed_images,
                                      self.encoder.batch_size if max_batch is None else max_batch, max_wait_ms)
        return self.batcher

    def embed(self, crops, progress=None) -> np.ndarray:
        """Crops (paths, PIL images or HxWx3 uint8 arrays) -> raw encoder embeddings [N, 256].

        With dynamic batching on, crops are preprocessed in the calling thread and the encoder call
        is shared with other threads' requests."""
        from runtime.encoder import as_crop_list, check_progress

        crops = as_crop_list(crops)
        check_progress(progress)
        if self.batcher is None:
            return self.encoder.embed(crops, progress)
        from export.contract.preprocess import preprocess_batch

        c = self.config
        out = np.zeros((len(crops), c.feature_dim), np.float32)
        step = self.batcher.max_batch
        for s in range(0, len(crops), step):
            chunk = crops[s:s + step]
            images = preprocess_batch(chunk, c.input_size_hw, c.pixel_mean, c.pixel_std, first=s)
            out[s:s + len(chunk)] = self.batcher(images)
            if progress:
                progress(len(chunk))
        return out

    def embed_images(self, images) -> np.ndarray:
        """Preprocessed images float32 [B, 3, H, W] (``export.contract.preprocess``) -> raw encoder
        embeddings [B, feature_dim]: the encoder's batches, or the dynamic batcher's when it is on."""
        if self.batcher is None:
            return self.encoder.embed_images(images)
        h, w = self.config.input_size_hw
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[1:] != (3, h, w):
            raise InputError(f"images must be [batch, 3, {h}, {w}], found {images.shape}; use "
                             "export.contract.preprocess to prepare crops")
        step = self.batcher.max_batch
        out = np.zeros((len(images), self.config.feature_dim), np.float32)
        for s in range(0, len(images), step):
            out[s:s + step] = self.batcher(np.ascontiguousarray(images[s:s + step], dtype=np.float32))
        return out

    @property
    def layers_refiner(self):
        """The refinement with neighbour lists as inputs (``nformer_layers``), opened on first use."""
        if self._layers is None:
            from runtime.refiner import LayersRefiner

            # engines of nformer_layers are optional: with backend="tensorrt" a missing one falls back
            # to ONNX Runtime (the reason lands in self.notes) rather than refusing the gallery
            backend, notes, choice = choose_backend(self.model_dir, self.manifest, "nformer_layers",
                                                    "auto" if self.backend == "tensorrt" else self.backend,
                                                    self.providers, self.threads, dynamic_shapes=True)
            self.notes += notes
            self.backend_choice["nformer_layers"] = choice
            self._layers = LayersRefiner(backend, self.config)
        return self._layers

    def gallery(self, path=None, seed: int = 0, reserve: int | None = None, allow_model_mismatch: bool = False):
        """A new empty Gallery (``path`` None) or the one saved at ``path``, bound to this model's
        refinement.  ``seed``: landmark draw of a new gallery (a loaded one keeps its own)."""
        from runtime.gallery import Gallery, model_identity
        from runtime.neighbors import DEFAULT_RESERVE

        ident = model_identity(self.manifest, self.config, encoder_precision=self.encoder_precision)
        if path is None:
            return Gallery(self.config, self.layers_refiner, seed=seed,
                           reserve=DEFAULT_RESERVE if reserve is None else reserve, model=ident)
        return Gallery.load(path, self.config, self.layers_refiner, model=ident,
                            allow_model_mismatch=allow_model_mismatch)

    def close(self) -> None:
        """Stop the batcher (queued requests finish) and release engines."""
        if self.batcher is not None:
            self.batcher.close()
        for runner in (self.encoder, self.refiner, self._layers):
            close = getattr(getattr(runner, "backend", None), "close", None)
            if close:
                close()

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def set_refine_path(self, path: str = "auto") -> str:
        """How :meth:`refine` runs: "one-shot" (``nformer.onnx``), "lists+layers" (the exact lists of
        ``runtime.neighbors``, then ``nformer_layers.onnx``: identical lists, the same refined rows
        within float32 rounding) or "auto", the faster of the two here (``runtime.refiner.
        choose_refine_path``: "lists+layers" on ONNX Runtime's CPU provider).  The choice is logged
        and kept in ``refine_path`` and ``backend_choice["refine"]``."""
        from runtime.refiner import REFINE_PATHS, choose_refine_path

        if path == "auto":
            path, reason = choose_refine_path(self.refiner.backend, self.manifest)
        elif path in REFINE_PATHS:
            reason = f"refine path {path!r} was asked for"
            if path == "lists+layers" and "nformer_layers" not in self.manifest["files"]:
                raise InputError(f"{self.model_dir} has no nformer_layers file in its manifest: re-run the export "
                                 "with this version of nformer-trt, or use the 'one-shot' path")
        else:
            raise InputError(f"refine path must be one of auto, {', '.join(REFINE_PATHS)}, found {path!r}")
        self.refine_path = path
        self.backend_choice["refine"] = {"path": path, "reason": reason}
        log.info("refine: %s (%s)", path, reason)
        return path

    def refine(self, embeddings, landmarks=None, seed: int = 0, normalize_output: bool = True) -> np.ndarray:
        """Embeddings [N, D] -> refined [N, D] by :attr:`refine_path`."""
        if self.refine_path == "lists+layers":
            from runtime.refiner import ListsLayersRefiner

            return ListsLayersRefiner(self.layers_refiner).refine(embeddings, landmarks, seed, normalize_output)
        return self.refiner.refine(embeddings, landmarks, seed, normalize_output)
