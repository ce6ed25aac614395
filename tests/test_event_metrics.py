"""Event metrics: tIoU, ActivityNet localisation / captions, baselines, moment retrieval.

Expected values are worked out by hand in the comments.
"""
import random
import string

import numpy as np
import pytest

from vlpjax.evaluators import caption_metrics
from vlpjax.evaluators import event_metrics as em
from vlpjax.evaluators import java_metrics
from vlpjax.evaluators import video_evals

# -- tIoU ------------------------------------------------------------------------------------


@pytest.mark.parametrize("a,b,want", [
    ((0, 2), (1, 3), 1 / 3),       # overlap [1, 2]: 1 / (2 + 2 - 1)
    ((0, 20), (10, 30), 1 / 3),    # the same in other units: scale free
    ((0, 10), (2, 4), 0.2),        # nested: 2 / 10
    ((0, 1), (2, 3), 0.0),         # disjoint
    ((0, 1), (1, 2), 0.0),         # touching: the intersection has length 0
    ((0.5, 1.5), (0.5, 1.5), 1.0),  # identical
    ((1, 1), (1, 1), 0.0),         # zero length, even against itself: 0 / 0 -> 0
    ((0.5, 0.5), (0, 1), 0.0),     # a point inside a segment
    ((3, 1), (0, 4), 0.0),         # reversed: covers no time
    ((3, 1), (3, 1), 0.0),
])
def test_tiou_by_hand(a, b, want):
  assert em.tiou(a, b) == pytest.approx(want, abs=1e-12)
  assert em.tiou(b, a) == pytest.approx(want, abs=1e-12)


def test_tiou_matrix_matches_pairs():
  pred = [(0, 2), (1, 1), (5, 9), (3, 2)]
  gt = [(1, 3), (0, 10), (6, 7)]
  matrix = em.tiou_matrix(pred, gt)
  assert matrix.shape == (4, 3)
  for i, p in enumerate(pred):
    for j, g in enumerate(gt):
      assert matrix[i, j] == em.tiou(p, g)
  # (5, 9) vs (0, 10): 4 / 10; (5, 9) vs (6, 7): 1 / 4.
  np.testing.assert_allclose(matrix[2], [0.0, 0.4, 0.25])
  assert em.tiou_matrix([], gt).shape == (0, 3)
  assert em.tiou_matrix(pred, np.zeros((0, 2))).shape == (4, 0)


@pytest.mark.parametrize("segments,message", [
    ([(0, float("nan"))], "NaN or infinite"),
    ([(0, float("inf"))], "NaN or infinite"),
    ([(0, 1, 2)], r"shape \[n, 2\]"),
])
def test_tiou_bad_input(segments, message):
  with pytest.raises(ValueError, match=message):
    em.tiou_matrix(segments, [(0, 1)])


# -- localisation ----------------------------------------------------------------------------

# Video 1 (seconds): refs (0, 10), (20, 30); preds (0, 10) [tIoU 1 with ref 0], (5, 15)
#   [5 / 15 = 1/3 with ref 0], (40, 50) [nothing].
# Video 2: ref (0, 1), pred (0, 0.5): tIoU exactly 0.5, which does not pass t = 0.5 (strict >).
# Video 3: ref (0.2, 0.6), no prediction: precision 0 and recall 0.
# Video 4: no reference: left out, whatever it predicts.
PREDICTIONS = [[(0, 10), (5, 15), (40, 50)], [(0, 0.5)], [], [(0, 1)]]
REFERENCES = [[(0, 10), (20, 30)], [(0, 1)], [(0.2, 0.6)], []]


