"""Document generation evaluators: layout boxes and question answering, with baselines.

Both read a document task's held-out examples (`data_mixtures/documents.py`) through
`generation.GenerationEvaluator` (its config keys, plus those below).

"document_layout" (UDOP layout modeling, or joint text-layout reconstruction: targets
`<extra_id_k><loc_a><loc_b><loc_c><loc_d>...`): the boxes of prediction and targets by
`layout_metrics.parse_sentinel_boxes`. Every sentinel box of the targets is scored, against
the prediction's box of the same sentinel; a sentinel the prediction lacks (or gives no
box) counts as wrong with IoU 0. Returns `box_acc@0.5` (fraction of target boxes with IoU
>= 0.5), `miou` (their mean IoU), `num_boxes`, and the baseline `baseline_box_acc@0.5` of
`layout_metrics.mean_box_baseline`: every box predicted as the mean of the evaluated
targets' boxes. Taking the mean from the evaluated targets themselves favours the baseline
(it is the best constant box in the L2 sense for exactly these boxes).

"document_qa" (`documents_qa`-style: the answer is the target): the detokenized prediction
against the detokenized target, `exact_match`, `anls` and `vqa_accuracy`
(`qa_metrics.qa_scores`; with one answer per question VQA accuracy is the exact match after
VQA's answer normalisation), and the most-frequent-answer baseline `baseline_exact_match` /
`baseline_anls` / `baseline_vqa_accuracy`: the most frequent (normalised) answer among the
first `baseline_examples` (default 2000) examples of `baseline_split` (default "train"), read
like the evaluated split. The baseline's ANLS and VQA accuracy score the answer's most
frequent written form (ANLS sees case and punctuation). The training answers are read once,
on the first run.
"""
import collections
from typing import Dict, List, Optional

import jax
import numpy as np

from vlpjax.evaluators import EVALUATORS
from vlpjax.evaluators import generation
from vlpjax.evaluators import layout_metrics
from vlpjax.evaluators import qa_metrics


@EVALUATORS.register("document_layout")
class DocumentLayout(generation.GenerationEvaluator):
  """Box accuracy of generated sentinel boxes, and the mean-box baseline."""

  def score(self, predictions, targets, examples) -> Dict[str, float]:
    del examples
    pred_boxes: List[Optional[layout_metrics.Box]] = []
    gt_boxes: List[layout_metrics.Box] = []
    for prediction, target in zip(predictions, targets):
      predicted = layout_metrics.parse_sentinel_boxes(prediction, self.vocab)
      for k, box in sorted(layout_metrics.parse_sentinel_boxes(target, self.vocab).items()):
        gt_boxes.append(box)
        pred_boxes.append(predicted.get(k))
    if not gt_boxes:
      raise ValueError(f"evals.{self.name}: no target of task {self.task!r} has a sentinel "
                       "box (<extra_id_k> then four <loc_*>); is it a layout-modeling task?")
    ious = [0.0 if p is None else layout_metrics.box_iou(p, g)
            for p, g in zip(pred_boxes, gt_boxes)]
    _, baseline = layout_metrics.mean_box_baseline(gt_boxes, gt_boxes, 0.5)
    return {"box_acc@0.5": layout_metrics.box_accuracy(pred_boxes, gt_boxes, 0.5),
            "miou": float(np.mean(ious)), "num_boxes": float(len(gt_boxes)),
            "baseline_box_acc@0.5": baseline}


@EVALUATORS.register("document_qa")
class DocumentQA(generation.GenerationEvaluator):
  """Exact match, ANLS, VQA accuracy of generated answers; the most-frequent-answer baseline."""

  extra_keys = ("baseline_split", "baseline_examples")

  def __init__(self, name, cfg: Dict, *, config, family, mesh):
    super().__init__(name, cfg, config=config, family=family, mesh=mesh)
    self.baseline_split = cfg.get("baseline_split", "train")
    self.baseline_examples = int(cfg.get("baseline_examples", 2000))
    if self.baseline_examples < 1:
      raise ValueError(f"evals.{name}.baseline_examples must be >= 1, got "
                       f"{self.baseline_examples}.")
    self._baseline_answers: Optional[List[str]] = None

  def baseline_answers(self) -> List[str]:
    """The answers of the baseline split's first `baseline_examples` examples (read once)."""
    if self._baseline_answers is None:
      self._baseline_answers = [
          self.detokenize(example["targets"])
          for example in self.read_examples(self.baseline_split, self.baseline_examples)]
      if not self._baseline_answers:
        raise ValueError(f"evals.{self.name}: baseline_split {self.baseline_split!r} of "
                         f"task {self.task!r} has no examples.")
    return self._baseline_answers

  def score(self, predictions, targets, examples) -> Dict[str, float]:
    del examples
    preds = [self.detokenize(p) for p in predictions]
    answers = [self.detokenize(t) for t in targets]
    metrics = qa_metrics.qa_scores(preds, answers)
    train = self.baseline_answers()
    answer, baseline_em = qa_metrics.most_frequent_answer_baseline(train, answers)
    written = most_frequent_form(train, answer)
    baseline = qa_metrics.qa_scores([written] * len(answers), answers)
    metrics.update(baseline_exact_match=baseline_em, baseline_anls=baseline["anls"],
                   baseline_vqa_accuracy=baseline["vqa_accuracy"])
    if jax.process_index() == 0:
      print(f"  {self.name} baseline answer: {written!r}", flush=True)
    return metrics


def most_frequent_form(answers: List[str], normalized: str) -> str:
  """The most frequent of `answers` whose `normalize_answer` is `normalized` (ties: the
  alphabetically first); `normalized` itself when none is."""
  forms = collections.Counter(a for a in answers
                              if qa_metrics.normalize_answer(a) == normalized)
  if not forms:
    return normalized
  return min(forms, key=lambda a: (-forms[a], a))
