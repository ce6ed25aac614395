"""The ring-chunked sigmoid loss against the plain one: values, metrics, gradients, memory."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.test_trainer import STEP_TOL, assert_trees_close, make_config, one_step, random_batch
from tools import loss_memory
from vlpjax import chunked_loss
from vlpjax import losses
from vlpjax import sharding

# (mesh, rules preset): the batch split over two mesh axes, over one, with a tensor axis that
# the loss's inputs are replicated over, and over two slices (`data` spans them).
MESHES = {
    "data2_fsdp4": (dict(data=2, fsdp=4, tensor=1), "fsdp"),
    "slices2_fsdp4": (dict(slices=2, data=1, fsdp=4, tensor=1), "fsdp"),
    "data8": (dict(data=8), "data_parallel"),
    "data2_fsdp2_tensor2": (dict(data=2, fsdp=2, tensor=2), "fsdp_tensor"),
}


def _embeddings(batch=64, dim=16, seed=0):
  rng = np.random.default_rng(seed)
  zimg = rng.normal(size=(batch, dim))
  ztxt = zimg + rng.normal(size=(batch, dim))  # Correlated: some pairs are argmaxes.
  zimg /= np.linalg.norm(zimg, axis=1, keepdims=True)
  ztxt /= np.linalg.norm(ztxt, axis=1, keepdims=True)
  return jnp.asarray(zimg, jnp.float32), jnp.asarray(ztxt, jnp.float32)


def _value_and_grads(loss_fn, zimg, ztxt, scale, bias, mesh_name=None):
  """jit(value_and_grad) of a loss on (zimg, ztxt, scale[, bias]), batch-sharded on a mesh."""
  args = (zimg, ztxt, scale) + (() if bias is None else (bias,))
  fn = jax.jit(jax.value_and_grad(loss_fn, argnums=tuple(range(len(args))), has_aux=True))
  if mesh_name is None:
    return fn(*args), None
  mesh_config, preset = MESHES[mesh_name]
  mesh, rules = sharding.make_mesh(mesh_config), sharding.rules_preset(preset)
  batch = sharding.batch_sharding(mesh, rules, 2)
  args = (jax.device_put(zimg, batch), jax.device_put(ztxt, batch)) + args[2:]
  with sharding.logical_context(mesh, rules):
    return fn(*args), fn.lower(*args).compile().as_text()


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("mesh_name", sorted(MESHES))
def test_equals_plain_sigmoid_loss(mesh_name, with_bias):
  zimg, ztxt = _embeddings()
  scale = jnp.asarray(np.log(10.), jnp.float32)
  bias = jnp.asarray(-3., jnp.float32) if with_bias else None
  ((loss, metrics), grads), hlo = _value_and_grads(
      chunked_loss.chunked_sigmoid_loss, zimg, ztxt, scale, bias, mesh_name)
  (ref_loss, ref_metrics), ref_grads = _value_and_grads(
      losses.sigmoid_contrastive_loss, zimg, ztxt, scale, bias)[0]
  # The ring ran (no silent fallback to the plain loss): texts move by collective-permute,
  # never by all-gather.
  assert "collective-permute" in hlo and "all-gather" not in hlo
  assert 0.2 < ref_metrics["i2t_accuracy"] < 0.9  # Neither trivial nor hopeless.
  assert set(metrics) == set(ref_metrics)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  for key in ref_metrics:
    np.testing.assert_allclose(metrics[key], ref_metrics[key], rtol=1e-6, atol=1e-6, err_msg=key)
  assert len(grads) == len(ref_grads)
  for grad, ref in zip(grads, ref_grads):
    np.testing.assert_allclose(grad, ref, rtol=1e-5, atol=1e-6)


def test_ties_break_like_argmax():
  # Examples come in groups of 3 sharing one embedding, some groups straddling devices: in
  # every row (column) the group's logits tie for the max and argmax takes the first, so
  # exactly the first example of each group counts as correct.
  groups = np.arange(64) // 3
  z = jnp.asarray(np.eye(32)[groups], jnp.float32)
  scale, bias = jnp.zeros(()), jnp.zeros(())
  with sharding.logical_context(sharding.make_mesh(dict(data=8)),
                                sharding.rules_preset("data_parallel")):
    _, metrics = jax.jit(chunked_loss.chunked_sigmoid_loss)(z, z, scale, bias)
  first_of_group = np.mean(np.arange(64) == 3 * groups)
  np.testing.assert_allclose(metrics["i2t_accuracy"], first_of_group)
  np.testing.assert_allclose(metrics["t2i_accuracy"], first_of_group)
  _, ref = losses.sigmoid_contrastive_loss(z, z, scale, bias)
  np.testing.assert_allclose(ref["i2t_accuracy"], first_of_group)


def test_falls_back_to_plain_loss_without_a_split_batch():
  zimg, ztxt = _embeddings(batch=12)  # 12 does not divide over 8 devices: no ring is tried.
  scale, bias = jnp.asarray(2.), jnp.asarray(-1.)
  expected = losses.sigmoid_contrastive_loss(zimg, ztxt, scale, bias)
  # No mesh at all.
  assert chunked_loss.ring_axes() == ((), 1)
  jax.tree.map(np.testing.assert_array_equal,
               chunked_loss.chunked_sigmoid_loss(zimg, ztxt, scale, bias), expected)
  # A mesh whose batch split is 1-way.
  with sharding.logical_context(sharding.make_mesh(dict(data=1), jax.devices()[:1]),
                                sharding.rules_preset("data_parallel")):
    assert chunked_loss.ring_axes() == (("data", "fsdp"), 1)
    jax.tree.map(np.testing.assert_array_equal,
                 chunked_loss.chunked_sigmoid_loss(zimg, ztxt, scale, bias), expected)


def test_bad_inputs_raise_value_errors():
  zimg, ztxt = _embeddings(batch=12)
  scale = jnp.zeros(())
  with pytest.raises(ValueError, match=r"one shape \[B, D\].*\(12, 16\) and \(8, 16\)"):
    chunked_loss.chunked_sigmoid_loss(zimg, ztxt[:8], scale)
  with sharding.logical_context(sharding.make_mesh(dict(data=8)),
                                sharding.rules_preset("data_parallel")):
    with pytest.raises(ValueError, match=r"batch 12 is not divisible by the 8-way"):
      chunked_loss.chunked_sigmoid_loss(zimg, ztxt, scale)


def test_registered_as_sigmoid_chunked():
  assert losses.LOSSES.get("sigmoid_chunked") is chunked_loss.chunked_sigmoid_loss


def test_trainer_step_equals_plain_sigmoid_step():
  # Batch 16 over data=2 x fsdp=4: 2 examples per device, 8 ring steps. The chunked run also
  # accumulates over 2 micro-batches (exact for the plain loss, see test_trainer): GradCache
  # then takes the loss's gradient w.r.t. the features, which the ring's VJP gives.
  mesh = ["mesh.data=2", "mesh.fsdp=4", "optim.eps=1e-6"]
  plain = make_config(overrides=mesh)
  chunked = make_config(overrides=mesh + ["loss=sigmoid_chunked", "grad_accum_steps=2"])
  for config in (plain, chunked):
    config.sharding_rules = sharding.rules_preset("fsdp")
  batch = random_batch(plain)
  params, metrics = one_step(chunked, batch)
  ref_params, ref_metrics = one_step(plain, batch)
  assert np.isfinite(metrics["loss"])
  for key in ("loss", "i2t_accuracy", "t2i_accuracy", "pos_logit_mean", "neg_logit_mean",
              "grad_norm"):
    np.testing.assert_allclose(metrics[key], ref_metrics[key], rtol=1e-5, err_msg=key)
  assert_trees_close(params, ref_params, **STEP_TOL)


def test_chunked_temp_memory_is_at_most_a_quarter_of_all_gather():
  # Compile only: XLA's buffer sizes for value_and_grad at global batch 16384 on 8 devices.
  mesh = sharding.make_mesh(dict(data=8))
  rules = sharding.rules_preset("data_parallel")
  plain = loss_memory.compiled_memory("sigmoid", 16384, 1152, mesh, rules)
  chunked = loss_memory.compiled_memory("sigmoid_chunked", 16384, 1152, mesh, rules)
  logits_per_device = 2048 * 16384 * 4  # [b, B] f32, which the all-gather version holds.
  assert plain["temp"] >= logits_per_device
  assert chunked["temp"] <= plain["temp"] / 4
  assert chunked["argument"] == plain["argument"] == 2 * 2048 * 1152 * 4 + 2 * 4


def test_loss_memory_tool_prints_table_and_writes_json(tmp_path, capsys):
  out = tmp_path / "memory.json"
  loss_memory.main(["--batch", "512", "1024", "--dim", "32", "--mesh", "data=2,fsdp=4",
                    "--json", str(out)])
  printed = capsys.readouterr().out
  assert "| global batch |" in printed and "| 1024 | 128 | 32 |" in printed
  rows = json.loads(out.read_text())
  assert [r["batch"] for r in rows] == [512, 1024]
  assert rows[1]["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1}
  for r in rows:
    assert r["temp_ratio"] == pytest.approx(r["sigmoid_chunked"]["temp"] / r["sigmoid"]["temp"])
  with pytest.raises(ValueError, match="--mesh 'data:8'"):
    loss_memory.main(["--mesh", "data:8"])