def test_localisation_by_hand():
  scores = em.localisation_scores(PREDICTIONS, REFERENCES)
  # t = 0.3: P = (2/3 + 1 + 0) / 3 = 5/9, R = (1/2 + 1 + 0) / 3 = 1/2,
  #          F1 = 2 (5/9)(1/2) / (5/9 + 1/2) = (5/9) / (19/18) = 10/19.
  # t = 0.5, 0.7, 0.9: P = (1/3 + 0 + 0) / 3 = 1/9, R = (1/2 + 0 + 0) / 3 = 1/6,
  #          F1 = 2 (1/54) / (1/9 + 1/6) = (1/27) / (5/18) = 2/15.
  want = {"precision@0.3": 5 / 9, "recall@0.3": 1 / 2, "f1@0.3": 10 / 19}
  for t in (0.5, 0.7, 0.9):
    want.update({f"precision@{t}": 1 / 9, f"recall@{t}": 1 / 6, f"f1@{t}": 2 / 15})
  # Means: P = (5/9 + 3 * 1/9) / 4 = 2/9, R = (1/2 + 3 * 1/6) / 4 = 1/4,
  #        F1 = 2 (2/9)(1/4) / (2/9 + 1/4) = (1/9) / (17/36) = 4/17.
  want.update(precision=2 / 9, recall=1 / 4, f1=4 / 17)
  assert scores.keys() == want.keys()
  for key, value in want.items():
    assert scores[key] == pytest.approx(value, abs=1e-12), key


def test_localisation_perfect_and_custom_thresholds():
  refs = [[(0, 0.3), (0.3, 1.0)], [(0.1, 0.2)]]
  scores = em.localisation_scores(refs, refs, thresholds=(0.5,))
  assert scores == {"precision@0.5": 1.0, "recall@0.5": 1.0, "f1@0.5": 1.0,
                    "precision": 1.0, "recall": 1.0, "f1": 1.0}


def test_localisation_bad_input():
  with pytest.raises(ValueError, match="same videos"):
    em.localisation_scores([[]], [[(0, 1)], [(0, 1)]])
  with pytest.raises(ValueError, match="no video has a reference"):
    em.localisation_scores([[(0, 1)]], [[]])
  with pytest.raises(ValueError, match="thresholds"):
    em.localisation_scores([[]], [[(0, 1)]], thresholds=(0.5, 1.5))
  with pytest.raises(ValueError, match=r"predictions\[0\]"):
    em.localisation_scores([[(0, float("nan"))]], [[(0, 1)]])


# -- dense captions --------------------------------------------------------------------------

DOOR = "a man opens the door slowly"
DOG = "the dog runs across the yard"


def test_dense_caption_scores_by_hand():
  # Video A: pred 0 = ref 0 (tIoU 1, same caption); pred 1 (0.5, 0.8) vs ref 1 (0.5, 1.0):
  #   tIoU 0.3 / 0.5 = 0.6, same caption.
  #   t = 0.3, 0.5: two items, each a perfect caption. With M = 2 items every n-gram but
  #     "the" has idf log 2 > 0, so each order's tf-idf vector is non-zero and the cosine of
  #     a caption with itself is 1: CIDEr-D = 10 * 1 * exp(0) = 10 per item, 10 for the video.
  #   t = 0.7, 0.9: pred 1 matches nothing and is scored against a no-match reference (0);
  #     pred 0 still scores 10 (M = 2): the video scores (10 + 0) / 2 = 5.
  # Video B: no prediction: 0.  Video C: no reference: left out.
  preds = [[(0.0, 0.4, DOOR), (0.5, 0.8, DOG)], [], [(0.0, 1.0, "anything")]]
  refs = [[(0.0, 0.4, DOOR), (0.5, 1.0, DOG)], [(0.0, 1.0, "a red circle appears")], []]
  scores = em.dense_caption_scores(preds, refs)
  want = {"cider@0.3": 5.0, "cider@0.5": 5.0, "cider@0.7": 2.5, "cider@0.9": 2.5,
          "cider": 3.75}
  for key, value in want.items():
    assert scores[key] == pytest.approx(value, abs=1e-9), key
  # The localisation part is `localisation_scores` of the segments.
  segments = [[e[:2] for e in video] for video in preds]
  ref_segments = [[e[:2] for e in video] for video in refs]
  localisation = em.localisation_scores(segments, ref_segments)
  assert {k: v for k, v in scores.items() if not k.startswith("cider")} == localisation
  # Video A: P = R = 1 at 0.3 / 0.5, 1/2 at 0.7 / 0.9; video B: 0.  Means over videos:
  # 1/2, 1/2, 1/4, 1/4; over thresholds 3/8.
  assert localisation["precision"] == localisation["recall"] == localisation["f1"] == 0.375


