"""Shared by generation evaluators: prompt a prefix-LM task's held-out examples, score outputs.

Config entry keys every generation evaluator takes (`config.evals.<name>`):
  type, every_steps, task, split (default "validation"), pp, batch_size (prompts per
  generation call; default config.global_batch_size),
  decode             dict of `vlpjax.decoding.DecodeConfig` fields; `eos_id` defaults to
                     the task vocabulary's
  max_examples       score only the first N examples (0 = the whole split)
  prompt_length      P of the prompt batches (default config.input.row_length: a prefix
                     longer than a training row never reached the model in training either)
  max_target_length  the targets axis of the prompt batches (default decode.max_decode_len);
                     scores always use the examples' whole targets
  num_shown          how many (prediction, reference) pairs to print per run (default 3)

The task is read as training reads it (`prefix_lm_pipeline.task_examples`, with
`config.input` as the data config and task / split / pp replaced), in order, one pass. Each
batch of examples becomes a prompt batch (`vlpjax.data.prompts.prompt_batch`, truncated as
packing truncates; the cut ones are counted in `num_truncated`), padded to `batch_size` with
BOS-only rows that are then ignored. Every host reads the whole split, builds the same global
batch and keeps its slice; generation is jitted with its output gathered on every host, so
all hosts compute the same metrics. The prompt batch, `targets` included (the references,
there for tests that replay them), goes to the family's predict function whole; models read
only the keys they know.

A subclass implements `score(predictions, targets, examples) -> {metric: float}`, where
`predictions[i]` and `targets[i]` are token ids cut before the first EOS (padding dropped)
and `examples[i]` the example without its images. A subclass that predicts something other
than tokens (a grounding head) overrides `predict` and sets `predicts_ids = False`; its
predictions are then the rows `predict` returned.
"""
import abc
import itertools
import math
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import jax
import numpy as np
import seqio

from vlpjax import decoding
from vlpjax import families
from vlpjax import sharding
from vlpjax.data import bad_records
from vlpjax.data import packing
from vlpjax.data import prefix_lm_pipeline
from vlpjax.data import prompts as prompts_lib
from vlpjax.evaluators import common

BASE_KEYS = ("every_steps", "task", "split", "pp", "batch_size", "decode", "max_examples",
             "prompt_length", "max_target_length", "num_shown")


def cut_at_eos(ids: np.ndarray, eos_id: int) -> np.ndarray:
  """int32 [n]: the ids before the first EOS, padding (0) dropped."""
  ids = np.asarray(ids).reshape(-1)
  end = np.flatnonzero(ids == eos_id)
  if end.size:
    ids = ids[:end[0]]
  return ids[ids != 0].astype(np.int32)


