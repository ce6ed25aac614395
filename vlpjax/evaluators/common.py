"""Shared by evaluators: running a jitted predict function over one pass of a dataset."""
import dataclasses
from typing import Callable, Dict, Iterable, List

import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from vlpjax import sharding
from vlpjax.data import pipeline


@dataclasses.dataclass
class EvalData:
  """Which examples an evaluator reads and how they are preprocessed."""
  task: str
  split: str
  pp: str
  batch_size: int

  def batches(self, config) -> Iterable[Dict[str, np.ndarray]]:
    data_config = ml_collections.ConfigDict(dict(
        task=self.task, split=self.split, pp=self.pp,
        text_length=config.input.text_length, shuffle_buffer=0))
    return pipeline.eval_batches(
        data_config, global_batch_size=self.batch_size,
        process_index=jax.process_index(), process_count=jax.process_count())


def replicated_jit(fn: Callable, mesh, rules):
  """jit `fn(params, batch_array)` with the output gathered on every host.

  A call returns once every local device has its copy: the caller reads one of them, and a
  device still inside the gather when its process exits can hang that exit (see
  `sharding.process_allgather`).
  """
  out = NamedSharding(mesh, PartitionSpec())
  jitted = jax.jit(fn, out_shardings=out)

  def call(params, array):
    with sharding.logical_context(mesh, rules):
      return jax.block_until_ready(jitted(params, array))
  return call


def to_global(array: np.ndarray, mesh, rules):
  return sharding.global_batch({"x": array}, mesh, rules)["x"]


def gather_valid(outputs: List[np.ndarray], masks: List[np.ndarray]) -> np.ndarray:
  """Concatenates per-batch outputs, dropping padding rows."""
  return np.concatenate([o[m] for o, m in zip(outputs, masks)], axis=0)


def gather_hosts(local: np.ndarray) -> np.ndarray:
  """Host-side values (masks, labels) of the whole global batch, in process order."""
  if jax.process_count() == 1:
    return local
  if local.dtype.itemsize == 8 and not jax.config.jax_enable_x64:
    # Without x64 JAX would truncate 64-bit values (e.g. id hashes) to 32 bits: send each as
    # two 32-bit halves instead.
    halves = np.ascontiguousarray(local).view(np.int32)
    gathered = sharding.process_allgather(halves, tiled=True)
    return np.ascontiguousarray(gathered).view(local.dtype)
  return sharding.process_allgather(local, tiled=True)


def make_embedder(cfg, *, config, family, mesh) -> "DatasetEmbedder":
  """The embedder for an evaluator config entry's data keys."""
  data = EvalData(cfg["task"], cfg.get("split", "validation"), cfg.get("pp", ""),
                  cfg.get("batch_size", config.global_batch_size))
  return DatasetEmbedder(data, config=config, family=family, mesh=mesh)


class DatasetEmbedder:
  """Embeds every example of an eval split with a two-tower family's predict functions."""

  def __init__(self, data: EvalData, *, config, family, mesh):
    self.data, self.config, self.family, self.mesh = data, config, family, mesh
    rules = config.sharding_rules
    self.rules = rules
    self._embed_images = replicated_jit(family.embed_images, mesh, rules)
    self._embed_texts = replicated_jit(family.embed_texts, mesh, rules)

  def embed_texts(self, params, tokens: np.ndarray) -> np.ndarray:
    """Embeds host-side token rows (same on every host), padding to the batch axis size."""
    step = sharding.batch_axis_size(self.mesh, self.rules) * jax.process_count()
    n = tokens.shape[0]
    padded = np.zeros((-(-n // step) * step,) + tokens.shape[1:], tokens.dtype)
    padded[:n] = tokens
    local = np.split(padded, jax.process_count())[jax.process_index()]
    return np.asarray(self._embed_texts(params, to_global(local, self.mesh, self.rules)))[:n]

  def embed_dataset(self, params, want_texts: bool = True) -> Dict[str, np.ndarray]:
    """{'zimg', 'ztxt' and 'texts' (if want_texts), 'label' and 'id_hash' (if present)}.

    Valid rows only, in the order the hosts read them: that order depends on the number of
    processes, so a metric that depends on order sorts by `id_hash` first.
    """
    outs: Dict[str, List[np.ndarray]] = {"zimg": [], "ztxt": [], "texts": [], "label": [],
                                         "id_hash": []}
    masks = []
    for batch in self.data.batches(self.config):
      masks.append(gather_hosts(batch["mask"]))
      outs["zimg"].append(np.asarray(self._embed_images(
          params, to_global(batch["image"], self.mesh, self.rules))))
      if want_texts:
        outs["ztxt"].append(np.asarray(self._embed_texts(
            params, to_global(batch["texts"], self.mesh, self.rules))))
        outs["texts"].append(gather_hosts(batch["texts"]))
      for key in ("label", "id_hash"):
        if key in batch:
          outs[key].append(gather_hosts(batch[key]))
    return {k: gather_valid(v, masks) for k, v in outs.items() if v}
