"""Captioning: generate a caption for every held-out image, score it against its reference.

Config entry (`config.evals.<name>`):
  type="captioning", task, split, pp, batch_size, every_steps,
  decode            dict of `vlpjax.decoding.DecodeConfig` fields (method, max_decode_len, ...)
  max_examples      score only the first N examples (0 = the whole split)
  baseline_caption  optional: also score this one caption for every image, the
                    constant-caption baseline a captioner has to beat
  num_shown         how many (generated, reference) pairs to print per run
  java_metrics      METEOR too, which needs Java (`java_metrics`): "auto" (default) where
                    `java_metrics.java_available()`, True to require it (an error at
                    construction names what is missing), False never

The task is an image-text task (`image`, `texts`); the reference of an image is its caption,
detokenized. Any family with `caption(params, images, *, decode, rng)` works (CoCa, VLM).
"""
from typing import Dict, List

import jax
import numpy as np
import seqio

from vlpjax import decoding
from vlpjax.evaluators import EVALUATORS
from vlpjax.evaluators import caption_metrics
from vlpjax.evaluators import common
from vlpjax.evaluators import java_metrics


def detokenize(vocab, tokens: np.ndarray, eos_id: int) -> List[str]:
  """Token rows -> strings, each cut at its first EOS (padding 0s are dropped)."""
  out = []
  for row in np.asarray(tokens):
    row = row.tolist()
    if eos_id in row:
      row = row[:row.index(eos_id)]
    out.append(vocab.decode([t for t in row if t != 0]))
  return out


def score(candidates: Dict[int, str], references: Dict[int, List[str]], *,
          meteor: bool = False) -> Dict[str, float]:
  """CIDEr-D, BLEU-4, ROUGE-L (and METEOR with `meteor`: Java) of candidates (same keys)."""
  cider, _ = caption_metrics.cider_d(candidates, references)
  metrics = {"cider": float(cider),
             "bleu4": float(caption_metrics.bleu(candidates, references, n=4)),
             "rouge_l": float(caption_metrics.rouge_l(candidates, references))}
  if meteor:
    metrics["meteor"] = java_metrics.meteor(candidates, references)[0]
  return metrics


@EVALUATORS.register("captioning")
class Captioning:
  """CIDEr-D / BLEU-4 / ROUGE-L / METEOR of generated captions (and of a constant baseline)."""

  @staticmethod
  def config_keys():
    return ("every_steps", "task", "split", "pp", "batch_size", "decode", "max_examples",
            "baseline_caption", "num_shown", "java_metrics")

  def __init__(self, name, cfg: Dict, *, config, family, mesh):
    if not hasattr(family, "caption"):
      raise ValueError(f"evals.{name}: family {config.family!r} cannot caption images.")
    self.name = name
    self.every_steps = cfg.get("every_steps", 0)
    self.max_examples = int(cfg.get("max_examples", 0))
    self.baseline = cfg.get("baseline_caption", "")
    self.num_shown = int(cfg.get("num_shown", 3))
    self.meteor = java_metrics.resolve_java_metrics(cfg.get("java_metrics", "auto"),
                                                    f"evals.{name}.java_metrics")
    self.data = common.EvalData(cfg["task"], cfg.get("split", "validation"), cfg.get("pp", ""),
                                cfg.get("batch_size", config.global_batch_size))
    self.vocab = seqio.get_mixture_or_task(cfg["task"]).output_features["texts"].vocabulary
    decode = dict(cfg.get("decode", {}))
    decode.setdefault("eos_id", self.vocab.eos_id)
    self.decode = decoding.DecodeConfig.from_dict(decode)
    self.config, self.mesh = config, mesh
    rng = jax.random.key(config.seed)  # Only sampling draws from it; fixed, so runs compare.
    self._caption = common.replicated_jit(
        lambda params, images: family.caption(params, images, decode=self.decode, rng=rng),
        mesh, config.sharding_rules)

  def run(self, params) -> Dict[str, float]:
    tokens, references, masks = [], [], []
    seen = 0
    for batch in self.data.batches(self.config):
      masks.append(common.gather_hosts(batch["mask"]))
      references.append(common.gather_hosts(batch["texts"]))
      tokens.append(np.asarray(self._caption(
          params, common.to_global(batch["image"], self.mesh, self.config.sharding_rules))))
      seen += int(masks[-1].sum())
      if self.max_examples and seen >= self.max_examples:
        break
    tokens = common.gather_valid(tokens, masks)
    references = common.gather_valid(references, masks)
    if self.max_examples:
      tokens, references = tokens[:self.max_examples], references[:self.max_examples]
    generated = detokenize(self.vocab, tokens, self.decode.eos_id)
    refs = {i: [r] for i, r in enumerate(detokenize(self.vocab, references, 0))}
    metrics = score(dict(enumerate(generated)), refs, meteor=self.meteor)
    if self.baseline:
      metrics["baseline_cider"] = score({i: self.baseline for i in refs}, refs)["cider"]
    metrics["num_examples"] = float(len(generated))
    if jax.process_index() == 0:
      for i in range(min(self.num_shown, len(generated))):
        print(f"  {self.name} example {i}: {generated[i]!r} (reference {refs[i][0]!r})",
              flush=True)
    return metrics
