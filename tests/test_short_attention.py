"""vlpjax/models/short_attention.py, the Pallas attention kernels, run by Pallas' interpreter.

Numbers against a numpy reference (outputs) and JAX's autodiff of plain softmax attention
(gradients), on the shapes the kernels pad and mask (196 tokens, one query, Lq != Lk); the same
through `attention.attend` and a whole model; sharded over 8 devices against unsharded. That
the kernels compile for an H100 is tests/test_gpu_compile.py's.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import test_attention
from tests import test_flops
from vlpjax import sharding
from vlpjax.models import attention
from vlpjax.models import pallas_util
from vlpjax.models import short_attention


def _plain_attention(q, k, v, scale):
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision="highest") * scale
  return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v, precision="highest")


def _qkv(seed, batch, q_len, kv_len, heads, head_dim, dtype=np.float32):
  rng = np.random.default_rng(seed)
  shapes = [(batch, q_len, heads, head_dim)] + [(batch, kv_len, heads, head_dim)] * 2
  return [rng.normal(size=s).astype(dtype) for s in shapes]


@pytest.mark.parametrize("q_len,kv_len,head_dim,scale", [
    (196, 196, 64, 0.125),  # a B/16 image tower: 196 = 3 query blocks and a part, keys padded
    (64, 64, 32, 1.0),      # a text tower: exactly one tile
    (1, 196, 64, 0.125),    # a MAP head's single probe query
    (5, 50, 16, 0.3),       # cross-attention: fewer queries than keys, both padded
])
def test_kernels_match_softmax_attention_and_its_gradient(q_len, kv_len, head_dim, scale):
  q, k, v = _qkv(0, 2, q_len, kv_len, 3, head_dim)
  d_out = np.random.default_rng(1).normal(size=q.shape).astype(np.float32)
  with pallas_util.interpret():
    out, vjp = jax.vjp(lambda *a: short_attention.attention(*a, logits_scale=scale), q, k, v)
    grads = vjp(d_out)
  expected = test_attention._numpy_attention(q * scale, k, v, None)
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)
  _, reference_vjp = jax.vjp(lambda *a: _plain_attention(*a, scale), q, k, v)
  for got, want, name in zip(grads, reference_vjp(d_out), ("dq", "dk", "dv")):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()),
                               err_msg=name)


def test_queries_whose_logits_are_all_far_below_zero_stay_finite():
  # Their log-sum-exp is about -600; the padding keys (196 -> 256), whose logits read 0, must
  # not get exp(600) in the backward pass.
  q, k, v = _qkv(5, 1, 196, 196, 2, 64)
  q[:, :8] = -10.0
  k[:] = np.abs(k) + 1.0
  d_out = np.random.default_rng(6).normal(size=q.shape).astype(np.float32)
  with pallas_util.interpret():
    _, vjp = jax.vjp(short_attention.attention, q, k, v)
    grads = vjp(d_out)
  _, reference_vjp = jax.vjp(lambda *a: _plain_attention(*a, 1.0), q, k, v)
  for got, want in zip(grads, reference_vjp(d_out)):
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))


def test_bf16_inputs_come_back_bf16_and_close_to_f32():
  q, k, v = _qkv(2, 2, 196, 196, 2, 64)
  low = [jnp.asarray(a, jnp.bfloat16) for a in (q, k, v)]
  with pallas_util.interpret():
    out = short_attention.attention(*low, logits_scale=0.125)
  assert out.dtype == jnp.bfloat16
  expected = _plain_attention(*[a.astype(jnp.float32) for a in low], 0.125)
  np.testing.assert_allclose(np.asarray(out, np.float32), expected, atol=3e-2)


def test_shapes_it_does_not_take_are_refused_or_routed_elsewhere():
  assert short_attention.takes(196, 196, 64, 12, 12, masked=False)
  assert not short_attention.takes(196, 257, 64, 12, 12, masked=False)  # keys beyond one tile
  assert not short_attention.takes(64, 64, 72, 16, 16, masked=False)    # So400m's head_dim
  assert not short_attention.takes(64, 64, 64, 8, 2, masked=False)      # grouped-query
  assert not short_attention.takes(64, 64, 64, 8, 8, masked=True)
  with pytest.raises(ValueError, match="at most 256 keys"):
    short_attention.attention(*_qkv(0, 1, 4, 300, 2, 64))
  # Through attend, a mask sends it to another implementation (the same numbers).
  q, k, v, mask = test_attention._inputs(heads=4, kv_heads=4, head_dim=16)
  with pallas_util.interpret():
    out = attention.attend(q, k, v, mask, impl="pallas", dtype=jnp.float32, heads_first=False)
  np.testing.assert_allclose(out, test_attention._numpy_attention(q, k, v, mask), rtol=1e-4,
                             atol=1e-5)


def test_pallas_needs_a_gpu_outside_the_interpreter():
  with pytest.raises(ValueError, match="needs a GPU"):
    attention.resolve("pallas", jnp.bfloat16)
  with pallas_util.interpret():
    assert attention.resolve("pallas", jnp.float32) == "pallas"


def test_sharded_over_batch_and_heads_equals_unsharded():
  """Under a mesh the kernel runs per device (shard_map over the batch and head rules)."""
  q, k, v = _qkv(3, 4, 20, 20, 4, 16)
  d_out = np.random.default_rng(4).normal(size=q.shape).astype(np.float32)

  def loss(q, k, v):
    out = attention.attend(q, k, v, None, impl="pallas", dtype=jnp.float32, heads_first=False)
    return jnp.sum(out * d_out)

  with pallas_util.interpret():
    expected = jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)
    mesh = sharding.make_mesh({"data": 4, "fsdp": 1, "tensor": 2})
    rules = [("act_batch", "data"), ("act_heads", "tensor")]
    with sharding.logical_context(mesh, rules):
      spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data", None, "tensor"))
      placed = [jax.device_put(a, spec) for a in (q, k, v)]
      step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
      assert "shard_map" in str(jax.make_jaxpr(step)(*placed))
      got = step(*placed)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), got,
               expected)


def test_a_two_tower_model_trains_the_same_with_the_kernels():
  """siglip_shapes (head_dim 32; 16 image and 16 text tokens, a MAP head): every attention
  it has goes through the kernels (one forward kernel per block and one for the MAP head),
  and loss and gradients match einsum attention's."""
  configs = {}
  for impl in ("einsum", "pallas"):
    configs[impl] = test_flops.tiny_config("siglip_shapes.py")
    configs[impl].attention_impl = impl
  traced = test_attention.kernels_train_the_same(configs["einsum"], configs["pallas"])
  towers = configs["pallas"].model
  for kernel in short_attention.KERNEL_MATMULS:
    assert traced.count(f"name={kernel}") == towers.image.depth + towers.text.depth + 1