def test_dense_caption_items_per_video():
  # One prediction overlapping two references gives two items (one per reference), and the
  # corpus is the video's items: the same as cider_d over these items written out by hand.
  preds = [[(0.0, 1.0, "a man walks a dog"), (0.9, 1.0, "people clap")]]
  refs = [[(0.0, 0.8, "a man walks his dog"), (0.2, 1.0, "a dog walks with a man"),
           (0.0, 0.1, "people clap loudly")]]
  # tIoU: pred 0 vs refs 0.8, 0.8, 0.1; pred 1 vs refs 0, 0.1 / 0.8 = 0.125, 0.
  scores = em.dense_caption_scores(preds, refs, thresholds=(0.5,))
  want, _ = caption_metrics.cider_d(
      {0: "a man walks a dog", 1: "a man walks a dog", 2: "people clap"},
      {0: ["a man walks his dog"], 1: ["a dog walks with a man"], 2: ["\x00no-match"]})
  assert scores["cider@0.5"] == pytest.approx(want, abs=1e-12)
  assert 0 < want < 10


def test_dense_caption_single_item_video_scores_zero():
  # The evaluator's quirk: with one item per video every idf is log(1 / 1) = 0.
  scores = em.dense_caption_scores([[(0, 1, DOG)]], [[(0, 1, DOG)]])
  assert scores["cider"] == 0.0 and scores["f1"] == 1.0


def _meteor_reference(per_threshold_items):
  """{t: mean over videos of pycocoevalcap's Meteor of the video's (res, gts) items}."""
  from pycocoevalcap.meteor.meteor import Meteor  # pylint: disable=g-import-not-at-top
  scorer = Meteor()
  try:
    return {t: np.mean([scorer.compute_score({i: [r] for i, r in enumerate(refs)},
                                             {i: [c] for i, c in enumerate(cands)})[0]
                        if cands else 0.0 for cands, refs in videos])
            for t, videos in per_threshold_items.items()}
  finally:
    del scorer  # pycocoevalcap ends its java process in __del__.


@pytest.mark.skipif(not java_metrics.java_available(), reason="METEOR needs java")
def test_dense_caption_meteor_against_per_pair_pycocoevalcap():
  opens, runs, both = "a man opens a door", "a dog runs in the yard", "a man and a dog"
  unmatched = "no cat is matching the reference"  # Words of the CIDEr-style sentinels.
  sleeps, claps = "a cat sleeps on a sofa", "people clap"
  preds = [[(0.0, 0.4, opens), (0.5, 0.8, runs), (0.0, 1.0, both)],
           [(0.6, 1.0, unmatched)],
           [],
           [(0.0, 1.0, "a video without references")]]
  refs = [[(0.0, 0.4, DOOR), (0.5, 1.0, DOG)],
          [(0.0, 0.5, sleeps)],
          [(0.2, 0.6, claps)],
          []]
  # tIoU, video A: opens 1 / 0, runs 0 / 0.6, both 0.4 / 0.5; video B: 0. Video C has no
  # prediction (0), video D no reference (left out). The script's no-match reference is a
  # random word of 10-20 letters.
  nothing = "".join(random.Random(0).choice(string.ascii_lowercase) for _ in range(15))
  items = {
      0.3: [([opens, runs, both, both], [DOOR, DOG, DOOR, DOG]),
            ([unmatched], [nothing]), ([], [])],
      0.7: [([opens, runs, both], [DOOR, nothing, nothing]),
            ([unmatched], [nothing]), ([], [])],
  }
  want = _meteor_reference(items)
  scores = em.dense_caption_scores(preds, refs, thresholds=(0.3, 0.7), meteor=True)
  for t in (0.3, 0.7):
    assert scores[f"meteor@{t}"] == pytest.approx(want[t], abs=1e-12), t
  assert scores["meteor"] == pytest.approx((want[0.3] + want[0.7]) / 2, abs=1e-12)
  assert 0 < scores["meteor@0.7"] < scores["meteor@0.3"] < 1
  # Localisation and CIDEr do not change.
  plain = em.dense_caption_scores(preds, refs, thresholds=(0.3, 0.7))
  assert {k: v for k, v in scores.items() if not k.startswith("meteor")} == plain
  assert not any(k.startswith("meteor") for k in plain)


