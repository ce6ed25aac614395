"""Metrics for document models: boxes and sentinel-keyed outputs (QA: `qa_metrics`).

Pure numpy and Python (a vocabulary is loaded only to decode token ids), deterministic.

Boxes are (x0, y0, x1, y1) in any one unit (normalised to [0, 1] when they come from loc
tokens). IoU = area(a ∩ b) / (area(a) + area(b) - area(a ∩ b)), with widths and heights
max(0, x1 - x0), max(0, y1 - y0); a degenerate box (zero or negative width or height, which a
model may well write) has IoU 0 with everything, itself included. Box accuracy is the
referring-expression metric (RefCOCO "Acc@0.5"): the fraction of boxes with IoU >= 0.5.

Sentinel-keyed outputs are the targets of the UDOP objectives (docs/data_documents.md):
layout modeling `<extra_id_0><loc_50><loc_50><loc_289><loc_160><extra_id_1>...`, joint
text-layout reconstruction `<extra_id_0> total 42<loc_50>...`, visual text recognition
`<extra_id_0> total 42<extra_id_1> 12/03/24`. `parse_sentinel_boxes` and
`parse_sentinel_texts` read targets and model outputs alike into {sentinel index: value}, so
the k-th masked group of a prediction is compared with the k-th of its reference.
"""
import dataclasses
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from vlpjax.evaluators import event_metrics
from vlpjax.data import special_tokens

Box = Tuple[float, float, float, float]
TextOrIds = Union[str, Sequence[int], np.ndarray]


# -- boxes -----------------------------------------------------------------------------------

