"""Held-out loss of a prefix-LM task, optionally with its images taken away.

Config entry (`config.evals.<name>`):
  type="prefix_lm_loss", task, split, pp, batch_size (rows), every_steps,
  drop_images   remove every image (its placeholder and pixels) from the prefix, so the
                same targets are scored from text alone
  max_examples  score only the first N examples (0 = the whole split)

Two entries over one task, with and without `drop_images`, measure how much a model reads its
images: on interleaved documents the text after an image should cost fewer nats with the image
than without it. Rows are packed as in training (`config.input` row_length and image slots);
packing is invisible to the loss (segment masks and restarting positions). Examples that do not
fit one row *with* their images are left out (counted in `num_too_long`) whether or not images
are dropped, so both entries score exactly the same target tokens.

Every host reads the whole split and keeps its slice of each global batch of rows, so all
hosts run the same number of steps and padding rows (weight 0) never count.
"""
import itertools
from typing import Dict, Iterator, List

import jax
import numpy as np

from vlpjax import families
from vlpjax.data import bad_records
from vlpjax.data import packing
from vlpjax.data import prefix_lm_pipeline
from vlpjax.evaluators import EVALUATORS
from vlpjax.evaluators import common


def without_images(example: Dict[str, np.ndarray], image_token_id: int) -> Dict[str, np.ndarray]:
  """The example with every image placeholder and its pixels removed (targets unchanged)."""
  keep = example["inputs"] != image_token_id
  out = dict(example, inputs=example["inputs"][keep], images=example["images"][:0])
  if "input_boxes" in example:
    out["input_boxes"] = example["input_boxes"][keep]
  return out


@EVALUATORS.register("prefix_lm_loss")
class PrefixLMLoss:
  """Mean token loss (and perplexity) on the targets of a task's held-out examples."""

  @staticmethod
  def config_keys():
    return ("every_steps", "task", "split", "pp", "batch_size", "drop_images", "max_examples")

  def __init__(self, name, cfg: Dict, *, config, family, mesh):
    if not hasattr(family, "token_losses"):
      raise ValueError(f"evals.{name}: family {config.family!r} has no token_losses.")
    self.name = name
    self.every_steps = cfg.get("every_steps", 0)
    self.drop_images = bool(cfg.get("drop_images", False))
    self.max_examples = int(cfg.get("max_examples", 0))
    self.batch_size = int(cfg.get("batch_size", config.global_batch_size))
    self.data_config = families.input_config(config, family)
    self.data_config.update(task=cfg["task"], split=cfg.get("split", "validation"),
                            pp=cfg.get("pp", ""))
    self.family, self.config, self.mesh = family, config, mesh
    self.image_token_id = prefix_lm_pipeline.image_token_id(cfg["task"])
    self._losses = common.replicated_jit(family.token_losses, mesh, config.sharding_rules)
    self._keys = list(family.input_specs(1))

  def _fits(self, example: Dict[str, np.ndarray]) -> bool:
    """Whether the example fits one row whole, images expanded (packing.py's lengths)."""
    num_images = int(np.sum(example["inputs"] == self.image_token_id))
    length = (len(example["inputs"]) + num_images * (self.data_config.tokens_per_image - 1)
              + len(example["targets"]))
    return (length <= self.data_config.row_length
            and num_images <= self.data_config.max_images_per_row)

  def _examples(self) -> Iterator[Dict[str, np.ndarray]]:
    examples = prefix_lm_pipeline.task_examples(
        self.data_config, self.data_config.task, seed=0, process_index=0, process_count=1,
        skipped=bad_records.SkipCounter(), shuffle=False, num_epochs=1)
    if self.max_examples:
      examples = itertools.islice(examples, self.max_examples)
    self.num_too_long = 0
    for example in examples:
      if not self._fits(example):
        self.num_too_long += 1
        continue
      yield without_images(example, self.image_token_id) if self.drop_images else example

  def _batches(self) -> Iterator[Dict[str, np.ndarray]]:
    rows = packing.pack_iter(
        self._examples(), row_length=self.data_config.row_length,
        max_images_per_row=self.data_config.max_images_per_row,
        tokens_per_image=self.data_config.tokens_per_image,
        image_token_id=self.image_token_id,
        image_shape=prefix_lm_pipeline.image_shape(self.data_config),
        with_boxes="decoder_boxes" in self._keys,
        with_image_times="image_times" in self._keys)
    empty = None
    while True:
      group: List[Dict[str, np.ndarray]] = list(itertools.islice(rows, self.batch_size))
      if not group:
        return
      if empty is None:  # A row of padding: segment 0 and no loss weight anywhere.
        empty = {k: np.zeros_like(v) for k, v in group[0].items()}
      group += [empty] * (self.batch_size - len(group))
      yield packing.batch_rows(group)

  def run(self, params) -> Dict[str, float]:
    loss_sum = weight_sum = 0.0
    process, count = jax.process_index(), jax.process_count()
    for batch in self._batches():
      local = {k: np.split(batch[k], count)[process] for k in self._keys}
      global_batch = {k: common.to_global(v, self.mesh, self.config.sharding_rules)
                      for k, v in local.items()}
      losses, weights = self._losses(params, global_batch)
      loss_sum += float(np.sum(losses))
      weight_sum += float(np.sum(weights))
    loss = loss_sum / max(weight_sum, 1.0)
    return {"loss": loss, "perplexity": float(np.exp(loss)), "num_tokens": weight_sum,
            "num_too_long": float(self.num_too_long)}
