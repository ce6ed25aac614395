"""The trainer end to end on tiny configs: sharding, accumulation, NaNs, kill and resume."""
import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from vlpjax import config as config_lib
from vlpjax import sharding
from vlpjax import trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, "experiments", "siglip_shapes.py")
TINY_ARG = "steps=6,batch=16,size=16,eval_every=0"


def tiny_model(config):
  """Shrinks the demo config's towers so a step compiles and runs in about a second."""
  config.model.image.update(width=32, depth=1, mlp_dim=64, num_heads=2, patch_size=8)
  config.model.text.update(width=32, depth=1, mlp_dim=64, num_heads=2, max_len=8)
  config.model.embed_dim = 32
  config.input.text_length = 8
  config.input.shuffle_buffer = 64
  return config


def tiny_overrides():
  """The same tiny config as command-line overrides (for the subprocess runs)."""
  over = ["model.image.width=32", "model.image.depth=1", "model.image.mlp_dim=64",
          "model.image.num_heads=2", "model.text.width=32", "model.text.depth=1",
          "model.text.mlp_dim=64", "model.text.num_heads=2", "model.text.max_len=8",
          "model.embed_dim=32", "input.text_length=8", "input.shuffle_buffer=64",
          "checkpoint.every_steps=2", "log_every_steps=1"]
  return over


def make_config(arg=TINY_ARG, overrides=(), evals=False):
  config = tiny_model(config_lib.load(f"{DEMO}:{arg}"))
  if not evals:
    config.evals = {}
  else:
    for entry in config.evals.values():
      entry.batch_size = 64
  return config_lib.finalize(config, list(overrides))


def random_batch(config, seed=0):
  rng = np.random.default_rng(seed)
  b, size, length = config.global_batch_size, config.input.image_size, config.input.text_length
  return {"image": rng.uniform(-1, 1, (b, size, size, 3)).astype(np.float32),
          "texts": rng.integers(3, 200, (b, length)).astype(np.int32)}


def one_step(config, batch, devices=None):
  setup = trainer.build(config, devices)
  state = setup.init_state()
  state, metrics = setup.train_step(
      state, sharding.global_batch(batch, setup.mesh, config.sharding_rules))
  return jax.device_get(state["params"]), jax.device_get(metrics)


def assert_trees_close(a, b, **tol):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, **tol), a, b)


# Tolerance for sharded vs unsharded f32 steps: the sharded program sums partial matmuls in a
# different order, so results agree to float32 round-off, not bit for bit. Adam's first step
# divides by sqrt(v) ~ |g|, which amplifies round-off for near-zero gradients, so the test
# uses eps=1e-6 to keep the update a smooth function of the gradient.
STEP_TOL = dict(rtol=2e-5, atol=2e-6)


@pytest.fixture(scope="module")
def one_device_step():
  config = make_config(overrides=["optim.eps=1e-6"])
  batch = random_batch(config)
  return config, batch, one_step(config, batch, devices=jax.devices()[:1])


@pytest.mark.parametrize("layout,kwargs", [
    ("data_parallel", {}), ("fsdp", {}), ("fsdp_tensor", dict(tensor=2)),
    ("multislice", dict(slices=2)), ("multislice", dict(slices=2, tensor=2))])
def test_parallelism_presets_on_8_devices_equal_1_device(one_device_step, layout, kwargs):
  config, batch, (params_1, metrics_1) = one_device_step
  config_8 = make_config(overrides=["optim.eps=1e-6"])
  mesh, rules = sharding.parallelism(layout, **kwargs)
  config_8.mesh.update(mesh)
  config_8.sharding_rules = rules
  params_8, metrics_8 = one_step(config_8, batch)
  assert np.isfinite(metrics_1["loss"])
  np.testing.assert_allclose(metrics_8["loss"], metrics_1["loss"], rtol=1e-6)
  assert_trees_close(params_8, params_1, **STEP_TOL)


def test_grad_accumulation_equals_full_batch(one_device_step):
  config, batch, (params_full, metrics_full) = one_device_step
  config_acc = make_config(overrides=["optim.eps=1e-6", "grad_accum_steps=4"])
  params_acc, metrics_acc = one_step(config_acc, batch, devices=jax.devices()[:1])
  np.testing.assert_allclose(metrics_acc["loss"], metrics_full["loss"], rtol=1e-6)
  np.testing.assert_allclose(metrics_acc["grad_norm"], metrics_full["grad_norm"], rtol=1e-5)
  assert_trees_close(params_acc, params_full, **STEP_TOL)


def test_frozen_image_tower_does_not_move(one_device_step):
  config, batch, (params_full, _) = one_device_step
  config_lit = make_config(overrides=["optim.eps=1e-6", "optim.freeze=img/.*"])
  params_lit, _ = one_step(config_lit, batch, devices=jax.devices()[:1])
  init = jax.device_get(trainer.build(config_lit, jax.devices()[:1]).init_state()["params"])
  assert_trees_close(params_lit["img"], init["img"], rtol=0, atol=0)
  assert_trees_close(params_lit["txt"], params_full["txt"], **STEP_TOL)


def test_nan_loss_stops_with_the_step(tmp_path):
  # exp(1e5) overflows: the very first loss is not finite.
  config = make_config(overrides=["model.temperature_init=100000.0"])
  with pytest.raises(trainer.NonFiniteLossError, match=r"at step 1\b"):
    trainer.Loop(config, str(tmp_path / "w")).run()
  # Nothing non-finite was written as a checkpoint.
  assert not os.path.exists(tmp_path / "w" / "checkpoints" / "1")


def _train_cmd(workdir):
  return [sys.executable, "-m", "vlpjax.train", "--config", f"{DEMO}:{TINY_ARG}",
          "--workdir", str(workdir), "--config.evals={}"] + [
              f"--config.{o}" for o in tiny_overrides()]


