"""The one encode -> refine -> score loop with numpy runners, and the refinement-precision rule."""
from __future__ import annotations

import numpy as np
import pytest

from export.contract.config import ModelConfig
from export.contract.landmarks import sample_landmarks
from runtime.evaluation.loop import image_chunks, run_loop, score
from runtime.evaluation.metrics import euclidean_distances, evaluate_rank
from export.contract.variants import refinement_precision
from runtime.evaluation.runners import Runner
from runtime.refiner import l2_normalize

CONFIG = ModelConfig(arch="resnet18", widths=(16, 32, 64, 128), stem_width=16, feature_dim=8, n_embd=8,
                     input_size_hw=(32, 16))


@pytest.mark.parametrize("encoder, available, want", [
    ("fp32", ("fp32", "fp16"), "fp32"), ("fp32", ("fp16",), "fp32"),
    ("fp16", ("fp32", "fp16"), "fp16"), ("fp16", ("fp32",), "fp32"),
    ("int8", ("fp32", "fp16"), "fp16"), ("int8", ("fp32",), "fp32"), ("int8", (), "fp32")])
def test_refinement_precision_rule(encoder, available, want):
    assert refinement_precision(encoder, available) == want
    assert refinement_precision(encoder) == ("fp32" if encoder == "fp32" else "fp16")


def _runner(name, weights, seen):
    def encode(images):
        return images.reshape(len(images), -1) @ weights

    def refine(x, lm):
        seen.append((name, lm.copy(), np.linalg.norm(x, axis=1)))
        return x + x.mean(0)

    return Runner(name, "fp32", "fp32", encode, refine)


def test_loop_matches_a_direct_computation_for_every_runner():
    rng = np.random.default_rng(0)
    n, nq = 30, 6
    images = rng.standard_normal((n, 3, 32, 16)).astype(np.float32)
    pids = np.repeat(np.arange(10), 3)
    cams = np.tile([0, 1, 2], 10)
    order = np.r_[np.arange(0, n, 5), np.setdiff1d(np.arange(n), np.arange(0, n, 5))]  # queries first
    images, pids, cams = images[order], pids[order], cams[order]
    w = [rng.standard_normal((3 * 32 * 16, 8)).astype(np.float32) for _ in range(2)]
    seen = []
    runners = [_runner("a", w[0], seen), _runner("b", w[1], seen)]
    chunks = [images[s:s + 7] for s in range(0, n, 7)]
    results = run_loop(runners, chunks, query=nq, pids=pids, camids=cams, config=CONFIG, seed=4, max_rank=10)
    lm = sample_landmarks(n, CONFIG.n_layer, CONFIG.landmarks, 4)
    assert [s[0] for s in seen] == ["a", "b"]
    for name, got_lm, norms in seen:
        np.testing.assert_array_equal(got_lm, lm)        # the same landmarks for every runner
        np.testing.assert_allclose(norms, 1, atol=1e-6)  # the refinement gets unit rows
    for res, weights in zip(results, w):
        raw = images.reshape(n, -1) @ weights
        np.testing.assert_allclose(res.raw, raw, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(res.encoder, l2_normalize(raw), atol=1e-5)
        refined = l2_normalize(res.encoder + res.encoder.mean(0))
        np.testing.assert_allclose(res.refined, refined, atol=1e-6)
        for stage, emb in (("encoder", res.encoder), ("refined", res.refined)):
            cmc, mAP = evaluate_rank(euclidean_distances(emb[:nq], emb[nq:]), pids[:nq], pids[nq:], cams[:nq],
                                     cams[nq:], 10)
            assert res.stages[stage].mAP == pytest.approx(mAP)
            np.testing.assert_allclose(res.stages[stage].cmc, cmc)
            assert res.stages[stage].as_dict()["rank1"] == pytest.approx(cmc[0])
            assert res.stages[stage].rank(50) == pytest.approx(cmc[-1])
        assert set(res.seconds) == {"read", "encoder", "refinement"}


def test_image_chunks_read_lazily_in_order(tmp_path):
    from PIL import Image

    paths = []
    for i in range(5):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(np.full((64, 32, 3), 40 * i, np.uint8)).save(paths[-1])
    counted = []
    chunks = list(image_chunks(paths, CONFIG, chunk=2, progress=counted.append))
    assert [len(c) for c in chunks] == [2, 2, 1] and counted == [2, 2, 1]
    assert chunks[0].shape[1:] == (3, 32, 16)
    means = np.concatenate(chunks).mean(axis=(1, 2, 3))
    assert np.all(np.diff(means) > 0)


def test_score_is_the_market1501_protocol():
    x = l2_normalize(np.eye(4, dtype=np.float32) + 0.1)
    s = score(x[:2], x[2:], [1, 2], [1, 2], [0, 0], [1, 1])
    assert s.mAP == pytest.approx(evaluate_rank(euclidean_distances(x[:2], x[2:]), [1, 2], [1, 2], [0, 0], [1, 1])[1])


@pytest.mark.parametrize("max_rank", [1, 3, 9])
def test_short_max_rank_still_reports_true_rank5_and_rank10(max_rank):
    """``runtime evaluate --max-rank 1`` reported Rank-1 under rank5 and rank10: the curve was cut at
    max_rank and StageScores.rank(k) read its last point."""
    rng = np.random.default_rng(3)
    q = l2_normalize(rng.standard_normal((40, 8)))
    g = l2_normalize(rng.standard_normal((200, 8)))
    q_pids, g_pids = rng.integers(0, 20, 40), rng.integers(0, 20, 200)
    q_cams, g_cams = np.zeros(40, int), np.ones(200, int)
    full, mAP = evaluate_rank(euclidean_distances(q, g), q_pids, g_pids, q_cams, g_cams, 50)
    assert full[0] < full[4] < full[9]                     # the case can tell the ranks apart
    got = score(q, g, q_pids, g_pids, q_cams, g_cams, max_rank=max_rank)
    assert got.as_dict() == {"mAP": pytest.approx(mAP), "rank1": pytest.approx(full[0]),
                             "rank5": pytest.approx(full[4]), "rank10": pytest.approx(full[9])}
    np.testing.assert_allclose(got.cmc[:max_rank], full[:max_rank])
