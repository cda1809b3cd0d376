"""``runtime serve`` behind a real Triton server (PyTriton's bundled tritonserver), on loopback.

Every server listens on 127.0.0.1 with free ports, runs in its own process group, is bounded in
time, and is stopped by its PID (SIGTERM, then SIGKILL of the group).
"""
from __future__ import annotations

import io
import os
import signal
import threading
import time

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("pytriton", reason="runtime serve needs the serve extra (nvidia-pytriton)")
httpclient = pytest.importorskip("tritonclient.http")
grpcclient = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402

from runtime.pipeline import Pipeline  # noqa: E402
from runtime.serving.process import ServeFailed, ServeProcess, infer as triton_infer  # noqa: E402

START_TIMEOUT_S = 240
MAX_BATCH = 16


class Server(ServeProcess):
    """A server with this module's batch size, started without LD_LIBRARY_PATH: serve must set it itself."""

    def __init__(self, model_dir, gallery, log_path, *extra):
        env = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}
        try:
            super().__init__(model_dir, gallery, log_path, "--max-batch", str(MAX_BATCH), *extra,
                             start_timeout_s=START_TIMEOUT_S, env=env)
        except ServeFailed as err:
            pytest.fail(str(err))

    def tail(self, n=4000):
        return self.output()[-n:]


