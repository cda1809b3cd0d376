"""``runtime serve``: the re-identification service behind a real Triton Inference Server (PyTriton).

Place in the flow: the outermost layer of ``runtime/``.  PyTriton starts the ``tritonserver``
binary it bundles; each Triton model below is a Python-backend stub that hands requests to this
process, where ``ReidService`` answers them with the project's runtime.  The model names, inputs
and outputs are the interface (README "Serve"):

================  ======================================================  =============================================
model             inputs                                                  outputs
================  ======================================================  =============================================
embed             crops BYTES [-1, 1] (encoded JPEG/PNG; batched)         embeddings FP32 [-1, D]
encoder           images FP32 [-1, 3, H, W] (preprocessed; batched)       embeddings FP32 [-1, D]
gallery_add       embeddings FP32 [-1, D], ids BYTES [-1],                count INT64 [1] (gallery size once durable)
                  camids INT64 [-1], timestamps FP64 [-1] (optional)
gallery_remove    ids BYTES [-1]                                          count INT64 [1]
gallery_search    embeddings FP32 [-1, D], camids INT64 [-1],             ids BYTES [-1, topn], distances FP32
                  topn INT32 [1], mode BYTES [1] (optional)               [-1, topn], unknown BOOL [-1]
================  ======================================================  =============================================

``embed`` and ``encoder`` use Triton's dynamic batcher (``--max-batch``, ``--max-queue-delay-us``):
requests of many clients become one encoder batch; ``embed``'s ``crops`` therefore carry the batch
dimension, shape [-1, 1].  A refused request gets a Triton error carrying the project's
one-line reason (:class:`RequestRefused`), and the server keeps serving.  PyTriton answers a batch with one result
or one error, so a bad crop also fails the requests Triton batched with it (the message names the
request at fault); clients that share a server retry such a failure.

Each model has one instance: PyTriton's instances of one model initialise concurrently and race
for a handshake socket (seen here: the second instance's connect refused on a loaded machine),
and every model's work is serialised by the gallery or batched by Triton anyway.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import sys
import sysconfig
import threading
import time
from pathlib import Path

import numpy as np

from export.contract.errors import InputError
from export.contract.preprocess import preprocess_batch
from export.contract.files import scratch_dir

log = logging.getLogger(__name__)

MODELS = ("embed", "encoder", "gallery_add", "gallery_remove", "gallery_search")
#: PyTriton's default is 30 s: a stop then waits that long for idle HTTP keep-alive connections
EXIT_TIMEOUT_S = 5
#: seconds to wait, after the models are bound, for their Python backend stubs to be found
STUB_WAIT_S = 30


def interpreter_library_dir() -> str:
    """Where this interpreter's libpython lives (``sysconfig`` LIBDIR)."""
    return sysconfig.get_config_var("LIBDIR") or str(Path(sys.base_prefix) / "lib")


def stub_environment(env: dict | None = None) -> dict:
    """``env`` with this interpreter's library directory first on LD_LIBRARY_PATH.

    PyTriton's Python-backend stub links libpython dynamically; without this the loader may take
    the system's libpython of the same minor version (seen: Debian's 3.11.2 under a 3.11.7 venv),
    and the stub fails with ``'_thread.RLock' object has no attribute '_recursion_count'``."""
    env = dict(os.environ if env is None else env)
    first = interpreter_library_dir()
    rest = [p for p in env.get("LD_LIBRARY_PATH", "").split(":") if p and p != first]
    env["LD_LIBRARY_PATH"] = ":".join([first] + rest)
    return env


