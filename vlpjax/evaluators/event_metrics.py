"""Metrics for timed events: dense video captioning and moment retrieval, with baselines.

Pure numpy and Python, deterministic. Times may be seconds or fractions of the clip: every
score here is a ratio of lengths, so it does not depend on the unit (the random-window
baseline alone needs fractions, see there).

Temporal IoU. A segment is (start, end); its length is max(0, end - start). For segments a, b
  tIoU(a, b) = |a ∩ b| / (|a| + |b| - |a ∩ b|),  |a ∩ b| = max(0, min(e_a, e_b) - max(s_a, s_b))
and tIoU = 0 when the denominator is 0. So a zero-length or reversed (end < start) segment has
tIoU 0 with everything, itself included: it covers no time, so it cannot match anything. This
is what the ActivityNet evaluator computes (it divides by union + 1e-8); reversed segments are
wrong predictions, not errors (model outputs may be anything), while NaN or infinite times
are bad input and raise ValueError.

Dense captioning follows the ActivityNet Captions evaluator (Krishna et al. 2017, the
`densevid_eval` script that Vid2Seq and PDVC report with), for one reference set per video:

* Localisation, per tIoU threshold t: in each video, precision is the fraction of predicted
  segments with tIoU > t to some reference, recall the fraction of references with tIoU > t
  to some prediction. A video without predictions has precision 0. Both are averaged over
  the videos; videos without references are left out (the evaluator cannot score them:
  their recall is 0 / 0), and at least one video must have references. The script compares
  with a strict `>` (and its caption matching's `>=` meets the 1e-8 in its IoU), so a tIoU
  exactly equal to t does not count, here as there; that matters for quantised times, where
  a tIoU of exactly 0.5 is common.
* The summary "precision" / "recall" are the means over thresholds, and "f1" the harmonic
  mean of those two means, 2 P R / (P + R) (0 when both are 0), as Vid2Seq and PDVC report it.
  The per-threshold f1@t is likewise the harmonic mean of the video-averaged P@t and R@t.
* Captions, per threshold t: every (prediction, reference) pair of a video with tIoU > t is
  one scored item, the prediction's caption against that reference's; a prediction with no
  such reference is one item against a one-word reference that matches nothing (the script
  draws a random word of 10-20 letters; any such word gives the same scores, its length of
  one word included). CIDEr-D (`caption_metrics.cider_d`) is computed per video with that
  video's items as the corpus (the idf comes from them: a video with a single item scores 0,
  the script's quirk), a video without predictions scores 0, and the score is the mean over
  videos with references; "cider" is the mean over thresholds.
* METEOR, the script's headline (`meteor=True`; it needs Java, see `java_metrics`), the same
  way: per video and threshold the video's items are one METEOR corpus, scored as the jar
  scores a corpus (match statistics summed over the items, then one score: what the
  script's per-video `compute_score` returns), a video without predictions scores 0, and
  "meteor@t" is the mean over videos, "meteor" the mean over thresholds. The items of all
  videos and thresholds go through one Java process (one per video would take hours).

Moment retrieval (Charades-STA, QVHighlights, ... as in Moment-DETR's evaluation): each query
has one ground-truth window and one top-1 prediction; R1@u is the fraction of queries whose
prediction has tIoU >= u (here `>=`, that field's convention), mIoU the mean tIoU.
"""
import math
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from vlpjax.evaluators import caption_metrics
from vlpjax.evaluators import java_metrics

THRESHOLDS = (0.3, 0.5, 0.7, 0.9)     # ActivityNet Captions / YouCook2 / ViTT.
GROUNDING_IOUS = (0.5, 0.7)           # Charades-STA / QVHighlights R1@IoU.
Segment = Tuple[float, float]
Event = Tuple[float, float, str]
CaptionItems = Tuple[Dict[int, str], Dict[int, List[str]]]        # (candidates, references)
Video = Tuple[np.ndarray, List[str], List[str]]   # (tIoU [P, G], predicted, reference captions)

