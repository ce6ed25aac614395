"""Video generation evaluators: dense captioning and temporal grounding, with baselines.

Both read a video task's held-out examples (`data_mixtures/videos.py`) through
`generation.GenerationEvaluator` (its config keys, plus those below). Times are fractions of
the clip: a `<time_k>` token is k / (num_bins - 1) (tIoU does not depend on the unit).

"dense_captioning" (Vid2Seq, `videos_dense_captions`-style targets):
  events of the prediction and of the targets by `video_targets.parse_events`; returns
  `event_metrics.dense_caption_scores` (precision / recall / f1 per tIoU threshold and their
  means, cider@t and cider, and meteor@t and meteor when `java_metrics` says so),
  `num_events_pred` / `num_events_ref` (means per video), and the fixed-segments baseline
  `baseline_f1@0.5`, `baseline_f1`, `baseline_k` of
  `event_metrics.best_fixed_segments_baseline` over the same references. The baseline picks
  its number of segments k on the evaluated set itself, which favours it: it is an upper
  bound of what "k equal segments" achieves on unseen data.

"temporal_grounding" (moment retrieval, `videos_grounding`-style targets `<time_s><time_e>`):
  mode "generate" (default): the generated window (`video_targets.parse_moment`); a
  prediction without one scores tIoU 0 and is counted in `num_invalid`. mode "head": the
  family's grounding head, `family.ground(params, prompts) -> float32 [B, 2]` relative
  windows (non-finite windows score 0 and are counted in `num_invalid`). Returns
  `event_metrics.grounding_scores` (r1@0.5, r1@0.7, miou) and the chance level of random
  windows `random_r1@0.5`, `random_r1@0.7`, `random_miou`
  (`event_metrics.random_window_baseline`).

Extra config keys: `num_bins` (both; the task's time bins, default the vocabulary's),
`java_metrics` (dense captioning: METEOR, which needs Java; "auto" (default) where
`java_metrics.java_available()`, True to require it (an error at construction names what
is missing), False never) and `mode` (grounding).
"""
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from vlpjax.data.kinds import video_targets
from vlpjax.evaluators import EVALUATORS
from vlpjax.evaluators import event_metrics
from vlpjax.evaluators import generation
from vlpjax.evaluators import java_metrics

GROUNDING_MODES = ("generate", "head")


def _num_bins(vocabulary, num_bins: Optional[int]) -> int:
  available = vocabulary.special_ids.spec.num_time_bins
  num_bins = available if num_bins is None else int(num_bins)
  if not 2 <= num_bins <= available:
    raise ValueError(f"num_bins must be in [2, {available}] (the vocabulary's time tokens), "
                     f"got {num_bins}.")
  return num_bins


def _example_id(example: Dict[str, Any]) -> str:
  ex_id = example.get("id", b"")
  return ex_id.decode("utf-8", "replace") if isinstance(ex_id, bytes) else str(ex_id)


@EVALUATORS.register("dense_captioning")
class DenseCaptioning(generation.GenerationEvaluator):
  """ActivityNet-style dense captioning scores of generated events, and a fixed baseline."""

  extra_keys = ("num_bins", "java_metrics")

  def __init__(self, name, cfg: Dict, *, config, family, mesh):
    self.meteor = java_metrics.resolve_java_metrics(cfg.get("java_metrics", "auto"),
                                                    f"evals.{name}.java_metrics")
    super().__init__(name, cfg, config=config, family=family, mesh=mesh)
    self.num_bins = _num_bins(self.vocab, cfg.get("num_bins"))

  def events(self, ids: np.ndarray) -> List[event_metrics.Event]:
    return video_targets.parse_events(ids, 1.0, self.vocab, num_bins=self.num_bins)

  def score(self, predictions, targets, examples) -> Dict[str, float]:
    del examples
    pred_events = [self.events(p) for p in predictions]
    ref_events = [self.events(t) for t in targets]
    if not any(ref_events):
      raise ValueError(f"evals.{self.name}: no reference of task {self.task!r} has an "
                       "event (dense captioning targets are <time><time> caption ...).")
    metrics = event_metrics.dense_caption_scores(pred_events, ref_events, meteor=self.meteor)
    k, baseline = event_metrics.best_fixed_segments_baseline(
        [[event[:2] for event in events] for events in ref_events])
    metrics.update({"baseline_f1@0.5": baseline["f1@0.5"], "baseline_f1": baseline["f1"],
                    "baseline_k": float(k),
                    "num_events_pred": float(np.mean([len(e) for e in pred_events])),
                    "num_events_ref": float(np.mean([len(e) for e in ref_events]))})
    return metrics


@EVALUATORS.register("temporal_grounding")
class TemporalGrounding(generation.GenerationEvaluator):
  """Moment retrieval R1@IoU / mIoU of generated (or head-predicted) windows."""

  extra_keys = ("num_bins", "mode")

  def __init__(self, name, cfg: Dict, *, config, family, mesh):
    self.mode = cfg.get("mode", "generate")
    if self.mode not in GROUNDING_MODES:
      raise ValueError(f"evals.{name}.mode must be one of {GROUNDING_MODES}, got "
                       f"{self.mode!r}.")
    self.predicts_ids = self.mode == "generate"
    super().__init__(name, cfg, config=config, family=family, mesh=mesh)
    self.num_bins = _num_bins(self.vocab, cfg.get("num_bins"))

  def predict_fn(self):
    if self.mode == "generate":
      return super().predict_fn()
    if not hasattr(self.family, "ground"):
      raise ValueError(f"evals.{self.name}: mode 'head' needs a family with a grounding "
                       f"head, ground(params, prompts); {self.config.family!r} has none.")
    return self.family.ground

  def moment(self, ids: np.ndarray) -> Optional[Tuple[float, float]]:
    """A `<time_s><time_e>` answer as fractions of the clip (`video_targets.parse_moment`)."""
    return video_targets.parse_moment(ids, 1.0, self.vocab, num_bins=self.num_bins)

  def window(self, prediction: np.ndarray) -> Optional[Tuple[float, float]]:
    """The predicted window, or None when there is none (scored tIoU 0)."""
    if self.mode == "generate":
      return self.moment(prediction)
    window = np.asarray(prediction, np.float64).reshape(-1)
    if window.shape != (2,):
      raise ValueError(f"evals.{self.name}: family.ground must return [batch, 2] windows, "
                       f"got rows of shape {np.shape(prediction)}.")
    return tuple(window) if np.all(np.isfinite(window)) else None

  def score(self, predictions, targets, examples) -> Dict[str, float]:
    gt = []
    for target, example in zip(targets, examples):
      window = self.moment(target)
      if window is None:
        raise ValueError(f"evals.{self.name}: the targets of example {_example_id(example)!r} "
                         "are not a <time_s><time_e> window; is the task a grounding task?")
      gt.append(window)
    windows = [self.window(p) for p in predictions]
    # No window: the zero-length (0, 0), which has tIoU 0 with everything.
    pred = [(0.0, 0.0) if w is None else w for w in windows]
    metrics = event_metrics.grounding_scores(pred, gt)
    metrics.update({f"random_{k}": v
                    for k, v in event_metrics.random_window_baseline(gt).items()})
    metrics["num_invalid"] = float(sum(w is None for w in windows))
    return metrics

  def show(self, prediction, target) -> Tuple[str, str]:
    if self.mode == "generate":
      return super().show(prediction, target)
    start, end = np.asarray(prediction, np.float64).reshape(-1)[:2]
    return f"window ({start:.3f}, {end:.3f})", self.detokenize(target)
