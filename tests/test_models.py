"""ViT / text / two-tower models: variants, shapes, logical names, remat."""
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from vlpjax import models
from vlpjax.models import layers
from vlpjax.models.text import TextEncoder
from vlpjax.models.two_tower import TwoTower
from vlpjax.models.vit import PatchEmbedding, ViT, parse_variant
from vlpjax.registry import UnknownNameError

TINY = dict(width=16, depth=1, mlp_dim=32, num_heads=2)
TINY_VIT = dict(TINY, patch_size=4)
TINY_TEXT = dict(TINY, vocab_size=50, max_len=6)


def _images(batch=2, size=8, seed=0):
  return jax.random.uniform(jax.random.PRNGKey(seed), (batch, size, size, 3),
                            minval=-1., maxval=1.)


def _texts(batch=2, length=6, seed=0):
  return jax.random.randint(jax.random.PRNGKey(seed), (batch, length), 0, 50)


def _two_tower(**kwargs):
  return TwoTower(image=kwargs.pop("image", TINY_VIT),
                  text=kwargs.pop("text", TINY_TEXT), **kwargs)


# -- variants ------------------------------------------------------------------

def test_parse_variant_so400m_and_b():
  assert parse_variant("So400m/14") == dict(
      width=1152, depth=27, mlp_dim=4304, num_heads=16, patch_size=14)
  assert parse_variant("B/16") == dict(
      width=768, depth=12, mlp_dim=3072, num_heads=12, patch_size=16)
  assert parse_variant("L")["patch_size"] is None


def test_parse_variant_typo_lists_nearest_names():
  with pytest.raises(UnknownNameError, match="So400m") as err:
    parse_variant("So400/14")
  assert "Known:" in str(err.value)
  with pytest.raises(ValueError, match="NAME/PATCH"):
    parse_variant("B/16x")


def test_vit_explicit_fields_override_variant():
  assert ViT(variant="B/16", depth=2).dims == dict(
      width=768, depth=2, mlp_dim=3072, num_heads=12, patch_size=16)
  with pytest.raises(ValueError, match="patch_size"):
    _ = ViT(variant="B").dims


# -- shapes ----------------------------------------------------------------------

@pytest.mark.parametrize("pool_type,posemb,want", [
    ("map", "learn", (2, 16)),
    ("gap", "sincos2d", (2, 16)),
    ("tok", "learn", (2, 16)),
    ("none", "learn", (2, 4, 16)),
])
def test_vit_output_shapes(pool_type, posemb, want):
  model = ViT(**TINY_VIT, pool_type=pool_type, posemb=posemb)
  (out, aux), params = model.init_with_output(jax.random.PRNGKey(0), _images())
  assert out.shape == want
  num_tokens = 4 + (pool_type == "tok")
  assert aux["tokens"].shape == (2, num_tokens, 16)
  params = params["params"]
  assert ("position_embedding" in params) == (posemb == "learn")
  assert ("head" in params) == (pool_type == "map")
  assert ("cls" in params) == (pool_type == "tok")


@pytest.mark.parametrize("height,width", [(16, 16), (18, 23)])
def test_patch_embedding_is_the_strided_conv(height, width):
  """Same params (names, shapes, initial values) and outputs as a VALID stride-p nn.Conv,
  also when the image does not divide into patches (the conv drops the remainder)."""
  images = jax.random.uniform(jax.random.PRNGKey(3), (2, height, width, 3), minval=-1.)
  ours = PatchEmbedding(8, 4)
  conv = nn.Conv(8, (4, 4), strides=(4, 4), padding="VALID",
                 kernel_init=nn.initializers.lecun_normal())
  params = ours.init(jax.random.PRNGKey(0), images)
  conv_params = conv.init(jax.random.PRNGKey(0), images)
  jax.tree.map(np.testing.assert_array_equal, nn.unbox(params), conv_params)
  params = jax.tree.map(lambda p: p + 0.1, nn.unbox(params))  # a non-zero bias too
  got = ours.apply(params, images)
  assert got.shape == (2, height // 4, width // 4, 8)
  np.testing.assert_allclose(got, conv.apply(params, images), rtol=1e-5, atol=1e-5)
  # The kernel's gradient, what training takes from this layer.
  grads = [jax.grad(lambda p: jnp.sum(m.apply(p, images) ** 2))(params) for m in (ours, conv)]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), *grads)


