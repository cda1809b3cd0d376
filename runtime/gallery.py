"""The gallery: embeddings of known people, refined together and searched; saved atomically.

Place in the flow: the serving end of ``runtime/`` (no torch).  A video-analytics pipeline embeds
person crops (``Pipeline.embed``), adds them with ids, camera ids and metadata, and searches new
crops against them.  Search follows the original's protocol: the queries and the gallery are
refined as one set (``nformer_layers.onnx`` fed by neighbour lists that ``runtime.neighbors``
keeps exact incrementally: adding the queries costs O(N m d), not O(N^2 d)), then queries' refined
embeddings are ranked against the gallery's by Euclidean distance between L2-normalised vectors.
The queries leave the set afterwards; the gallery is unchanged.

On disk (``save``/``load``) a gallery is a directory::

    gallery/
      CURRENT              {"format": "nformer-trt/gallery", "format_version": 1, "version": "v000003"}
      v000003/
        gallery.json       ids, camera ids, metadata, model identity, seed, checksums of the arrays
                           and of its own contents (content_sha256, model_sha256)
        embeddings.npy     float32 [N, D] raw embeddings as added
        features.npy       float32 [N, D] the L2-normalised rows the neighbour lists rank
        neighbors.npz      the lists (loading needs no O(N^2) scan)
        refined.npy        float32 [N, D] refined embeddings, when they were computed

A save writes a new version directory under a temporary name, renames it into place and then
replaces ``CURRENT`` (an atomic rename), so a crash or an exception at any point leaves the
previous save readable; older versions are deleted only after the switch.

Concurrent saves and loads of one directory (threads or processes) are serialised by ``flock`` on
the gallery directory itself: a save holds it exclusively from reading ``CURRENT`` to deleting the
old versions, a load holds it shared while it reads, so a load sees the last complete save and
saves never trip over each other's temporary directories.

Loading trusts nothing: ``gallery.json`` is checked against its own checksums (a missing checksum
is an error, not a skip) and its schema, the arrays against theirs, and the model identity (the
encoder file's sha256, the checkpoint's, the input size, the preprocessing mean/std and the
embedding width) against the model it is opened with.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
import shutil
import stat
import threading
from collections.abc import Mapping, Set as AbcSet
from dataclasses import asdict, dataclass, field
from numbers import Integral
from pathlib import Path

import numpy as np

from export.contract.config import ModelConfig
from export.contract.errors import InputError, as_array, as_path, check_count
from export.contract.files import make_temp_dir, sha256_file, write_bytes_atomic
from export.contract.variants import PRECISIONS

from runtime.refiner import LayersRefiner
from runtime.evaluation.metrics import euclidean_distances
from runtime.neighbors import DEFAULT_RESERVE, NeighborIndex
from runtime.refiner import feature_limit, l2_normalize, validate_features

FORMAT = "nformer-trt/gallery"
FORMAT_VERSION = 1
POINTER = "CURRENT"
ITEMS = "gallery.json"
ARRAYS = ("embeddings.npy", "features.npy", "neighbors.npz", "refined.npy")
REQUIRED_ARRAYS = ARRAYS[:3]
#: what the embeddings depend on: a gallery opened with a model that differs in one of them is refused
IDENTITY_KEYS = ("encoder_sha256", "checkpoint_sha256", "input_size_hw", "pixel_mean", "pixel_std", "feature_dim",
                 "n_embd")
#: recorded too, not refused: the precision of the encoder that made the embeddings (fp32, fp16, int8,
#: int8-cpu); a gallery opened by a pipeline at another precision is logged (same model, slightly
#: shifted embeddings: a GPU-built gallery stays usable on a CPU box)
PRECISION_KEY = "encoder_precision"
#: its values: the variants' precisions, or "mixed" once rows of another precision were added
MIXED = "mixed"
RECORDED_PRECISIONS = (*PRECISIONS, MIXED)
#: lock files a gallery directory may hold besides its versions: ``.lock`` (saves and loads where
#: directories cannot be locked), ``.serve.lock`` (the one server that journals into it)
SERVE_LOCK = ".serve.lock"
LOCK_FILES = (".lock", SERVE_LOCK)
_VERSION_DIR = re.compile(r"v[0-9]+")           # ASCII digits only ("v²" is no version)
_TEMP_DIR = re.compile(r"\.v[0-9]+\.tmp-.*")

#: spare neighbours a row may keep (DEFAULT_RESERVE is 16; each costs N * 16 bytes)
MAX_RESERVE = 1024
_SHA256 = re.compile(r"[0-9a-f]{64}")

log = logging.getLogger(__name__)


def check_gallery_dir(path: Path) -> None:
    """InputError unless ``path`` is a gallery, an empty directory or not there yet: a save (or a
    service) never writes into a directory of other files."""
    path = Path(path)
    if path.is_dir() and not (path / POINTER).is_file() and any(
            not _TEMP_DIR.fullmatch(p.name) and p.name not in LOCK_FILES for p in path.iterdir()):
        raise InputError(f"{path} is a non-empty directory that is not a gallery (no {POINTER}); "
                         "choose an empty or new directory")


@dataclass(frozen=True)
class Hit:
    """One search result: a gallery item and its distance to the query (smaller is closer)."""
    id: object
    distance: float
    camid: int
    meta: dict = field(default_factory=dict)
    position: int = -1

    def to_json(self) -> dict:
        return asdict(self)


def model_identity(manifest: dict | None, config: ModelConfig, encoder_precision: str | None = None) -> dict:
    """What a gallery records about the model its embeddings came from: the encoder file and the
    checkpoint (sha256, from the manifest), the configuration that shapes the embedding space, and
    the precision the encoder ran at (``encoder_precision``, when known)."""
    ident = {"n_embd": config.n_embd, "topk": config.topk, "n_layer": config.n_layer, "landmarks": config.landmarks,
             "feature_dim": config.feature_dim, "input_size_hw": [int(v) for v in config.input_size_hw],
             "pixel_mean": [float(v) for v in config.pixel_mean], "pixel_std": [float(v) for v in config.pixel_std]}
    if manifest:
        files = manifest.get("files") if isinstance(manifest.get("files"), dict) else {}
        encoder = files.get("encoder") if isinstance(files.get("encoder"), dict) else {}
        source = manifest.get("source") if isinstance(manifest.get("source"), dict) else {}
        if encoder.get("sha256"):
            ident["encoder_sha256"] = encoder["sha256"]
        if source.get("sha256"):
            ident["checkpoint_sha256"] = source["sha256"]
    if encoder_precision:
        if encoder_precision not in PRECISIONS:
            raise InputError(f"encoder precision must be one of {', '.join(PRECISIONS)}, found {encoder_precision!r}")
        ident[PRECISION_KEY] = encoder_precision
    return ident


def _canonical_sha256(data) -> str:
    """sha256 of ``data`` as canonical JSON (independent of the file's formatting)."""
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def _content_sha256(items: dict) -> str:
    """Checksum of everything in gallery.json except the model identity and the checksums themselves
    (the identity has its own, so that ``allow_model_mismatch`` can accept another model's record)."""
    return _canonical_sha256({k: v for k, v in items.items() if k not in ("model", "content_sha256", "model_sha256")})


def id_list(ids, where: str, ordered: bool = True) -> list:
    """``ids`` (a list, tuple, array or other iterable of ids) as a list; one string or bytes is
    refused, not split into characters ("abc" is not ["a", "b", "c"]); where the order pairs ids
    with rows (``ordered``), a set or mapping is refused too (its order is arbitrary)."""
    if isinstance(ids, (str, bytes)) or not hasattr(ids, "__iter__"):      # np.str_/np.bytes_ are str/bytes
        raise InputError(f"{where}: ids must be a list of ids (one per row), found {type(ids).__name__} {ids!r:.40}")
    if ordered and isinstance(ids, (AbcSet, Mapping)):    # a set's order changes between runs (seeded string hashes)
        raise InputError(f"{where}: ids must be an ordered list (one per row, in the rows' order), found a "
                         f"{type(ids).__name__}, whose order is arbitrary; pass a list")
    return np.asarray(ids, dtype=object).reshape(-1).tolist() if isinstance(ids, np.ndarray) else list(ids)


def _json_scalar_id(value, where: str):
    if isinstance(value, (bool, np.bool_)):
        raise InputError(f"{where}: ids must be strings or integers, found a boolean")
    if isinstance(value, Integral):
        return int(value)
    if isinstance(value, str):
        return value
    raise InputError(f"{where}: ids must be strings or integers, found {type(value).__name__} {value!r}")


@contextlib.contextmanager
def _not_served(path: Path, served_by: int | None):
    """Hold the service's lock (``.serve.lock``) of ``path`` for the block, or raise InputError when
    a running ``runtime serve`` holds it; ``served_by`` is the service's own descriptor (nothing to do)."""
    lock = path / SERVE_LOCK
    if served_by is not None or not lock.exists():
        yield
        return
    try:
        import fcntl
    except ImportError:
        yield
        return
    try:
        # flock needs no write access (the file is made 0644); O_NONBLOCK: a FIFO would block open() forever
        fd = os.open(lock, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        yield                                  # cannot be opened: nobody could have locked it through us either
        return
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise InputError(f"{lock} is not a regular file (a FIFO, device or directory), so it is not the lock "
                             "`runtime serve` makes; remove it, then save again")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise InputError(f"gallery {path} is served by a running `runtime serve` (it holds {lock}): change it "
                             "through the service (gallery_add / gallery_remove), or stop the server first; a save "
                             "from outside would drop the changes in its journal") from None
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def _locked(path: Path, exclusive: bool):
    """Hold ``flock`` on the gallery directory (exclusive for a save, shared for a load)."""
    try:
        import fcntl
    except ImportError:      # no flock here (not POSIX): saves and loads are not serialised
        yield
        return
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError as err:
        raise InputError(f"cannot open gallery directory {path}: {err.strerror or err}; check that it exists "
                         "and is readable") from None
    mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
    try:
        try:
            fcntl.flock(fd, mode)
        except OSError:
            # a file system that cannot lock directories (NFS): a lock file inside it instead
            os.close(fd)
            fd = -1
            lock_file = path / ".lock"
            try:
                fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o666)   # the umask applies
                fcntl.flock(fd, mode)
            except OSError as err:
                raise InputError(f"cannot lock gallery directory {path} ({lock_file}: {err.strerror or err}); "
                                 "check that it is writable and on a file system with locks") from None
        yield
    finally:
        if fd >= 0:
            os.close(fd)    # releases the lock


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class Gallery:
    """Embeddings with ids, camera ids and metadata; refined together; searched; saved atomically.

    Thread-safe: one lock serialises changes, refinement and search.
    """

    def __init__(self, config: ModelConfig, refiner: LayersRefiner | None = None, seed: int = 0,
                 reserve: int = DEFAULT_RESERVE, model: dict | None = None):
        if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, Integral) or not 0 <= seed < 2 ** 63:
            raise InputError(f"the landmark seed must be an integer in 0..2**63-1, found {seed!r}")
        if isinstance(reserve, (bool, np.bool_)) or not isinstance(reserve, Integral) or not 0 <= reserve <= MAX_RESERVE:
            raise InputError(f"reserve (spare neighbours a row keeps) must be an integer in 0..{MAX_RESERVE}, found "
                             f"{reserve!r}")
        self.config = config
        self.refiner = refiner
        self.seed = int(seed)
        self.model = model or model_identity(None, config)
        self._adding_precision: str | None = None   # set by load: the pipeline embeds at another precision
        self._lock = threading.RLock()
        self._index = NeighborIndex(config.topk, config.n_embd, reserve)
        self._raw = np.zeros((0, config.n_embd), np.float32)
        self._ids: list = []
        self._next_id = 0                   # default ids continue from here: a removed item's id is never reused
        self._position: dict = {}
        self._camids = np.zeros(0, np.int64)
        self._meta: list[dict] = []
        self._refined: np.ndarray | None = None

    # ---- contents ----

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, item_id) -> bool:
        try:
            return item_id in self._position
        except TypeError:          # unhashable (a list ...): no id is one
            return False

    @property
    def ids(self) -> list:
        return list(self._ids)

    @property
    def camids(self) -> np.ndarray:
        return self._camids.copy()

    @property
    def meta(self) -> list[dict]:
        return [dict(m) for m in self._meta]

    @property
    def embeddings(self) -> np.ndarray:
        """Raw embeddings as added, float32 [N, D]."""
        return self._raw.copy()

    def item(self, item_id) -> dict:
        with self._lock:
            if item_id not in self._position:
                raise InputError(f"no item with id {item_id!r} in the gallery")
            p = self._position[item_id]
            return {"id": item_id, "camid": int(self._camids[p]), "meta": dict(self._meta[p]),
                    "embedding": self._raw[p].copy(), "position": p}

    # ---- changes ----

    def _validated_batch(self, embeddings, ids, camids, meta):
        x = as_array(embeddings, "add: embeddings")
        if x.ndim == 2 and x.shape[0] == 0 and x.shape[1] == self.config.n_embd:
            return None
        x = validate_features(x, self.config.n_embd)
        m = len(x)
        if ids is None:
            start = max(self._next_id, 1 + max((i for i in self._ids if isinstance(i, int)), default=-1))
            ids = list(range(start, start + m))
        else:
            ids = [_json_scalar_id(i, "add") for i in id_list(ids, "add")]
        if len(ids) != m:
            raise InputError(f"add: {m} embeddings but {len(ids)} ids; give one id per row")
        if len(set(ids)) != m:
            counts: dict = {}
            for i in ids:
                counts[i] = counts.get(i, 0) + 1
            raise InputError(f"add: ids must be unique, found repeated ids {[i for i, c in counts.items() if c > 1][:5]}")
        taken = [i for i in ids if i in self._position]
        if taken:
            raise InputError(f"add: {len(taken)} id(s) already in the gallery, first {taken[:5]}; remove them "
                             "first or use other ids")
        if camids is None:
            cams = np.full(m, -1, np.int64)
        else:
            cams = as_array(camids, "add: camids")
            if cams.ndim == 0:
                cams = np.full(m, cams)
            if cams.shape != (m,) or not (np.issubdtype(cams.dtype, np.integer) or cams.size == 0):
                raise InputError(f"add: camids must be {m} integers (one per row), found shape {cams.shape} "
                                 f"dtype {cams.dtype}")
            if cams.size and cams.dtype == np.uint64 and int(cams.max()) >= 2 ** 63:   # would wrap to negative
                raise InputError(f"add: camids must fit in 64-bit signed integers, found {int(cams.max())}")
            cams = cams.astype(np.int64)
        if meta is None:
            metas = [{} for _ in range(m)]
        else:
            metas = list(meta)
            if len(metas) != m or not all(isinstance(d, dict) for d in metas):
                raise InputError(f"add: meta must be a list of {m} dicts (one per row)")
            try:
                metas = json.loads(json.dumps(metas))      # JSON-able, and a copy the caller cannot change
            except (TypeError, ValueError, RecursionError) as err:   # RecursionError: nested past Python's limit
                raise InputError(f"add: metadata must be JSON-serialisable ({err})") from None
        return x, ids, cams, metas

    def validate_add(self, embeddings, ids=None, camids=None, meta=None):
        """What :meth:`add` would add, checked, without changing anything: ``(rows float32 [m, D], ids,
        camids int64 [m], meta)``; InputError for what ``add`` would refuse.  A journal records this
        before the change is applied."""
        with self._lock:
            batch = self._validated_batch(embeddings, ids, camids, meta)
            if batch is None:
                return np.zeros((0, self.config.n_embd), np.float32), [], np.zeros(0, np.int64), []
            x, ids, cams, metas = batch
            return np.asarray(x, np.float32), ids, cams, metas

    def add(self, embeddings, ids=None, camids=None, meta=None) -> list:
        """Add raw encoder embeddings [m, D] with their ids (default: integers after the largest ever
        given, so a removed item's id is not reused; a list, not a set), camera ids
        (default -1) and metadata dicts.  Returns the ids.  Nothing changes on bad input."""
        with self._lock:
            batch = self._validated_batch(embeddings, ids, camids, meta)
            if batch is None:
                return []
            x, ids, cams, metas = batch
            self._index.add(l2_normalize(x))
            if self._adding_precision and self._adding_precision != self.model.get(PRECISION_KEY):
                # rows of another precision than the recorded one: the record says so from now on
                self.model = {**self.model, PRECISION_KEY: MIXED if len(self._ids) else self._adding_precision}
            n = len(self._ids)
            self._raw = np.concatenate([self._raw, x])
            self._camids = np.concatenate([self._camids, cams])
            self._meta.extend(metas)
            self._ids.extend(ids)
            self._next_id = max(self._next_id, 1 + max((i for i in ids if isinstance(i, int)), default=-1))
            self._position.update({i: n + t for t, i in enumerate(ids)})
            self._refined = None
            return list(ids)

    def remove(self, ids) -> None:
        """Remove the items with these ids; an unknown id removes nothing and raises InputError."""
        with self._lock:
            if isinstance(ids, np.ndarray):
                ids = ids.reshape(-1).tolist()
            elif isinstance(ids, (str, bytes, Integral, float, np.generic)) or not hasattr(ids, "__iter__"):
                ids = [ids]
            ids = [_json_scalar_id(i, "remove") for i in ids]   # True or 1.0 must not stand for id 1
            unknown = [i for i in ids if i not in self._position]
            if unknown:
                raise InputError(f"remove: {len(unknown)} unknown id(s), first {unknown[:5]}; nothing was removed")
            pos = np.unique([self._position[i] for i in ids]).astype(np.int64)
            if len(pos) == 0:
                return
            self._index.remove(pos)
            keep = np.ones(len(self._ids), bool)
            keep[pos] = False
            self._raw = self._raw[keep]
            self._camids = self._camids[keep]
            self._meta = [m for m, k in zip(self._meta, keep) if k]
            self._ids = [i for i, k in zip(self._ids, keep) if k]
            self._position = {i: t for t, i in enumerate(self._ids)}
            self._refined = None

    # ---- refinement and search ----

    def _need_refiner(self) -> LayersRefiner:
        if self.refiner is None:
            raise InputError("this gallery is not bound to a refinement model: open it with "
                             "Pipeline.load(MODEL_DIR).gallery(PATH)")
        return self.refiner

    def refine(self) -> np.ndarray:
        """Refined, L2-normalised embeddings of the gallery as one set, float32 [N, D] (cached)."""
        with self._lock:
            if len(self) == 0:
                raise InputError("the gallery is empty: add embeddings first")
            if self._refined is None:
                idx, valid = self._index.neighbors()
                self._refined = self._need_refiner().refine(self._index.rows(), idx, valid, seed=self.seed,
                                                            normalized_input=True)
            return self._refined.copy()

    def distances(self, query_embeddings, refined: bool = True) -> np.ndarray:
        """Squared Euclidean distances [num_query, N] between L2-normalised queries and gallery
        items; ``refined``: queries and gallery refined together first (the original's protocol)."""
        with self._lock:
            if len(self) == 0:
                raise InputError("the gallery is empty: add embeddings before searching")
            q = l2_normalize(validate_features(query_embeddings, self.config.n_embd))
            g = self._index.rows()
            if refined:
                refiner = self._need_refiner()
                with self._index.extended(q) as both:
                    idx, valid = both.neighbors()
                    out = refiner.refine(np.concatenate([g, q]), idx, valid, seed=self.seed, normalized_input=True)
                g, q = out[:len(g)], out[len(g):]
            return euclidean_distances(q, g)

    def search(self, query_embeddings, topn: int = 10, query_camids=None, refined: bool = True) -> list[list[Hit]]:
        """The ``topn`` nearest gallery items of each query (raw encoder embeddings [q, D]).

        ``query_camids``: camera id per query; gallery items seen by the same camera are left out
        of that query's hits (cross-camera re-identification); a negative camera id (unknown
        camera) leaves nothing out.  Ties keep gallery order.
        """
        check_count(topn, "topn")
        with self._lock:   # one acquisition: positions must not move between ranking and lookup
            dist = self.distances(query_embeddings, refined)
            cams = None
            if query_camids is not None:
                cams = as_array(query_camids, "search: query camids")
                if cams.shape != (len(dist),) or not np.issubdtype(cams.dtype, np.integer) \
                        or (cams.size and cams.dtype == np.uint64 and int(cams.max()) >= 2 ** 63):
                    raise InputError(f"query_camids must be {len(dist)} 64-bit integers (one per query), found shape "
                                     f"{cams.shape} dtype {cams.dtype}")
                cams = cams.astype(np.int64)
            hits = []
            for qi, row in enumerate(dist):
                order = np.argsort(row, kind="stable")
                if cams is not None and cams[qi] >= 0:
                    order = order[self._camids[order] != cams[qi]]
                hits.append([Hit(self._ids[p], float(np.sqrt(row[p])), int(self._camids[p]),
                                 json.loads(json.dumps(self._meta[p])), int(p)) for p in order[:topn]])
            return hits

    # ---- persistence ----

    def save(self, path, served_by: int | None = None) -> Path:
        """Write the gallery to directory ``path`` atomically; returns the version directory.

        Safe against concurrent saves and loads of the same directory, from threads or processes.
        A directory that ``runtime serve`` owns (it holds ``.serve.lock``) is refused: the service's
        journal holds acknowledged changes that a save from outside would orphan.  ``served_by``: the
        lock descriptor of the service itself (its own snapshots)."""
        path = as_path(path, "the gallery directory")
        with self._lock:
            if path.exists() and not path.is_dir():
                raise InputError(f"cannot save a gallery to {path}: it is a file; choose a directory")
            try:
                path.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise InputError(f"cannot create gallery directory {path}: {err.strerror or err}") from None
            with _not_served(path, served_by), _locked(path, exclusive=True):
                check_gallery_dir(path)
                previous = _read_pointer(path) if (path / POINTER).is_file() else None
                numbers = [int(p.name[1:]) for p in path.iterdir() if _VERSION_DIR.fullmatch(p.name)]
                if previous:
                    numbers.append(int(previous["version"][1:]))
                version = f"v{max(numbers, default=0) + 1:06d}"
                try:
                    work = make_temp_dir(path, f".{version}.tmp-")
                except OSError as err:
                    raise InputError(f"cannot save a gallery to {path}: {err.strerror or err}; check that the "
                                     "directory is writable, or choose another") from None
                try:
                    self._write_version(work)
                    os.rename(work, path / version)
                    work = path / version
                    _fsync_dir(path)
                    write_bytes_atomic(path / POINTER, json.dumps(
                        {"format": FORMAT, "format_version": FORMAT_VERSION, "version": version}, indent=1).encode())
                    _fsync_dir(path)     # the switch is durable before the old version is deleted
                except OSError as err:   # a full disk, a folder made read-only meanwhile: the old version stays
                    shutil.rmtree(work, ignore_errors=True)
                    raise InputError(f"cannot save a gallery to {path}: {err.strerror or err}; the previous "
                                     "version, if any, is unchanged") from None
                except BaseException:
                    shutil.rmtree(work, ignore_errors=True)
                    raise
                # previous versions and leftovers of interrupted saves (no other save runs: we hold the lock)
                for old in path.iterdir():
                    if old.name != version and old.is_dir() and not old.is_symlink() \
                            and (_VERSION_DIR.fullmatch(old.name) or _TEMP_DIR.fullmatch(old.name)):
                        shutil.rmtree(old, ignore_errors=True)
                return path / version

    def _write_version(self, folder: Path) -> None:
        arrays = {"embeddings.npy": self._raw, "features.npy": self._index.rows()}
        if self._refined is not None:
            arrays["refined.npy"] = self._refined
        for name, arr in arrays.items():
            write_bytes_atomic(folder / name, _npy_bytes(arr))
        with io.BytesIO() as f:
            np.savez(f, **self._index.state())
            write_bytes_atomic(folder / "neighbors.npz", f.getvalue())
        items = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "count": len(self._ids),
            "model": json.loads(json.dumps(self.model)), "seed": self.seed, "reserve": self._index.reserve,
            "ids": self._ids, "next_id": self._next_id, "camids": self._camids.tolist(), "meta": self._meta,
            "sha256": {name: sha256_file(folder / name) for name in ARRAYS if (folder / name).is_file()},
        }
        items["content_sha256"] = _content_sha256(items)
        items["model_sha256"] = _canonical_sha256(items["model"])
        write_bytes_atomic(folder / ITEMS, json.dumps(items).encode())
        _fsync_dir(folder)

    @classmethod
    def load(cls, path, config: ModelConfig, refiner: LayersRefiner | None = None, model: dict | None = None,
             allow_model_mismatch: bool = False) -> "Gallery":
        """Read a gallery saved by :meth:`save`; InputError for another format version, a gallery of
        another model (``model``: :func:`model_identity` of the model it is opened with), or damaged
        or edited files.  ``allow_model_mismatch``: accept another model's embeddings (the widths
        must still fit)."""
        path = as_path(path, "the gallery directory")
        if not (path / POINTER).is_file():
            raise InputError(f"{path} is not a gallery directory (no {POINTER} file): expected a directory "
                             "written by Gallery.save")
        with _locked(path, exclusive=False):
            pointer = _read_pointer(path)
            folder = path / pointer["version"]
            items = _read_items(folder / ITEMS)
            n = items["count"]
            saved_model = items["model"]
            for key in ("n_embd", "topk"):
                if saved_model.get(key) != getattr(config, key) or isinstance(saved_model.get(key), bool):
                    raise InputError(f"gallery {path} was made for a model with {key}={saved_model.get(key)!r}, this "
                                     f"model has {key}={getattr(config, key)!r}; re-embed the gallery with this model")
            if not allow_model_mismatch:
                _check_identity(path, saved_model, model or model_identity(None, config))
                if items.get("model_sha256") != _canonical_sha256(saved_model):
                    raise InputError(f"{folder / ITEMS}: its model identity does not match its checksum "
                                     "(model_sha256): the file was edited or is damaged; restore the gallery from a "
                                     "backup or rebuild it")
            adding = _note_precision(path, saved_model, model or {})
            for name, digest in items["sha256"].items():
                if not (folder / name).is_file() or sha256_file(folder / name) != digest:
                    raise InputError(f"{folder / name} is missing or does not match its checksum in {ITEMS}; the "
                                     "gallery is damaged: restore it from a backup or rebuild it")
            raw = _load_npy(folder / "embeddings.npy")
            features = _load_npy(folder / "features.npy")
            refined = _load_npy(folder / "refined.npy") if "refined.npy" in items["sha256"] else None
            try:
                state = _read_neighbor_state(folder / "neighbors.npz", n)
            except Exception as err:  # noqa: BLE001 - whatever edited bytes make numpy or zipfile raise
                raise InputError(f"cannot read {folder / 'neighbors.npz'}: {err}; the gallery is damaged") from None
        shape = (n, config.n_embd)
        for name, arr in (("embeddings.npy", raw), ("features.npy", features), ("refined.npy", refined)):
            if arr is not None and (arr.shape != shape or not np.issubdtype(arr.dtype, np.floating)):
                raise InputError(f"gallery {folder} is inconsistent: {n} items of width {config.n_embd} but "
                                 f"{name} holds {arr.dtype} {arr.shape}; rebuild it")
        limit = feature_limit(config.n_embd)
        if n and not all(np.isfinite(arr).all() and np.abs(arr).max() <= limit for arr in (raw, features)):
            raise InputError(f"gallery {folder} is inconsistent: embeddings.npy or features.npy holds NaN, infinite or "
                             f"values beyond +-{limit:.3g} (no encoder makes those); the gallery is damaged: restore it "
                             "from a backup or rebuild it")
        if refined is not None and n:
            # what refine() returns as it was saved: L2-normalised rows (an edited file would be served as is);
            # l2_normalize leaves a row shorter than NORM_EPS shorter than 1 (a zero row stays zero)
            with np.errstate(all="ignore"):
                norms = np.linalg.norm(refined.astype(np.float64), axis=1)
            if not (np.isfinite(refined).all() and np.all(norms <= 1.0 + 1e-3)):
                raise InputError(f"gallery {folder} is inconsistent: refined.npy holds NaN, infinite or rows longer "
                                 "than unit length (refined rows are L2-normalised); the gallery is damaged: restore "
                                 "it from a backup or rebuild it")
        # the ranked rows are the raw embeddings L2-normalised (to rounding: numpy's sums differ between CPUs)
        if n and not np.allclose(features, l2_normalize(raw.astype(np.float32)), rtol=0, atol=1e-6):
            raise InputError(f"gallery {folder} is inconsistent: features.npy is not embeddings.npy L2-normalised; "
                             "the gallery is damaged: restore it from a backup or rebuild it")
        gallery = cls(config, refiner, seed=items["seed"], reserve=items["reserve"], model=saved_model)
        gallery._adding_precision = adding
        try:
            same = int(state["k"]) == config.topk and int(state["reserve"]) == items["reserve"]
        except (KeyError, TypeError, ValueError):
            same = False
        if not same:
            raise InputError(f"{folder / 'neighbors.npz'} holds lists for k={state.get('k')!r}, reserve="
                             f"{state.get('reserve')!r}, the gallery is for topk={config.topk}, reserve="
                             f"{items['reserve']}: the gallery is damaged; rebuild it")
        try:
            gallery._index = NeighborIndex.from_state(features, state)
        except (KeyError, ValueError, TypeError, IndexError) as err:
            raise InputError(f"{folder / 'neighbors.npz'} does not hold valid neighbour lists ({err}); the "
                             "gallery is damaged: rebuild it") from None
        gallery._raw = raw.astype(np.float32)
        gallery._ids = list(items["ids"])
        gallery._next_id = max(items.get("next_id", 0),         # galleries saved before next_id was recorded
                               1 + max((i for i in gallery._ids if isinstance(i, int)), default=-1))
        gallery._position = {i: t for t, i in enumerate(gallery._ids)}
        gallery._camids = np.asarray(items["camids"], np.int64).reshape(n)
        gallery._meta = list(items["meta"])
        if refined is not None:
            gallery._refined = refined.astype(np.float32)
        return gallery


