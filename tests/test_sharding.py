"""Mesh construction and logical-name -> mesh-axis shardings."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from vlpjax import sharding


def test_mesh_fill_axis_and_errors():
  assert sharding.resolve_mesh_shape(dict(data=-1, fsdp=2, tensor=2), 8) == dict(
      data=2, fsdp=2, tensor=2)
  assert sharding.resolve_mesh_shape(dict(data=1, fsdp=-1), 8) == dict(data=1, fsdp=8, tensor=1)
  with pytest.raises(ValueError, match="at most one axis may be -1"):
    sharding.resolve_mesh_shape(dict(data=-1, fsdp=-1), 8)
  with pytest.raises(ValueError, match="needs 4 devices but 8"):
    sharding.resolve_mesh_shape(dict(data=2, fsdp=2, tensor=1), 8)
  with pytest.raises(ValueError, match="unknown axes"):
    sharding.resolve_mesh_shape(dict(dat=8), 8)
  mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
  assert dict(mesh.shape) == dict(data=2, fsdp=2, tensor=2)


def test_rules_preset_typo():
  with pytest.raises(ValueError, match="Did you mean 'fsdp_tensor'"):
    sharding.rules_preset("fsdp_tensr")
  with pytest.raises(ValueError, match="unknown mesh axes"):
    sharding.as_rules([("embed", "model")])


class _Mlp(nn.Module):
  @nn.compact
  def __call__(self, x):
    init = nn.initializers.lecun_normal()
    x = nn.Dense(64, kernel_init=nn.with_logical_partitioning(init, ("embed", "mlp")))(x)
    return nn.Dense(3, kernel_init=nn.with_logical_partitioning(init, ("mlp", "embed")))(x)


def test_param_and_optimizer_shardings_follow_rules():
  mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
  rules = sharding.rules_preset("fsdp_tensor")
  boxed = jax.eval_shape(_Mlp().init, jax.random.key(0), jnp.ones((4, 8)))["params"]
  shard = sharding.param_shardings(boxed, mesh, rules)
  assert shard["Dense_0"]["kernel"].spec == P("fsdp", "tensor")
  # 3 output features do not divide over fsdp=2: that dim falls back to replication.
  assert shard["Dense_1"]["kernel"].spec == P("tensor", None)
  params = nn.unbox(boxed)
  opt = jax.eval_shape(optax.adamw(1e-3).init, params)
  opt_shard = sharding.like_params_shardings(opt, params, shard, mesh)
  assert opt_shard[0].mu["Dense_0"]["kernel"].spec == P("fsdp", "tensor")
  assert opt_shard[0].count.spec == P()


def test_global_batch_is_sharded_over_data_axes():
  mesh = sharding.make_mesh(dict(data=4, fsdp=2, tensor=1))
  rules = sharding.rules_preset("fsdp")
  local = {"x": np.arange(16 * 3, dtype=np.float32).reshape(16, 3)}
  arr = sharding.global_batch(local, mesh, rules)["x"]
  assert arr.shape == (16, 3)
  assert arr.sharding.spec == P(("data", "fsdp"), None)
  assert len(arr.addressable_shards) == 8
  np.testing.assert_array_equal(np.asarray(arr), local["x"])
  assert sharding.batch_axis_size(mesh, rules) == 8