def test_patch_embedding_rejects_images_smaller_than_a_patch():
  with pytest.raises(ValueError, match="smaller than one 4x4 patch"):
    PatchEmbedding(8, 4).init(jax.random.PRNGKey(0), jnp.zeros((1, 3, 16, 3)))


def test_vit_projection_head():
  model = ViT(**TINY_VIT, head_dim_out=24)
  out, _ = model.init_with_output(jax.random.PRNGKey(0), _images())[0]
  assert out.shape == (2, 24) and model.output_dim == 24


def test_vit_bad_pool_type_names_choices():
  with pytest.raises(ValueError, match="'map'"):
    ViT(**TINY_VIT, pool_type="mapp").init(jax.random.PRNGKey(0), _images())


@pytest.mark.parametrize("pool_type", ["last", "first", "gap", "eos"])
def test_text_pooling(pool_type):
  model = TextEncoder(**TINY_TEXT, pool_type=pool_type, eos_id=7, out_dim=12)
  texts = jnp.array([[3, 4, 7, 1, 1, 1], [3, 4, 5, 6, 8, 9]])
  (out, aux), _ = model.init_with_output(jax.random.PRNGKey(0), texts)
  assert out.shape == (2, 12)
  tokens = aux["tokens"]
  want = {"last": tokens[:, -1], "first": tokens[:, 0],
          "gap": tokens.mean(axis=1),
          # Row 0 has eos at position 2, row 1 has none: its last position.
          "eos": jnp.stack([tokens[0, 2], tokens[1, -1]])}[pool_type]
  np.testing.assert_allclose(aux["pooled"], want, rtol=1e-6)


def test_clip_options_change_nothing_by_default():
  """pre_norm / proj_bias / head_bias: defaults keep today's trees; CLIP's drop or add one."""
  default_img = ViT(**TINY_VIT, pool_type="tok", head_dim_out=24).init(
      jax.random.PRNGKey(0), _images())["params"]
  assert "pre_layernorm" not in default_img and "bias" in default_img["proj"]
  clip_img = ViT(**TINY_VIT, pool_type="tok", head_dim_out=24, pre_norm=True,
                 proj_bias=False).init(jax.random.PRNGKey(0), _images())["params"]
  assert set(clip_img) == set(default_img) | {"pre_layernorm"}
  assert set(clip_img["proj"]) == {"kernel"}
  assert set(clip_img["pre_layernorm"]) == {"scale", "bias"}
  default_txt = TextEncoder(**TINY_TEXT, out_dim=12).init(jax.random.PRNGKey(0), _texts())
  clip_txt = TextEncoder(**TINY_TEXT, out_dim=12, head_bias=False, causal=True).init(
      jax.random.PRNGKey(0), _texts())
  assert "bias" in default_txt["params"]["head"]
  assert set(clip_txt["params"]["head"]) == {"kernel"}
  # `causal` adds no parameter: the same params run either way.
  assert (jax.tree.map(np.shape, default_txt["params"]["encoder"])
          == jax.tree.map(np.shape, clip_txt["params"]["encoder"]))


def test_causal_text_positions_ignore_later_tokens():
  texts = jnp.array([[3, 4, 5, 6, 7, 8]])
  later = texts.at[0, 4].set(9)  # Only position 4 changes.
  for causal in (True, False):
    model = TextEncoder(**TINY_TEXT, causal=causal)
    variables = model.init(jax.random.PRNGKey(0), texts)
    tokens = model.apply(variables, texts)[1]["tokens"]
    tokens_later = model.apply(variables, later)[1]["tokens"]
    same = np.allclose(tokens_later[:, :4], tokens[:, :4], rtol=1e-6, atol=1e-6)
    assert same == causal
    assert not np.allclose(tokens_later[:, 4:], tokens[:, 4:])


def test_text_variant_and_short_texts():
  model = TextEncoder(variant="mu", vocab_size=50, max_len=6, out_dim=8)
  (out, _), params = model.init_with_output(jax.random.PRNGKey(0), _texts(length=4))
  assert out.shape == (2, 8)
  assert params["params"]["position_embedding"]["embedding"].value.shape == (6, 32)
  with pytest.raises(ValueError, match="max_len"):
    model.apply(params, _texts(length=7))


