"""The re-identification service: what ``runtime serve`` answers, as plain functions of numpy arrays.

Place in the flow: the serving end of ``runtime/`` (no torch).  ``ReidService`` holds one
``Pipeline`` (TensorRT engines where usable, else ONNX Runtime), one durable gallery
(``runtime.serving.gallery_store``) and the open-set thresholds; ``runtime.serving.triton_server`` binds
its methods to Triton models.  Every method checks its inputs and raises InputError (one line:
what was expected, what was found) for a bad request; nothing changes on a refused request.

Open set: a query whose nearest gallery item is farther than the threshold of its ranking mode
(``refined`` or ``encoder``) is ``unknown``.  Thresholds come from ``runtime.serving.open_set``
(``runtime threshold``) or ``--unknown-distance``; with neither, no query is unknown unless the
gallery has no candidate for it.
"""
from __future__ import annotations

import logging

import numpy as np

from export.contract.errors import InputError
from export.contract.preprocess import decode_image

from runtime.refiner import validate_features
from runtime.serving.open_set import MODES

log = logging.getLogger(__name__)

#: most crops or images one request may carry beyond --max-batch (they are split into batches)
MAX_SEARCH_QUERIES = 1024
MAX_ADD_ROWS = 65536
MAX_TOPN = 1000
MAX_CROP_BYTES = 32 << 20
#: decoded pixels one embed request may hold in all (about 200 MB as RGB; a person crop is ~0.03 Mpixel)
MAX_REQUEST_PIXELS = 64_000_000


