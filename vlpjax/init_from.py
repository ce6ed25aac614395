"""Starting a run from other weights: `config.init_from` (fine-tuning, LiT, imported HF models).

  c.init_from = dict(path="/ckpt/siglip_b16", include="img/.*")   # LiT: take the image tower
  c.optim.freeze = "img/.*"                                       # ... and keep it fixed

`path` is a params directory (written by `tools.import_checkpoint` or `tools.export_checkpoint
--format orbax`) or another run's workdir (its latest checkpoint, or `step`). Only params are
read; the optimizer starts fresh. `include` is a regex over '/'-joined param paths
(`img/encoder/layers_0/mlp/fc1/kernel`); empty takes every param the source has. A param the
source lacks keeps its fresh initialisation and is listed, so a partial load is never silent.

A learned image position embedding of another grid size is resampled (a checkpoint trained at
224 px used at 256 px), as big_vision and timm do; any other shape mismatch is an error naming
the param, since silently re-initialising it would waste the run.

Layer stacks may differ in layout: a source with unscanned blocks (`.../layers_{i}/...`) loads
into a model with `scan_layers=True` (`.../scanned/...`, stacked on a leading axis) and the
other way round (`vlpjax.models.scan_util.match_layers`); `include` matches this model's
param paths. Stacks of different depths then differ in shape, an error naming the param.
"""
import re
from typing import Any, List, Tuple

import jax
import numpy as np

from vlpjax import checkpoint as checkpoint_lib
from vlpjax import config as config_lib
from vlpjax.models import scan_util
from vlpjax.optim import param_path

_POSEMB = re.compile(r"(.*/)?position_embedding/embedding")


def _flatten(tree) -> dict:
  return {param_path(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _fit(name: str, source: np.ndarray, target_shape, where: str) -> Tuple[np.ndarray, str]:
  """`source` shaped for the target param, with a note when it had to be resampled."""
  if tuple(source.shape) == tuple(target_shape):
    return source, ""
  if (_POSEMB.fullmatch(name) and name.startswith("img/") and source.ndim == 2
      and source.shape[1] == target_shape[1]):
    from vlpjax.interop import posemb  # pylint: disable=g-import-not-at-top
    resampled = posemb.resample_posemb(np.asarray(source, np.float32), target_shape[0])
    return resampled.astype(source.dtype), f"{name} {source.shape[0]} -> {target_shape[0]}"
  raise config_lib.ConfigError(
      f"config.init_from: param {name} has shape {tuple(source.shape)} in {where} but "
      f"{tuple(target_shape)} in this model: check config.model against the checkpoint, or "
      f"leave the param out with config.init_from.include.")


def merge_init_params(fresh_params, init_cfg) -> Tuple[Any, List[str]]:
  """(params, log lines): the source's values (host numpy) where taken, else `fresh_params`' leaf.

  Only the fresh leaves' shapes and dtypes are read, so they may be sharded jax arrays.
  """
  try:
    pattern = re.compile(init_cfg.include or ".*")
  except re.error as e:
    raise config_lib.ConfigError(
        f"config.init_from.include={init_cfg.include!r} is not a valid regex: {e}") from None
  step = None if init_cfg.step < 0 else int(init_cfg.step)
  try:
    source, where = checkpoint_lib.read_params_from(init_cfg.path, step)
  except (ValueError, FileNotFoundError) as e:
    raise config_lib.ConfigError(f"config.init_from.path={init_cfg.path!r}: {e}") from e
  relaid = []
  try:
    source = scan_util.match_layers(source, fresh_params, converted=relaid)
  except ValueError as e:
    raise config_lib.ConfigError(
        f"config.init_from: the layer stacks of {where} cannot take this model's layout "
        f"(scan_layers): {e}") from None
  source = _flatten(source)
  taken, kept, resampled = [], [], []

  def put(path, fresh):
    name = param_path(path)
    if not pattern.fullmatch(name):
      return fresh
    if name not in source:
      kept.append(name)
      return fresh
    value, note = _fit(name, np.asarray(source[name]), fresh.shape, where)
    taken.append(name)
    if note:
      resampled.append(note)
    return np.asarray(value, dtype=fresh.dtype)

  merged = jax.tree_util.tree_map_with_path(put, fresh_params)
  if not taken:
    raise config_lib.ConfigError(
        f"config.init_from: no param of this model matches include={init_cfg.include!r} and "
        f"exists in {where} (it has e.g. {sorted(source)[:3]}).")
  lines = [f"init_from: {len(taken)} params from {where}"]
  if relaid:
    lines.append(f"init_from: layer stacks converted to this model's layout: "
                 f"{'; '.join(relaid)}")
  if kept:
    lines.append(f"init_from: {len(kept)} params not in the source keep their initialisation: "
                 f"{', '.join(kept[:5])}{' ...' if len(kept) > 5 else ''}")
  if resampled:
    lines.append(f"init_from: position embedding resampled: {'; '.join(resampled)}")
  return merged, lines