def test_posemb_sincos_2d():
  pe = np.asarray(layers.posemb_sincos_2d(3, 5, 16))
  assert pe.shape == (15, 16)
  # Position (0, 0): sines are 0 and cosines 1; the y quarter follows rows.
  np.testing.assert_allclose(pe[0], [0.] * 4 + [1.] * 4 + [0.] * 4 + [1.] * 4,
                             atol=1e-7)
  row, col = 2, 3
  omega = 10_000. ** -(np.arange(4) / 3)
  np.testing.assert_allclose(
      pe[row * 5 + col],
      np.concatenate([np.sin(col * omega), np.cos(col * omega),
                      np.sin(row * omega), np.cos(row * omega)]), rtol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_add_position_embedding_matches_autodiff_of_the_sum(dtype):
  x = jax.random.normal(jax.random.PRNGKey(0), (5, 3, 4)).astype(dtype)
  pos = jax.random.normal(jax.random.PRNGKey(1), (3, 4))
  g = jax.random.normal(jax.random.PRNGKey(2), (5, 3, 4)).astype(dtype)
  got, got_vjp = jax.vjp(layers.add_position_embedding, x, pos)
  want, want_vjp = jax.vjp(lambda x, pos: x + pos[None].astype(x.dtype), x, pos)
  assert got.dtype == dtype
  np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
  (gx, gpos), (wx, _) = got_vjp(g), want_vjp(g)
  np.testing.assert_array_equal(np.asarray(gx, np.float32), np.asarray(wx, np.float32))
  assert gpos.dtype == pos.dtype
  # The batch sum, accumulated in f32 (a bf16 reduction would round at every add).
  np.testing.assert_allclose(gpos, np.asarray(g, np.float64).sum(0), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype,kernel_shape", [(jnp.float32, (6, 4)),
                                                 (jnp.float32, (6, 2, 3)),
                                                 (jnp.bfloat16, (6, 2, 3))])
def test_biased_token_matmul_matches_autodiff_of_matmul_plus_bias(dtype, kernel_shape):
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  x = jax.random.normal(keys[0], (3, 5, 6)).astype(dtype)
  kernel = jax.random.normal(keys[1], kernel_shape).astype(dtype)
  bias = jax.random.normal(keys[2], kernel_shape[1:]).astype(dtype)
  got, got_vjp = jax.vjp(layers.biased_token_matmul, x, kernel, bias)
  want, want_vjp = jax.vjp(lambda x, k, b: layers.token_matmul(x, k) + b, x, kernel, bias)
  assert got.shape == want.shape == (3, 5) + kernel_shape[1:] and got.dtype == dtype
  tol = dict(rtol=1e-5, atol=1e-5) if dtype == jnp.float32 else dict(rtol=2e-2, atol=5e-2)
  as_f32 = lambda a: np.asarray(a, np.float32)
  np.testing.assert_allclose(as_f32(got), as_f32(want), **tol)
  g = jax.random.normal(keys[3], got.shape).astype(dtype)
  for ours, theirs in zip(got_vjp(g), want_vjp(g)):
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    np.testing.assert_allclose(as_f32(ours), as_f32(theirs), **tol)
  # The bias gradient is a row of the weight-gradient matmul (f32 accumulation), not a
  # reduction of its own over the tokens.
  backward = jax.make_jaxpr(got_vjp)(g)
  assert not [e for e in backward.eqns if e.primitive.name.startswith("reduce")]
  np.testing.assert_allclose(as_f32(got_vjp(g)[2]),
                             np.asarray(g, np.float64).sum((0, 1)), rtol=1e-2, atol=1e-2)


class _AsFc1(nn.Module):
  """Puts `make(name="fc1")` at the path MlpBlock gives its fc1 (init's rng follows paths)."""
  make: Any

  @nn.compact
  def __call__(self, x):
    return self.make(name="fc1")(x)