def _as_boxes(boxes, what: str) -> np.ndarray:
  """float64 [n, 4] of (x0, y0, x1, y1), after checking shape and finiteness."""
  return event_metrics.finite_rows(boxes, ("x0", "y0", "x1", "y1"), what, "box")


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Elementwise IoU of broadcastable [..., 4] box arrays (module docstring)."""
  def side(lo, hi):
    return np.maximum(0.0, hi - lo)
  intersection = (side(np.maximum(a[..., 0], b[..., 0]), np.minimum(a[..., 2], b[..., 2])) *
                  side(np.maximum(a[..., 1], b[..., 1]), np.minimum(a[..., 3], b[..., 3])))
  area_a = side(a[..., 0], a[..., 2]) * side(a[..., 1], a[..., 3])
  area_b = side(b[..., 0], b[..., 2]) * side(b[..., 1], b[..., 3])
  union = area_a + area_b - intersection
  return np.where(union > 0, intersection / np.where(union > 0, union, 1.0), 0.0)


def box_iou_matrix(a, b) -> np.ndarray:
  """float64 [P, G]: IoU of every box of `a` [P, 4] with every box of `b` [G, 4]."""
  a, b = _as_boxes(a, "a"), _as_boxes(b, "b")
  return _iou(a[:, None, :], b[None, :, :])


def box_iou(a: Box, b: Box) -> float:
  """IoU of two boxes (x0, y0, x1, y1); 0 if either is degenerate."""
  return float(box_iou_matrix([a], [b])[0, 0])


def box_accuracy(pred_boxes: Sequence[Optional[Box]], gt_boxes: Sequence[Box],
                 threshold: float = 0.5) -> float:
  """Fraction of predictions with IoU >= `threshold` to their ground truth.

  A missing prediction (None: the model wrote no readable box) counts as wrong.
  """
  gt = _as_boxes(gt_boxes, "gt_boxes")
  if len(pred_boxes) != len(gt) or not len(gt):
    raise ValueError(f"need one prediction (or None) per ground-truth box and at least one "
                     f"box, got {len(pred_boxes)} predictions for {len(gt)} boxes.")
  if not 0 <= threshold <= 1:
    raise ValueError(f"threshold must be in [0, 1], got {threshold!r}.")
  present = [i for i, box in enumerate(pred_boxes) if box is not None]
  pred = _as_boxes([pred_boxes[i] for i in present], "pred_boxes (the ones not None)")
  hits = _iou(pred, gt[present]) >= threshold if present else np.zeros(0, bool)
  return float(np.sum(hits)) / len(gt)


def mean_box_baseline(train_boxes, eval_boxes, threshold: float = 0.5
                      ) -> Tuple[Box, float]:
  """(the coordinate-wise mean training box, its `box_accuracy` on `eval_boxes`).

  The chance level of a box predictor that ignores page and query.
  """
  train = _as_boxes(train_boxes, "train_boxes")
  if not len(train):
    raise ValueError("train_boxes has no box.")
  box = tuple(float(c) for c in train.mean(axis=0))
  eval_boxes = _as_boxes(eval_boxes, "eval_boxes")
  return box, box_accuracy([box] * len(eval_boxes), eval_boxes, threshold)


# -- sentinel-keyed outputs ------------------------------------------------------------------

def _as_text(text_or_ids: TextOrIds, vocabulary) -> str:
  """The text itself, or ids decoded up to the first EOS with padding dropped."""
  if isinstance(text_or_ids, str):
    return text_or_ids
  ids = np.asarray(text_or_ids)
  if ids.ndim != 1 or not (ids.size == 0 or np.issubdtype(ids.dtype, np.integer)):
    raise ValueError(f"expected a str or a 1-D sequence of int token ids (one example), got "
                     f"shape {ids.shape} of {ids.dtype}.")
  ids = [int(i) for i in ids]
  if vocabulary.eos_id in ids:
    ids = ids[:ids.index(vocabulary.eos_id)]
  return vocabulary.decode([i for i in ids if i != vocabulary.pad_id])


def _parse(text_or_ids: TextOrIds, vocabulary, num_bins: Optional[int]
           ) -> Tuple[List[special_tokens.Segment], special_tokens.TokenSpec]:
  """(`special_tokens.parse_special` of the text, the token counts it was parsed with)."""
  if vocabulary is None and not isinstance(text_or_ids, str):
    # Loaded only here: decoding ids needs seqio (and TensorFlow); text does not.
    from vlpjax.data import vocab  # pylint: disable=g-import-not-at-top
    vocabulary = vocab.multimodal_vocabulary()
  text = _as_text(text_or_ids, vocabulary)
  # The defaults of TokenSpec are those of vocab.multimodal_vocabulary().
  spec = getattr(vocabulary, "spec", None) or special_tokens.TokenSpec()
  if num_bins is not None:
    if not isinstance(num_bins, int) or num_bins < 2:
      raise ValueError(f"num_bins must be an int >= 2, got {num_bins!r}.")
    spec = dataclasses.replace(spec, num_loc_bins=num_bins)
  return special_tokens.parse_special(text, spec), spec


def _by_sentinel(segments: List[special_tokens.Segment]
                 ) -> List[Tuple[int, List[special_tokens.Segment]]]:
  """(index, the segments up to the next sentinel) per sentinel, first occurrence only."""
  groups, seen = [], set()
  current = None
  for segment in segments:
    if isinstance(segment, special_tokens.Sentinel):
      current = None
      if segment.index not in seen:
        seen.add(segment.index)
        current = []
        groups.append((segment.index, current))
    elif current is not None:
      current.append(segment)
  return groups


def parse_sentinel_boxes(text_or_ids: TextOrIds, vocabulary=None,
                         num_bins: Optional[int] = None) -> Dict[int, Box]:
  """{k: normalised box} from "<extra_id_k>...<loc_a><loc_b><loc_c><loc_d>..." text or ids.

  Reads layout-modeling and joint-reconstruction targets, and model output, by these rules:
  the box of sentinel k is the first run of four loc tokens (whitespace between them allowed,
  as `special_tokens.parse_special` groups them) after `<extra_id_k>` and before the next
  sentinel; text and other tokens around it are ignored. A sentinel without four loc tokens in
  a row is skipped (no entry), and when a sentinel appears more than once its first
  occurrence is the one read. Loc tokens before the first sentinel are ignored. Boxes are
  (x0, y0, x1, y1) bin values k / (K - 1), not checked for order (`box_iou` scores a reversed
  one 0).

  Args:
    text_or_ids: decoded text, or token ids (decoded up to the first EOS, padding dropped).
    vocabulary: decodes ids and gives the token counts; default
      `vocab.multimodal_vocabulary()` for ids and its counts (`TokenSpec()`) for text.
    num_bins: the number K of loc bins; default the vocabulary's.
  """
  boxes = {}
  for index, group in _by_sentinel(_parse(text_or_ids, vocabulary, num_bins)[0]):
    found = [s for s in group if isinstance(s, special_tokens.Box)]
    if found:
      boxes[index] = found[0].coords
  return boxes


def _token_text(segment: special_tokens.Segment, spec_image_tokens: int) -> Optional[str]:
  """The text a segment contributes to a sentinel's span; None where the span ends."""
  if isinstance(segment, str):
    return segment
  if isinstance(segment, special_tokens.Time):
    return special_tokens.time_token(segment.bin)
  if isinstance(segment, special_tokens.Image):
    return special_tokens.image_token(segment.index, spec_image_tokens)
  return None  # Loc tokens and boxes end the text.


def parse_sentinel_texts(text_or_ids: TextOrIds, vocabulary=None,
                         num_bins: Optional[int] = None) -> Dict[int, str]:
  """{k: text} from "<extra_id_k> words ..." text or ids (reconstruction / recognition).

  The text of sentinel k runs from `<extra_id_k>` to the next sentinel or loc token, with
  whitespace collapsed to single spaces and stripped; time and image tokens inside it stay as
  their token strings (span-denoising targets of timed transcripts contain them). Every
  sentinel gets an entry, "" when nothing follows it; a repeated sentinel's first occurrence
  is the one read; text before the first sentinel is ignored. Arguments as for
  `parse_sentinel_boxes` (`num_bins` only decides which `<loc_k>` strings are loc tokens).
  """
  segments, spec = _parse(text_or_ids, vocabulary, num_bins)
  texts = {}
  for index, group in _by_sentinel(segments):
    pieces = []
    for segment in group:
      piece = _token_text(segment, spec.num_image_tokens)
      if piece is None:
        break
      pieces.append(piece)
    texts[index] = " ".join("".join(pieces).split())
  return texts
