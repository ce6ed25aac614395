"""Multi-host training: 2 processes x 4 CPU devices against 1 process x 8, and preemption.

The processes join one jax.distributed run on 127.0.0.1 (gloo CPU collectives), exactly as
hosts of a pod do; the reference runs in this process on conftest's 8 devices.
"""
import json
import os
import re
import signal

import numpy as np
import pytest

from tests import processes
from tests.test_trainer import DEMO, TINY_ARG, assert_trees_close, make_config, tiny_overrides
from vlpjax import checkpoint as checkpoint_lib
from vlpjax import trainer

# FSDP over all 8 devices: with 2 processes every param is split across both hosts, so the
# run exercises cross-host all-gathers, reduce-scatters and a checkpoint written by both.
ARG = TINY_ARG + ",rules=fsdp"
# Both runs read every global batch in full and keep their rows: the batches are then the
# same for 1 and 2 processes (with per-host seqio shards they would differ by design).
SHARED = ["input.sharding=global", "checkpoint.every_steps=3", "log_every_steps=1",
          "optim.eps=1e-6"]  # see test_trainer.STEP_TOL


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["train/loss"] for r in map(json.loads, f) if "train/loss" in r}


def _train_args(workdir, arg=ARG, extra=()):
  return ["vlpjax.train", "--config", f"{DEMO}:{arg}", "--workdir", str(workdir),
          "--config.evals={}"] + [f"--config.{o}" for o in tiny_overrides() + SHARED + list(extra)]


def test_two_processes_train_like_one(tmp_path):
  reference = trainer.Loop(make_config(ARG, overrides=SHARED), str(tmp_path / "one")).run()
  assert reference["final_step"] == 6

  logs = processes.run_processes(_train_args(tmp_path / "two"))
  # One voice on the console: only process 0 reports progress and checkpoints.
  assert "step 6/6" in logs[0] and "step 6/6" not in logs[1]
  assert "checkpoint saved at step 6" not in logs[1]

  one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
  assert sorted(two) == list(range(1, 7))
  np.testing.assert_allclose([two[s] for s in sorted(two)], [one[s] for s in sorted(one)],
                             rtol=1e-5)
  # The checkpoint both hosts wrote holds the same params as the single-process run's.
  params_one, _ = checkpoint_lib.read_params_from(str(tmp_path / "one"))
  params_two, _ = checkpoint_lib.read_params_from(str(tmp_path / "two"))
  assert_trees_close(params_two, params_one, rtol=2e-5, atol=2e-6)


def test_sigterm_on_one_host_checkpoints_every_host_at_one_step(tmp_path):
  """A preemption notice reaching one host only: JAX's preemption service makes both hosts
  save the same step and stop; the checkpoint is complete and resumable."""
  workdir = tmp_path / "pod"
  procs = processes.start_processes(
      _train_args(workdir, arg=ARG.replace("steps=6", "steps=100000")))
  for line in procs[0].stdout:
    if line.startswith("step 3/"):
      procs[1].send_signal(signal.SIGTERM)  # the non-lead host
      break
  logs = processes.communicate_all(procs, timeout=300)
  steps = []
  for p, log in zip(procs, logs):
    assert p.returncode == 128 + signal.SIGTERM, log[-3000:]
    steps += [int(s) for s in re.findall(r"preempted \(SIGTERM\) at step (\d+)", log)]
  assert len(steps) == 2 and steps[0] == steps[1] and steps[0] >= 3, logs
  ckpt = checkpoint_lib.Checkpointer(str(workdir / "checkpoints"), read_only=True)
  assert ckpt.latest_step() == steps[0]
  params, _ = checkpoint_lib.read_params_from(str(workdir))
  assert all(np.isfinite(v).all() for v in _leaves(params))


def _leaves(tree):
  import jax  # pylint: disable=g-import-not-at-top
  return jax.tree.leaves(tree)


@pytest.mark.parametrize("variable", ["JAX_NUM_PROCESSES", "JAX_PROCESS_ID"])
def test_partial_explicit_settings_fail_clearly(variable, monkeypatch):
  from vlpjax import sharding  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match="config.distributed: a multi-process run needs"):
    sharding.maybe_initialize_distributed(dict(coordinator_address="127.0.0.1:1",
                                               num_processes=2, process_id=5))
  monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
  monkeypatch.setenv("JAX_PROCESS_ID", "0")
  monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
  monkeypatch.setenv(variable, "x")
  with pytest.raises(ValueError, match="JAX_\\* environment variables"):
    sharding.maybe_initialize_distributed(dict(auto=True))


_JOIN = """
import jax, numpy as np
from vlpjax import sharding
sharding.maybe_initialize_distributed({"auto": True})
i = jax.process_index()
stacked = sharding.process_allgather(np.array([i + 1]))
tiled = sharding.process_allgather(np.full((2, 3), i), tiled=True)
assert stacked.shape == (2, 1) and tiled.shape == (4, 3), (stacked.shape, tiled.shape)
assert (tiled == np.repeat([[0], [1]], 2, axis=0)).all(), tiled
# One string, one write: gloo logs to the same pipe from C++, and print's separate pieces
# (unbuffered) could be split by its messages.
print(f"joined {i} {jax.process_count()} {jax.device_count()} {int(stacked.sum())}", flush=True)
"""


def _cluster_env(kind, index, port):
  if kind == "jax_env":
    return {"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2",
            "JAX_PROCESS_ID": str(index)}
  # What `srun --ntasks=2` sets on one node; JAX derives the port from the job id.
  return {"SLURM_JOB_ID": str(port - (65536 - 4096)), "SLURM_STEP_NODELIST": "127.0.0.1",
          "SLURM_NTASKS": "2", "SLURM_PROCID": str(index), "SLURM_LOCALID": str(index),
          "SLURM_STEP_NUM_NODES": "1"}


@pytest.mark.parametrize("kind", ["jax_env", "slurm"])
def test_processes_join_from_the_environment(kind):
  """No flags: the JAX_* variables, or a SLURM job step, are enough to form the run."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  port = processes.free_port(low=65536 - 4096)  # SLURM's port comes from the job id
  procs = [subprocess.Popen(
      [sys.executable, "-c", _JOIN], cwd=processes.REPO, text=True, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, env={**processes.env_with_devices(4), **_cluster_env(kind, i, port)})
           for i in range(2)]
  logs = processes.communicate_all(procs, timeout=120)
  for i, (proc, log) in enumerate(zip(procs, logs)):
    # Process i of 2, 8 devices in all, and a collective over both processes (1 + 2).
    assert f"joined {i} 2 8 3" in log and proc.returncode == 0, log[-2000:]