def test_dense_gelu_is_dense_then_gelu_with_fewer_saved_activations():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 8))
  ours = _AsFc1(lambda name: layers.DenseGelu(32, name=name))
  reference = _AsFc1(lambda name: lambda x: nn.gelu(nn.Dense(32, name=name)(x),
                                                    approximate=True))
  variables = ours.init(jax.random.PRNGKey(1), x)
  ref_variables = reference.init(jax.random.PRNGKey(1), x)
  # Same parameters from the same rng: names, shapes and initialisers are nn.Dense's.
  jax.tree_util.tree_map(np.testing.assert_array_equal, variables, ref_variables)

  def run(module, params):
    return jax.vjp(lambda p, x: module.apply({"params": p}, x), params, x)

  (got, got_vjp) = run(ours, variables["params"])
  (want, want_vjp) = run(reference, ref_variables["params"])
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  g = jax.random.normal(jax.random.PRNGKey(2), got.shape)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                         got_vjp(g)[0], want_vjp(g)[0])
  np.testing.assert_allclose(got_vjp(g)[1], want_vjp(g)[1], rtol=1e-5, atol=1e-6)

  # What the backward pass keeps of [tokens, features] size: the matmul's output only (the
  # bias add and GELU are recomputed); plain autodiff keeps the biased pre-activation and
  # pieces of GELU as well.
  def activations_kept(vjp_fn):
    return sum(leaf.size == got.size for leaf in jax.tree_util.tree_leaves(vjp_fn))
  assert activations_kept(got_vjp) == 1
  assert activations_kept(want_vjp) >= 2


def test_attention_mask_hides_keys():
  attn = layers.MultiHeadAttention(num_heads=2)
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 4, 8))
  variables = attn.init(jax.random.PRNGKey(1), x)
  mask = jnp.array([True, True, True, False])[None, None, None, :]
  changed = x.at[:, 3].set(5.)  # Only the masked key/value token changes.
  out = attn.apply(variables, x[:, :2], x, mask=mask)
  np.testing.assert_allclose(attn.apply(variables, x[:, :2], changed, mask=mask),
                             out, rtol=1e-6)
  assert not np.allclose(attn.apply(variables, x[:, :2], changed), out)


# -- two tower -----------------------------------------------------------------

def test_two_tower_outputs_and_one_sided_calls():
  model = _two_tower()
  images, texts = _images(), _texts()
  variables = model.init(jax.random.PRNGKey(0), images, texts)
  zimg, ztxt, out = model.apply(variables, images, texts)
  assert zimg.shape == ztxt.shape == (2, 16)
  assert zimg.dtype == ztxt.dtype == jnp.float32
  np.testing.assert_allclose(jnp.linalg.norm(zimg, axis=-1), 1., rtol=1e-6)
  np.testing.assert_allclose(jnp.linalg.norm(ztxt, axis=-1), 1., rtol=1e-6)
  np.testing.assert_allclose(out["logit_scale"], math.log(10.), rtol=1e-6)
  np.testing.assert_allclose(out["logit_bias"], -10.)

  only_img = model.apply(variables, images=images)
  assert only_img[1] is None
  np.testing.assert_allclose(only_img[0], zimg, rtol=1e-6)
  only_txt = model.apply(variables, texts=texts)
  assert only_txt[0] is None
  np.testing.assert_allclose(only_txt[1], ztxt, rtol=1e-6)
  np.testing.assert_allclose(
      model.apply(variables, images, method=TwoTower.embed_images), zimg, rtol=1e-6)
  np.testing.assert_allclose(
      model.apply(variables, texts, method="embed_texts"), ztxt, rtol=1e-6)


def test_two_tower_clip_style_projection_and_no_bias():
  model = _two_tower(embed_dim=24, bias_init=None,
                     temperature_init=math.log(1 / 0.07))
  variables = model.init(jax.random.PRNGKey(0), _images(), _texts())
  params = variables["params"]
  assert set(params) == {"img", "txt", "logit_scale"}
  assert params["img"]["proj"]["kernel"].value.shape == (16, 24)
  zimg, ztxt, out = model.apply(variables, _images(), _texts())
  assert zimg.shape == ztxt.shape == (2, 24) and out["logit_bias"] is None
  # SigLIP shape: image width == embed_dim, so no image projection.
  siglip = _two_tower().init(jax.random.PRNGKey(0), _images(), _texts())
  assert "proj" not in siglip["params"]["img"]
  assert set(siglip["params"]) == {"img", "txt", "logit_scale", "logit_bias"}


