"""SigLIP's chunked sigmoid loss (Zhai et al. 2023, section 3.3): per-device memory O(b^2 + b*d).

The plain "sigmoid" loss on a batch split over n devices (b = B / n examples each) makes XLA
all-gather the text embeddings, so every device holds [b, B] logits and their gradient: loss
memory grows with the global batch B. Here each device keeps its b image embeddings while the
text embeddings travel around a ring of the batch-sharding devices (n - 1 `ppermute`s), and a
device scores its images against one visiting [b, d] chunk at a time. The sigmoid loss is a sum
of independent per-pair terms, so the chunks' sums add up to the full loss exactly; the positive
pairs are all in a device's own chunk.

The gradient is a second trip around the ring (a custom VJP), each text chunk travelling with
the gradient accumulated for it so far, and it recomputes each [b, b] block of logits. Plain
autodiff of the forward loop would instead store every visiting chunk for the backward pass,
n * b * d = B * d floats per device: as much as the all-gather keeps, and on many devices
(small b) far more than the logits.

"sigmoid_chunked" has the signature, the metrics and (to float round-off) the values and
gradients of the plain "sigmoid" loss; its metrics carry no gradient. It needs the trainer's
mesh and logical rules (`sharding.logical_context`); with no mesh, or a batch that is not
split, it is the plain loss.
"""
import math
from typing import Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from vlpjax import losses

BATCH_NAME = "act_batch"


def ring_axes() -> Tuple[Tuple[str, ...], int]:
  """(mesh axes the active rules split `act_batch` over, their product); ((), 1) if none.

  The ring runs over the product of the axes: with ("data", "fsdp") it visits all
  data x fsdp devices, in the order in which the batch dimension is laid out over them.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return (), 1
  axes = nn.logical_to_mesh_axes((BATCH_NAME,))[0]
  if axes is None:
    return (), 1
  axes = tuple(axes) if isinstance(axes, (tuple, list)) else (axes,)
  missing = [a for a in axes if a not in mesh.shape]
  if missing:
    raise ValueError(f"sharding rules map {BATCH_NAME!r} to mesh axes {missing} that the "
                     f"active mesh {dict(mesh.shape)} does not have.")
  return axes, math.prod(mesh.shape[a] for a in axes)


class _Ring:
  """One device's view of the ring (use inside shard_map over `axes`).

  Step k scores this device's images against the text chunk of device (me - k) mod n; chunks
  are contiguous blocks of the global batch, so global example indices follow from k.
  """

  def __init__(self, axes, n, zimg):
    self.axes, self.n = axes, n
    self.zimg = zimg.astype(jnp.float32)
    self.me = jax.lax.axis_index(axes)
    self.b = zimg.shape[0]

  def send_on(self, travelling):
    """Every device passes `travelling` to the next one."""
    return jax.lax.ppermute(travelling, self.axes, [(i, (i + 1) % self.n) for i in range(self.n)])

  def similarities(self, chunk):
    """[b, b] dot products of this device's images with a text chunk, in f32."""
    return self.zimg @ chunk.astype(jnp.float32).T

  def first_index(self, k):
    """Global index of the first example of the chunk visiting at step k."""
    return ((self.me - k) % self.n) * self.b

  def scan(self, visit, carry, travelling):
    """Visits the own chunk, then the n - 1 others as `travelling` goes round (no last hop)."""
    carry, travelling = visit(carry, travelling, 0)

    def step(state, k):
      carry, travelling = state
      return visit(carry, self.send_on(travelling), k), None

    (carry, travelling), _ = jax.lax.scan(step, (carry, travelling), jnp.arange(1, self.n))
    return carry, travelling


# The ring adds up blocks without looking for the positives: with label +1 on the positive
# pairs and -1 elsewhere, sum_ij -log_sigmoid(label_ij x_ij) = sum_ij softplus(x_ij) - sum_i x_ii,
# and the positives' x_ii are row-wise dot products of a device's own image and text chunks.
# So no [b, b] mask is ever built, and neither pass treats the own block specially.
def _positive_logits(zimg, ztxt, scale, bias):
  return jnp.sum(zimg.astype(jnp.float32) * ztxt.astype(jnp.float32), axis=1) * scale + bias


def _best(best, logits, axis, offset):
  """Running (max, first index of max) over blocks met in any order: argmax's tie-break."""
  value = jnp.max(logits, axis=axis)
  index = jnp.argmax(logits, axis=axis) + offset
  best_value, best_index = best
  better = (value > best_value) | ((value == best_value) & (index < best_index))
  return jnp.where(better, value, best_value), jnp.where(better, index, best_index)


def _forward_sums(zimg, ztxt, scale, bias, *, axes, n):
  """Per device: psum'd (loss, i2t / t2i correct counts, positive / negative logit sums)."""
  ring = _Ring(axes, n, zimg)

  # Images keep the (max logit, its global text index) of their row; texts carry those of
  # their column.
  def visit(carry, travelling, k):
    softplus_sum, logit_sum, img_best = carry
    chunk, txt_best = travelling
    logits = ring.similarities(chunk) * scale + bias
    softplus_sum += jnp.sum(jax.nn.softplus(logits))
    logit_sum += jnp.sum(logits)
    img_best = _best(img_best, logits, 1, ring.first_index(k))
    txt_best = _best(txt_best, logits, 0, ring.me * ring.b)
    return (softplus_sum, logit_sum, img_best), (chunk, txt_best)

  nothing = (jnp.full((ring.b,), -jnp.inf), jnp.zeros((ring.b,), jnp.int32))
  zero = jnp.zeros(())
  (softplus_sum, logit_sum, img_best), (_, txt_best) = ring.scan(
      visit, (zero, zero, nothing), (ztxt, nothing))
  own = ring.me * ring.b + jnp.arange(ring.b)
  # The text chunk now here has visited every device (it sits one before its home): its
  # column is complete. Which device counts a text does not matter to the psum.
  txt_ids = ring.first_index(n - 1) + jnp.arange(ring.b)
  pos_sum = jnp.sum(_positive_logits(zimg, ztxt, scale, bias))
  sums = (softplus_sum - pos_sum,
          jnp.sum(img_best[1] == own).astype(jnp.float32),
          jnp.sum(txt_best[1] == txt_ids).astype(jnp.float32),
          pos_sum, logit_sum - pos_sum)
  return jax.lax.psum(sums, axes)


