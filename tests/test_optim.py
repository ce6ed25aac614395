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