class ReidService:
    """Embed crops, keep a gallery, answer "who is this" (or "unknown")."""

    def __init__(self, pipe, store, thresholds: dict | None = None, max_request: int = 32):
        self.pipe = pipe
        self.store = store
        self.thresholds = {m: None for m in MODES}
        self.thresholds.update(thresholds or {})
        self.max_request = int(max_request)
        self.width = pipe.config.n_embd

    # ---- embeddings ----

    def decode(self, crops) -> list:
        """Encoded crops (JPEG/PNG bytes, any array shape) -> RGB images, decoded exactly as
        ``runtime embed`` reads files."""
        crops = np.asarray(crops, dtype=object).reshape(-1)
        if len(crops) == 0:
            raise InputError("embed: the request holds no crops; send at least one encoded image")
        if len(crops) > self.max_request:
            raise InputError(f"embed: {len(crops)} crops in one request, at most {self.max_request}; split the "
                             "request")
        images, pixels = [], 0
        for n, data in enumerate(crops):
            if not isinstance(data, (bytes, np.bytes_)) or len(data) == 0:
                raise InputError(f"embed: crop {n} is empty or not bytes; send encoded JPEG/PNG images")
            if len(data) > MAX_CROP_BYTES:
                raise InputError(f"embed: crop {n} is {len(data):,} bytes, more than a crop may be "
                                 f"({MAX_CROP_BYTES:,}); crop the person out of the frame first")
            try:
                images.append(decode_image(bytes(data), f"crop {n}"))
            except InputError:
                raise
            except Exception as err:        # a decoder bug on hostile bytes is still a bad request
                raise InputError(f"crop {n} is not a decodable image ({type(err).__name__}: {err})") from None
            pixels += images[-1].width * images[-1].height
            if pixels > MAX_REQUEST_PIXELS:  # small files of huge flat images: memory, not bytes, is the limit
                raise InputError(f"embed: the crops of one request decode to more than {MAX_REQUEST_PIXELS:,} pixels "
                                 f"(crop {n} reaches {pixels:,}); person crops are far smaller: crop them out of the "
                                 "frames, or send fewer per request")
        return images

    def embed_images(self, images: list) -> np.ndarray:
        """Decoded crops -> raw embeddings float32 [n, D] (``Pipeline.embed``: the same
        preprocessing and encoder batches as in-process)."""
        return self.pipe.embed(images)

    def embed(self, crops) -> np.ndarray:
        """Encoded crops -> raw embeddings float32 [n, D]."""
        return self.embed_images(self.decode(crops))

    def encode(self, images) -> np.ndarray:
        """Preprocessed images float32 [n, 3, H, W] (what DeepStream sends) -> embeddings [n, D]."""
        images = np.asarray(images)
        h, w = self.pipe.config.input_size_hw
        if images.ndim != 4 or images.shape[1:] != (3, h, w) or len(images) == 0:
            raise InputError(f"encoder: images must be float32 [n >= 1, 3, {h}, {w}], found {images.shape}")
        if not np.isfinite(images).all():
            raise InputError("encoder: images hold NaN or infinite values; send preprocessed finite pixels")
        return self.pipe.embed_images(images.astype(np.float32, copy=False))

    # ---- gallery ----

    def _rows(self, embeddings, what: str, limit: int) -> np.ndarray:
        x = np.asarray(embeddings)
        if x.ndim != 2 or x.shape[1] != self.width or len(x) == 0:
            raise InputError(f"{what}: embeddings must be float32 [n >= 1, {self.width}], found {x.shape}")
        if len(x) > limit:
            raise InputError(f"{what}: {len(x)} rows in one request, at most {limit}; split the request")
        return validate_features(x, self.width)

    def add(self, embeddings, ids, camids, timestamps=None) -> int:
        x = self._rows(embeddings, "gallery_add", MAX_ADD_ROWS)
        ids = list(np.asarray(ids, dtype=object).reshape(-1))
        cams = np.asarray(camids).reshape(-1)
        if len(ids) != len(x) or len(cams) != len(x):
            raise InputError(f"gallery_add: {len(x)} embeddings need {len(x)} ids and camids, found {len(ids)} ids "
                             f"and {len(cams)} camids")
        if timestamps is not None:
            timestamps = np.asarray(timestamps, np.float64).reshape(-1)
        return self.store.add(x, ids, cams.astype(np.int64), timestamps)

    def remove(self, ids) -> int:
        ids = list(np.asarray(ids, dtype=object).reshape(-1))
        if not ids:
            raise InputError("gallery_remove: the request holds no ids")
        if len(ids) > MAX_ADD_ROWS:
            raise InputError(f"gallery_remove: {len(ids)} ids in one request, at most {MAX_ADD_ROWS}")
        return self.store.remove(ids)

    def search(self, embeddings, camids, topn: int, mode: str = "refined"):
        """-> ids object [q, topn] (b"" where fewer hits), distances float32 [q, topn] (inf there),
        unknown bool [q]."""
        if mode not in MODES:
            raise InputError(f"gallery_search: mode must be one of {', '.join(MODES)}, found {mode!r}")
        q = self._rows(embeddings, "gallery_search", MAX_SEARCH_QUERIES)
        cams = np.asarray(camids).reshape(-1)
        if len(cams) != len(q):
            raise InputError(f"gallery_search: {len(q)} embeddings need {len(q)} camids (-1: unknown camera), "
                             f"found {len(cams)}")
        topn = int(topn)
        if not 1 <= topn <= MAX_TOPN:
            raise InputError(f"gallery_search: topn must be 1..{MAX_TOPN}, found {topn}")
        ids = np.full((len(q), topn), b"", dtype=object)
        dist = np.full((len(q), topn), np.inf, np.float32)
        # expired items never answer; a full disk delays only the expiry's record, never the search
        hits = self.store.search(q, topn, cams.astype(np.int64), refined=mode == "refined")
        for r, row in enumerate(hits):
            for c, hit in enumerate(row):
                ids[r, c] = str(hit.id).encode()
                dist[r, c] = hit.distance
        threshold = self.thresholds.get(mode)
        unknown = ~np.isfinite(dist[:, 0])
        if threshold is not None:
            unknown |= dist[:, 0] > threshold
        return ids, dist, unknown

    def close(self) -> None:
        self.store.close()
        self.pipe.close()