# The reference given to a caption that matched no reference: one word that captions do not
# contain (the script draws a random one). Letters only: METEOR splits words at punctuation
# and matches stems and paraphrases, so a sentinel such as "no-matching-reference" would
# match the words "no", "matching" and "reference" of a prediction.
_NO_MATCH = "qxzjvnomatchvjzxq"


# -- input checks ----------------------------------------------------------------------------

def finite_rows(values, names: Sequence[str], what: str, item: str) -> np.ndarray:
  """float64 [n, len(names)] rows (segments, boxes), after checking shape and finiteness."""
  width = len(names)
  array = np.asarray(values, dtype=np.float64)
  if array.size == 0:
    return np.zeros((0, width))
  if array.ndim != 2 or array.shape[1] != width:
    raise ValueError(f"{what} must be ({', '.join(names)}) {item}s, shape [n, {width}]; got "
                     f"shape {array.shape}.")
  if not np.all(np.isfinite(array)):
    bad = int(np.argwhere(~np.isfinite(array))[0, 0])
    raise ValueError(f"{what}: {item} {bad} {tuple(array[bad])} has a NaN or infinite value.")
  return array


def _as_segments(segments, what: str) -> np.ndarray:
  return finite_rows(segments, ("start", "end"), what, "segment")


def _check_thresholds(thresholds: Sequence[float], what: str = "thresholds") -> List[float]:
  thresholds = [float(t) for t in thresholds]
  if not thresholds or any(not 0 <= t <= 1 for t in thresholds):
    raise ValueError(f"{what} must be a non-empty list of values in [0, 1], got {thresholds}.")
  if len(set(thresholds)) != len(thresholds):
    raise ValueError(f"{what} has repeated values: {thresholds}.")
  return thresholds


def _check_videos(predictions: Sequence, references: Sequence) -> None:
  if len(predictions) != len(references):
    raise ValueError(f"predictions and references must list the same videos, got "
                     f"{len(predictions)} and {len(references)} videos.")
  if not any(len(refs) for refs in references):
    raise ValueError(f"no video has a reference segment (of {len(references)} videos): "
                     "nothing to score.")


def _split_events(events: Sequence, what: str) -> Tuple[np.ndarray, List[str]]:
  """(segments [n, 2], captions) of a video's (start, end, caption) events."""
  for i, event in enumerate(events):
    if len(event) != 3 or not isinstance(event[2], str):
      raise ValueError(f"{what}: event {i} must be (start, end, caption str), got {event!r}.")
  return (_as_segments([e[:2] for e in events], what), [e[2] for e in events])


# -- temporal IoU ----------------------------------------------------------------------------

def _iou(starts_a, ends_a, starts_b, ends_b) -> np.ndarray:
  """Elementwise tIoU of broadcastable start / end arrays (module docstring)."""
  intersection = np.maximum(0.0, np.minimum(ends_a, ends_b) - np.maximum(starts_a, starts_b))
  union = (np.maximum(0.0, ends_a - starts_a) + np.maximum(0.0, ends_b - starts_b)
           - intersection)
  return np.where(union > 0, intersection / np.where(union > 0, union, 1.0), 0.0)


def tiou_matrix(pred, gt) -> np.ndarray:
  """float64 [P, G]: tIoU of every predicted segment [P, 2] with every reference [G, 2]."""
  pred, gt = _as_segments(pred, "pred"), _as_segments(gt, "gt")
  return _iou(pred[:, None, 0], pred[:, None, 1], gt[None, :, 0], gt[None, :, 1])


def tiou(a: Segment, b: Segment) -> float:
  """tIoU of two segments (start, end); 0 if either is zero-length or reversed."""
  return float(tiou_matrix([a], [b])[0, 0])


