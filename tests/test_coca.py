"""CoCa: caption targets, causality, padding, both losses, cached decoding, sharded step."""
import functools
import os

import jax
import jax.numpy as jnp
from flax import linen as nn
import ml_collections
import numpy as np
import pytest

from vlpjax import config as config_lib
from vlpjax import decoding
from vlpjax import losses
from vlpjax import sharding
from vlpjax import trainer
from vlpjax.families.coca import CoCaFamily
from vlpjax.models.coca import EOS_ID, CoCa, caption_targets
from tests.test_trainer import one_step

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, "experiments", "coca_shapes.py")
VOCAB = 40
IMAGE = dict(width=32, depth=1, mlp_dim=64, num_heads=2, patch_size=8)
TEXT = dict(vocab_size=VOCAB, width=32, unimodal_depth=1, multimodal_depth=1, mlp_dim=64,
            num_heads=4, num_kv_heads=2, max_len=12)


# One model shared by most tests (bias_init set: the softmax loss ignores the bias, the
# sigmoid loss uses it), so each function compiles once for the whole file.
MODEL = dict(image=IMAGE, text=TEXT, embed_dim=24, num_caption_queries=3, bias_init=-10.0)


def tiny_model(**overrides):
  return CoCa(**{**MODEL, **overrides})


def random_inputs(batch=3, length=8, seed=0):
  rng = np.random.default_rng(seed)
  images = rng.uniform(-1, 1, (batch, 16, 16, 3)).astype(np.float32)
  texts = rng.integers(2, VOCAB, (batch, length)).astype(np.int32)
  texts[1, 5:] = 0  # one padded row
  return jnp.asarray(images), texts


def jit_apply(model):
  """`model.apply` under jit: eager Flax runs (and compiles) op by op, which is far slower."""
  return jax.jit(model.apply, static_argnames="method")


@pytest.fixture(scope="module")
def tiny():
  """(model, variables, jitted apply)."""
  model = tiny_model()
  images, texts = random_inputs()
  variables = nn.unbox(jax.jit(model.init)(jax.random.key(0), images, texts))
  return model, variables, jit_apply(model)


def test_caption_targets_on_hand_written_rows():
  texts = np.array([[5, 6, 7, 0, 0],
                    [3, 4, 5, 6, 7],     # full: no room for EOS, last token not an input
                    [0, 0, 0, 0, 0]])    # empty: predict EOS right after BOS
  inputs, targets, weights = caption_targets(texts)
  np.testing.assert_array_equal(targets, [[5, 6, 7, 1, 0], [3, 4, 5, 6, 7], [1, 0, 0, 0, 0]])
  np.testing.assert_array_equal(inputs, [[0, 5, 6, 7, 1], [0, 3, 4, 5, 6], [0, 1, 0, 0, 0]])
  np.testing.assert_array_equal(weights, [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])


