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


# Leaves up to this size are squared and summed as one concatenated vector (`global_norm`).
_SMALL_LEAF = 65536


def global_norm(tree) -> jax.Array:
  """The L2 norm of all of `tree`'s leaves together, in f32 (optax.tree.norm's value).

  Why not optax's: it sums each leaf to a scalar, and XLA:GPU splits each of those sums in two
  kernels, so a model's hundreds of leaves cost hundreds of tiny launches per norm (565 in a
  SigLIP B/16 step, for the gradient's and the parameters' norms). Here each large leaf sums
  its rows (one kernel, often fused into the optimizer's update of that leaf), the small leaves
  (biases, norm scales) go in as one concatenated vector, and one reduction sums it all. The
  optimization barrier stops XLA from rewriting the sum of the concatenation back into a sum
  of per-leaf sums. A deviceless H100 compile of that step: 2,515 -> 2,010 kernels, 93.8 -> 92.5
  ms estimated (docs/benchmarks.md).
  """
  leaves = [jnp.asarray(x, jnp.float32) for x in jax.tree_util.tree_leaves(tree)]
  if not leaves:
    return jnp.zeros((), jnp.float32)
  small = [x.ravel() for x in leaves if x.size <= _SMALL_LEAF]
  parts = [jnp.sum(jnp.square(x).reshape(-1, x.shape[-1]), axis=1)
           for x in leaves if x.size > _SMALL_LEAF]
  if small:
    parts.append(jnp.square(jnp.concatenate(small)))
  return jnp.sqrt(jnp.sum(jax.lax.optimization_barrier(jnp.concatenate(parts))))


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
  """optax.clip_by_global_norm (same rule: updates scaled by max_norm / norm when the norm
  exceeds max_norm) with the norm from `global_norm`, the one the step's metrics report, so
  XLA computes it once."""

  def update_fn(updates, state, params=None):
    del params
    norm = global_norm(updates)
    keep = norm < max_norm
    updates = jax.tree.map(
        lambda t: jax.lax.select(keep, t, (t / norm.astype(t.dtype)) * max_norm), updates)
    return updates, state

  return optax.GradientTransformation(optax.init_empty_state, update_fn)


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
    trainable.insert(0, clip_by_global_norm(oc.grad_clip_norm))
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