def _paired_tiou(pred, gt) -> np.ndarray:
  """float64 [N]: tIoU of pred[i] with gt[i]."""
  pred, gt = _as_segments(pred, "pred"), _as_segments(gt, "gt")
  if len(pred) != len(gt) or not len(gt):
    raise ValueError(f"need one prediction per ground-truth window and at least one query, "
                     f"got {len(pred)} predictions for {len(gt)} windows.")
  return _iou(pred[:, 0], pred[:, 1], gt[:, 0], gt[:, 1])


# -- dense captioning: localisation ----------------------------------------------------------

def _harmonic_mean(p: float, r: float) -> float:
  return 2 * p * r / (p + r) if p + r > 0 else 0.0


def _localisation_from_ious(ious: Sequence[np.ndarray], thresholds: Sequence[float]
                            ) -> Dict[str, float]:
  """Scores from each video's [P, G] tIoU matrix (videos with G = 0 already dropped)."""
  scores = {}
  for t in thresholds:
    precisions = [float(np.mean((m > t).any(axis=1))) if m.shape[0] else 0.0 for m in ious]
    recalls = [float(np.mean((m > t).any(axis=0))) for m in ious]
    p, r = float(np.mean(precisions)), float(np.mean(recalls))
    scores.update({f"precision@{t}": p, f"recall@{t}": r, f"f1@{t}": _harmonic_mean(p, r)})
  p = float(np.mean([scores[f"precision@{t}"] for t in thresholds]))
  r = float(np.mean([scores[f"recall@{t}"] for t in thresholds]))
  scores.update(precision=p, recall=r, f1=_harmonic_mean(p, r))
  return scores


def localisation_scores(predictions: Sequence[Sequence[Segment]],
                        references: Sequence[Sequence[Segment]],
                        thresholds: Sequence[float] = THRESHOLDS) -> Dict[str, float]:
  """ActivityNet event localisation precision / recall / F1 (module docstring).

  Args:
    predictions: per video, the predicted (start, end) segments (any number, maybe none).
    references: per video (same order), the reference segments; videos without any are
      left out of the averages.
    thresholds: tIoU thresholds t; a pair matches when tIoU > t.

  Returns:
    {"precision@t", "recall@t", "f1@t"} for each t (the key uses f"{t}"), and "precision",
    "recall" (means over thresholds) and "f1" (their harmonic mean).
  """
  thresholds = _check_thresholds(thresholds)
  _check_videos(predictions, references)
  ious = [tiou_matrix(_as_segments(p, f"predictions[{i}]"), _as_segments(r, f"references[{i}]"))
          for i, (p, r) in enumerate(zip(predictions, references)) if len(r)]
  return _localisation_from_ious(ious, thresholds)


# -- dense captioning: captions --------------------------------------------------------------

def _caption_items(iou: np.ndarray, pred_captions: List[str], ref_captions: List[str],
                   threshold: float) -> CaptionItems:
  """One video's caption items at one threshold (module docstring)."""
  candidates, references = {}, {}
  for p, caption in enumerate(pred_captions):
    matches = np.flatnonzero(iou[p] > threshold)
    for r in matches:
      candidates[len(candidates)] = caption
      references[len(references)] = [ref_captions[r]]
    if not len(matches):
      candidates[len(candidates)] = caption
      references[len(references)] = [_NO_MATCH]
  return candidates, references


def _video_cider(iou: np.ndarray, pred_captions: List[str], ref_captions: List[str],
                 threshold: float) -> float:
  """CIDEr-D of one video's caption items at one threshold (module docstring)."""
  candidates, references = _caption_items(iou, pred_captions, ref_captions, threshold)
  if not candidates:
    return 0.0
  return caption_metrics.cider_d(candidates, references)[0]