def _check_identity(path: Path, saved: dict, current: dict) -> None:
    """InputError unless the saved model identity agrees with ``current`` on every IDENTITY_KEYS key
    that ``current`` records."""
    differ, unrecorded = [], []
    for key in IDENTITY_KEYS:
        if current.get(key) is None:
            continue
        a, b = saved.get(key), json.loads(json.dumps(current[key]))
        if a is None:
            unrecorded.append(key)
        elif a != b:
            kinds = f" as {type(a).__name__}, not {type(b).__name__}" if type(a) is not type(b) else ""
            differ.append(f"{key} {_short(a)}{kinds} (this model: {_short(b)})")
    if differ:
        raise InputError(f"gallery {path} holds embeddings of another model: {'; '.join(differ)}; re-embed it with "
                         "this model, or pass allow_model_mismatch=True if the encoders are known to agree")
    if unrecorded:
        raise InputError(f"gallery {path} does not record the {', '.join(unrecorded)} of the model that made it, so "
                         "it cannot be shown to fit this model; re-embed it with this model (Pipeline.gallery), or "
                         "pass allow_model_mismatch=True if it is known to come from this model")


def _note_precision(path: Path, saved: dict, current: dict) -> str | None:
    """Log when the gallery's embeddings came from the encoder at another precision than the one
    that embeds the queries now (accepted: the same model, embeddings within its precision gate).
    Returns that other precision (rows added from now on are of it), else None."""
    a, b = saved.get(PRECISION_KEY), current.get(PRECISION_KEY)
    if a and b and a != b:
        made = "at mixed precisions" if a == MIXED else f"by the {a} encoder"
        log.warning("gallery %s holds embeddings made %s; this pipeline embeds at %s: query-to-gallery distances "
                    "carry both precisions' error (re-embed the gallery at %s for like-for-like results)",
                    path, made, b, b)
        return b
    return None