def test_param_logical_names():
  variables = _two_tower().init(jax.random.PRNGKey(0), _images(), _texts())
  # Every param is boxed with names, one name per dimension.
  boxes = jax.tree_util.tree_leaves(
      variables["params"], is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert all(isinstance(b, nn.LogicallyPartitioned) and len(b.names) == b.value.ndim
             for b in boxes)

  spec = nn.get_partition_spec(variables)["params"]
  P = jax.sharding.PartitionSpec
  block = spec["img"]["encoder"]["layers_0"]
  assert block["mlp"]["fc1"]["kernel"] == P("embed", "mlp")
  assert block["mlp"]["fc2"]["kernel"] == P("mlp", "embed")
  assert block["mlp"]["fc1"]["bias"] == P("mlp")
  assert block["self_attn"]["q_proj"]["kernel"] == P("embed", "heads", "kv")
  assert block["self_attn"]["q_proj"]["bias"] == P("heads", "kv")
  assert block["self_attn"]["out_proj"]["kernel"] == P("heads", "kv", "embed")
  assert block["layer_norm1"]["scale"] == P("embed")
  img = spec["img"]
  assert img["patch_embedding"]["kernel"] == P("patch", None, "channels", "embed")
  assert img["position_embedding"]["embedding"] == P("pos", "embed")
  assert img["head"]["probe"] == P(None, None, "embed")
  assert img["encoder"]["encoder_norm"]["bias"] == P("embed")
  txt = spec["txt"]
  assert txt["token_embedding"]["embedding"] == P("vocab", "embed")
  assert txt["head"]["kernel"] == P("embed", "proj")
  assert spec["logit_scale"] == P() and spec["logit_bias"] == P()


def test_bf16_compute_keeps_f32_params_and_outputs():
  model = _two_tower(dtype=jnp.bfloat16)
  variables = model.init(jax.random.PRNGKey(0), _images(), _texts())
  dtypes = {x.dtype for x in jax.tree_util.tree_leaves(nn.unbox(variables))}
  assert dtypes == {jnp.dtype(jnp.float32)}
  zimg, ztxt, _ = model.apply(variables, _images(), _texts())
  assert zimg.dtype == ztxt.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(zimg))) and bool(jnp.all(jnp.isfinite(ztxt)))


def _subjaxprs(eqn):
  for value in eqn.params.values():
    for item in value if isinstance(value, (tuple, list)) else (value,):
      if hasattr(item, "eqns"):
        yield item
      elif hasattr(item, "jaxpr") and hasattr(item.jaxpr, "eqns"):
        yield item.jaxpr


def _has_matmul(jaxpr) -> bool:
  return any(eqn.primitive.name == "dot_general" or any(map(_has_matmul, _subjaxprs(eqn)))
             for eqn in jaxpr.eqns)


def _remats_around_matmuls(jaxpr) -> int:
  """Remat (checkpoint) regions holding a matmul, nested ones included."""
  count = 0
  for eqn in jaxpr.eqns:
    inner = list(_subjaxprs(eqn))
    if eqn.primitive.name.startswith("remat") and any(map(_has_matmul, inner)):
      count += 1
    count += sum(map(_remats_around_matmuls, inner))
  return count


def test_remat_policies_keep_values_and_gradients():
  images, texts = _images(), _texts()
  variables = _two_tower().init(jax.random.PRNGKey(0), images, texts)
  params = nn.unbox(variables)["params"]

  def loss_and_grads(policy):
    model = _two_tower(remat_policy=policy)

    def loss(p):
      zimg, ztxt, _ = model.apply({"params": p}, images, texts)
      return jnp.sum(zimg * ztxt)

    # One remat per encoder block (1 image + 1 text block), none without policy; the MLPs'
    # bias + GELU remats (layers.bias_gelu, no matmul inside) are there under every policy.
    assert _remats_around_matmuls(jax.make_jaxpr(loss)(params).jaxpr) == (
        0 if policy == "none" else 2)
    return jax.jit(jax.value_and_grad(loss))(params)

  want = loss_and_grads("none")
  for policy in ("full", "dots_with_no_batch_dims_saveable"):
    got = loss_and_grads(policy)
    jax.tree_util.tree_map(
        lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6), got, want)
  with pytest.raises(ValueError, match="dots_saveable"):
    _two_tower(remat_policy="dots_saveabel").init(jax.random.PRNGKey(0), images, texts)