def _meteor_per_threshold(videos: Sequence[Video], thresholds: Sequence[float]
                          ) -> Dict[float, float]:
  """{t: mean over videos of the video's METEOR at t}, all through one Java process."""
  items = {(t, v): _caption_items(*video, t)
           for t in thresholds for v, video in enumerate(videos)}
  scored = [key for key, (candidates, _) in items.items() if candidates]
  results = java_metrics.meteor_corpora([items[key] for key in scored])
  per_video = {key: corpus_score for key, (corpus_score, _) in zip(scored, results)}
  return {t: float(np.mean([per_video.get((t, v), 0.0) for v in range(len(videos))]))
          for t in thresholds}


def dense_caption_scores(pred_events: Sequence[Sequence[Event]],
                         ref_events: Sequence[Sequence[Event]],
                         thresholds: Sequence[float] = THRESHOLDS,
                         meteor: bool = False) -> Dict[str, float]:
  """ActivityNet dense-captioning scores: localisation, CIDEr-D, METEOR (module docstring).

  Args:
    pred_events: per video, the predicted (start, end, caption) events, e.g.
      `video_targets.parse_events` of the model's output.
    ref_events: per video (same order), the reference events.
    thresholds: tIoU thresholds, as for `localisation_scores`.
    meteor: also score METEOR (needs Java: `java_metrics.java_available()`; a RuntimeError
      says what is missing otherwise).

  Returns:
    `localisation_scores` of the segments, plus "cider@t" per threshold and "cider", their
    mean, and with `meteor` likewise "meteor@t" and "meteor".
  """
  thresholds = _check_thresholds(thresholds)
  _check_videos(pred_events, ref_events)
  if meteor:
    java_metrics.require_meteor()  # Before any work, even where no video has an item.
  videos = []
  for i, (preds, refs) in enumerate(zip(pred_events, ref_events)):
    if not len(refs):
      continue
    pred_segments, pred_captions = _split_events(preds, f"pred_events[{i}]")
    ref_segments, ref_captions = _split_events(refs, f"ref_events[{i}]")
    videos.append((tiou_matrix(pred_segments, ref_segments), pred_captions, ref_captions))
  scores = _localisation_from_ious([iou for iou, _, _ in videos], thresholds)
  for t in thresholds:
    scores[f"cider@{t}"] = float(np.mean([_video_cider(*video, t) for video in videos]))
  scores["cider"] = float(np.mean([scores[f"cider@{t}"] for t in thresholds]))
  if meteor:
    per_threshold = _meteor_per_threshold(videos, thresholds)
    scores.update({f"meteor@{t}": per_threshold[t] for t in thresholds})
    scores["meteor"] = float(np.mean(list(per_threshold.values())))
  return scores


# -- dense captioning: the fixed-segments baseline -------------------------------------------

def fixed_segments(num_segments: int, duration: float = 1.0) -> List[Segment]:
  """`num_segments` equal, contiguous segments covering [0, duration]."""
  if not isinstance(num_segments, int) or num_segments < 1:
    raise ValueError(f"num_segments must be an int >= 1, got {num_segments!r}.")
  if not (math.isfinite(duration) and duration > 0):
    raise ValueError(f"duration must be finite and > 0, got {duration!r}.")
  return [(k * duration / num_segments, (k + 1) * duration / num_segments)
          for k in range(num_segments)]


def best_fixed_segments_baseline(references: Sequence[Sequence[Segment]],
                                 max_segments: int = 10,
                                 thresholds: Sequence[float] = THRESHOLDS,
                                 durations: Optional[Sequence[float]] = None
                                 ) -> Tuple[int, Dict[str, float]]:
  """The best "k equal segments" prediction: the bar a learned event localiser must clear.

  Every video is cut into the same number k of equal segments, for k = 1..max_segments; the
  k with the highest "f1" of `localisation_scores` wins (the smallest k on a tie). The
  baseline sees the references only to choose k, one number for the whole set, so it knows
  about as much as a dataset's typical event count.

  Args:
    references: per video, the reference (start, end) segments.
    max_segments: the largest k tried.
    thresholds: tIoU thresholds, as for `localisation_scores`.
    durations: per video, its length in the references' unit; default 1 for all (times as
      fractions of the clip).

  Returns:
    (k, the `localisation_scores` of k segments per video).
  """
  if not isinstance(max_segments, int) or max_segments < 1:
    raise ValueError(f"max_segments must be an int >= 1, got {max_segments!r}.")
  if durations is None:
    durations = [1.0] * len(references)
  if len(durations) != len(references):
    raise ValueError(f"need one duration per video, got {len(durations)} for "
                     f"{len(references)} videos.")
  best_k, best = 0, None
  for k in range(1, max_segments + 1):
    predictions = [fixed_segments(k, float(d)) for d in durations]
    scores = localisation_scores(predictions, references, thresholds)
    if best is None or scores["f1"] > best["f1"]:
      best_k, best = k, scores
  return best_k, best


