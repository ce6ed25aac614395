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


def test_multislice_mesh_keeps_fsdp_inside_a_slice():
  # Per-slice sizes; `data` spans the slices.
  assert sharding.resolve_mesh_shape(dict(slices=2, data=1, fsdp=-1), 8) == dict(
      data=2, fsdp=4, tensor=1)
  with pytest.raises(ValueError, match="needs 8 devices per slice but 4 devices per slice"):
    sharding.resolve_mesh_shape(dict(slices=2, data=1, fsdp=8), 8)
  with pytest.raises(ValueError, match="slices=3 does not divide the 8 devices"):
    sharding.resolve_mesh_shape(dict(slices=3, fsdp=-1), 8)
  devices = jax.devices()
  mesh = sharding.make_mesh(dict(slices=2, data=1, fsdp=-1, tensor=2), devices)
  assert dict(mesh.shape) == dict(data=2, fsdp=2, tensor=2)
  # Slice k (devices 4k..4k+3 on one host) is exactly mesh row data=k.
  for k in range(2):
    assert {d.id for d in mesh.devices[k].flat} == {d.id for d in devices[4 * k:4 * k + 4]}


def test_parallelism_presets():
  mesh, rules = sharding.parallelism("multislice", slices=4)
  assert mesh == dict(slices=4, data=1, fsdp=-1, tensor=1)
  assert rules == sharding.rules_preset("fsdp")
  mesh, rules = sharding.parallelism("fsdp", tensor=4)
  assert mesh["tensor"] == 4 and rules == sharding.rules_preset("fsdp_tensor")
  with pytest.raises(ValueError, match="Did you mean 'multislice'"):
    sharding.parallelism("multislise")
  with pytest.raises(ValueError, match="use 'multislice'"):
    sharding.parallelism("fsdp", slices=2)


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


def test_rules_table_in_docs_is_the_code():
  """docs/scaling.md's rules table is RULES_PRESETS, row by row."""
  import os  # pylint: disable=g-import-not-at-top
  import re  # pylint: disable=g-import-not-at-top
  path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "docs", "scaling.md")
  with open(path) as f:
    table = re.search(r"<!-- rules-table -->\n(.*?)<!-- /rules-table -->", f.read(), re.S)[1]
  rows = [line.strip("|").split("|") for line in table.strip().split("\n")[2:]]
  presets = ["data_parallel", "fsdp", "fsdp_tensor"]
  documented = {cells[0].strip().strip("`"): [c.strip() for c in cells[1:]] for cells in rows}

  def shown(axes):
    if axes is None:
      return "-"
    return f"({', '.join(axes)})" if isinstance(axes, tuple) else axes

  names = {name for p in presets for name, _ in sharding.RULES_PRESETS[p]}
  assert set(documented) == names
  for name, cells in documented.items():
    assert cells == [shown(dict(sharding.RULES_PRESETS[p]).get(name)) for p in presets], name