def test_forward_shapes_and_unit_embeddings(tiny):
  _, variables, apply = tiny
  images, texts = random_inputs()
  out = apply(variables, images, texts)
  assert out["zimg"].shape == out["ztxt"].shape == (3, 24)
  assert out["logits"].shape == (3, 8, VOCAB) and out["logits"].dtype == jnp.float32
  np.testing.assert_allclose(np.linalg.norm(out["zimg"], axis=-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(out["ztxt"], axis=-1), 1.0, rtol=1e-5)
  encoded = apply(variables, images, method=CoCa.caption_encoding)
  assert encoded.shape == (3, 3, 32)  # 3 caption queries of the image width
  # The predict methods give what the forward pass gives.
  np.testing.assert_allclose(apply(variables, texts, method=CoCa.embed_texts),
                             out["ztxt"], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(apply(variables, images, method=CoCa.embed_images),
                             out["zimg"], rtol=1e-6, atol=1e-6)
  # num_caption_queries=0: the decoder sees every image token (16 / 8 = 2x2 patches).
  all_tokens = tiny_model(num_caption_queries=0)
  v0 = jax.eval_shape(all_tokens.init, jax.random.key(0), images, texts)
  assert "img_caption_pooler" not in v0["params"]
  encoded = jax.eval_shape(functools.partial(all_tokens.apply, method=CoCa.caption_encoding),
                           v0, images)
  assert encoded.shape == (3, 4, 32)


def test_logits_do_not_depend_on_later_tokens(tiny):
  _, variables, apply = tiny
  images, texts = random_inputs()
  logits = apply(variables, images, texts)["logits"]
  cut = 4  # keep texts[:, :cut]; logits at input positions 0..cut depend only on those
  changed = texts.copy()
  changed[:, cut:] = (texts[:, cut:] + 7) % (VOCAB - 2) + 2  # still non-padding
  logits_changed = apply(variables, images, changed)["logits"]
  np.testing.assert_allclose(logits_changed[:, :cut + 1], logits[:, :cut + 1],
                             rtol=1e-5, atol=1e-5)
  assert np.abs(logits_changed[:, cut + 1:] - logits[:, cut + 1:]).max() > 1e-3


def test_padding_length_changes_nothing(tiny):
  _, variables, apply = tiny
  images, texts = random_inputs()
  texts[:, 5:] = 0
  short = apply(variables, images, texts)
  longer = apply(variables, images, np.pad(texts, ((0, 0), (0, 4))))
  np.testing.assert_allclose(longer["ztxt"], short["ztxt"], rtol=1e-5, atol=1e-6)
  # Input positions 0..5 are BOS, 5 tokens; position 5 predicts EOS.
  np.testing.assert_allclose(longer["logits"][:, :6], short["logits"][:, :6],
                             rtol=1e-5, atol=1e-5)
  # ... and the padded forward pass equals the unpadded prefix alone.
  encoded = apply(variables, images, method=CoCa.caption_encoding)
  inputs, _, _ = caption_targets(texts)
  prefix = apply(variables, encoded, inputs[:, :6], method=CoCa.caption_logits)
  np.testing.assert_allclose(prefix, short["logits"][:, :6], rtol=1e-5, atol=1e-5)


def family_config(loss="softmax", loss_weights=None, **model_overrides):
  config = ml_collections.ConfigDict(dict(
      model={**MODEL, **model_overrides},
      loss=loss, compute_dtype="float32", remat_policy="none", attention_impl="auto",
      norm_impl="auto",
      input=dict(image_size=16, text_length=8),
      loss_weights=loss_weights or {}))
  return config


def numpy_caption_loss(logits, targets, weights):
  logits = np.asarray(logits, np.float64)
  logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  nll = logz - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
  return (nll * weights).sum() / weights.sum()


@pytest.mark.parametrize("loss", ["softmax", "sigmoid"])
def test_loss_is_weighted_contrastive_plus_caption(tiny, loss):
  _, variables, apply = tiny
  family = CoCaFamily(family_config(loss, {"caption": 0.5, "contrastive": 3.0}))
  images, texts = random_inputs()
  texts[0, 3:] = 0
  batch = {"image": images, "texts": texts}
  params = variables["params"]
  total, metrics = jax.jit(lambda p, b: family.features_loss(
      p, family.features(p, b, jax.random.key(2))))(params, batch)

  out = apply(variables, images, texts)
  contrastive, _ = losses.LOSSES.get(loss)(out["zimg"], out["ztxt"], params["logit_scale"],
                                           params.get("logit_bias"))
  _, targets, weights = caption_targets(texts)
  caption = numpy_caption_loss(out["logits"], np.asarray(targets), np.asarray(weights))
  np.testing.assert_allclose(metrics["contrastive_loss"], contrastive, rtol=1e-6)
  np.testing.assert_allclose(metrics["caption_loss"], caption, rtol=1e-5)
  np.testing.assert_allclose(total, 3.0 * contrastive + 0.5 * caption, rtol=1e-5)
  correct = (np.argmax(out["logits"], -1) == targets) * weights
  np.testing.assert_allclose(metrics["token_accuracy"], correct.sum() / weights.sum())
  assert "loss" not in metrics  # the total is the trainer's to report


def test_bad_settings_fail_clearly():
  with pytest.raises(config_lib.ConfigError, match="loss_weights.captions"):
    CoCaFamily(family_config(loss_weights={"captions": 1.0}))
  config = family_config()
  config.model.text.depth = 2
  with pytest.raises(config_lib.ConfigError, match="model.text.depth"):
    CoCaFamily(config)
  images, texts = random_inputs()
  with pytest.raises(ValueError, match="pool_type"):
    jax.eval_shape(tiny_model(image=dict(IMAGE, pool_type="map")).init, jax.random.key(0),
                   images, texts)
  with pytest.raises(ValueError, match="max_len 12"):
    jax.eval_shape(tiny_model().init, jax.random.key(0), images, np.ones((3, 13), np.int32))


def greedy_without_cache(apply, variables, images, steps):
  """Greedy decoding the slow way: the whole prefix through the full forward, every step.

  The inputs keep one shape (zeros after the prefix; causality, tested above, makes them
  irrelevant to the logits read), so the forward pass compiles once.
  """
  encoded = apply(variables, images, method=CoCa.caption_encoding)
  inputs = np.zeros((images.shape[0], steps), np.int32)  # BOS, then the tokens so far
  tokens = []
  for t in range(steps):
    logits = apply(variables, encoded, inputs, method=CoCa.caption_logits)
    tokens.append(np.argmax(logits[:, t], axis=-1))
    if t + 1 < steps:
      inputs[:, t + 1] = tokens[-1]
  tokens = np.stack(tokens, axis=1)
  # As `decoding` returns them: EOS kept, zeros after it.
  is_eos = tokens == EOS_ID
  eos_before = np.cumsum(is_eos, axis=1) - is_eos > 0
  return np.where(eos_before, 0, tokens)


def beam_without_cache(apply, variables, images, config):
  """Beam search over the full forward pass: the tokens so far ride in the 'cache'."""
  encoded = apply(variables, images, method=CoCa.caption_encoding)
  inputs = jnp.zeros((images.shape[0], config.max_decode_len), jnp.int32)

  def step_fn(tokens, state, t):
    inputs = state["inputs"].at[:, t + 1].set(tokens)
    logits = apply(variables, state["encoded"], inputs, method=CoCa.caption_logits)
    return jnp.take(logits, t + 1, axis=1), {"inputs": inputs, "encoded": state["encoded"]}

  first = apply(variables, encoded, inputs, method=CoCa.caption_logits)[:, 0]
  return decoding.decode(step_fn, first, {"inputs": inputs, "encoded": encoded},
                         config=config)["tokens"]


def scanned_params(params):
  """Unscanned decoder params -> the scan_layers layout (layers stacked on a leading axis)."""
  out = dict(params)
  for stack in ("txt_unimodal", "txt_multimodal"):
    layers_ = [params[stack][f"layers_{i}"] for i in range(len(params[stack]))]
    out[stack] = {"scanned": jax.tree.map(lambda *x: jnp.stack(x), *layers_)}
  return out


def test_cached_decoding_equals_the_full_forward_pass(tiny):
  _, variables, apply = tiny
  images, _ = random_inputs()
  params = variables["params"]
  steps = 7
  reference = greedy_without_cache(apply, {"params": params}, images, steps)
  # Varied rows (a decoder ignoring its cache could still repeat one token right).
  assert min(len(np.unique(row)) for row in reference[:2]) >= 3

  greedy = decoding.DecodeConfig(method="greedy", max_decode_len=steps)
  family = CoCaFamily(family_config())
  cached = jax.jit(lambda p, x: family.caption(p, x, decode=greedy))(params, images)
  np.testing.assert_array_equal(cached, reference)
  # The same weights in scanned layers (caches with a leading layer axis) decode the same.
  scanned = CoCaFamily(family_config(scan_layers=True))
  cached = jax.jit(lambda p, x: scanned.caption(p, x, decode=greedy))(
      scanned_params(params), images)
  np.testing.assert_array_equal(cached, reference)

  # Beam search repeats and reorders the image encoding with the KV caches.
  beam = decoding.DecodeConfig(method="beam", beam_size=3, max_decode_len=steps)
  cached = jax.jit(lambda p, x: family.caption(p, x, decode=beam))(params, images)
  expected = jax.jit(lambda p, x: beam_without_cache(apply, {"params": p}, x, beam))(
      params, images)
  np.testing.assert_array_equal(cached, expected)

  with pytest.raises(ValueError, match="max_decode_len=13 exceeds the model's text.max_len=12"):
    family.caption(params, images, decode=decoding.DecodeConfig(max_decode_len=13))


def demo_config(overrides=()):
  """The shapes demo config with tiny dims and no evals."""
  config = config_lib.load(f"{DEMO}:steps=2,batch=16,size=16,eval_every=0")
  # A ViT without blocks (the two-tower tests shard those): this test is about the rest.
  config.model.image.update(width=32, depth=0, mlp_dim=64, num_heads=2, patch_size=8)
  config.model.text.update(width=32, unimodal_depth=1, multimodal_depth=1, mlp_dim=64,
                           num_heads=4, num_kv_heads=2, max_len=8)
  config.model.embed_dim = 32
  config.model.num_caption_queries = 2
  config.input.text_length = 8
  config.evals = {}
  return config_lib.finalize(config, ["optim.eps=1e-6"] + list(overrides))


def test_fsdp_tensor_accumulated_step_on_8_devices_equals_1_device():
  # One comparison for both: sharding, and the per-example features that keep gradient
  # accumulation exact (contrastive over the whole batch, caption tokens summed).
  config_1 = demo_config()
  rng = np.random.default_rng(0)
  texts = rng.integers(3, 200, (16, 8)).astype(np.int32)
  texts[::3, 5:] = 0
  batch = {"image": rng.uniform(-1, 1, (16, 16, 16, 3)).astype(np.float32), "texts": texts}
  params_1, metrics_1 = one_step(config_1, batch, devices=jax.devices()[:1])

  config_8 = demo_config(["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2",
                          "grad_accum_steps=2"])
  config_8.sharding_rules = sharding.rules_preset("fsdp_tensor")
  params_8, metrics_8 = one_step(config_8, batch)
  assert np.isfinite(metrics_1["loss"]) and metrics_1["caption_loss"] > 0
  np.testing.assert_allclose(metrics_8["loss"], metrics_1["loss"], rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6),
               params_8, params_1)