class GenerationEvaluator(abc.ABC):
  """Base class: prompts a task's examples, generates, and lets `score` judge the outputs."""

  extra_keys: Tuple[str, ...] = ()
  predicts_ids = True   # predictions are token ids (cut at EOS before scoring)

  @classmethod
  def config_keys(cls):
    return BASE_KEYS + cls.extra_keys

  def __init__(self, name, cfg: Dict, *, config, family, mesh):
    self.name = name
    self.config, self.family, self.mesh = config, family, mesh
    self.rules = config.sharding_rules
    self.every_steps = cfg.get("every_steps", 0)
    self.max_examples = int(cfg.get("max_examples", 0))
    self.num_shown = int(cfg.get("num_shown", 3))
    self.batch_size = int(cfg.get("batch_size", config.global_batch_size))
    # Each process keeps an equal slice, and the mesh's batch axis splits the whole.
    step = math.lcm(sharding.batch_axis_size(mesh, self.rules), jax.process_count())
    if self.batch_size < 1 or self.batch_size % step:
      raise ValueError(f"evals.{name}.batch_size={self.batch_size} must be a positive "
                       f"multiple of {step} (the mesh's batch axis and the "
                       f"{jax.process_count()} processes divide it).")
    if getattr(family, "input_format", None) != "prefix_lm":
      raise ValueError(f"evals.{name}: family {config.family!r} does not read prefix-LM "
                       "examples; generation evaluators prompt prefix-LM tasks.")
    self.data_config = families.input_config(config, family)
    self.data_config.update(task=cfg["task"], split=cfg.get("split", "validation"),
                            pp=cfg.get("pp", ""))
    self.task = cfg["task"]
    self.vocab = seqio.get_mixture_or_task(self.task).output_features["targets"].vocabulary
    decode = dict(cfg.get("decode", {}))
    decode.setdefault("eos_id", self.vocab.eos_id)
    self.decode = decoding.DecodeConfig.from_dict(decode)
    self.prompt_length = int(cfg.get("prompt_length", self.data_config.row_length))
    self.max_target_length = int(cfg.get("max_target_length", self.decode.max_decode_len))
    self.image_token_id = prefix_lm_pipeline.image_token_id(self.task)
    self.image_shape = prefix_lm_pipeline.image_shape(self.data_config)
    specs = family.input_specs(1)
    self._prompt_args = dict(
        tokens_per_image=self.data_config.tokens_per_image,
        image_token_id=self.image_token_id, image_shape=self.image_shape,
        prompt_length=self.prompt_length, max_images=self.data_config.max_images_per_row,
        max_target_length=self.max_target_length, batch_size=self.batch_size,
        # Layout boxes / frame times whenever the family reads them, else as the data has.
        with_boxes=True if packing.BOX_FEATURE in specs else None,
        with_image_times=True if packing.TIMES_FEATURE in specs else None)
    self._predict = common.replicated_jit(self.predict_fn(), mesh, self.rules)

  # -- what subclasses change ------------------------------------------------------------

  def predict_fn(self):
    """fn(params, prompts) -> [B, ...] per-row predictions, jitted by the base class.

    Default: `family.generate` with the configured decoding, int32 [B, max_decode_len].
    """
    if not hasattr(self.family, "generate"):
      raise ValueError(f"evals.{self.name}: family {self.config.family!r} cannot generate "
                       "(it has no generate(params, prompts, *, decode, rng)).")
    rng = jax.random.key(self.config.seed)  # Only sampling draws from it; fixed, so runs compare.
    decode, family = self.decode, self.family
    return lambda params, prompts: family.generate(params, prompts, decode=decode, rng=rng)

  @abc.abstractmethod
  def score(self, predictions: List[np.ndarray], targets: List[np.ndarray],
            examples: List[Dict[str, Any]]) -> Dict[str, float]:
    """The metrics of predictions (ids cut at EOS, or `predict_fn` rows) against targets."""

  def show(self, prediction: np.ndarray, target: np.ndarray) -> Tuple[str, str]:
    """(prediction, reference) as printed for the first `num_shown` examples."""
    return self.detokenize(prediction), self.detokenize(target)

  # -- shared machinery ----------------------------------------------------------------

  def detokenize(self, ids: Sequence[int]) -> str:
    return self.vocab.decode([int(i) for i in cut_at_eos(np.asarray(ids), self.vocab.eos_id)])

  def read_examples(self, split: Optional[str] = None, max_examples: Optional[int] = None
                    ) -> Iterator[Dict[str, np.ndarray]]:
    """The task's examples of `split` (default the evaluated one) in order, one pass."""
    data_config = self.data_config
    if split is not None:
      data_config = data_config.copy_and_resolve_references()
      data_config.split = split
    examples = prefix_lm_pipeline.task_examples(
        data_config, self.task, seed=0, process_index=0, process_count=1,
        skipped=bad_records.SkipCounter(), shuffle=False, num_epochs=1)
    limit = self.max_examples if max_examples is None else max_examples
    return itertools.islice(examples, limit) if limit else examples

  def _batches(self) -> Iterator[Tuple[List[Dict[str, np.ndarray]], Dict[str, np.ndarray]]]:
    examples = self.read_examples()
    while True:
      group = list(itertools.islice(examples, self.batch_size))
      if not group:
        return
      yield group, prompts_lib.prompt_batch(group, **self._prompt_args)

  def _fits(self, example: Mapping[str, Any]) -> bool:
    length, num_images = prompts_lib.prompt_size(
        example, tokens_per_image=self.data_config.tokens_per_image,
        image_token_id=self.image_token_id)
    return (length <= self.prompt_length
            and num_images <= self.data_config.max_images_per_row)

  def run(self, params) -> Dict[str, float]:
    process, count = jax.process_index(), jax.process_count()
    predictions, targets, examples = [], [], []
    num_truncated = 0
    for group, batch in self._batches():
      local = {k: np.split(v, count)[process] for k, v in batch.items()}
      out = np.asarray(self._predict(params, sharding.global_batch(local, self.mesh,
                                                                   self.rules)))
      for example, row in zip(group, out[:len(group)]):
        predictions.append(cut_at_eos(row, self.decode.eos_id) if self.predicts_ids else row)
        targets.append(cut_at_eos(example["targets"], self.vocab.eos_id))
        examples.append({k: v for k, v in example.items() if k != "images"})
        num_truncated += not self._fits(example)
    if not examples:
      raise ValueError(f"evals.{self.name}: task {self.task!r} split "
                       f"{self.data_config.split!r} has no examples to score.")
    metrics = self.score(predictions, targets, examples)
    metrics.update(num_examples=float(len(examples)), num_truncated=float(num_truncated))
    if jax.process_index() == 0:
      for i in range(min(self.num_shown, len(examples))):
        shown, reference = self.show(predictions[i], targets[i])
        print(f"  {self.name} example {i}: {shown!r} (reference {reference!r})", flush=True)
    return metrics
