"""Contrastive losses against independent numpy references (values and grads)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlpjax import losses
from vlpjax.registry import UnknownNameError

BATCH_SIZES = (1, 2, 5, 16)


def _inputs(n, dim=8, seed=0):
  rng = np.random.default_rng(seed + n)
  zimg = rng.normal(size=(n, dim))
  ztxt = zimg + 0.7 * rng.normal(size=(n, dim))  # Correlated: a learnt-ish pair.
  zimg /= np.linalg.norm(zimg, axis=1, keepdims=True)
  ztxt /= np.linalg.norm(ztxt, axis=1, keepdims=True)
  return zimg, ztxt, np.log(10.) + 0.1 * rng.normal(), -3. + rng.normal()


# -- numpy references (float64), written from the papers' formulas ------------

def np_sigmoid_loss(zimg, ztxt, scale, bias):
  logits = zimg @ ztxt.T * np.exp(scale) + bias
  labels = np.where(np.eye(len(zimg)) > 0, 1., -1.)
  # -log sigmoid(z) = log(1 + exp(-z))
  return np.sum(np.logaddexp(0., -labels * logits)) / len(zimg)


def np_sigmoid_grads(zimg, ztxt, scale, bias):
  """Analytic d loss / d (zimg, ztxt, scale, bias)."""
  n, t = len(zimg), np.exp(scale)
  sims = zimg @ ztxt.T
  logits = sims * t + bias
  labels = np.where(np.eye(n) > 0, 1., -1.)
  # d/dz of log(1 + exp(-y z)) = -y * sigmoid(-y z)
  g = -labels / (1. + np.exp(labels * logits)) / n
  return g @ ztxt * t, g.T @ zimg * t, np.sum(g * sims) * t, np.sum(g)


def np_softmax_loss(zimg, ztxt, scale, bias=0.):
  logits = zimg @ ztxt.T * np.exp(scale) + bias

  def ce(lg):  # Row-wise cross-entropy with the diagonal as the target.
    m = lg.max(axis=1, keepdims=True)
    logz = m[:, 0] + np.log(np.exp(lg - m).sum(axis=1))
    return np.mean(logz - np.diag(lg))

  return 0.5 * (ce(logits) + ce(logits.T))


def np_softmax_grads(zimg, ztxt, scale):
  n, t = len(zimg), np.exp(scale)
  sims = zimg @ ztxt.T
  logits = sims * t

  def softmax(x, axis):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)

  g = 0.5 * ((softmax(logits, 1) - np.eye(n)) + (softmax(logits, 0) - np.eye(n))) / n
  return g @ ztxt * t, g.T @ zimg * t, np.sum(g * sims) * t


def _jax_grads(loss_fn, zimg, ztxt, scale, bias):
  f = lambda *a: loss_fn(*a)[0]
  return jax.grad(f, argnums=(0, 1, 2, 3))(
      jnp.float32(zimg), jnp.float32(ztxt), jnp.float32(scale), jnp.float32(bias))


# -- tests ---------------------------------------------------------------------

@pytest.mark.parametrize("n", BATCH_SIZES)
def test_sigmoid_loss_value_and_metrics(n):
  zimg, ztxt, scale, bias = _inputs(n)
  loss, metrics = losses.sigmoid_contrastive_loss(
      jnp.float32(zimg), jnp.float32(ztxt), jnp.float32(scale), jnp.float32(bias))
  np.testing.assert_allclose(loss, np_sigmoid_loss(zimg, ztxt, scale, bias),
                             rtol=1e-5)
  logits = zimg @ ztxt.T
  np.testing.assert_allclose(metrics["i2t_accuracy"],
                             np.mean(logits.argmax(1) == np.arange(n)))
  np.testing.assert_allclose(metrics["t2i_accuracy"],
                             np.mean(logits.argmax(0) == np.arange(n)))
  np.testing.assert_allclose(metrics["temperature"], np.exp(scale), rtol=1e-6)
  np.testing.assert_allclose(metrics["loss"], loss)


@pytest.mark.parametrize("n", BATCH_SIZES)
def test_sigmoid_loss_gradients_match_analytic(n):
  zimg, ztxt, scale, bias = _inputs(n)
  got = _jax_grads(losses.sigmoid_contrastive_loss, zimg, ztxt, scale, bias)
  want = np_sigmoid_grads(zimg, ztxt, scale, bias)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)


def test_sigmoid_loss_without_bias_and_hf_shaped_scalars():
  zimg, ztxt, scale, _ = _inputs(4)
  loss, metrics = losses.sigmoid_contrastive_loss(
      jnp.float32(zimg), jnp.float32(ztxt), jnp.full((1,), scale, jnp.float32), None)
  np.testing.assert_allclose(loss, np_sigmoid_loss(zimg, ztxt, scale, 0.), rtol=1e-5)
  assert loss.shape == () and metrics["bias"] == 0.


@pytest.mark.parametrize("n", BATCH_SIZES)
def test_softmax_loss_value(n):
  zimg, ztxt, scale, bias = _inputs(n)
  loss, metrics = losses.softmax_contrastive_loss(
      jnp.float32(zimg), jnp.float32(ztxt), jnp.float32(scale))
  np.testing.assert_allclose(loss, np_softmax_loss(zimg, ztxt, scale), rtol=1e-5,
                             atol=1e-6)
  # A shared bias shifts every logit alike: the loss must not move.
  loss_b, _ = losses.softmax_contrastive_loss(
      jnp.float32(zimg), jnp.float32(ztxt), jnp.float32(scale), jnp.float32(bias))
  np.testing.assert_allclose(loss_b, loss, rtol=1e-5, atol=1e-6)
  assert set(metrics) >= {"loss", "loss_i2t", "loss_t2i", "i2t_accuracy"}


@pytest.mark.parametrize("n", BATCH_SIZES)
def test_softmax_loss_gradients_match_analytic_and_finite_differences(n):
  zimg, ztxt, scale, _ = _inputs(n)
  gimg, gtxt, gscale, gbias = _jax_grads(
      losses.softmax_contrastive_loss, zimg, ztxt, scale, 0.)
  want = np_softmax_grads(zimg, ztxt, scale)
  for g, w in zip((gimg, gtxt, gscale), want):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(gbias, 0., atol=1e-6)

  # Central differences of the float64 reference along a random direction.
  rng = np.random.default_rng(n)
  d_img, d_txt, d_scale = rng.normal(size=zimg.shape), rng.normal(size=ztxt.shape), 1.
  eps = 1e-5
  plus = np_softmax_loss(zimg + eps * d_img, ztxt + eps * d_txt, scale + eps * d_scale)
  minus = np_softmax_loss(zimg - eps * d_img, ztxt - eps * d_txt, scale - eps * d_scale)
  directional = np.sum(gimg * d_img) + np.sum(gtxt * d_txt) + gscale * d_scale
  # atol: f32 gradients summed over the batch carry ~1e-6 absolute error.
  np.testing.assert_allclose(directional, (plus - minus) / (2 * eps), rtol=1e-4,
                             atol=1e-5)


def test_sigmoid_loss_finite_differences():
  zimg, ztxt, scale, bias = _inputs(6)
  grads = _jax_grads(losses.sigmoid_contrastive_loss, zimg, ztxt, scale, bias)
  rng = np.random.default_rng(1)
  dirs = (rng.normal(size=zimg.shape), rng.normal(size=ztxt.shape), 0.5, -1.)
  eps = 1e-5
  at = lambda s: np_sigmoid_loss(*(x + s * d for x, d in
                                   zip((zimg, ztxt, scale, bias), dirs)))
  directional = sum(np.sum(np.asarray(g) * d) for g, d in zip(grads, dirs))
  np.testing.assert_allclose(directional, (at(eps) - at(-eps)) / (2 * eps),
                             rtol=1e-4)


def test_losses_registry():
  assert losses.LOSSES.get("sigmoid") is losses.sigmoid_contrastive_loss
  assert losses.LOSSES.get("softmax") is losses.softmax_contrastive_loss
  with pytest.raises(UnknownNameError, match="sigmoid"):
    losses.LOSSES.get("sigmod")


def test_losses_jit_and_bf16_inputs_give_f32():
  zimg, ztxt, scale, bias = _inputs(4)
  for fn in (losses.sigmoid_contrastive_loss, losses.softmax_contrastive_loss):
    loss, _ = jax.jit(fn)(jnp.bfloat16(zimg), jnp.bfloat16(ztxt),
                          jnp.float32(scale), jnp.float32(bias))
    assert loss.dtype == jnp.float32
