"""Attention implementations (vlpjax/models/attention.py) against a numpy reference and each other."""
from flax import linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import test_flops
from vlpjax import families
from vlpjax.models import attention
from vlpjax.models import decoder
from vlpjax.models import layers


def _numpy_attention(q, k, v, mask):
  """[B, L, heads, kv] reference; kv head j serves query heads j*g .. j*g+g-1."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  groups = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, groups, axis=2), np.repeat(v, groups, axis=2)
  logits = np.einsum("bqhd,bkhd->bhqk", q, k)
  if mask is not None:
    logits = np.where(np.asarray(mask), logits, -1e30)
  logits -= logits.max(-1, keepdims=True)
  weights = np.exp(logits)
  weights /= weights.sum(-1, keepdims=True)
  return np.einsum("bhqk,bkhd->bqhd", weights, v)


def _inputs(seed=0, batch=2, q_len=5, kv_len=7, heads=4, kv_heads=2, head_dim=8):
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(batch, q_len, heads, head_dim)).astype(np.float32)
  k = rng.normal(size=(batch, kv_len, kv_heads, head_dim)).astype(np.float32)
  v = rng.normal(size=(batch, kv_len, kv_heads, head_dim)).astype(np.float32)
  mask = rng.random((batch, 1, q_len, kv_len)) < 0.7
  mask[0, 0, 1] = False  # a query that may see nothing: uniform weights, not NaN
  return q, k, v, mask


def _heads_first(x):
  return jnp.swapaxes(x, 1, 2)


@pytest.mark.parametrize("with_mask", [True, False])
@pytest.mark.parametrize("impl,heads_first", [("einsum", True), ("einsum", False),
                                              ("xla", False)])
def test_matches_numpy(impl, heads_first, with_mask):
  q, k, v, mask = _inputs()
  mask = mask if with_mask else None
  expected = _numpy_attention(q, k, v, mask)
  if heads_first:
    q, k, v = map(_heads_first, (q, k, v))
  out = attention.attend(q, k, v, mask, impl=impl, dtype=jnp.float32, heads_first=heads_first)
  if heads_first:
    out = _heads_first(out)
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
  assert np.isfinite(np.asarray(out)).all()


@pytest.mark.parametrize("impl", ["einsum", "xla"])
def test_logits_scale_equals_scaling_q(impl):
  q, k, v, mask = _inputs(seed=7)
  expected = _numpy_attention(q * 0.125, k, v, mask)
  out = attention.attend(q, k, v, mask, impl=impl, dtype=jnp.float32, heads_first=False,
                         logits_scale=0.125)
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("heads_first,logits_scale", [(False, None), (True, None), (True, 0.3)])
def test_einsum_gradients_agree_with_xla(heads_first, logits_scale):
  """The einsum path's hand-written backward pass against autodiff of JAX's own attention.

  The mask has a query that sees no key (its weights are uniform): its logits were constants,
  so q gets no gradient there.
  """
  q, k, v, mask = _inputs(seed=1)
  cotangent = np.random.default_rng(2).normal(size=q.shape).astype(np.float32)

  def loss(impl, q, k, v):
    if impl == "einsum" and heads_first:
      out = _heads_first(attention.attend(*map(_heads_first, (q, k, v)), mask, impl=impl,
                                          dtype=jnp.float32, heads_first=True,
                                          logits_scale=logits_scale))
    else:
      out = attention.attend(q, k, v, mask, impl=impl, dtype=jnp.float32, heads_first=False,
                             logits_scale=logits_scale)
    return jnp.sum(out * cotangent)

  grads = {impl: jax.grad(lambda *a, impl=impl: loss(impl, *a), argnums=(0, 1, 2))(q, k, v)
           for impl in ("einsum", "xla")}
  for a, b in zip(grads["einsum"], grads["xla"]):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    assert np.abs(np.asarray(a)).max() > 0
  np.testing.assert_array_equal(grads["einsum"][0][0, 1], 0.0)


def test_einsum_bf16_gradients_close_to_f32():
  q, k, v, mask = _inputs(seed=4)
  cotangent = np.random.default_rng(5).normal(size=q.shape).astype(np.float32)

  def grads(dtype):
    def loss(q, k, v):
      out = attention.attend(q, k, v, mask, impl="einsum", dtype=dtype, heads_first=False)
      return jnp.sum(out.astype(jnp.float32) * cotangent)
    return jax.grad(loss, argnums=(0, 1, 2))(*(jnp.asarray(a, dtype) for a in (q, k, v)))

  for low, high in zip(grads(jnp.bfloat16), grads(jnp.float32)):
    assert low.dtype == jnp.bfloat16
    scale = np.abs(np.asarray(high)).max()
    np.testing.assert_allclose(np.asarray(low, np.float32), high, atol=0.05 * scale)


def test_bf16_implementations_agree_within_bf16_precision():
  q, k, v, mask = _inputs(seed=3)
  q, k, v = (jnp.asarray(a, jnp.bfloat16) for a in (q, k, v))
  outs = [attention.attend(q, k, v, mask, impl=impl, dtype=jnp.bfloat16, heads_first=False)
          for impl in ("einsum", "xla")]
  assert all(o.dtype == jnp.bfloat16 for o in outs)
  expected = _numpy_attention(*(np.asarray(a, np.float32) for a in (q, k, v)), mask)
  for out in outs:
    np.testing.assert_allclose(np.asarray(out, np.float32), expected, rtol=0.05, atol=0.05)


def test_resolve():
  assert attention.resolve("auto", jnp.bfloat16, backend="gpu") == "cudnn"
  assert attention.resolve("auto", jnp.float32, backend="gpu") == "einsum"
  assert attention.resolve("auto", jnp.bfloat16, backend="tpu") == "einsum"
  assert attention.resolve("auto", jnp.float32, backend="cpu") == "einsum"
  assert attention.resolve("xla", jnp.float32, backend="cpu") == "xla"
  assert attention.resolve("cudnn", jnp.float16, backend="gpu") == "cudnn"
  with pytest.raises(ValueError, match="needs a GPU.*'cpu'"):
    attention.resolve("cudnn", jnp.bfloat16, backend="cpu")
  with pytest.raises(ValueError, match="bfloat16 or float16, not float32"):
    attention.resolve("cudnn", jnp.float32, backend="gpu")
  with pytest.raises(ValueError, match="einsum"):
    attention.resolve("einsun", jnp.float32)


def test_heads_first_needs_einsum():
  q, k, v, _ = _inputs()
  with pytest.raises(ValueError, match="heads-first"):
    attention.attend(q, k, v, None, impl="xla", dtype=jnp.float32, heads_first=True)


def _module_outputs(make_module, inputs, impls, **call_kwargs):
  """Outputs of `make_module(impl)` for each impl, all with the params of the first."""
  params = make_module(impls[0]).init(jax.random.key(0), *inputs, **call_kwargs)
  return [make_module(impl).apply(params, *inputs, **call_kwargs) for impl in impls]


def test_multi_head_attention_same_params_any_implementation():
  rng = np.random.default_rng(4)
  x = rng.normal(size=(2, 6, 32)).astype(np.float32)
  kv = rng.normal(size=(2, 9, 32)).astype(np.float32)
  mask = rng.random((2, 1, 6, 9)) < 0.8
  make = lambda impl: layers.MultiHeadAttention(4, attention_impl=impl)
  einsum_out, xla_out = _module_outputs(make, (x, kv, mask), ("einsum", "xla"))
  np.testing.assert_allclose(einsum_out, xla_out, rtol=1e-5, atol=1e-6)


def test_map_head_and_encoder_block_pass_the_choice_down():
  x = np.random.default_rng(5).normal(size=(2, 6, 32)).astype(np.float32)
  for make in (lambda impl: layers.MAPHead(4, 64, attention_impl=impl),
               lambda impl: layers.EncoderBlock(64, 4, attention_impl=impl)):
    einsum_out, xla_out = _module_outputs(make, (x,), ("einsum", "xla"))
    np.testing.assert_allclose(einsum_out, xla_out, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="attention implementation"):
    layers.EncoderBlock(64, 4, attention_impl="flash").init(jax.random.key(0), x)


def test_decoder_attention_with_cache_any_implementation():
  """Grouped-query self-attention writing a KV cache: prefill then one step, einsum vs xla."""
  batch, max_len, width, heads, kv_heads, head_dim = 2, 8, 32, 4, 2, 8
  rng = np.random.default_rng(6)
  x = rng.normal(size=(batch, 5, width)).astype(np.float32)
  step = rng.normal(size=(batch, 1, width)).astype(np.float32)
  cache = {n: jnp.zeros((batch, max_len, kv_heads, head_dim)) for n in ("k", "v")}
  causal = np.tril(np.ones((max_len, max_len), bool))

  def run(impl, params=None):
    module = decoder.Attention(heads, kv_heads, head_dim, attention_impl=impl)
    positions = np.broadcast_to(np.arange(5), (batch, 5))
    mask = np.broadcast_to(causal[None, None, :5], (batch, 1, 5, max_len))
    args = (x, mask)
    kwargs = dict(positions=positions, cache=cache, cache_index=0)
    if params is None:
      params = module.init(jax.random.key(0), *args, **kwargs)
    out, new_cache = module.apply(params, *args, **kwargs)
    step_mask = np.broadcast_to(causal[None, None, 5:6], (batch, 1, 1, max_len))
    step_out, _ = module.apply(params, step, step_mask, positions=np.full((batch, 1), 5),
                               cache=new_cache, cache_index=5)
    return params, out, step_out

  params, einsum_out, einsum_step = run("einsum")
  _, xla_out, xla_step = run("xla", params)
  np.testing.assert_allclose(einsum_out, xla_out, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(einsum_step, xla_step, rtol=1e-5, atol=1e-6)


# -- config.attention_impl reaches every family ---------------------------------------------


def _family_loss_and_grads(config, params=None):
  """(params, loss, grads) of one batch through the family `config` builds."""
  from tools.bench_train import synthetic_batch  # pylint: disable=g-import-not-at-top
  family = families.get_family(config)
  specs = family.input_specs(test_flops.BATCH)
  batch = synthetic_batch(specs)
  if params is None:
    params = nn.meta.unbox(family.init(jax.random.key(0), batch))

  def loss_fn(params):
    features = family.features(params, batch, jax.random.key(1))
    loss = family.features_loss(params, features)
    return loss[0] if isinstance(loss, tuple) else loss

  loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params)
  return params, loss, grads


def kernels_train_the_same(reference_config, kernel_config) -> str:
  """Asserts that `kernel_config`'s family, run in Pallas' interpreter (vlpjax's kernels),
  gives `reference_config`'s loss and gradients on one batch from the same params; returns
  the jaxpr of its gradient, for the caller to count kernels in."""
  from vlpjax.models import pallas_util  # pylint: disable=g-import-not-at-top
  from tools.bench_train import synthetic_batch  # pylint: disable=g-import-not-at-top
  params, loss, grads = _family_loss_and_grads(reference_config)
  with pallas_util.interpret():
    _, kernel_loss, kernel_grads = _family_loss_and_grads(kernel_config, params)
    family = families.get_family(kernel_config)
    batch = synthetic_batch(family.input_specs(test_flops.BATCH))

    def loss_fn(p):
      loss = family.features_loss(p, family.features(p, batch, jax.random.key(1)))
      return loss[0] if isinstance(loss, tuple) else loss

    traced = str(jax.make_jaxpr(jax.grad(loss_fn))(params))
  np.testing.assert_allclose(kernel_loss, loss, rtol=1e-5)
  scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(grads))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale),
               kernel_grads, grads)
  return traced


@pytest.mark.parametrize("experiment,sections", [
    ("siglip_shapes.py", {}),
    ("coca_shapes.py", {}),
    ("vlm_shapes.py", test_flops.vlm_sections(num_kv_heads=2)),
    ("vid2seq_shapes.py", test_flops.video_sections(model=dict(architecture="prefix_lm"))),
], ids=["two_tower", "coca", "vlm", "video"])
def test_every_family_trains_the_same_with_xla_attention(experiment, sections):
  configs = {}
  for impl in ("einsum", "xla"):
    configs[impl] = test_flops.tiny_config(experiment, **sections)
    configs[impl].attention_impl = impl
  params, loss, grads = _family_loss_and_grads(configs["einsum"])
  _, xla_loss, xla_grads = _family_loss_and_grads(configs["xla"], params)
  np.testing.assert_allclose(xla_loss, loss, rtol=1e-5)
  scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(grads))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale),
               xla_grads, grads)


def test_config_typo_names_the_key():
  config = test_flops.tiny_config("siglip_shapes.py")
  config.attention_impl = "flash"
  family = families.get_family(config)
  with pytest.raises(ValueError, match=r"config\.attention_impl.*'flash'"):
    jax.eval_shape(family.init, jax.random.key(0), family.input_specs(test_flops.BATCH))


def test_cudnn_takes_even_lengths_and_head_dims_it_has_kernels_for():
  # The MAP head's single probe query (Lq = 1) is what cuDNN's training path refuses in a
  # SigLIP step; such attention runs "xla" instead (checked on an H100: docs/benchmarks.md).
  assert not attention.cudnn_takes(1, 196, 64, backend="cpu")
  assert attention.cudnn_takes(196, 196, 64, backend="cpu")
  assert attention.cudnn_takes(64, 64, 72, backend="cpu")  # So400m: 1152 / 16 heads
  assert not attention.cudnn_takes(64, 63, 64, backend="cpu")
  assert not attention.cudnn_takes(64, 64, 60, backend="cpu")
  assert not attention.cudnn_takes(64, 64, 256, backend="cpu")  # 256 only from Hopper on
