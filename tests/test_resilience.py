"""Preemption and faults: SIGTERM checkpoints, SIGKILL at random moments, resharded restores."""
import os
import random
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from tests import processes
from tests.processes import REPO
from tests.test_trainer import DEMO, assert_trees_close, make_config, tiny_overrides
from vlpjax import checkpoint as checkpoint_lib
from vlpjax import sharding
from vlpjax import trainer


def _train_cmd(workdir, arg, extra=()):
  return [sys.executable, "-m", "vlpjax.train", "--config", f"{DEMO}:{arg}",
          "--workdir", str(workdir), "--config.evals={}"] + [
              f"--config.{o}" for o in tiny_overrides() + list(extra)]


def _final_params(workdir, step):
  params, where = checkpoint_lib.read_params_from(str(workdir), step)
  assert where.endswith(f"step {step}")
  return params


def test_sigterm_saves_the_current_step_and_resume_matches(tmp_path):
  workdir = tmp_path / "w"
  # Far more steps than it will run; periodic checkpoints every 1000 never come.
  arg = "steps=100000,batch=16,size=16,eval_every=0"
  proc = subprocess.Popen(_train_cmd(workdir, arg, ["checkpoint.every_steps=1000"]), cwd=REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  for line in proc.stdout:
    if line.startswith("step 3/"):
      proc.send_signal(signal.SIGTERM)
      break
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
  step = int(re.search(r"preempted \(SIGTERM\) at step (\d+)", err).group(1))
  assert step >= 3 and f"checkpoint saved at step {step}" in out

  # Resumed to step+2, it equals a run that was never interrupted.
  total = step + 2
  resumed = subprocess.run(
      _train_cmd(workdir, arg, ["checkpoint.every_steps=1000", f"total_steps={total}"]),
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"resuming from checkpoint step {step}" in resumed.stdout
  reference = make_config(arg, overrides=["checkpoint.every_steps=1000", "log_every_steps=1",
                                          f"total_steps={total}"])
  trainer.Loop(reference, str(tmp_path / "ref")).run()
  assert_trees_close(_final_params(workdir, total), _final_params(tmp_path / "ref", total),
                     rtol=1e-6, atol=1e-7)


def test_checkpoint_from_8_device_fsdp_restores_on_4_device_data_parallel(tmp_path):
  config = make_config(overrides=["checkpoint.every_steps=2"])
  config.mesh, config.sharding_rules = sharding.parallelism("fsdp")
  result = trainer.Loop(config, str(tmp_path / "w")).run()
  saved = jax.device_get(result["state"])
  assert result["state"]["params"]["txt"]["token_embedding"]["embedding"].sharding.spec != (
      jax.sharding.PartitionSpec())  # really sharded on the way in

  config_dp = make_config(overrides=["checkpoint.every_steps=2"])
  config_dp.mesh, config_dp.sharding_rules = sharding.parallelism("data_parallel")
  setup = trainer.build(config_dp, devices=jax.devices()[:4])
  target = checkpoint_lib.abstract_with_shardings(setup.abstract_state, setup.state_shardings)
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path / "w" / "checkpoints"), read_only=True)
  restored, meta = ckpt.restore(6, target)
  ckpt.close()
  assert meta["data_position"] == 6
  leaf = restored["params"]["txt"]["token_embedding"]["embedding"]
  assert len(leaf.sharding.device_set) == 4 and leaf.sharding.is_fully_replicated
  # Bit-identical values, optimizer moments included.
  assert_trees_close(jax.device_get(restored), saved, rtol=0, atol=0)
  # And the restored state trains on the new mesh.
  from tests.test_trainer import random_batch  # pylint: disable=g-import-not-at-top
  state, metrics = setup.train_step(restored, sharding.global_batch(
      random_batch(config_dp), setup.mesh, config_dp.sharding_rules))
  assert int(state["step"]) == 7 and np.isfinite(float(metrics["loss"]))


def _kill_loop(tmp_path, kills: int, seed: int):
  """Trains to the end through `kills` SIGKILLs at random moments; returns the workdir.

  Moments are drawn from a seeded generator: while JAX starts or compiles, while a
  checkpoint restores, between steps and in the middle of asynchronous saves (one per step).
  """
  rng = random.Random(seed)
  workdir = tmp_path / "killed"
  arg = "steps=40,batch=16,size=16,eval_every=0"
  cmd = _train_cmd(workdir, arg, ["checkpoint.every_steps=1", "checkpoint.max_to_keep=2"])
  # Every start compiles, as a user's would: kills also land in compilation.
  env = processes.env_compiling_everything()
  killed = 0
  while killed < kills:
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    if rng.random() < 0.2:  # anywhere in start-up: imports, restore, compilation
      time.sleep(rng.uniform(0.5, 8.0))
    else:  # a few steps in, then a little later (mid-step or mid-save)
      target = rng.randint(1, 4)
      seen = 0
      for line in proc.stdout:
        seen += line.startswith("step ")
        if seen >= target or line.startswith("done:"):
          break
      time.sleep(rng.uniform(0.0, 0.3))
    if proc.poll() is not None:  # it finished before the kill: nothing left to do
      break
    proc.kill()
    proc.wait()
    killed += 1
    # Whatever the moment, the latest committed checkpoint loads.
    latest = checkpoint_lib.Checkpointer(str(workdir / "checkpoints"),
                                         read_only=True).latest_step()
    if latest is not None:
      _final_params(workdir, latest)
  final = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert final.returncode == 0, final.stderr[-3000:]
  return workdir, arg, killed


@pytest.mark.slow
def test_random_sigkills_end_where_an_uninterrupted_run_ends(tmp_path):
  workdir, arg, killed = _kill_loop(tmp_path, kills=12, seed=7)
  assert killed >= 10, f"only {killed} kills landed before the run finished"
  reference = make_config(arg, overrides=["checkpoint.every_steps=1", "log_every_steps=1",
                                          "checkpoint.max_to_keep=2"])
  trainer.Loop(reference, str(tmp_path / "ref")).run()
  assert_trees_close(_final_params(workdir, 40), _final_params(tmp_path / "ref", 40),
                     rtol=1e-6, atol=1e-7)