def test_kill_and_resume_equals_uninterrupted(tmp_path):
  # Uninterrupted run, in process, with evals: also checks the metrics and config files.
  config = make_config(overrides=["checkpoint.every_steps=2", "log_every_steps=1"],
                       evals=True)
  config.evals.zeroshot.every_steps = 3
  reference = trainer.Loop(config, str(tmp_path / "ref")).run()
  assert reference["final_step"] == 6
  assert 0.0 <= reference["zeroshot"]["top1"] <= 1.0
  with open(tmp_path / "ref" / "metrics.jsonl") as f:
    records = [json.loads(line) for line in f]
  assert [r["step"] for r in records if "train/loss" in r] == [1, 2, 3, 4, 5, 6]
  assert any("zeroshot/top1" in r and r["step"] == 3 for r in records)
  assert os.path.exists(tmp_path / "ref" / "config.json")
  assert os.listdir(tmp_path / "ref" / "tensorboard")

  # Same config from the command line, SIGKILLed right after its step-4 checkpoint started.
  workdir = tmp_path / "killed"
  proc = subprocess.Popen(_train_cmd(workdir), cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, text=True)
  for line in proc.stdout:
    if "checkpoint saved at step 4" in line:
      proc.send_signal(signal.SIGKILL)
      break
  proc.wait(timeout=300)
  assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"

  # Re-running the same command resumes from the last committed checkpoint (2 or 4).
  resumed = subprocess.run(_train_cmd(workdir), cwd=REPO, capture_output=True, text=True,
                           timeout=300)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert "resuming from checkpoint step" in resumed.stdout

  restore_config = make_config(overrides=["checkpoint.every_steps=2", "log_every_steps=1"])
  setup = trainer.build(restore_config)
  from vlpjax import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
  target = checkpoint_lib.abstract_with_shardings(setup.abstract_state, setup.state_shardings)
  final = {}
  for name in ("ref", "killed"):
    ckpt = checkpoint_lib.Checkpointer(str(tmp_path / name / "checkpoints"), every_steps=2,
                                       max_to_keep=2)
    assert ckpt.latest_step() == 6
    final[name] = jax.device_get(ckpt.restore(6, target)[0]["params"])
    ckpt.close()
  # Same devices, same programs, same batches: the resumed run matches to round-off.
  assert_trees_close(final["killed"], final["ref"], rtol=1e-6, atol=1e-7)


def test_trains_from_tfrecord_files_named_in_the_config(tmp_path):
  from vlpjax.data import shapes  # pylint: disable=g-import-not-at-top
  path = str(tmp_path / "train.tfrecord")
  shapes.write_tfrecords("train", path, image_size=24, num_examples=64)
  config = make_config(arg="steps=2,batch=16,size=16,eval_every=0", overrides=[
      "input.task=user_captions_tfrecord", f"input.files={{'train': '{path}'}}",
      "input.pp=resize(16)|value_range(-1, 1)", "checkpoint.every_steps=0",
      "log_every_steps=1"])
  results = trainer.Loop(config, str(tmp_path / "w")).run()
  assert results["final_step"] == 2
  with open(tmp_path / "w" / "metrics.jsonl") as f:
    losses = [json.loads(line)["train/loss"] for line in f]
  assert len(losses) == 2 and all(np.isfinite(losses))


def write_records_with_a_bad_one(path: str, count: int, bad_index: int) -> None:
  """`count` shapes records (16 px) as TFRecords; record `bad_index` (id user/bad-N) is no image."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from vlpjax.data import shapes  # pylint: disable=g-import-not-at-top
  with tf.io.TFRecordWriter(path) as writer:
    for i in range(count):
      record = shapes.generate_example("train", i, image_size=16)
      if i == bad_index:
        record = dict(record, id=f"user/bad-{i}", image=b"not an image")
      feature = {
          "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[record["image"]])),
          "caption": tf.train.Feature(bytes_list=tf.train.BytesList(
              value=[record["caption"].encode()])),
          "id": tf.train.Feature(bytes_list=tf.train.BytesList(value=[record["id"].encode()])),
      }
      writer.write(tf.train.Example(features=tf.train.Features(feature=feature))
                   .SerializeToString())


def test_corrupt_record_stops_with_its_id_and_step(tmp_path):
  path = str(tmp_path / "bad.tfrecord")
  write_records_with_a_bad_one(path, count=32, bad_index=5)
  config = make_config(arg="steps=2,batch=16,size=16,eval_every=0", overrides=[
      "input.task=user_bad_tfrecord", f"input.files={{'train': '{path}'}}",
      "input.pp=resize(16)|value_range(-1, 1)", "input.shuffle_buffer=1"])
  with pytest.raises(trainer.InputError,
                     match=r"step 1: .*split 'train', record id 'user/bad-5': corrupt image"):
    trainer.Loop(config, str(tmp_path / "w")).run()
  # The same data under the skip policy trains, and the log says what was dropped.
  config = config_lib.finalize(config, ["input.bad_records=skip", "log_every_steps=1",
                                        "checkpoint.every_steps=0"])
  assert trainer.Loop(config, str(tmp_path / "skip")).run()["final_step"] == 2
  with open(tmp_path / "skip" / "metrics.jsonl") as f:
    logged = [json.loads(line) for line in f]
  data = [m for m in logged if "data/skipped" in m]
  assert [m["data/examples/user_bad_tfrecord"] for m in data] == [16, 32]
  assert data[-1]["data/skipped/corrupt_image"] >= 1
  assert data[-1]["data/skipped"] == data[-1]["data/skipped/corrupt_image"]