def check_ports(host: str, ports: dict) -> None:
    """InputError naming the first port that cannot be bound on ``host`` (another server holds it):
    tritonserver would otherwise only log it, and PyTriton would talk to whatever answers there."""
    import ipaddress
    import socket

    try:
        if ipaddress.ip_address(host.strip("[]")).version == 6:
            raise InputError(f"--host {host!r} is an IPv6 address, which PyTriton's clients cannot address; give an "
                             "IPv4 address (127.0.0.1 for this machine only, 0.0.0.0 for every interface) or a host name")
    except ValueError:
        pass                                            # a host name (or an IPv4 address): checked below
    for option, port in ports.items():
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as err:
            raise InputError(f"--host {host!r} is not an address here ({err}); give an address such as 127.0.0.1") \
                from None
        family, _, _, _, address = infos[0]
        if family == socket.AF_INET6:                # a host name that resolves to IPv6 first (ip6-localhost)
            raise InputError(f"--host {host!r} resolves to the IPv6 address {address[0]}, which PyTriton's clients "
                             "cannot address; give an IPv4 address (127.0.0.1, 0.0.0.0) or a name that resolves to one")
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as err:
                if err.errno == errno.EADDRNOTAVAIL:
                    raise InputError(f"--host {host} is not an address of this machine ({err.strerror}); give one of "
                                     "its addresses, 127.0.0.1, or 0.0.0.0 for every interface") from None
                raise InputError(f"{option} {port} on {host} is not free ({err.strerror or err}): another server "
                                 "listens there; stop it or choose other ports") from None


