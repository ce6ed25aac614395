"""The train step: loss, gradients (optionally over micro-batches), optimizer update.

Gradient accumulation for a contrastive loss cannot average per-micro-batch losses: every
example is a negative for every other one, so that would be a different objective. Instead
(GradCache, Gao et al. 2021) the step
  1. computes the features of all micro-batches without keeping activations,
  2. takes the full-batch loss and its gradient w.r.t. the features (cheap: [B, d] arrays),
  3. re-runs each micro-batch and back-propagates its slice of that feature gradient.
The result is the full batch's gradient while activation memory is that of one micro-batch.
"""
from typing import Any, Dict

import jax
import jax.numpy as jnp
import optax

from vlpjax import optim


def _split_micro(batch, accum: int):
  """[B, ...] -> [accum, B/accum, ...], micro-batch i = examples i, i+accum, i+2*accum, ...

  Strided rather than contiguous: the batch axis is sharded in contiguous blocks across
  devices, so a strided split keeps every micro-batch spread over all devices.
  """
  def split(x):
    b = x.shape[0] // accum
    return jnp.swapaxes(x.reshape((b, accum) + x.shape[1:]), 0, 1)
  return jax.tree.map(split, batch)


def _merge_micro(tree):
  """Inverse of `_split_micro` for per-example outputs [accum, b, ...] -> [B, ...]."""
  def merge(x):
    x = jnp.swapaxes(x, 0, 1)
    return x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:])
  return jax.tree.map(merge, tree)


def loss_and_grads(family, params, batch, rng, accum: int):
  """(loss, metrics), grads of the full-batch loss; exact for any `accum`."""
  if accum == 1:
    def full_loss(p):
      return family.features_loss(p, family.features(p, batch, rng))
    return jax.value_and_grad(full_loss, has_aux=True)(params)

  micro = _split_micro(batch, accum)
  rngs = jax.random.split(rng, accum)
  # Pass 1: features only. lax.map keeps one micro-batch's activations live at a time.
  feats = jax.lax.map(lambda xs: family.features(params, xs[0], xs[1]), (micro, rngs))
  (loss, metrics), (head_grads, feat_grads) = jax.value_and_grad(
      family.features_loss, argnums=(0, 1), has_aux=True)(params, _merge_micro(feats))
  feat_grads = _split_micro(feat_grads, accum)

  # Pass 2: per micro-batch VJP of the features, summed into the parameter gradient.
  def body(acc, xs):
    mb, mb_rng, mb_feat_grads = xs
    _, vjp = jax.vjp(lambda p: family.features(p, mb, mb_rng), params)
    (g,) = vjp(mb_feat_grads)
    return jax.tree.map(jnp.add, acc, g), None

  tower_grads, _ = jax.lax.scan(
      body, jax.tree.map(jnp.zeros_like, params), (micro, rngs, feat_grads))
  return (loss, metrics), jax.tree.map(jnp.add, head_grads, tower_grads)


def make_train_step(family, tx: optax.GradientTransformation, schedule, accum: int, base_rng,
                    frozen=None):
  """train_step(state, batch) -> (state, metrics); state = dict(step, params, opt_state).

  `frozen`: optional tree of bools like params; frozen params are cut from the graph with
  stop_gradient, so XLA never computes their weight gradients (LiT saves the image tower's).
  """

  def train_step(state: Dict[str, Any], batch):
    step = state["step"]
    # Per-step randomness from (seed, step): a resumed run draws exactly the same numbers.
    rng = jax.random.fold_in(base_rng, step)
    params = state["params"]
    if frozen is not None:
      params = jax.tree.map(lambda p, f: jax.lax.stop_gradient(p) if f else p, params, frozen)
    (loss, metrics), grads = loss_and_grads(family, params, batch, rng, accum)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = dict(metrics, loss=loss, grad_norm=optim.global_norm(grads),
                   param_norm=optim.global_norm(params), lr=schedule(step))
    return dict(step=step + 1, params=params, opt_state=opt_state), metrics

  return train_step
