"""`steps_per_call`: several train steps per compiled call give the same run as one per call."""
import json
import types

import jax
import numpy as np
import pytest

from tests.test_trainer import assert_trees_close, make_config, random_batch
from vlpjax import checkpoint as checkpoint_lib
from vlpjax import config as config_lib
from vlpjax import sharding
from vlpjax import trainer

# One call of K steps is a lax.scan of the step: XLA may fuse the scanned body differently from
# the standalone step, so the runs agree to float32 round-off, not bit for bit.
TOL = dict(rtol=2e-5, atol=2e-6)


def test_one_call_of_three_steps_equals_three_calls():
  config = make_config(overrides=["optim.eps=1e-6"])
  setup = trainer.build(config)
  batches = [sharding.global_batch(random_batch(config, seed), setup.mesh,
                                   config.sharding_rules) for seed in range(3)]
  state = setup.init_state()
  one_by_one = []
  for batch in batches:
    state, metrics = setup.train_step(state, batch)
    one_by_one.append(jax.device_get(metrics))
  expected = jax.device_get(state)

  state, stacked = setup.train_steps(setup.init_state(), batches)
  stacked = jax.device_get(stacked)
  assert int(state["step"]) == 3
  assert_trees_close(jax.device_get(state["params"]), expected["params"], **TOL)
  for i, metrics in enumerate(one_by_one):  # Step i's metrics are row i of the stacked ones.
    for key, value in metrics.items():
      np.testing.assert_allclose(stacked[key][i], value, rtol=1e-5, err_msg=f"{key} step {i}")
  # The steps differ (they saw different batches and params): row 1 is not a copy of row 0.
  assert stacked["loss"][0] != stacked["loss"][1]


def _final_params(workdir, step):
  params, where = checkpoint_lib.read_params_from(str(workdir), step)
  assert where.endswith(f"step {step}")
  return params


def _logged_steps(workdir):
  with open(workdir / "metrics.jsonl") as f:
    return {r["step"]: r["train/loss"] for r in map(json.loads, f) if "train/loss" in r}


def test_loop_with_three_steps_per_call_trains_like_one_and_resumes(tmp_path):
  # 8 steps, logs and checkpoints every 4. With 3 steps per call, run to step 4 (calls of 3,
  # then 1: step 4 is a boundary), then resumed from that checkpoint to 8 (3, then 1 again).
  # eps=1e-6, as the test above: Adam would turn round-off in a near-zero gradient into an
  # update of the learning rate's size (seen: one element of a [1, 32] parameter 2.3e-6 apart
  # after 8 steps, once the tests' compiler settings changed).
  base = ["log_every_steps=4", "checkpoint.every_steps=4", "optim.eps=1e-6"]
  trainer.Loop(make_config(overrides=base + ["total_steps=8", "steps_per_call=1"]),
               str(tmp_path / "k1")).run()
  for total in (4, 8):
    run = trainer.Loop(make_config(overrides=base + [f"total_steps={total}", "steps_per_call=3"]),
                       str(tmp_path / "k3")).run()
    assert run["final_step"] == total
  logged = {name: _logged_steps(tmp_path / name) for name in ("k1", "k3")}
  assert sorted(logged["k3"]) == sorted(logged["k1"]) == [4, 8]
  np.testing.assert_allclose([logged["k3"][s] for s in (4, 8)],
                             [logged["k1"][s] for s in (4, 8)], rtol=1e-5)
  # The resumed calls read on from the batch the first run stopped at: the same 8 steps.
  assert_trees_close(_final_params(tmp_path / "k3", 8), _final_params(tmp_path / "k1", 8), **TOL)


def test_calls_stop_at_every_step_the_loop_must_see(tmp_path):
  config = make_config(overrides=["total_steps=20", "log_every_steps=10", "steps_per_call=4"])
  loop = trainer.Loop(config, str(tmp_path))
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path / "checkpoints"), every_steps=6,
                                     max_to_keep=1)
  evaluators = {"zeroshot": types.SimpleNamespace(every_steps=15)}
  step, ends = 0, []
  while step < 20:
    step += loop._steps_in_call(step, evaluators, ckpt)  # pylint: disable=protected-access
    ends.append(step)
  ckpt.close()
  # Logs at 10 and 20, checkpoints at 6, 12, 18, the eval at 15: each is the end of a call.
  assert {6, 10, 12, 15, 18, 20} <= set(ends)
  assert set(np.diff([0] + ends)) == {1, 4}  # Two call sizes: two compiled programs at most.
  assert ends[:2] == [4, 5]  # 4 steps, then one: a call of 4 from step 4 would pass step 6.


def test_a_non_finite_loss_inside_a_call_names_its_own_step(tmp_path):
  # An lr of 1e30 leaves step 1 finite but blows the params up: step 2's loss is not.
  config = make_config(overrides=["total_steps=3", "steps_per_call=3", "log_every_steps=100",
                                  "optim.lr=1e30", "schedule.type=constant",
                                  "schedule.warmup_steps=0"])
  with pytest.raises(trainer.NonFiniteLossError, match=r"at step 2\b"):
    trainer.Loop(config, str(tmp_path / "w")).run()
  assert not (tmp_path / "w" / "checkpoints" / "3").exists()


@pytest.mark.parametrize("value", [0, -2, True, 1.5])
def test_steps_per_call_must_be_a_positive_int(value):
  with pytest.raises(config_lib.ConfigError, match="steps_per_call"):
    make_config(overrides=[f"steps_per_call={value}"])