def _short(value) -> str:
    return f"{value[:12]}..." if isinstance(value, str) and len(value) > 16 else json.dumps(value)


def _read_items(where: Path) -> dict:
    """gallery.json, checked against its content checksum and its schema."""
    try:
        items = json.loads(where.read_bytes().decode("utf-8"))
    except (OSError, ValueError, RecursionError) as err:     # RecursionError: nested past Python's limit
        raise InputError(f"cannot read {where}: {err}; the gallery is damaged") from None
    if not isinstance(items, dict):
        raise InputError(f"{where} must hold a JSON object, found {type(items).__name__}; the gallery is damaged")
    _check_format(items, where)
    digest = items.get("content_sha256")
    if not (isinstance(digest, str) and _SHA256.fullmatch(digest)):
        raise InputError(f"{where} has no valid content_sha256 checksum (found {digest!r}): it was written by an "
                         "older nformer-trt or edited; re-save the gallery with this version, or rebuild it")
    if _content_sha256(items) != digest:
        raise InputError(f"{where} does not match its checksum (content_sha256): ids, camera ids, metadata or "
                         "checksums were edited or damaged; restore the gallery from a backup or rebuild it")

    def bad(key, expected, found):
        shown = repr(found)
        return InputError(f"{where}: {key} must be {expected}, found {shown[:60] + '...' if len(shown) > 60 else shown}"
                          "; the gallery is damaged: rebuild it")

    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)

    n = items.get("count")
    if not (is_int(n) and n >= 0):
        raise bad("count", "an integer >= 0", n)
    for key, top in (("seed", 2 ** 63 - 1), ("reserve", MAX_RESERVE)):
        if not (is_int(items.get(key)) and 0 <= items[key] <= top):
            raise bad(key, f"an integer in 0..{top}", items.get(key))
    if "next_id" in items and not (is_int(items["next_id"]) and items["next_id"] >= 0):
        raise bad("next_id", "an integer >= 0", items["next_id"])
    if not isinstance(items.get("model"), dict):
        raise bad("model", "an object (the model identity)", items.get("model"))
    if PRECISION_KEY in items["model"] and items["model"][PRECISION_KEY] not in RECORDED_PRECISIONS:
        raise bad(f"model.{PRECISION_KEY}", f"one of {', '.join(RECORDED_PRECISIONS)}", items["model"][PRECISION_KEY])
    ids = items.get("ids")
    if not (isinstance(ids, list) and len(ids) == n and all(is_int(i) or isinstance(i, str) for i in ids)):
        raise bad("ids", f"a list of {n} strings or integers", ids)
    if len(set(ids)) != n:
        seen, repeated = set(), []
        for i in ids:
            if i in seen and i not in repeated:
                repeated.append(i)
            seen.add(i)
        raise InputError(f"{where}: ids must be unique, found repeated ids {repeated[:5]}; the gallery is damaged: "
                         "rebuild it")
    camids = items.get("camids")
    if not (isinstance(camids, list) and len(camids) == n and all(is_int(c) and -2**63 <= c < 2**63 for c in camids)):
        raise bad("camids", f"a list of {n} integers", camids)
    meta = items.get("meta")
    if not (isinstance(meta, list) and len(meta) == n and all(isinstance(m, dict) for m in meta)):
        raise bad("meta", f"a list of {n} objects", meta)
    sums = items.get("sha256")
    if not (isinstance(sums, dict) and all(k in ARRAYS and isinstance(v, str) and _SHA256.fullmatch(v)
                                           for k, v in sums.items())):
        raise bad("sha256", f"an object mapping {', '.join(ARRAYS)} to sha256 digests", sums)
    missing = [a for a in REQUIRED_ARRAYS if a not in sums]
    if missing:
        raise InputError(f"{where} has no checksum for {', '.join(missing)}; the gallery is damaged: rebuild it")
    return items


