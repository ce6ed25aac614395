"""Optimizer from config: optax AdamW, lr schedules, gradient clipping, frozen param groups."""
import re

import jax
import jax.numpy as jnp
import optax

from vlpjax.registry import Registry

SCHEDULES = Registry("lr schedule")


def param_path(path) -> str:
  """'img/Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel' style name of a tree leaf."""
  parts = []
  for key in path:
    name = getattr(key, "key", None)
    if name is None:
      name = getattr(key, "name", None)
    if name is None:
      name = getattr(key, "idx", key)
    parts.append(str(name))
  return "/".join(parts)


def path_labels(params, fn):
  return jax.tree_util.tree_map_with_path(lambda p, _: fn(param_path(p)), params)


@SCHEDULES.register("constant")
def _constant(peak, cfg, total_steps):
  del cfg, total_steps
  return lambda step: jnp.asarray(peak, jnp.float32)


@SCHEDULES.register("cosine")
def _cosine(peak, cfg, total_steps):
  decay_steps = max(total_steps - cfg.warmup_steps, 1)
  return optax.cosine_decay_schedule(peak, decay_steps, alpha=cfg.end_lr_fraction)


@SCHEDULES.register("rsqrt")
def _rsqrt(peak, cfg, total_steps):
  del total_steps
  timescale = float(cfg.timescale)
  # Counted from the end of warm-up so the lr is continuous at the join.
  return lambda step: peak * jnp.sqrt(timescale / jnp.maximum(step + timescale, timescale))


def make_schedule(optim_cfg, schedule_cfg, total_steps: int):
  """Linear warm-up from 0 to the peak lr, then the configured decay."""
  decay = SCHEDULES.get(schedule_cfg.type)(optim_cfg.lr, schedule_cfg, total_steps)
  if not schedule_cfg.warmup_steps:
    return decay
  warmup = optax.linear_schedule(0.0, optim_cfg.lr, schedule_cfg.warmup_steps)
  return optax.join_schedules([warmup, decay], [schedule_cfg.warmup_steps])


def _compile(regex: str, key: str):
  try:
    return re.compile(regex)
  except re.error as e:
    raise ValueError(f"config.optim.{key}={regex!r} is not a valid regex: {e}") from None


def make_optimizer(config, params_abstract):
  """Returns (optax transformation, lr schedule, frozen mask tree or None).

  Frozen params (`optim.freeze` regex) get no optimizer state and zero updates; clipping and
  weight decay see only the trainable params, so freezing a tower does not change how the
  other one is clipped.
  """
  oc = config.optim
  if oc.name != "adamw":
    raise ValueError(f"config.optim.name={oc.name!r}: only 'adamw' is available.")
  schedule = make_schedule(oc, config.schedule, config.total_steps)
  if oc.wd_mask:
    decay_re = _compile(oc.wd_mask, "wd_mask")
    decays = lambda p: path_labels(p, lambda n: bool(decay_re.fullmatch(n)))
  else:  # Matrices and embedding tables decay; biases, norm scales, temperature do not.
    decays = lambda p: jax.tree_util.tree_map(lambda x: x.ndim >= 2, p)
  trainable = [optax.scale_by_adam(b1=oc.b1, b2=oc.b2, eps=oc.eps)]
  if oc.grad_clip_norm:
    trainable.insert(0, optax.clip_by_global_norm(oc.grad_clip_norm))
  trainable.append(optax.add_decayed_weights(oc.weight_decay, mask=decays))
  trainable.append(optax.scale_by_learning_rate(schedule))
  tx = optax.chain(*trainable)

  if oc.freeze:
    freeze_re = _compile(oc.freeze, "freeze")
    labels = path_labels(params_abstract,
                         lambda n: "frozen" if freeze_re.fullmatch(n) else "trainable")
    if all(l == "frozen" for l in jax.tree_util.tree_leaves(labels)):
      raise ValueError(f"config.optim.freeze={oc.freeze!r} freezes every parameter.")
    if not any(l == "frozen" for l in jax.tree_util.tree_leaves(labels)):
      raise ValueError(f"config.optim.freeze={oc.freeze!r} matches no parameter; names look "
                       f"like {param_path_examples(params_abstract)}.")
    tx = optax.multi_transform({"trainable": tx, "frozen": optax.set_to_zero()}, labels)
    return tx, schedule, jax.tree.map(lambda l: l == "frozen", labels)
  return tx, schedule, None


def param_path_examples(params, n: int = 3):
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  return [param_path(p) for p, _ in leaves[:n]]