def test_dense_caption_meteor_without_java_fails_first(monkeypatch, tmp_path):
  monkeypatch.setenv("PATH", str(tmp_path))  # An empty directory: no java on PATH.
  with pytest.raises(RuntimeError, match="METEOR cannot run here, it lacks Java"):
    em.dense_caption_scores([[]], [[(0, 1, DOG)]], meteor=True)  # Even with no item at all.
  with pytest.raises(ValueError, match=r"evals.dense.java_metrics=True, but METEOR cannot "
                                       r"run here: Java"):
    video_evals.DenseCaptioning("dense", dict(task="unused", java_metrics=True),
                                config=None, family=None, mesh=None)
  with pytest.raises(ValueError, match=r"evals.dense.java_metrics must be one of"):
    video_evals.DenseCaptioning("dense", dict(task="unused", java_metrics="always"),
                                config=None, family=None, mesh=None)


def test_dense_caption_bad_events():
  with pytest.raises(ValueError, match=r"pred_events\[0\]: event 0"):
    em.dense_caption_scores([[(0, 1)]], [[(0, 1, "a")]])


# -- fixed segments --------------------------------------------------------------------------


def test_fixed_segments():
  assert em.fixed_segments(1) == [(0.0, 1.0)]
  assert em.fixed_segments(4, duration=10.0) == [(0, 2.5), (2.5, 5), (5, 7.5), (7.5, 10)]
  with pytest.raises(ValueError, match="num_segments"):
    em.fixed_segments(0)
  with pytest.raises(ValueError, match="duration"):
    em.fixed_segments(2, duration=0.0)


def test_best_fixed_segments_by_hand():
  # One reference (0, 0.5) per video.
  #   k = 1: (0, 1) has tIoU 0.5: matches at t = 0.3 only: P = R = (1, 0, 0, 0), means 1/4,
  #          F1 1/4.
  #   k = 2: (0, 0.5) is exact: P = 1/2 and R = 1 at every t: F1 = 2 (1/2) / (3/2) = 2/3.
  #   k = 3: (0, 1/3) has tIoU 2/3 (t = 0.3, 0.5), (1/3, 2/3) has (1/6) / (2/3) = 1/4:
  #          P = 1/3, 1/3, 0, 0 -> 1/6; R = 1, 1, 0, 0 -> 1/2; F1 = (1/6) / (2/3) = 1/4.
  #   k = 4: (0, 1/4) and (1/4, 1/2) have tIoU exactly 1/2: match at t = 0.3 only:
  #          P = 1/2 -> 1/8, R = 1 -> 1/4, F1 = (1/16) / (3/8) = 1/6.
  refs = [[(0.0, 0.5)]] * 3
  k, scores = em.best_fixed_segments_baseline(refs, max_segments=4)
  assert k == 2
  assert scores["precision"] == 0.5 and scores["recall"] == 1.0
  assert scores["f1"] == pytest.approx(2 / 3, abs=1e-12)
  assert scores == em.localisation_scores([em.fixed_segments(2)] * 3, refs)


