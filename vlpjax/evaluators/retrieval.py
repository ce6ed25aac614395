"""Image <-> text retrieval recall@k over paired examples of an eval split."""
from typing import Dict, Optional, Sequence

import numpy as np

from vlpjax.evaluators import EVALUATORS
from vlpjax.evaluators import common


def recall_at_k(similarity: np.ndarray, ks: Sequence[int],
                correct: Optional[np.ndarray] = None) -> Dict[int, float]:
  """Recall@k of rows against columns; `correct[i, j]` marks right answers (default: i == j).

  A row's rank is the number of wrong columns scoring at least as high as its best right
  one: ties with a wrong answer count against the model, so constant scores get 0.
  """
  if correct is None:
    correct = np.eye(*similarity.shape, dtype=bool)
  best_right = np.max(np.where(correct, similarity, -np.inf), axis=1, keepdims=True)
  rank = np.sum((similarity >= best_right) & ~correct, axis=1)
  return {k: float(np.mean(rank < k)) for k in ks}


def same_text(tokens: np.ndarray) -> np.ndarray:
  """[N, N] True where two examples have identical captions (either is a right answer)."""
  _, ids = np.unique(tokens, axis=0, return_inverse=True)
  ids = ids.reshape(-1)
  return ids[:, None] == ids[None, :]


@EVALUATORS.register("retrieval")
class Retrieval:
  """R@k in both directions: image->text (i2t) and text->image (t2i)."""

  @staticmethod
  def config_keys():
    return ("every_steps", "task", "split", "pp", "batch_size", "ks")

  def __init__(self, name, cfg: Dict, *, config, family, mesh):
    self.name = name
    self.every_steps = cfg.get("every_steps", 0)
    self.ks = tuple(cfg.get("ks", (1, 5, 10)))
    self.embedder = common.make_embedder(cfg, config=config, family=family, mesh=mesh)

  def run(self, params) -> Dict[str, float]:
    data = self.embedder.embed_dataset(params)
    sim = data["zimg"] @ data["ztxt"].T
    # Identical captions of different images are interchangeable answers.
    correct = same_text(data["texts"])
    metrics = {}
    for direction, s in (("i2t", sim), ("t2i", sim.T)):
      for k, r in recall_at_k(s, self.ks, correct).items():
        metrics[f"{direction}_r@{k}"] = r
    metrics["num_examples"] = float(sim.shape[0])
    return metrics
