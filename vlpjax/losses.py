"""Contrastive losses for two-tower models.

Both take L2-normalised embeddings zimg, ztxt [N, D] (row i of each is a
matching pair), the log-temperature `logit_scale` and an optional `logit_bias`,
and return `(loss, metrics)`; everything is computed in f32.
"""
from typing import Dict, Optional, Tuple

import jax
import jax.numpy as jnp

from vlpjax.registry import Registry

LOSSES = Registry("loss")

Metrics = Dict[str, jax.Array]


def _logits(zimg, ztxt, logit_scale, logit_bias):
  """Pairwise logits [N_img, N_txt] = zimg @ ztxt.T * exp(scale) + bias."""
  zimg = zimg.astype(jnp.float32)
  ztxt = ztxt.astype(jnp.float32)
  # Scalars may come as shape (1,) (HF layout); a () keeps logits [N, N].
  scale = jnp.exp(jnp.reshape(logit_scale, ()).astype(jnp.float32))
  logits = zimg @ ztxt.T * scale
  if logit_bias is not None:
    logits = logits + jnp.reshape(logit_bias, ()).astype(jnp.float32)
  return logits, scale


def _common_metrics(logits, scale, logit_bias) -> Metrics:
  n = logits.shape[0]
  diag = jnp.eye(n, dtype=bool)
  targets = jnp.arange(n)
  num_off = max(n * n - n, 1)
  return {
      "i2t_accuracy": jnp.mean(jnp.argmax(logits, axis=1) == targets),
      "t2i_accuracy": jnp.mean(jnp.argmax(logits, axis=0) == targets),
      "temperature": scale,
      "bias": (jnp.zeros(()) if logit_bias is None
               else jnp.reshape(logit_bias, ()).astype(jnp.float32)),
      "pos_logit_mean": jnp.sum(jnp.where(diag, logits, 0.)) / n,
      "neg_logit_mean": jnp.sum(jnp.where(diag, 0., logits)) / num_off,
  }


@LOSSES.register("sigmoid")
def sigmoid_contrastive_loss(zimg: jax.Array, ztxt: jax.Array,
                             logit_scale: jax.Array,
                             logit_bias: Optional[jax.Array] = None
                             ) -> Tuple[jax.Array, Metrics]:
  """SigLIP: every pair is a binary problem, +1 on the diagonal, -1 elsewhere.

  loss = -sum_ij log_sigmoid(label_ij * logit_ij) / N.
  """
  logits, scale = _logits(zimg, ztxt, logit_scale, logit_bias)
  n = logits.shape[0]
  labels = 2. * jnp.eye(n, dtype=jnp.float32) - 1.
  loss = -jnp.sum(jax.nn.log_sigmoid(labels * logits)) / n
  metrics = _common_metrics(logits, scale, logit_bias)
  metrics["loss"] = loss
  return loss, metrics


@LOSSES.register("softmax")
def softmax_contrastive_loss(zimg: jax.Array, ztxt: jax.Array,
                             logit_scale: jax.Array,
                             logit_bias: Optional[jax.Array] = None
                             ) -> Tuple[jax.Array, Metrics]:
  """CLIP: mean of image->text and text->image cross-entropies.

  A bias, if given, shifts every logit alike and so does not change the loss;
  it is accepted so both losses share one signature.
  """
  logits, scale = _logits(zimg, ztxt, logit_scale, logit_bias)
  targets = jnp.arange(logits.shape[0])

  def cross_entropy(lg):
    log_probs = jax.nn.log_softmax(lg, axis=-1)
    return -jnp.mean(jnp.take_along_axis(log_probs, targets[:, None], axis=-1))

  loss_i2t = cross_entropy(logits)
  loss_t2i = cross_entropy(logits.T)
  loss = 0.5 * (loss_i2t + loss_t2i)
  metrics = _common_metrics(logits, scale, logit_bias)
  metrics.update(loss=loss, loss_i2t=loss_i2t, loss_t2i=loss_t2i)
  return loss, metrics


def token_statistics(logits: jax.Array, targets: jax.Array, weights: jax.Array
                     ) -> Dict[str, jax.Array]:
  """Per-example sums over tokens: weighted cross-entropy, weight, correct argmaxes, count.

  `weights` may differ from 1 (per-task loss weights): `loss_sum` is weighted, while
  `correct_sum` and `count_sum` count the tokens with weight > 0, so a loss normalised by
  `count_sum` sums the tasks' losses with their weights.
  """
  logits = logits.astype(jnp.float32)
  target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  cross_entropy = jax.nn.logsumexp(logits, axis=-1) - target_logits
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  counted = (weights > 0).astype(jnp.float32)
  return {"loss_sum": jnp.sum(cross_entropy * weights, axis=1),
          "weight_sum": jnp.sum(weights, axis=1),
          "correct_sum": jnp.sum(correct * counted, axis=1),
          "count_sum": jnp.sum(counted, axis=1)}
