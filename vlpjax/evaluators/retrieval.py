"""Image <-> text retrieval recall@k over paired examples of an eval split."""
from typing import Dict, Sequence

import numpy as np

from vlpjax.evaluators import EVALUATORS
from vlpjax.evaluators import common


def recall_at_k(similarity: np.ndarray, ks: Sequence[int]) -> Dict[int, float]:
  """Row i's correct column is i. A tie with the correct item counts against it."""
  correct = np.diag(similarity)[:, None]
  # Rank = number of candidates scoring at least as high as the correct one, minus itself.
  rank = np.sum(similarity >= correct, axis=1) - 1
  return {k: float(np.mean(rank < k)) for k in ks}


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
    metrics = {}
    for direction, s in (("i2t", sim), ("t2i", sim.T)):
      for k, r in recall_at_k(s, self.ks).items():
        metrics[f"{direction}_r@{k}"] = r
    metrics["num_examples"] = float(sim.shape[0])
    return metrics