def test_runs_under_mesh_with_logical_rules():
  # Auto axes: logical constraints are hints to the partitioner (MaxText style);
  # under Explicit axes (make_mesh's default) they would be assertions.
  mesh = jax.make_mesh((4, 2), ("data", "model"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  rules = (("act_batch", "data"), ("embed", None), ("mlp", "model"),
           ("heads", "model"), ("act_heads", "model"), ("act_mlp", "model"),
           ("vocab", "model"), ("patch", None))
  model = _two_tower()
  images, texts = _images(batch=4), _texts(batch=4)
  variables = model.init(jax.random.PRNGKey(0), images, texts)
  want, _, _ = model.apply(variables, images, texts)
  # jax.set_mesh, not the legacy `with mesh:` that Flax does not see.
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    apply = jax.jit(model.apply)
    assert "sharding_constraint" in apply.lower(variables, images, texts).as_text()
    zimg, _, _ = apply(variables, images, texts)
  np.testing.assert_allclose(zimg, want, rtol=1e-5, atol=1e-6)


def test_two_tower_traced_for_a_gpu_trains_as_on_cpu_and_shards():
  """Traced for a GPU, the q/k/v and fc1 biases go inside their matmuls
  (layers.biased_token_matmul); with einsum attention that step runs here. Under FSDP + tensor
  rules on 8 devices (the kernel's sharded `embed` dim is the one the bias row extends), its
  gradients must be the unsharded CPU trace's."""
  from vlpjax.models import attention  # pylint: disable=g-import-not-at-top
  mesh = jax.make_mesh((4, 2), ("data", "model"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  rules = (("act_batch", "data"), ("embed", "data"), ("mlp", "model"),
           ("heads", "model"), ("act_heads", "model"), ("act_mlp", "model"),
           ("vocab", "model"), ("patch", None))
  model = _two_tower(attention_impl="einsum")
  images, texts = _images(batch=4), _texts(batch=4)
  # Boxed (nn.Partitioned): under the rules, Flax constrains each parameter to its sharding.
  params = model.init(jax.random.PRNGKey(0), images, texts)["params"]

  def make_loss():
    # A new function for each trace: JAX caches traces by function, not by compile_target.
    def loss(p):
      zimg, ztxt, _ = model.apply({"params": p}, images, texts)
      return jnp.sum(zimg * ztxt)
    return loss

  def biased_matmuls():
    return str(jax.make_jaxpr(make_loss())(params)).count("name=biased_token_matmul")

  assert biased_matmuls() == 0
  want = nn.unbox(jax.jit(jax.grad(make_loss()))(params))
  with attention.compile_target("gpu", 9.0), jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    # q, k, v and fc1 in each tower's block and in the image tower's MAP head.
    assert biased_matmuls() == 12
    step = jax.jit(jax.grad(make_loss()))
    assert "sharding_constraint" in step.lower(params).as_text()
    got = nn.unbox(step(params))
  jax.tree_util.tree_map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5),
                         got, want)


def test_model_registry():
  assert models.get_model("two_tower") is TwoTower
  assert models.get_model("vit") is ViT
  assert models.get_model("text") is TextEncoder
  with pytest.raises(UnknownNameError, match="two_tower"):
    models.get_model("two_towers")


# -- Hugging Face SigLIP parity --------------------------------------------------

@pytest.fixture(scope="module")
def hf_siglip():
  """A tiny random SiglipModel (every weight perturbed so no mapping hides)."""
  import torch
  import transformers

  torch.set_num_threads(1)  # The test machine's cores are shared.
  config = transformers.SiglipConfig(
      vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=48, patch_size=4, image_size=16),
      text_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=48, vocab_size=100,
                       max_position_embeddings=8, pad_token_id=1,
                       bos_token_id=98, eos_token_id=99))
  torch.manual_seed(0)
  model = transformers.SiglipModel(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name and name.endswith("weight"):
        p.copy_(1. + 0.1 * torch.randn_like(p))
      elif name == "logit_scale":
        p.fill_(math.log(10.) + 0.1)
      elif name == "logit_bias":
        p.fill_(-2.5)
      else:
        p.copy_(0.15 * torch.randn_like(p))
  state_dict = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
  return model, config, state_dict


def _hf_inputs(seed=0):
  rng = np.random.default_rng(seed)
  images = rng.uniform(-1., 1., size=(3, 16, 16, 3)).astype(np.float32)
  texts = rng.integers(0, 100, size=(3, 8)).astype(np.int32)
  return images, texts


def _features(output):
  """transformers 5 returns a ModelOutput here, 4.x the pooled tensor itself."""
  return getattr(output, "pooler_output", output)


def test_hf_siglip_parity(hf_siglip):
  import torch

  from vlpjax.interop import params_from_hf_siglip, twotower_kwargs_from_hf_config

  hf_model, config, state_dict = hf_siglip
  images, texts = _hf_inputs()
  with torch.no_grad():
    pixel_values = torch.from_numpy(images.transpose(0, 3, 1, 2))  # NHWC -> NCHW
    input_ids = torch.from_numpy(texts).long()
    hf_out = hf_model(input_ids=input_ids, pixel_values=pixel_values)
    hf_vision = hf_model.vision_model(pixel_values=pixel_values)
    hf_img = _features(hf_model.get_image_features(pixel_values=pixel_values))
    hf_txt = _features(hf_model.get_text_features(input_ids=input_ids))
  hf_img = (hf_img / hf_img.norm(dim=-1, keepdim=True)).numpy()
  hf_txt = (hf_txt / hf_txt.norm(dim=-1, keepdim=True)).numpy()

  model = TwoTower(**twotower_kwargs_from_hf_config(config))
  params = params_from_hf_siglip(state_dict, config)
  # The converted tree has exactly the structure and shapes vlpjax would init.
  want_shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), images, texts)
  assert (jax.tree_util.tree_map(lambda x: x.shape, nn.unbox(want_shapes["params"]))
          == jax.tree_util.tree_map(np.shape, params))

  zimg, ztxt, out = jax.jit(model.apply)({"params": params}, images, texts)
  np.testing.assert_allclose(zimg, hf_img, atol=1e-5)
  np.testing.assert_allclose(ztxt, hf_txt, atol=1e-5)
  np.testing.assert_allclose(out["img"]["tokens"],
                             hf_vision.last_hidden_state.numpy(), atol=1e-4)
  logits = zimg @ ztxt.T * jnp.exp(out["logit_scale"]) + out["logit_bias"]
  np.testing.assert_allclose(logits, hf_out.logits_per_image.numpy(),
                             rtol=1e-5, atol=1e-4)


