"""vlpjax/models/layer_norm.py: LayerNorm with a choice of backward pass.

"xla" against flax's nn.LayerNorm bit for bit; the Pallas backward kernel, run by Pallas'
interpreter, against JAX's autodiff of nn.LayerNorm (widths that are not a power of two, row
counts that are not a multiple of a program's rows, bf16); sharded over 8 devices against
unsharded; a whole model against the default. That the kernel compiles for an H100 is
tests/test_gpu_compile.py's.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from tests import test_attention
from tests import test_flops
from vlpjax import sharding
from vlpjax.models import layer_norm
from vlpjax.models import pallas_util

EPS = 1e-6


def _arrays(seed, shape, dtype=np.float32):
  rng = np.random.default_rng(seed)
  width = shape[-1]
  # Off-centre inputs and non-trivial params: a wrong mean or a dropped scale shows.
  x = (rng.normal(size=shape) * 2 + 0.5).astype(dtype)
  scale, bias = (rng.normal(size=(width,)).astype(np.float32) for _ in range(2))
  d_y, d_residual = (rng.normal(size=shape).astype(dtype) for _ in range(2))
  return x, scale, bias, d_y, d_residual


def _flax_layer_norm(x, scale, bias, dtype):
  module = nn.LayerNorm(epsilon=EPS, dtype=jnp.float32)
  return module.apply({"params": {"scale": scale, "bias": bias}}, x).astype(dtype)


def _ours(x, scale, bias, dtype, impl, residual):
  module = layer_norm.LayerNorm(epsilon=EPS, dtype=dtype, impl=impl)
  return module.apply({"params": {"scale": scale, "bias": bias}}, x, residual=residual)


@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16])
def test_xla_is_flax_layer_norm_bit_for_bit(dtype):
  x, scale, bias, d_y, _ = _arrays(0, (2, 7, 40), dtype)
  want, want_vjp = jax.vjp(lambda *a: _flax_layer_norm(*a, dtype), x, scale, bias)
  got, got_vjp = jax.vjp(lambda *a: _ours(*a, dtype, "xla", False), x, scale, bias)
  np.testing.assert_array_equal(np.float32(got), np.float32(want))
  for g, w in zip(got_vjp(d_y.astype(dtype)), want_vjp(d_y.astype(dtype))):
    np.testing.assert_array_equal(np.float32(g), np.float32(w))


@pytest.mark.parametrize("shape", [
    (3, 45, 48),    # 135 rows: two programs of 64 and a part; width 48 padded to a 64 tile
    (2, 196, 768),  # a B/16 image tower's rows (392: six programs and a part), width 768
    (1, 1, 16),     # a single row
])
@pytest.mark.parametrize("residual", [False, True])
def test_kernel_matches_autodiff_of_flax_layer_norm(shape, residual):
  x, scale, bias, d_y, d_residual = _arrays(1, shape)
  want_y, want_vjp = jax.vjp(lambda *a: _flax_layer_norm(*a, jnp.float32), x, scale, bias)
  d_x, d_scale, d_bias = want_vjp(d_y)
  with pallas_util.interpret():
    got, got_vjp = jax.vjp(lambda *a: _ours(*a, jnp.float32, "pallas", residual),
                           x, scale, bias)
    traced = str(jax.make_jaxpr(got_vjp)((d_residual, d_y) if residual else d_y))
    got_grads = got_vjp((d_residual, d_y) if residual else d_y)
  assert "name=layer_norm_bwd" in traced
  if residual:
    np.testing.assert_array_equal(got[0], x)
    got, d_x = got[1], d_x + d_residual
  np.testing.assert_array_equal(got, want_y)  # the forward is nn.LayerNorm's
  for g, w in zip(got_grads, (d_x, d_scale, d_bias)):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * float(np.abs(w).max()))


def test_bf16_kernel_matches_f32_autodiff_to_bf16_precision():
  x, scale, bias, d_y, d_residual = _arrays(2, (2, 64, 96), jnp.bfloat16)
  f32 = lambda a: np.asarray(a, np.float32)
  _, want_vjp = jax.vjp(lambda *a: _flax_layer_norm(*a, jnp.float32), f32(x), scale, bias)
  d_x, d_scale, d_bias = want_vjp(f32(d_y))
  with pallas_util.interpret():
    (_, y), got_vjp = jax.vjp(lambda *a: _ours(*a, jnp.bfloat16, "pallas", True),
                              x, scale, bias)
    got_x, got_scale, got_bias = got_vjp((d_residual, d_y))
  assert y.dtype == jnp.bfloat16 and got_x.dtype == jnp.bfloat16
  np.testing.assert_allclose(f32(got_x), d_x + f32(d_residual), rtol=2e-2, atol=2e-2)
  for g, w in ((got_scale, d_scale), (got_bias, d_bias)):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4 * float(np.abs(w).max()))


def test_reference_backward_matches_autodiff():
  x, scale, bias, d_y, _ = _arrays(3, (2, 9, 24))
  _, vjp = jax.vjp(lambda *a: _flax_layer_norm(*a, jnp.float32), x, scale, bias)
  for g, w in zip(layer_norm.backward_reference(x, scale, d_y, EPS), vjp(d_y)):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * float(np.abs(w).max()))


@pytest.mark.parametrize("rules,in_kernel", [
    ([("act_batch", "data"), ("act_length", "tensor")], True),   # rows split two ways
    ([("act_batch", "data"), ("act_embed", "tensor")], False),   # width split: XLA's backward
])
def test_sharded_equals_unsharded(rules, in_kernel):
  x, scale, bias, d_y, d_residual = _arrays(4, (8, 10, 32))

  def loss(x, scale, bias):
    x_out, y = _ours(x, scale, bias, jnp.float32, "pallas", True)
    return jnp.sum(y * d_y) + jnp.sum(x_out * d_residual)

  grad = jax.value_and_grad(loss, argnums=(0, 1, 2))
  with pallas_util.interpret():
    expected = grad(x, scale, bias)
    mesh = sharding.make_mesh({"data": 4, "fsdp": 1, "tensor": 2})
    with sharding.logical_context(mesh, rules):
      spec = jax.sharding.NamedSharding(
          mesh, nn.logical_to_mesh_axes(layer_norm.ACT_TOKENS, rules))
      step = jax.jit(grad)
      placed = jax.device_put(x, spec)
      traced = str(jax.make_jaxpr(step)(placed, scale, bias))
      got = step(placed, scale, bias)
  assert ("name=layer_norm_bwd" in traced) == in_kernel
  assert ("shard_map" in traced) == in_kernel
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), got,
               expected)


def test_pallas_needs_a_gpu_outside_the_interpreter_and_names_are_checked():
  with pytest.raises(ValueError, match="needs a GPU"):
    layer_norm.resolve("pallas")
  with pytest.raises(ValueError, match="norm_impl"):
    layer_norm.resolve("fused")
  with pallas_util.interpret():
    assert layer_norm.resolve("pallas") == "pallas"
  assert layer_norm.resolve("auto") == "xla"


def test_pallas_refuses_layer_norm_settings_it_does_not_compute():
  x = np.ones((1, 2, 8), np.float32)
  for fields in (dict(use_bias=False), dict(use_fast_variance=False), dict(reduction_axes=1)):
    module = layer_norm.LayerNorm(epsilon=EPS, impl="pallas", **fields)
    with pallas_util.interpret(), pytest.raises(ValueError, match="norm_impl='pallas' is"):
      module.init(jax.random.key(0), x)


@pytest.mark.parametrize("experiment,sections", [
    ("siglip_shapes.py", {}),
    ("coca_shapes.py", {}),
    ("vlm_shapes.py", test_flops.vlm_sections()),
    ("siglip_shapes.py", {"model": dict(scan_layers=True)}),
], ids=["two_tower", "coca", "vlm", "two_tower_scanned"])
def test_every_family_trains_the_same_with_the_kernel(experiment, sections):
  """Every encoder LayerNorm (two per block, and each encoder's final one) has its backward in
  the kernel, and loss and gradients match the default's."""
  configs = {}
  for impl in ("auto", "pallas"):
    configs[impl] = test_flops.tiny_config(experiment, **sections)
    configs[impl].norm_impl = impl
  traced = test_attention.kernels_train_the_same(configs["auto"], configs["pallas"])
  model = configs["pallas"].model
  encoders = [model.image] + ([model.text] if experiment == "siglip_shapes.py" else [])
  # A scanned encoder's blocks are one body in the jaxpr.
  blocks = lambda e: 1 if sections.get("model", {}).get("scan_layers") else e.depth
  assert traced.count("name=layer_norm_bwd") == sum(2 * blocks(e) + 1 for e in encoders)
