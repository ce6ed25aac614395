"""Learning-rate schedules, weight-decay masks and freezing, against their formulas."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlpjax import config as config_lib
from vlpjax import optim


def _config(**schedule):
  c = config_lib.defaults()
  c.total_steps = 110
  c.optim.lr = 0.5
  c.schedule.update(schedule)
  return c


def test_warmup_then_cosine():
  c = _config(type="cosine", warmup_steps=10, end_lr_fraction=0.1)
  sched = optim.make_schedule(c.optim, c.schedule, c.total_steps)
  assert float(sched(0)) == 0.0
  np.testing.assert_allclose(sched(5), 0.25, rtol=1e-6)
  np.testing.assert_allclose(sched(10), 0.5, rtol=1e-6)
  t = 60  # halfway through the 100 decay steps
  expected = 0.5 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (t - 10) / 100)))
  np.testing.assert_allclose(sched(t), expected, rtol=1e-6)
  np.testing.assert_allclose(sched(110), 0.05, rtol=1e-6)


def test_rsqrt_after_warmup():
  c = _config(type="rsqrt", warmup_steps=10, timescale=20)
  sched = optim.make_schedule(c.optim, c.schedule, c.total_steps)
  np.testing.assert_allclose(sched(10), 0.5, rtol=1e-6)
  np.testing.assert_allclose(sched(10 + 60), 0.5 * math.sqrt(20 / 80), rtol=1e-6)


def test_unknown_schedule_names_nearest():
  c = _config(type="cosin")
  with pytest.raises(KeyError, match="Did you mean 'cosine'"):
    optim.make_schedule(c.optim, c.schedule, c.total_steps)


def _params():
  return {"img": {"kernel": jnp.ones((3, 4)), "bias": jnp.ones((4,))},
          "txt": {"kernel": jnp.ones((4, 2))}, "logit_scale": jnp.ones(())}


def test_weight_decay_skips_vectors_and_frozen_params_stay():
  c = _config(type="constant")
  c.optim.update(weight_decay=0.1, grad_clip_norm=0.0, freeze="img/.*")
  params = _params()
  tx, _, frozen = optim.make_optimizer(c, params)
  assert frozen == {"img": {"kernel": True, "bias": True}, "txt": {"kernel": False},
                    "logit_scale": False}
  zero_grads = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zero_grads, tx.init(params), params)
  # Zero gradients: only decoupled weight decay moves params, and only matrices decay.
  np.testing.assert_allclose(updates["txt"]["kernel"], -0.5 * 0.1 * np.ones((4, 2)), rtol=1e-6)
  assert float(updates["logit_scale"]) == 0.0
  assert not np.any(updates["img"]["kernel"]) and not np.any(updates["img"]["bias"])


def test_freeze_regex_errors():
  c = _config(type="constant")
  c.optim.freeze = "image/.*"
  with pytest.raises(ValueError, match="matches no parameter"):
    optim.make_optimizer(c, _params())
  c.optim.freeze = ".*"
  with pytest.raises(ValueError, match="freezes every parameter"):
    optim.make_optimizer(c, _params())
  c.optim.freeze = "img/(("
  with pytest.raises(ValueError, match="not a valid regex"):
    optim.make_optimizer(c, _params())


def _mixed_tree(seed):
  """Leaves of every kind `global_norm` treats apart: a scalar, small vectors and matrices
  (concatenated), large ones (summed by rows), bf16, nested."""
  rng = np.random.default_rng(seed)
  return {
      "scale": np.float32(rng.normal()),
      "bias": rng.normal(size=(7,)).astype(np.float32),
      "small": rng.normal(size=(3, 5)).astype(np.float32),
      "big": {"kernel": rng.normal(size=(300, 260)).astype(np.float32) * 3,
              "heads": rng.normal(size=(72, 4, 250)).astype(jnp.bfloat16)},
  }


def test_global_norm_is_optax_tree_norm():
  import optax  # pylint: disable=g-import-not-at-top
  tree = _mixed_tree(0)
  want = float(optax.tree.norm(jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)))
  np.testing.assert_allclose(float(jax.jit(optim.global_norm)(tree)), want, rtol=1e-6)
  assert float(optim.global_norm({})) == 0.0


def test_global_norm_sharded_equals_unsharded():
  from vlpjax import sharding  # pylint: disable=g-import-not-at-top
  tree = _mixed_tree(1)
  mesh = sharding.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
  spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp"))
  placed = dict(tree, big={"kernel": jax.device_put(tree["big"]["kernel"], spec),
                           "heads": jax.device_put(tree["big"]["heads"], spec)})
  np.testing.assert_allclose(float(jax.jit(optim.global_norm)(placed)),
                             float(optim.global_norm(tree)), rtol=1e-6)


@pytest.mark.parametrize("max_norm", [1e9, 2.0])  # not clipped, clipped
def test_clip_by_global_norm_is_optax_s(max_norm):
  import optax  # pylint: disable=g-import-not-at-top
  tree = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), _mixed_tree(2))
  want, _ = optax.clip_by_global_norm(max_norm).update(tree, optax.EmptyState())
  got, _ = jax.jit(optim.clip_by_global_norm(max_norm).update)(tree, optax.EmptyState())
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-7), got, want)
  if max_norm == 2.0:
    np.testing.assert_allclose(float(optim.global_norm(got)), 2.0, rtol=1e-5)