def test_hf_siglip_conversion_round_trips(hf_siglip):
  from vlpjax.interop import hf_siglip_from_params, params_from_hf_siglip

  _, config, state_dict = hf_siglip
  back = hf_siglip_from_params(params_from_hf_siglip(state_dict, config))
  assert set(back) == set(state_dict)
  for key, value in state_dict.items():
    assert back[key].shape == value.shape, key
    np.testing.assert_array_equal(back[key], value, err_msg=key)

  # And vlpjax params -> HF -> vlpjax (boxed params are accepted too).
  from vlpjax.interop import twotower_kwargs_from_hf_config
  model = TwoTower(**twotower_kwargs_from_hf_config(config))
  images, texts = _hf_inputs()
  boxed = jax.jit(model.init)(jax.random.PRNGKey(1), images, texts)["params"]
  again = params_from_hf_siglip(hf_siglip_from_params(boxed), config)
  jax.tree_util.tree_map(np.testing.assert_array_equal, again, nn.unbox(boxed))


def test_hf_siglip_conversion_rejects_unknown_weights(hf_siglip):
  from vlpjax.interop import params_from_hf_siglip

  _, config, state_dict = hf_siglip
  with pytest.raises(ValueError, match="vision_model.extra"):
    params_from_hf_siglip({**state_dict, "vision_model.extra.weight": np.zeros(1)},
                          config)
  vision_only = {k: v for k, v in state_dict.items() if k.startswith("vision_model.")}
  assert set(params_from_hf_siglip(vision_only, config)) == {"img"}
