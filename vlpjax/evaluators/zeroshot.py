"""Zero-shot classification: class names through prompt templates, nearest class embedding."""
from typing import Dict, Sequence

import numpy as np
import seqio

from vlpjax.evaluators import EVALUATORS
from vlpjax.evaluators import common


def class_prompt_tokens(vocab, class_names: Sequence[str], templates: Sequence[str],
                        length: int) -> np.ndarray:
  """[num_templates * num_classes, length] int32, template-major, zero-padded/truncated."""
  rows = np.zeros((len(templates) * len(class_names), length), np.int32)
  for t, template in enumerate(templates):
    for c, name in enumerate(class_names):
      ids = vocab.encode(template.format(name))[:length]
      rows[t * len(class_names) + c, :len(ids)] = ids
  return rows


def topk_accuracy(scores: np.ndarray, labels: np.ndarray, k: int) -> float:
  topk = np.argsort(-scores, axis=1)[:, :k]
  return float(np.mean(np.any(topk == labels[:, None], axis=1)))


@EVALUATORS.register("zeroshot_classification")
class ZeroShotClassification:
  """Accuracy of picking the class whose prompt-ensemble embedding is nearest the image's."""

  @staticmethod
  def config_keys():
    return ("every_steps", "task", "split", "pp", "batch_size", "class_names", "templates")

  def __init__(self, name, cfg: Dict, *, config, family, mesh):
    self.name = name
    self.every_steps = cfg.get("every_steps", 0)
    self.class_names = list(cfg["class_names"])
    self.templates = list(cfg.get("templates", ["{}"]))
    self.embedder = common.make_embedder(cfg, config=config, family=family, mesh=mesh)
    vocab = seqio.get_mixture_or_task(cfg["task"]).output_features["texts"].vocabulary
    self.prompts = class_prompt_tokens(vocab, self.class_names, self.templates,
                                       config.input.text_length)

  def class_embeddings(self, params) -> np.ndarray:
    z = self.embedder.embed_texts(params, self.prompts)
    z = z.reshape(len(self.templates), len(self.class_names), -1).mean(axis=0)
    return z / np.linalg.norm(z, axis=-1, keepdims=True)

  def run(self, params) -> Dict[str, float]:
    classes = self.class_embeddings(params)
    data = self.embedder.embed_dataset(params, want_texts=False)
    if "label" not in data:
      raise ValueError(f"evals.{self.name}: task {self.embedder.data.task!r} has no 'label'.")
    scores = data["zimg"] @ classes.T
    metrics = {"top1": topk_accuracy(scores, data["label"], 1),
               "chance": 1.0 / len(self.class_names),
               "num_examples": float(len(data["label"]))}
    if len(self.class_names) >= 5:
      metrics["top5"] = topk_accuracy(scores, data["label"], 5)
    return metrics