def _backward(zimg, ztxt, scale, bias, loss_cotangent, *, axes, n):
  """Per device: gradients of the summed loss w.r.t. this device's chunks, scale and bias."""
  ring = _Ring(axes, n, zimg)

  def visit(carry, travelling, k):
    del k  # Every block is alike: d softplus(x) / dx = sigmoid(x).
    dzimg, dscale, dbias = carry
    chunk, dchunk = travelling
    sims = ring.similarities(chunk)
    dlogits = jax.nn.sigmoid(sims * scale + bias) * loss_cotangent
    dzimg += dlogits @ chunk.astype(jnp.float32) * scale
    dchunk += dlogits.T @ ring.zimg * scale
    return (dzimg, dscale + jnp.sum(dlogits * sims), dbias + jnp.sum(dlogits)), (chunk, dchunk)

  zero = jnp.zeros(())
  (dzimg, dscale, dbias), (_, dchunk) = ring.scan(
      visit, (jnp.zeros(zimg.shape, jnp.float32), zero, zero),
      (ztxt, jnp.zeros(ztxt.shape, jnp.float32)))
  # The chunk's gradient is complete here; one more hop takes it home, where the positives'
  # -sum_i x_ii term adds its own (local, [b, d]) part.
  zimg32, ztxt32 = zimg.astype(jnp.float32), ztxt.astype(jnp.float32)
  dzimg -= loss_cotangent * scale * ztxt32
  dztxt = ring.send_on(dchunk) - loss_cotangent * scale * zimg32
  dscale -= loss_cotangent * jnp.sum(zimg32 * ztxt32)
  dbias -= loss_cotangent * ring.b
  return (dzimg.astype(zimg.dtype), dztxt.astype(ztxt.dtype), jax.lax.psum(dscale, axes),
          jax.lax.psum(dbias, axes))


def _ring_sums(axes, n):
  """f(zimg, ztxt, scale, bias) on global arrays -> global sums, differentiable in the loss."""
  chunks, scalar = PartitionSpec(axes, None), PartitionSpec()
  forward = jax.shard_map(lambda *a: _forward_sums(*a, axes=axes, n=n),
                          in_specs=(chunks, chunks, scalar, scalar), out_specs=scalar)
  backward = jax.shard_map(lambda *a: _backward(*a, axes=axes, n=n),
                           in_specs=(chunks, chunks, scalar, scalar, scalar),
                           out_specs=(chunks, chunks, scalar, scalar))

  @jax.custom_vjp
  def sums(zimg, ztxt, scale, bias):
    return forward(zimg, ztxt, scale, bias)

  def fwd(zimg, ztxt, scale, bias):
    return forward(zimg, ztxt, scale, bias), (zimg, ztxt, scale, bias)

  def bwd(residuals, cotangents):
    # Only the loss is differentiated: the metrics' cotangents are dropped (and the caller
    # stops their gradient, so they are zero).
    return backward(*residuals, cotangents[0])

  sums.defvjp(fwd, bwd)
  return sums


@losses.LOSSES.register("sigmoid_chunked")
def chunked_sigmoid_loss(zimg: jax.Array, ztxt: jax.Array, logit_scale: jax.Array,
                         logit_bias: Optional[jax.Array] = None
                         ) -> Tuple[jax.Array, losses.Metrics]:
  """`losses.sigmoid_contrastive_loss` computed chunk by chunk on a ring of devices."""
  if zimg.ndim != 2 or zimg.shape != ztxt.shape:
    raise ValueError(f"sigmoid_chunked needs image and text embeddings of one shape [B, D], "
                     f"got {zimg.shape} and {ztxt.shape}.")
  axes, n = ring_axes()
  if n == 1:
    return losses.sigmoid_contrastive_loss(zimg, ztxt, logit_scale, logit_bias)
  batch = zimg.shape[0]
  if batch % n:
    raise ValueError(f"sigmoid_chunked: batch {batch} is not divisible by the {n}-way "
                     f"batch sharding over mesh axes {axes}.")
  # Scalars may come as shape (1,) (HF layout).
  scale = jnp.exp(jnp.reshape(logit_scale, ()).astype(jnp.float32))
  bias = (jnp.zeros((), jnp.float32) if logit_bias is None
          else jnp.reshape(logit_bias, ()).astype(jnp.float32))
  loss_sum, *counts = _ring_sums(axes, n)(zimg, ztxt, scale, bias)
  i2t_correct, t2i_correct, pos_sum, neg_sum = jax.lax.stop_gradient(counts)
  loss = loss_sum / batch
  metrics = {
      "loss": loss,
      "i2t_accuracy": i2t_correct / batch,
      "t2i_accuracy": t2i_correct / batch,
      "temperature": scale,
      "bias": bias,
      "pos_logit_mean": pos_sum / batch,
      "neg_logit_mean": neg_sum / max(batch * batch - batch, 1),
  }
  return loss, metrics