def test_best_fixed_segments_with_durations():
  # Quarters of a 10 s and a 20 s clip: four equal segments are exact once durations are known.
  refs = [em.fixed_segments(4, 10.0), em.fixed_segments(4, 20.0)]
  k, scores = em.best_fixed_segments_baseline(refs, durations=[10.0, 20.0])
  assert k == 4 and scores["f1"] == 1.0
  # Measured on [0, 1] instead, the 20 s clip's quarters are out of reach (k = 4 is wrong).
  k, scores = em.best_fixed_segments_baseline(refs)
  assert scores["f1"] < 1.0
  with pytest.raises(ValueError, match="one duration per video"):
    em.best_fixed_segments_baseline(refs, durations=[10.0])


# -- moment retrieval ------------------------------------------------------------------------


def test_grounding_by_hand():
  # tIoU 1, 0.5 (counts at u = 0.5: >=), 0: R1@0.5 = 2/3, R1@0.7 = 1/3, mIoU = 1.5 / 3.
  pred = np.array([[0, 1], [0, 0.5], [2, 3]])
  gt = np.array([[0, 1], [0, 1], [0, 1]])
  scores = em.grounding_scores(pred, gt)
  assert scores == pytest.approx({"r1@0.5": 2 / 3, "r1@0.7": 1 / 3, "miou": 0.5})
  assert em.grounding_scores(pred, gt, ious=(0.3,)).keys() == {"r1@0.3", "miou"}
  with pytest.raises(ValueError, match="one prediction per ground-truth window"):
    em.grounding_scores(pred[:2], gt)


def test_random_window_closed_form():
  # gt = the whole clip: tIoU = e - s = |U1 - U2|, density 2 (1 - x) on [0, 1]:
  # E = 1/3, P(>= 0.5) = (1 - 0.5)^2 = 1/4, P(>= 0.7) = 0.3^2 = 0.09.
  # Standard errors with 2e5 draws: 0.24 / 447 = 5e-4 (mIoU), 1e-3 (R1@0.5).
  scores = em.random_window_baseline([[0.0, 1.0]], num_draws=200_000)
  assert scores["miou"] == pytest.approx(1 / 3, abs=3e-3)
  assert scores["r1@0.5"] == pytest.approx(0.25, abs=5e-3)
  assert scores["r1@0.7"] == pytest.approx(0.09, abs=4e-3)


def test_random_window_against_grid_integration():
  # E over (U1, U2) uniform on the unit square of tIoU(sorted pair, gt), integrated on a
  # 1000 x 1000 midpoint grid with the overlap written out independently.
  gt = np.array([[0.2, 0.5], [0.6, 0.95]])
  u = (np.arange(1000) + 0.5) / 1000
  s, e = np.minimum.outer(u, u), np.maximum.outer(u, u)
  want_miou, want_r1 = [], []
  for g0, g1 in gt:
    overlap = np.clip(np.minimum(e, g1) - np.maximum(s, g0), 0, None)
    iou = overlap / ((e - s) + (g1 - g0) - overlap)
    want_miou.append(iou.mean())
    want_r1.append((iou >= 0.5).mean())
  scores = em.random_window_baseline(gt, num_draws=50_000, seed=3)
  assert scores["miou"] == pytest.approx(np.mean(want_miou), abs=3e-3)
  assert scores["r1@0.5"] == pytest.approx(np.mean(want_r1), abs=4e-3)


def test_random_window_deterministic_and_checked():
  gt = [[0.1, 0.4], [0.3, 0.9]]
  assert em.random_window_baseline(gt, 100, seed=1) == em.random_window_baseline(gt, 100, 1)
  assert em.random_window_baseline(gt, 100, seed=1) != em.random_window_baseline(gt, 100, 2)
  with pytest.raises(ValueError, match=r"fractions of their clip in \[0, 1\]"):
    em.random_window_baseline([[2.0, 5.0]])


def test_mean_window_baseline():
  # Mean training window (0.1, 0.5): tIoU 1 with (0.1, 0.5), 0 with (0.5, 0.9).
  scores = em.mean_window_baseline([[0.1, 0.5], [0.5, 0.9]], [[0.0, 0.4], [0.2, 0.6]])
  assert scores == pytest.approx({"r1@0.5": 0.5, "r1@0.7": 0.5, "miou": 0.5})