# -- moment retrieval ------------------------------------------------------------------------

def _grounding_from_ious(ious: np.ndarray, thresholds: Sequence[float]) -> Dict[str, float]:
  scores = {f"r1@{u}": float(np.mean(ious >= u)) for u in thresholds}
  scores["miou"] = float(np.mean(ious))
  return scores


def grounding_scores(pred, gt, ious: Sequence[float] = GROUNDING_IOUS) -> Dict[str, float]:
  """Moment retrieval R1@u and mIoU of top-1 predictions.

  Args:
    pred: [N, 2] the top-1 predicted window of each query.
    gt: [N, 2] its ground-truth window (same unit as `pred`).
    ious: the thresholds u; a query counts when tIoU >= u.

  Returns:
    {"r1@u": fraction of queries with tIoU >= u (key f"r1@{u}"), "miou": mean tIoU}.
  """
  return _grounding_from_ious(_paired_tiou(pred, gt), _check_thresholds(ious, "ious"))


def random_window_baseline(gt, num_draws: int = 1000, seed: int = 0,
                           ious: Sequence[float] = GROUNDING_IOUS) -> Dict[str, float]:
  """`grounding_scores` of random windows: the chance level of a moment retriever.

  For each query and each of `num_draws` draws, two times are drawn independently and
  uniformly in [0, 1] and sorted into (start, end); the scores are averaged over draws and
  queries (the same as averaging `grounding_scores` over draws). A numpy Generator seeded
  with `seed` draws them, so the result is a function of (gt, num_draws, seed).

  Args:
    gt: [N, 2] ground-truth windows as fractions of their clip, in [0, 1] (divide seconds
      by the clip's duration first).
  """
  gt = _as_segments(gt, "gt")
  if not len(gt):
    raise ValueError("gt has no query.")
  if np.any(gt < 0) or np.any(gt > 1):
    raise ValueError("gt windows must be fractions of their clip in [0, 1] (divide by the "
                     f"duration), got values in [{gt.min()}, {gt.max()}].")
  if not isinstance(num_draws, int) or num_draws < 1:
    raise ValueError(f"num_draws must be an int >= 1, got {num_draws!r}.")
  windows = np.sort(np.random.default_rng(seed).random((num_draws, len(gt), 2)), axis=-1)
  iou = _iou(windows[..., 0], windows[..., 1], gt[None, :, 0], gt[None, :, 1])
  return _grounding_from_ious(iou, _check_thresholds(ious, "ious"))


def mean_window_baseline(gt, train_gt, ious: Sequence[float] = GROUNDING_IOUS
                         ) -> Dict[str, float]:
  """`grounding_scores` of predicting, for every query, the mean training window.

  The prediction is (mean start, mean end) of `train_gt` [M, 2]: the best a retriever that
  ignores video and query can learn under an L1/L2 loss on the boundaries. Both in the same
  unit (fractions of the clip when clips differ in length).
  """
  train_gt = _as_segments(train_gt, "train_gt")
  if not len(train_gt):
    raise ValueError("train_gt has no window.")
  gt = _as_segments(gt, "gt")
  return grounding_scores(np.broadcast_to(train_gt.mean(axis=0), gt.shape), gt, ious)