def _npy_bytes(arr: np.ndarray) -> bytes:
    with io.BytesIO() as f:
        np.save(f, np.ascontiguousarray(arr), allow_pickle=False)
        return f.getvalue()


def _check_format(data: dict, where: Path) -> None:
    if data.get("format") != FORMAT or data.get("format_version") != FORMAT_VERSION:
        raise InputError(f"{where} has format {data.get('format')!r} version {data.get('format_version')!r}, "
                         f"expected {FORMAT!r} version {FORMAT_VERSION}; it was written by another version of "
                         "nformer-trt: open it with that version, or rebuild the gallery from its embeddings")


def _read_pointer(path: Path) -> dict:
    where = path / POINTER
    try:
        pointer = json.loads(where.read_text())
    except (OSError, ValueError, RecursionError) as err:
        raise InputError(f"cannot read {where}: {err}; the gallery is damaged") from None
    _check_format(pointer, where)
    version = pointer.get("version", "")
    if not (isinstance(version, str) and _VERSION_DIR.fullmatch(version) and (path / version).is_dir()):
        raise InputError(f"{where} points at {version!r}, which is not a version directory of {path}; the "
                         "gallery is damaged")
    return pointer


#: the members of neighbors.npz (NeighborIndex.state) and their sizes a row (0: a scalar)
_STATE_MEMBERS = {"k": 0, "reserve": 0, "next_uid": 0, "key_version": 0, "uid": 1, "count": 1,
                  "cand_key": None, "cand_uid": None}


def _read_neighbor_state(path: Path, n: int) -> dict:
    """neighbors.npz's members, each read only after its inflated size was checked against what
    ``n`` rows need (an extra or oversized member is refused before numpy inflates it)."""
    import zipfile

    with zipfile.ZipFile(path) as z:
        infos = {i.filename[:-4] if i.filename.endswith(".npy") else i.filename: i for i in z.infolist()}
        if set(infos) - set(_STATE_MEMBERS) or not {"k", "reserve", "uid", "count", "cand_key", "cand_uid",
                                                    "next_uid"} <= set(infos):
            raise ValueError(f"members {sorted(infos)[:12]}, expected {sorted(_STATE_MEMBERS)}")
        for name, info in infos.items():
            rows = _STATE_MEMBERS[name]
            limit = 1024 + 8 * (1 if rows == 0 else n * (1 if rows == 1 else MAX_RESERVE + 4096))
            if info.file_size > limit:
                raise ValueError(f"member {name} inflates to {info.file_size:,} bytes, more than {n} rows can need")
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except Exception as err:  # noqa: BLE001 - whatever edited bytes make numpy raise (a header that does not parse...)
        raise InputError(f"cannot read {path}: {err}; the gallery is damaged") from None
