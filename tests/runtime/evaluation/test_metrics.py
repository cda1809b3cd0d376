"""evaluate_rank on small cases computed by hand, and the Market-1501 reader."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from export.contract.errors import InputError
from export.contract.market1501 import parse_name, read_market1501
from runtime.evaluation.metrics import evaluate_rank


def test_single_query_hand_computed():
    # gallery order by distance: g0 (wrong), g1 (match), g2 (wrong), g3 (match)
    dist = np.array([[0.1, 0.2, 0.3, 0.4]])
    cmc, mAP = evaluate_rank(dist, [1], [2, 1, 3, 1], [0], [1, 1, 1, 1], max_rank=4)
    np.testing.assert_allclose(cmc, [0, 1, 1, 1])
    assert mAP == pytest.approx((1 / 2 + 2 / 4) / 2)


def test_same_camera_matches_are_removed_and_distractors_count_as_negatives():
    # g0: same id, same camera -> removed; g1: distractor (pid 0); g2: match from another camera
    dist = np.array([[0.0, 0.1, 0.2]])
    cmc, mAP = evaluate_rank(dist, [5], [5, 0, 5], [2], [2, 0, 1], max_rank=2)
    np.testing.assert_allclose(cmc, [0, 1])
    assert mAP == pytest.approx(0.5)


def test_queries_without_a_match_are_skipped():
    dist = np.array([[0.3, 0.1], [0.1, 0.2]])
    # query 0 (pid 7) has no match at all; query 1 (pid 8) matches g0 at rank 1
    cmc, mAP = evaluate_rank(dist, [7, 8], [8, 9], [0, 0], [1, 1], max_rank=2)
    np.testing.assert_allclose(cmc, [1, 1])
    assert mAP == 1.0


def test_ties_keep_gallery_order():
    dist = np.array([[0.5, 0.5, 0.5]])
    cmc, mAP = evaluate_rank(dist, [1], [2, 1, 1], [0], [1, 1, 1], max_rank=3)
    np.testing.assert_allclose(cmc, [0, 1, 1])
    assert mAP == pytest.approx((1 / 2 + 2 / 3) / 2)


def test_no_query_with_a_match_is_an_error():
    with pytest.raises(InputError, match="no query has a match"):
        evaluate_rank(np.zeros((1, 2)), [1], [2, 3], [0], [1, 1])


@pytest.mark.parametrize("max_rank", [0, -3, 2.5, True, np.float64(3.0), "5"])
def test_max_rank_must_be_a_positive_whole_number(max_rank):
    with pytest.raises(InputError, match="max_rank must be an integer >= 1"):     # export.contract.errors.check_count
        evaluate_rank(np.zeros((1, 3)), np.array([1]), np.array([1, 2, 1]), np.array([0]), np.array([1, 1, 1]),
                      max_rank=max_rank)


def test_max_rank_may_be_a_numpy_integer():
    cmc, _ = evaluate_rank(np.zeros((1, 3)), np.array([1]), np.array([1, 2, 1]), np.array([0]), np.array([1, 1, 1]),
                           max_rank=np.int64(2))
    assert cmc.shape == (2,)


def test_shape_mismatch_is_an_error():
    with pytest.raises(InputError, match="distmat must be"):
        evaluate_rank(np.zeros((2, 2)), [1], [2, 3], [0], [1, 1])


def test_parse_name():
    assert parse_name("0002_c1s1_000451_03.jpg") == (2, 0)
    assert parse_name("-1_c3s2_000000_00.jpg") == (-1, 2)
    assert parse_name("0000_c6s1_000001_01.jpg") == (0, 5)
    assert parse_name("Thumbs.db") is None
    for odd in ("12-3_c1s1_000000_01.jpg", "--1_c1s1_000000_01.jpg", "-_c1s1_000000_01.jpg", "-2_c1s1_000000_01.jpg"):
        assert parse_name(odd) is None, odd          # were int("12-3") ValueErrors in every reader


def test_reader_skips_junk_and_keeps_distractors(tmp_path):
    img = Image.new("RGB", (8, 16))
    layout = {"bounding_box_train": ["0002_c1s1_000451_03.jpg", "0002_c2s1_000451_03.jpg"],
              "query": ["0002_c1s1_000001_00.jpg"],
              "bounding_box_test": ["0002_c2s1_000002_00.jpg", "-1_c1s1_000003_00.jpg", "0000_c3s1_000004_00.jpg"]}
    for folder, names in layout.items():
        (tmp_path / folder).mkdir()
        for n in names:
            img.save(tmp_path / folder / n)
    (tmp_path / "query" / "notes.txt").write_text("ignored")
    data = read_market1501(tmp_path)
    assert [(i.pid, i.camid) for i in data.train] == [(2, 0), (2, 1)]
    assert [(i.pid, i.camid) for i in data.query] == [(2, 0)]
    assert [(i.pid, i.camid) for i in data.gallery] == [(0, 2), (2, 1)]
    assert data.summary()["gallery"] == {"images": 2, "identities": 2, "cameras": 2, "unnamed_skipped": 0}


def test_reader_names_what_is_missing(tmp_path):
    with pytest.raises(InputError, match="missing bounding_box_train, query, bounding_box_test"):
        read_market1501(tmp_path)


def test_names_with_ids_beyond_any_market_id_are_not_market_names():
    """A camera number past int64 was an OverflowError in `runtime threshold`."""
    assert parse_name("0001_c99999999999999999999s1_000001_01.jpg") is None
    assert parse_name("99999999999999999999_c1s1_000001_01.jpg") is None
    assert parse_name("123456789_c123456789s1_000001_01.jpg") == (123456789, 123456788)