def stub_processes(root: int | None = None) -> dict[int, tuple[str, bytes]]:
    """The Python backend stub processes (one per served model) below process ``root`` (default:
    this one): ``{pid: (model, command line)}``; read from /proc (PyTriton runs on Linux only)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    found, todo = {}, [root or os.getpid()]
    while todo:
        for pid in children.get(todo.pop(), []):
            todo.append(pid)
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"triton_python_backend_stub" in cmd:
                model = next((m for m in sorted(MODELS, key=len, reverse=True) if f"/{m}/".encode() in cmd
                              or f"{m}_".encode() in cmd), "?")
                found[pid] = (model, cmd)
    return found


def dead_stub(stubs: dict[int, tuple[str, bytes]]) -> str | None:
    """The first of ``stubs`` (from :func:`stub_processes`) that is gone or a zombie, as "model (pid N)"."""
    for pid, (model, cmd) in stubs.items():
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes() == cmd:     # a zombie's is empty; a reused pid's differs
                continue
        except OSError:
            pass
        return f"{model} (pid {pid})"
    return None


def import_pytriton():
    try:
        from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
        from pytriton.triton import Triton, TritonConfig
    except ImportError as err:
        raise InputError(f"runtime serve needs PyTriton ({err}); install the serve extra: "
                         "pip install 'nformer-trt[serve]'") from None
    return Triton, TritonConfig, ModelConfig, Tensor, DynamicBatcher


def _scalar_text(value, name: str) -> str:
    arr = np.asarray(value, dtype=object).reshape(-1)
    if len(arr) != 1:
        raise InputError(f"{name} must hold one value, found {len(arr)}")
    item = arr[0]
    if isinstance(item, (bytes, np.bytes_)):
        try:
            return bytes(item).decode("utf-8")
        except UnicodeDecodeError:
            raise InputError(f"{name} must be UTF-8 text") from None
    return str(item)


class RequestRefused(InputError):
    """A bad request, as its Triton error: the one-line reason without a server-side traceback.

    PyTriton formats an infer function's exception with ``traceback.format_exception``, which
    would show the client every frame (and this server's file paths); this exception has none."""

    @property
    def __traceback__(self):
        return None

    @__traceback__.setter
    def __traceback__(self, value):
        pass


def _refusing(infer):
    """``infer`` with every project error turned into :class:`RequestRefused`."""
    def wrapped(requests):
        try:
            return infer(requests)
        except InputError as err:
            raise RequestRefused(str(err)) from None
    return wrapped


def _per_request(handler):
    """An infer function answering each request with ``handler(request)``."""
    return _refusing(lambda requests: [handler(r) for r in requests])


def _finite(embeddings: np.ndarray, model: str, sizes: list[int]) -> np.ndarray:
    """The encoder's output for requests of ``sizes`` rows batched together, or an InputError naming
    the first request with a row that is not finite (pixels far outside the normalised range overflow
    inside the network: 3e38 gave all-NaN embeddings and a success)."""
    bad = ~np.isfinite(embeddings).all(axis=1)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        request = int(np.searchsorted(np.cumsum(sizes), first, side="right"))
        where = f" (request {request + 1} of the {len(sizes)} batched together)" if len(sizes) > 1 else ""
        raise InputError(f"{model}: the encoder's embeddings of {int(bad.sum())} image(s){where} are not finite; the "
                         "pixels are far outside the preprocessed range (normalised with the model's mean/std, about "
                         "-3..3): send preprocessed crops")
    return embeddings


def bind_models(triton, service, max_batch: int = 32, max_queue_delay_us: int = 2000) -> None:
    """Bind the five models of ``service`` to a PyTriton ``Triton``."""
    _, _, ModelConfig, Tensor, DynamicBatcher = import_pytriton()
    d = service.width
    c = service.pipe.config
    h, w = c.input_size_hw

    def embed(requests):
        # each request's crops are preprocessed as soon as they are decoded: a batch then holds
        # [n, 3, H, W] arrays rather than full-size images (the per-request pixel cap bounded one
        # request, not the batch: 8 requests of one 7000 x 7000 crop took the server to 1.5 GB)
        sizes, parts = [], []
        for n, r in enumerate(requests):
            try:
                parts.append(preprocess_batch(service.decode(r["crops"]), c.input_size_hw, c.pixel_mean, c.pixel_std))
            except InputError as err:
                raise InputError(f"request {n + 1} of the {len(requests)} batched together: {err}") \
                    if len(requests) > 1 else err from None
            sizes.append(len(parts[-1]))
        # the encoder's batches, as Pipeline.embed runs them (same batch_size, same order)
        out = _finite(service.pipe.embed_images(np.concatenate(parts)), "embed", sizes)
        return [{"embeddings": part} for part in np.split(out, np.cumsum(sizes)[:-1])]

    def encoder(requests):
        sizes = [len(r["images"]) for r in requests]
        for n, r in enumerate(requests):
            if not np.isfinite(r["images"]).all():
                raise InputError(f"encoder: images hold NaN or infinite values (request {n + 1} of the "
                                 f"{len(requests)} batched together); send preprocessed finite pixels")
        out = _finite(service.encode(np.concatenate([r["images"] for r in requests])), "encoder", sizes)
        return [{"embeddings": part} for part in np.split(out, np.cumsum(sizes)[:-1])]

    def gallery_add(request):
        count = service.add(request["embeddings"], request["ids"], request["camids"], request["timestamps"] if "timestamps" in request else None)
        return {"count": np.array([count], np.int64)}

    def gallery_remove(request):
        return {"count": np.array([service.remove(request["ids"])], np.int64)}

    def gallery_search(request):
        topn = np.asarray(request["topn"]).reshape(-1)
        if len(topn) != 1:
            raise InputError(f"topn must hold one value, found {len(topn)}")
        mode = _scalar_text(request["mode"], "mode") if "mode" in request else "refined"
        ids, dist, unknown = service.search(request["embeddings"], request["camids"], int(topn[0]), mode)
        return {"ids": ids.astype(np.bytes_), "distances": dist, "unknown": unknown}

    unbatched = ModelConfig(batching=False)
    batched = ModelConfig(max_batch_size=max_batch,
                          batcher=DynamicBatcher(max_queue_delay_microseconds=max_queue_delay_us))
    triton.bind("embed", _refusing(embed),
                inputs=[Tensor(name="crops", dtype=np.bytes_, shape=(1,))],
                outputs=[Tensor(name="embeddings", dtype=np.float32, shape=(d,))], config=batched)
    triton.bind("encoder", _refusing(encoder),
                inputs=[Tensor(name="images", dtype=np.float32, shape=(3, h, w))],
                outputs=[Tensor(name="embeddings", dtype=np.float32, shape=(d,))], config=batched)
    triton.bind("gallery_add", _per_request(gallery_add),
                inputs=[Tensor(name="embeddings", dtype=np.float32, shape=(-1, d)),
                        Tensor(name="ids", dtype=np.bytes_, shape=(-1,)),
                        Tensor(name="camids", dtype=np.int64, shape=(-1,)),
                        Tensor(name="timestamps", dtype=np.float64, shape=(-1,), optional=True)],
                outputs=[Tensor(name="count", dtype=np.int64, shape=(1,))], config=unbatched)
    triton.bind("gallery_remove", _per_request(gallery_remove),
                inputs=[Tensor(name="ids", dtype=np.bytes_, shape=(-1,))],
                outputs=[Tensor(name="count", dtype=np.int64, shape=(1,))], config=unbatched)
    triton.bind("gallery_search", _per_request(gallery_search),
                inputs=[Tensor(name="embeddings", dtype=np.float32, shape=(-1, d)),
                        Tensor(name="camids", dtype=np.int64, shape=(-1,)),
                        Tensor(name="topn", dtype=np.int32, shape=(1,)),
                        Tensor(name="mode", dtype=np.bytes_, shape=(1,), optional=True)],
                outputs=[Tensor(name="ids", dtype=np.bytes_, shape=(-1, -1)),
                         Tensor(name="distances", dtype=np.float32, shape=(-1, -1)),
                         Tensor(name="unknown", dtype=np.bool_, shape=(-1,))], config=unbatched)


def open_service(model_dir, gallery_dir, *, max_batch: int = 32, max_queue_delay_us: int = 2000,
                 max_items: int | None = None, ttl_seconds: float | None = None,
                 unknown_distance: float | None = None, backend: str = "auto", threads: int | None = None,
                 precision: str | None = None):
    """The ``ReidService`` that ``serve`` runs: pipeline with dynamic batching, durable gallery,
    thresholds (``unknown_distance`` overrides the stored ones for both modes)."""
    from runtime.pipeline import Pipeline
    from runtime.serving.gallery_store import GalleryStore
    from runtime.serving.open_set import MODES, load_thresholds
    from runtime.serving.service import ReidService

    pipe = Pipeline.load(model_dir, batch_size=max_batch, backend=backend, threads=threads, precision=precision)
    try:
        if unknown_distance is not None:
            if not (np.isfinite(unknown_distance) and unknown_distance >= 0):
                raise InputError(f"--unknown-distance must be a distance >= 0, found {unknown_distance}")
            thresholds = {m: float(unknown_distance) for m in MODES}
        else:
            thresholds = load_thresholds(model_dir, pipe.manifest, encoder_precision=pipe.encoder_precision)
        store = GalleryStore(gallery_dir, pipe, max_items=max_items, ttl_seconds=ttl_seconds)
    except BaseException:
        pipe.close()
        raise
    return ReidService(pipe, store, thresholds, max_request=max_batch * 64)


def serve(model_dir, gallery_dir=None, *, host: str = "127.0.0.1", http_port: int = 8000, grpc_port: int = 8001,
          metrics_port: int = 8002, max_batch: int = 32, max_queue_delay_us: int = 2000,
          max_items: int | None = None, ttl_seconds: float | None = None, unknown_distance: float | None = None,
          backend: str = "auto", precision: str | None = None, log_fn=None,
          stop_event: threading.Event | None = None) -> None:
    """Serve until SIGINT/SIGTERM (or ``stop_event``), or until Triton or one of the models' Python
    backend stubs dies (the stubs below this process are watched: one server per process), then stop
    Triton and fold the gallery's journal into a snapshot.  ``gallery_dir`` None: a gallery in
    ``model_dir/gallery``."""
    Triton, TritonConfig, _, _, _ = import_pytriton()
    log_fn = log_fn or (lambda message: print(message, flush=True))
    os.environ.update(stub_environment())          # the stub inherits the server's environment
    gallery_dir = Path(gallery_dir) if gallery_dir is not None else Path(model_dir) / "gallery"
    check_ports(host, {"--http-port": http_port, "--grpc-port": grpc_port, "--metrics-port": metrics_port})
    service = open_service(model_dir, gallery_dir, max_batch=max_batch, max_queue_delay_us=max_queue_delay_us,
                           max_items=max_items, ttl_seconds=ttl_seconds, unknown_distance=unknown_distance,
                           backend=backend, precision=precision)
    stop = stop_event or threading.Event()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda *_: stop.set())
    scratch_held = contextlib.ExitStack()
    try:
        scratch = scratch_held.enter_context(scratch_dir("nformer-serve-"))   # PyTriton creates the workspace in it
        config = TritonConfig(http_address=host, http_port=http_port, grpc_address=host, grpc_port=grpc_port,
                              metrics_address=host, metrics_port=metrics_port, allow_metrics=True,
                              exit_timeout_secs=EXIT_TIMEOUT_S)
        triton = Triton(config=config, workspace=scratch / "workspace")
        triton.run()
        bind_models(triton, service, max_batch, max_queue_delay_us)
        choice = ", ".join(f"{k}: {v.get('backend') or v.get('path')}" for k, v in service.pipe.backend_choice.items())
        t = service.thresholds
        log_fn(f"serving {Path(model_dir)} on {host}: http {http_port}, grpc {grpc_port}, metrics {metrics_port} "
               f"({choice}; encoder precision {service.pipe.encoder_precision}); gallery {gallery_dir} with {len(service.store)} items"
               + (f", {service.store.replayed} journal records replayed" if service.store.replayed else ""))
        log_fn("open set: " + (f"unknown beyond distance {t['refined']:.4f} (refined), {t['encoder']:.4f} "
                               "(encoder)" if t["refined"] is not None else
                               "no threshold (fit one with `runtime threshold`, or pass --unknown-distance)"))
        # Triton reports a model ready even when its Python backend stub died (the OOM killer, a
        # signal): it then answers every request with an error; the service stops instead (gallery
        # saved), so that a supervisor restarts it.  The stubs are found before "ready" is said.
        stubs, look_until = stub_processes(), time.monotonic() + STUB_WAIT_S
        while len({m for m, _ in stubs.values()}) < len(MODELS) and time.monotonic() < look_until \
                and not stop.wait(0.2):
            stubs = stub_processes()
        if len({m for m, _ in stubs.values()}) < len(MODELS):
            log.warning("found the Python backend stubs of %s only: the others are not watched",
                        ", ".join(sorted({m for m, _ in stubs.values()})) or "no model")
        log_fn("ready")
        while not stop.wait(1.0):
            if not triton.is_alive():
                raise InputError("the Triton server stopped on its own; see its log above")
            dead = dead_stub(stubs)
            if dead:
                raise InputError(f"the Python backend stub of model {dead} stopped (killed by a signal or the OOM "
                                 "killer); that model cannot answer any more, so the service stops with its gallery "
                                 "saved: restart it (run it under a supervisor that does)")
    finally:
        # a second SIGINT/SIGTERM during the shutdown (timeout signals the whole group, an impatient
        # operator presses Ctrl-C again) must not kill the process before the gallery is saved: the
        # handlers stay on (they only set the event) until Triton is stopped and the store closed
        try:
            if "triton" in locals():
                triton.stop()
        finally:
            try:
                service.close()
                scratch_held.close()
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)
        log_fn(f"stopped; gallery {gallery_dir} saved with {len(service.store)} items")