def png(seed, size=(64, 32)):
    arr = np.random.default_rng(seed).integers(0, 255, (*size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def infer(client, model, inputs, outputs, kind="http"):
    return triton_infer(client, model, inputs, outputs)


def embed(client, crops, kind="http"):
    arr = np.array([[c] for c in crops], dtype=object)
    return infer(client, "embed", {"crops": (arr, "BYTES")}, ["embeddings"], kind)[0]


def add(client, x, ids, camids, kind="http"):
    return infer(client, "gallery_add", {"embeddings": (x, "FP32"), "ids": (np.array(ids, dtype=object), "BYTES"),
                                         "camids": (np.asarray(camids, np.int64), "INT64")}, ["count"], kind)[0]


def search(client, q, camids, topn, mode=None, kind="http"):
    inputs = {"embeddings": (q, "FP32"), "camids": (np.asarray(camids, np.int64), "INT64"),
              "topn": (np.array([topn], np.int32), "INT32")}
    if mode:
        inputs["mode"] = (np.array([mode.encode()], dtype=object), "BYTES")
    return infer(client, "gallery_search", inputs, ["ids", "distances", "unknown"], kind)


@pytest.fixture(scope="module")
def model_dir(resnet18_export):
    return resnet18_export[0]


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    srv = Server(model_dir, tmp / "gallery", tmp / "serve.log", "--unknown-distance", "0.6")
    yield srv
    srv.terminate()


@pytest.fixture(scope="module")
def reference(model_dir):
    with Pipeline.load(model_dir, batch_size=MAX_BATCH, backend="onnxruntime") as pipe:
        yield pipe


def test_http_and_grpc_equal_the_in_process_pipeline_bitwise(server, reference):
    from export.contract.preprocess import decode_image, preprocess_batch

    crops = [png(i) for i in range(6)]
    want = reference.embed([decode_image(c) for c in crops])
    c = reference.config
    images = preprocess_batch([decode_image(b) for b in crops], c.input_size_hw, c.pixel_mean, c.pixel_std)
    want_enc = reference.encoder.embed_images(images)
    gallery = reference.gallery()
    g = np.random.default_rng(5).standard_normal((40, c.n_embd)).astype(np.float32)
    ids = [f"g{i}" for i in range(40)]
    gallery.add(g, ids, np.arange(40) % 4)
    for kind in ("http", "grpc"):
        client = server.client(kind)
        try:
            np.testing.assert_array_equal(embed(client, crops, kind), want)
            got = infer(client, "encoder", {"images": (images, "FP32")}, ["embeddings"], kind)[0]
            np.testing.assert_array_equal(got, want_enc)
        finally:
            client.close()
    client = server.client()
    try:
        assert add(client, g, ids, np.arange(40) % 4)[0] == 40
        q = g[:5] + np.float32(0.01)
        cams = np.array([0, 1, -1, 3, 2])
        for mode in ("refined", "encoder"):
            hits = gallery.search(q, topn=7, query_camids=cams, refined=mode == "refined")
            for kind in ("http", "grpc"):
                kc = server.client(kind)
                try:
                    got_ids, got_d, unknown = search(kc, q, cams, 7, mode if mode == "encoder" else None, kind)
                finally:
                    kc.close()
                assert got_ids.shape == (5, 7) and got_d.dtype == np.float32
                for r, row in enumerate(hits):
                    assert [i.decode() for i in got_ids[r]] == [h.id for h in row]
                    np.testing.assert_array_equal(got_d[r], np.array([h.distance for h in row], np.float32))
                np.testing.assert_array_equal(unknown, got_d[:, 0] > 0.6)
        # fewer hits than topn: padded with empty ids and infinite distances
        ids_, d_, _ = search(client, q[:1], [-1], 45)
        assert ids_[0, 40:].tolist() == [b""] * 5 and np.isinf(d_[0, 40:]).all()
    finally:
        client.close()


@pytest.mark.parametrize("case", ["dtype", "shape", "undecodable", "nan", "empty", "over_max", "unknown_ids",
                                  "topn", "mode", "repeated_id", "overflowing_pixels"])
def test_a_bad_request_gets_a_triton_error_and_the_server_keeps_serving(server, case):
    client = server.client()
    try:
        width = int(client.get_model_config("gallery_search")["input"][0]["dims"][1])
        good = np.random.default_rng(1).standard_normal((2, width)).astype(np.float32)
        calls = {
            "dtype": lambda: infer(client, "gallery_search", {"embeddings": (good.astype(np.float64), "FP64"),
                                                              "camids": (np.zeros(2, np.int64), "INT64"),
                                                              "topn": (np.array([1], np.int32), "INT32")}, ["ids"]),
            "shape": lambda: search(client, good[:, :-1], [0, 0], 1),
            "undecodable": lambda: embed(client, [b"\x89PNG not really"]),
            "nan": lambda: search(client, np.full_like(good, np.nan), [0, 0], 1),
            "empty": lambda: search(client, good[:0], [], 1),
            "over_max": lambda: infer(client, "encoder", {"images": (np.zeros((MAX_BATCH + 1, 3, 256, 128),
                                                                              np.float32), "FP32")}, ["embeddings"]),
            "unknown_ids": lambda: infer(client, "gallery_remove",
                                         {"ids": (np.array([b"nobody-has-this-id"], dtype=object), "BYTES")}, ["count"]),
            "topn": lambda: search(client, good, [0, 0], 0),
            "mode": lambda: search(client, good, [0, 0], 1, mode="fastest"),
            "repeated_id": lambda: add(client, good, ["same", "same"], [0, 0]),
            # finite pixels that overflow inside the network: all-NaN embeddings came back as a success
            "overflowing_pixels": lambda: infer(client, "encoder", {"images": (np.full((1, 3, 256, 128), 3e38,
                                                                                       np.float32), "FP32")},
                                                ["embeddings"]),
        }
        reasons = {"dtype": "data-type", "shape": "unexpected shape", "undecodable": "not an image",
                   "nan": "NaN", "empty": "", "over_max": "batch-size must be <=",
                   "unknown_ids": "unknown id", "topn": "topn must be 1..", "mode": "mode must be one of",
                   "repeated_id": "ids must be unique", "overflowing_pixels": "are not finite"}
        with pytest.raises(InferenceServerException) as err:
            calls[case]()
        assert reasons[case] in str(err.value), str(err.value)[-600:]
        if case not in ("dtype", "shape", "over_max", "empty"):      # the project's refusals: the reason alone
            # no frame of this server's process (its paths, PyTriton's proxy) reaches the client
            message = str(err.value)
            assert "RequestRefused: " in message and "runtime/serving" not in message \
                and "pytriton/proxy" not in message, message
        # still serving
        assert embed(client, [png(99)]).shape[0] == 1
        assert search(client, good, [-1, -1], 1)[0].shape == (2, 1)
    finally:
        client.close()


def test_eight_concurrent_clients_get_their_own_results(server, reference):
    from export.contract.preprocess import decode_image

    width = reference.config.n_embd
    crops = {t: [png(1000 + 10 * t + i) for i in range(3)] for t in range(8)}
    want = {t: reference.embed([decode_image(c) for c in crops[t]]) for t in range(8)}
    failures, lock = [], threading.Lock()

    def worker(t):
        client = server.client("grpc" if t % 2 else "http")
        kind = "grpc" if t % 2 else "http"
        rng = np.random.default_rng(100 + t)
        try:
            for n in range(50):
                op = n % 3
                if op == 0:
                    got = embed(client, crops[t][: 1 + n % 3], kind)
                    # Triton merges requests into one batch: a conv kernel may sum a row in another
                    # order at another batch size (bitwise equality held on one CPU, not by construction),
                    # so rounding-level differences pass; another request's crops differ by far more
                    ref = want[t][: 1 + n % 3]
                    if got.shape != ref.shape or not np.allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max()):
                        raise AssertionError(f"client {t} request {n}: embeddings of another request")
                elif op == 1:
                    x = rng.standard_normal((1, width)).astype(np.float32)
                    add(client, x, [f"c{t}-{n}"], [t], kind)
                    ids, dist, _ = search(client, x, [-1], 1, "encoder", kind)
                    if ids[0, 0] != f"c{t}-{n}".encode() or dist[0, 0] > 1e-3:
                        raise AssertionError(f"client {t} request {n}: nearest {ids[0, 0]!r} at {dist[0, 0]}")
                else:
                    ids, _, _ = search(client, rng.standard_normal((2, width)).astype(np.float32), [t, -1], 3,
                                       None, kind)
                    if ids.shape != (2, 3):
                        raise AssertionError(f"client {t} request {n}: shape {ids.shape}")
        except Exception as err:       # collected: an assert in a thread would be lost
            with lock:
                failures.append(f"{type(err).__name__}: {err}"[:500])
        finally:
            client.close()

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(600)
    assert not any(th.is_alive() for th in threads), "clients hung"
    assert not failures, failures


def test_sigterm_flushes_the_gallery_and_exits(model_dir, tmp_path):
    from runtime.serving.gallery_store import GalleryStore

    srv = Server(model_dir, tmp_path / "g", tmp_path / "serve.log")
    try:
        client = srv.client()
        width = int(client.get_model_config("gallery_add")["input"][0]["dims"][1])
        x = np.random.default_rng(2).standard_normal((5, width)).astype(np.float32)
        add(client, x, [f"s{i}" for i in range(5)], np.zeros(5))
        client.close()
        assert srv.terminate() == 0, srv.tail()
    finally:
        srv.kill()
    assert "stopped; gallery" in srv.tail()
    journals = sorted((tmp_path / "g").glob("journal.*.log"))
    assert len(journals) == 1 and journals[0].stat().st_size == 0      # folded into the snapshot
    with Pipeline.load(model_dir, backend="onnxruntime") as pipe, GalleryStore(tmp_path / "g", pipe) as store:
        assert store.gallery.ids == [f"s{i}" for i in range(5)] and store.replayed == 0
        np.testing.assert_array_equal(store.gallery.embeddings, x)


def test_kill_9_mid_stream_keeps_every_acknowledged_add_and_nothing_else(model_dir, tmp_path):
    from runtime.serving.gallery_store import GalleryStore

    srv = Server(model_dir, tmp_path / "g", tmp_path / "serve.log")
    acked, sent, errors, stop = [], [], [], threading.Event()
    width = None
    try:
        client = srv.client()
        width = int(client.get_model_config("gallery_add")["input"][0]["dims"][1])
        rng = np.random.default_rng(3)
        rows = {}

        def stream():
            sender = srv.client()        # tritonclient.http is gevent-based: one client per thread
            n = 0
            try:
                while not stop.is_set():
                    ids = [f"k{n}-{j}" for j in range(2)]
                    x = rng.standard_normal((2, width)).astype(np.float32)
                    rows.update(zip(ids, x))
                    sent.append(ids)
                    try:
                        add(sender, x, ids, [0, 1])
                    except Exception as err:
                        errors.append(err)
                        return
                    acked.extend(ids)
                    n += 1
            finally:
                sender.close()

        th = threading.Thread(target=stream)
        th.start()
        deadline = time.monotonic() + 120
        while len(acked) < 40 and time.monotonic() < deadline and th.is_alive():
            time.sleep(0.05)
        os.killpg(srv.proc.pid, signal.SIGKILL)          # mid-stream: the server gets no chance to flush
        srv.proc.wait(30)
        stop.set()
        th.join(60)
        client.close()
    finally:
        srv.kill()
    assert len(acked) >= 40, (len(acked), errors[:1], srv.tail())
    in_flight = set(sent[-1]) if sent and sent[-1][0] not in acked else set()
    srv2 = Server(model_dir, tmp_path / "g", tmp_path / "serve2.log")
    try:
        client = srv2.client()
        probe = np.stack([rows[i] for i in acked])
        ids, dist, _ = search(client, probe, np.full(len(probe), -1), 1, "encoder")
        assert [i.decode() for i in ids[:, 0]] == acked and float(dist.max()) < 1e-3   # restart serves them
        client.close()
        assert srv2.terminate() == 0, srv2.tail()
    finally:
        srv2.kill()
    with Pipeline.load(model_dir, backend="onnxruntime") as pipe, GalleryStore(tmp_path / "g", pipe) as store:
        present = set(store.gallery.ids)
    assert set(acked) <= present <= set(acked) | in_flight, (len(acked), len(present), in_flight)


def test_a_port_in_use_is_one_clear_error_before_anything_is_written(model_dir, tmp_path):
    import socket

    from click.testing import CliRunner

    from runtime.cli import main as runtime_cli

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(runtime_cli, ["serve", str(model_dir), "--gallery", str(tmp_path / "g"),
                                                  "--grpc-port", str(port)])
    assert result.exit_code == 2 and f"--grpc-port {port}" in result.output and "not free" in result.output
    assert not (tmp_path / "g").exists()


def _resolves_to_ipv6(name):
    import socket

    try:
        return socket.getaddrinfo(name, 80, type=socket.SOCK_STREAM)[0][0] == socket.AF_INET6
    except OSError:
        return False


def test_non_finite_encoder_outputs_name_their_request():
    from export.contract.errors import InputError
    from runtime.serving.triton_server import _finite

    x = np.zeros((6, 4), np.float32)
    assert _finite(x, "encoder", [2, 3, 1]) is x
    x[3, 1] = np.nan
    with pytest.raises(InputError, match=r"1 image\(s\) \(request 2 of the 3 batched together\)"):
        _finite(x, "encoder", [2, 3, 1])
    x[3, 1], x[5, 0] = 0, np.inf
    with pytest.raises(InputError, match="request 3 of the 3"):
        _finite(x, "embed", [2, 3, 1])
    with pytest.raises(InputError, match=r"embed: the encoder's embeddings of 1 image\(s\) are not finite"):
        _finite(x, "embed", [6])


def test_a_batch_of_embed_requests_holds_one_requests_decoded_images_at_a_time(model_dir, tmp_path):
    """The per-request pixel cap bounded one request, but a dynamic batch kept every request's
    full-size decoded images until the encoder ran (8 requests of one 7000 x 7000 crop: 1.5 GB).
    Each request's images are now preprocessed and released before the next request is decoded;
    the embeddings are those of the in-process pipeline."""
    import gc
    import weakref

    from runtime.serving.triton_server import bind_models, open_service

    class FakeTriton:
        def __init__(self):
            self.models = {}

        def bind(self, name, fn, **kwargs):
            self.models[name] = fn

    gc.disable()                                   # reference counting alone must free them
    try:
        service = open_service(model_dir, tmp_path / "g", max_batch=MAX_BATCH)
        try:
            triton = FakeTriton()
            bind_models(triton, service, MAX_BATCH)
            alive, real_decode = [], service.decode

            def decode(crops):
                assert not [r for r in alive if r() is not None], "an earlier request's images are still held"
                images = real_decode(crops)
                alive.extend(weakref.ref(img) for img in images)
                return images
            service.decode = decode
            crops = [png(i, size=(900, 400)) for i in range(4)]
            out = triton.models["embed"]([{"crops": np.array([c], dtype=object)} for c in crops])
            with Pipeline.load(model_dir, batch_size=MAX_BATCH, backend="onnxruntime") as pipe:
                want = pipe.embed([Image.open(io.BytesIO(c)) for c in crops])
            np.testing.assert_array_equal(np.concatenate([o["embeddings"] for o in out]), want)
        finally:
            service.close()
    finally:
        gc.enable()


@pytest.mark.parametrize("host, words", [("::1", "IPv6"), ("[::1]", "IPv6"),
                                         ("10.255.255.1", "not an address of this machine")]
                         + ([("ip6-localhost", "resolves to the IPv6 address")] if _resolves_to_ipv6("ip6-localhost")
                            else []))
def test_hosts_serve_cannot_use_are_one_clear_error_before_anything_is_written(model_dir, tmp_path, host, words):
    """An IPv6 literal ended in PyTriton's traceback after the gallery was created; an address of
    another machine was reported as a port another server holds."""
    from click.testing import CliRunner

    from runtime.cli import main as runtime_cli

    result = CliRunner().invoke(runtime_cli, ["serve", str(model_dir), "--gallery", str(tmp_path / "g"),
                                              "--host", host])
    assert result.exit_code == 2 and words in result.output and "Traceback" not in result.output, result.output
    assert not (tmp_path / "g").exists()


def test_a_host_name_that_resolves_to_ipv6_first_is_refused(monkeypatch):
    """Only IPv6 literals were refused; a name whose first address is IPv6 (ip6-localhost, or
    localhost on some hosts) reached PyTriton and its traceback."""
    import socket

    from export.contract.errors import InputError
    from runtime.serving.triton_server import check_ports

    monkeypatch.setattr(socket, "getaddrinfo", lambda host, port, **kw: [
        (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("::1", port, 0, 0))])
    with pytest.raises(InputError, match="'six-only-host' resolves to the IPv6 address ::1"):
        check_ports("six-only-host", {"--http-port": 18000})


def test_a_dead_model_stub_stops_the_service_with_its_gallery_saved(model_dir, tmp_path):
    """Killing one model's Python backend stub (the OOM killer would) left that model answering
    "Stub process ... is not healthy" forever while Triton reported it ready; the service now stops
    with an error naming the model, after saving its gallery, so that a supervisor restarts it."""
    from runtime.serving.triton_server import MODELS, stub_processes

    srv = Server(model_dir, tmp_path / "g", tmp_path / "serve.log")
    try:
        client = srv.client()
        width = int(client.get_model_config("gallery_add")["input"][0]["dims"][1])
        add(client, np.random.default_rng(3).standard_normal((3, width)).astype(np.float32), ["a", "b", "c"],
            np.zeros(3))
        client.close()
        stubs = stub_processes(srv.proc.pid)
        assert sorted(m for m, _ in stubs.values()) == sorted(MODELS), stubs
        victim = next(pid for pid, (m, _) in stubs.items() if m == "gallery_search")
        os.kill(victim, signal.SIGKILL)
        rc = srv.proc.wait(timeout=120)
    finally:
        srv.kill()
    out = srv.tail()
    assert rc != 0 and "stub of model gallery_search" in out and "stopped; gallery" in out, out
    assert "Traceback" not in out, out
    from runtime.serving.gallery_store import GalleryStore

    with Pipeline.load(model_dir, backend="onnxruntime") as pipe, GalleryStore(tmp_path / "g", pipe) as store:
        assert store.gallery.ids == ["a", "b", "c"]
