"""Video family: packed videos stay apart, grounding labels and head losses, cached decoding,
8 devices == 1, config errors."""
import os

from flax import linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlpjax import config as config_lib
from vlpjax import decoding
from vlpjax import sharding
from vlpjax import trainer
from vlpjax.data import packing
from vlpjax.data import vocab
from vlpjax.families import video as video_family
from vlpjax.models import video as video_lib
from tests.test_trainer import one_step  # trainer.build + one train step

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, "experiments", "vid2seq_shapes.py")
SIZE, ROW, SLOTS = 16, 48, 8
IDS = vocab.multimodal_vocabulary().special_ids
IMAGE_ID = int(IDS.image_id(0))
EOS = 1
NUM_BINS = IDS.spec.num_time_bins


def time_id(k):
  return int(IDS.time_id(k))


def tiny_config(arg="steps=4,batch=4,eval_every=0", overrides=(), model_extra=None):
  config = config_lib.load(f"{DEMO}:{arg}")
  config.model.update(model_extra or {})
  config.model.image.update(width=32, depth=1, mlp_dim=64, num_heads=2, patch_size=8)
  config.model.temporal.update(depth=1)
  config.model.llm.update(width=32, depth=1, mlp_dim=64, num_heads=4, num_kv_heads=2)
  config.input.update(task="", image_size=SIZE, row_length=ROW, max_images_per_row=SLOTS)
  config.input.task_loss_weights = {}
  config.evals = {}
  config.schedule.warmup_steps = 0
  return config_lib.finalize(config, list(overrides))


def video_example(rng, i, num_frames, grounding=False):
  """A clip of `num_frames` frames: a text prompt, and a moment or some timed text."""
  if grounding:
    a, b = sorted(rng.choice(NUM_BINS, 2, replace=False).tolist())
    targets = [time_id(a), time_id(b), EOS]
  else:
    targets = [time_id(int(rng.integers(NUM_BINS)))] + rng.integers(
        5, 400, size=int(rng.integers(1, 4))).tolist() + [EOS]
  times = (np.arange(num_frames) + 0.5) / num_frames
  return dict(id=str(i),
              inputs=np.array([IMAGE_ID] * num_frames + rng.integers(5, 400, 3).tolist(),
                              np.int32),
              targets=np.array(targets, np.int32),
              images=rng.uniform(-1, 1, (num_frames, SIZE, SIZE, 3)).astype(np.float32),
              image_times=times.astype(np.float32))


def packed_batch(rows, seed=0, n=24):
  rng = np.random.default_rng(seed)
  examples = [video_example(rng, i, int(rng.integers(2, 5)), grounding=i % 2 == 0)
              for i in range(n)]
  packed = packing.pack(examples, row_length=ROW, max_images_per_row=SLOTS, tokens_per_image=1,
                        image_token_id=IMAGE_ID, image_shape=(SIZE, SIZE, 3))
  assert len(packed) >= rows
  batch = packing.batch_rows(packed[:rows])
  assert (batch["image_segment_ids"].max(axis=1) >= 2).all()  # Several clips per row.
  return batch, examples


def init_params(family, seed=0):
  specs = family.input_specs(1)
  init = jax.jit(lambda rng: nn.unbox(family.init(rng, {k: jnp.zeros(s.shape, s.dtype)
                                                        for k, s in specs.items()})))
  return jax.device_get(init(jax.random.key(seed)))


def model_inputs(family, batch):
  return {k: batch[k] for k in family.input_specs(1)}


@pytest.mark.parametrize("arch", ["prefix_lm", "encoder_decoder"])
def test_packed_clips_do_not_see_each_other(arch):
  """Changing one clip's frames changes no logit of the other clips in its row."""
  family = video_family.VideoFamily(tiny_config(overrides=[f"model.architecture={arch}"]))
  params = init_params(family)
  batch, _ = packed_batch(2)
  apply = jax.jit(lambda b: family.model.apply({"params": params}, b))
  base = np.asarray(apply(model_inputs(family, batch)))
  changed = dict(batch, images=batch["images"].copy())
  slot_segments = batch["image_segment_ids"][0]
  changed["images"][0, slot_segments == 1] *= -1  # Row 0, clip 1's frames.
  out = np.asarray(apply(model_inputs(family, changed)))
  segments = batch["decoder_segment_ids"][0]
  np.testing.assert_allclose(out[0, segments > 1], base[0, segments > 1], atol=1e-5)
  assert not np.allclose(out[0, segments == 1], base[0, segments == 1], atol=1e-3)
  np.testing.assert_allclose(out[1], base[1], atol=1e-6)


def numpy_windows(batch):
  """Reference: per row, per slot, the moment of its clip when the clip's targets are
  exactly two time tokens and EOS."""
  rows, slots = batch["image_segment_ids"].shape
  windows, has = np.zeros((rows, slots, 2)), np.zeros((rows, slots), bool)
  for r in range(rows):
    for k in range(slots):
      s = batch["image_segment_ids"][r, k]
      if s == 0:
        continue
      at = (batch["decoder_segment_ids"][r] == s) & (batch["decoder_loss_weights"][r] > 0)
      t = batch["decoder_target_tokens"][r][at].tolist()
      if len(t) == 3 and t[2] == EOS and all(IDS.is_time_id(x) for x in t[:2]):
        has[r, k] = True
        windows[r, k] = [(t[0] - time_id(0)) / (NUM_BINS - 1),
                         (t[1] - time_id(0)) / (NUM_BINS - 1)]
  return windows, has


def test_grounding_windows_match_a_numpy_reference():
  batch, _ = packed_batch(4)
  windows, has = video_family.grounding_windows(
      {k: jnp.asarray(v) for k, v in batch.items()}, time_start=time_id(0),
      num_bins=NUM_BINS, eos_id=EOS)
  want_windows, want_has = numpy_windows(batch)
  assert want_has.any() and (~want_has & (batch["image_segment_ids"] > 0)).any()
  np.testing.assert_array_equal(np.asarray(has), want_has)
  np.testing.assert_allclose(np.asarray(windows)[want_has], want_windows[want_has], atol=1e-6)


def test_head_statistics_match_a_numpy_reference():
  rng = np.random.default_rng(1)
  batch, _ = packed_batch(3)
  windows, has = numpy_windows(batch)
  head = rng.normal(size=has.shape + (4,)).astype(np.float32)
  head[..., 2:] = np.abs(head[..., 2:])
  times, segs = batch["image_times"], batch["image_segment_ids"]
  got = jax.device_get(video_family.head_statistics(
      jnp.asarray(head), jnp.asarray(windows, jnp.float32), jnp.asarray(has),
      jnp.asarray(times), jnp.asarray(segs)))
  for r in range(has.shape[0]):
    fg = bce = l1 = sal = pos = 0.0
    for s in set(segs[r][has[r]].tolist()):
      frames = np.flatnonzero((segs[r] == s) & has[r])
      start, end = windows[r, frames[0]]
      inside = (times[r, frames] >= start) & (times[r, frames] <= end)
      logits = head[r, frames, 0].astype(np.float64)
      bce += np.sum(np.log1p(np.exp(-logits)) * inside + np.log1p(np.exp(logits)) * ~inside)
      fg += len(frames)
      offsets = np.stack([times[r, frames] - start, end - times[r, frames]], -1)
      l1 += np.sum(np.abs(head[r, frames, 2:] - offsets).sum(-1)[inside])
      scores = head[r, frames, 1].astype(np.float64)
      log_softmax = scores - np.log(np.sum(np.exp(scores)))
      sal += -np.sum(log_softmax[inside])
      pos += inside.sum()
    np.testing.assert_allclose(got["foreground_sum"][r], bce, rtol=1e-5)
    np.testing.assert_allclose(got["frame_count"][r], fg)
    np.testing.assert_allclose(got["boundary_sum"][r], l1, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["saliency_sum"][r], sal, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["positive_count"][r], pos)


def test_moment_from_head_takes_the_most_foreground_frame():
  head = np.zeros((1, 4, 4), np.float32)
  head[0, :, 0] = [0.1, 3.0, 2.0, 9.0]      # slot 3 is best but invalid
  head[0, 1, 2:] = [0.3, 0.2]
  times = np.array([[0.1, 0.4, 0.6, 0.9]], np.float32)
  valid = np.array([[True, True, True, False]])
  got = np.asarray(video_family.moment_from_head(head, times, valid))
  np.testing.assert_allclose(got, [[0.1, 0.6]], atol=1e-6)


def greedy_without_cache(family, params, prompts, max_len):
  """Re-runs the whole sequence for every token (prompt bidirectional, the rest causal)."""
  tokens = np.asarray(prompts["decoder_input_tokens"])
  batch, plen = tokens.shape
  length = plen + max_len
  buf = np.zeros((batch, length), np.int32)
  buf[:, :plen] = tokens
  feats = dict(decoder_segment_ids=np.ones((batch, length), np.int32),
               decoder_causal_attention=np.tile(np.arange(length) < plen, (batch, 1)),
               decoder_positions=np.tile(np.arange(length, dtype=np.int32), (batch, 1)),
               decoder_target_tokens=np.zeros((batch, length), np.int32),
               decoder_loss_weights=np.zeros((batch, length), np.float32),
               **{k: prompts[k] for k in ("images", "image_mask", "image_segment_ids",
                                          "image_times")})
  apply = jax.jit(lambda p, b: family.model.apply({"params": p}, b))
  out = np.zeros((batch, max_len), np.int32)
  done = np.zeros(batch, bool)
  for t in range(max_len):
    logits = np.array(apply(params, dict(feats, decoder_input_tokens=buf)))
    logits[..., [0, IMAGE_ID]] = -np.inf
    nxt = np.argmax(logits[:, plen - 1 + t], axis=-1).astype(np.int32)
    out[:, t] = np.where(done, 0, nxt)
    done |= nxt == EOS
    if plen + t < length:
      buf[:, plen + t] = nxt
  return out


@pytest.mark.parametrize("arch", ["prefix_lm", "encoder_decoder"])
def test_cached_generate_equals_uncached(arch):
  family = video_family.VideoFamily(tiny_config(overrides=[f"model.architecture={arch}"]))
  params = init_params(family, seed=2)
  params["llm"]["embed_tokens"]["embedding"] = np.asarray(
      params["llm"]["embed_tokens"]["embedding"]) * 8  # a sharper random LM
  rng = np.random.default_rng(0)
  frames = 3
  prompts = {
      "decoder_input_tokens": np.array([[0] + [IMAGE_ID] * frames + [7, 8]] * 2, np.int32),
      "prompt_mask": np.ones((2, frames + 3), bool),
      "images": rng.uniform(-1, 1, (2, frames, SIZE, SIZE, 3)).astype(np.float32),
      "image_mask": np.ones((2, frames), bool),
      "image_segment_ids": np.ones((2, frames), np.int32),
      "image_times": np.tile((np.arange(frames) + 0.5) / frames, (2, 1)).astype(np.float32)}
  want = greedy_without_cache(family, params, prompts, 5)
  decode = decoding.DecodeConfig(method="greedy", max_decode_len=5, eos_id=EOS)
  got = np.asarray(jax.jit(lambda p, x: family.generate(p, x, decode=decode))(params, prompts))
  np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("extra", [["model.grounding_head=True"],
                                   ["model.architecture=encoder_decoder"]])
def test_fsdp_tensor_step_on_8_devices_equals_1_device(extra):
  config = tiny_config(overrides=["optim.eps=1e-6"] + extra)
  family = video_family.VideoFamily(config)
  batch = model_inputs(family, packed_batch(4)[0])
  params_1, metrics_1 = one_step(config, batch, jax.devices()[:1])
  config_8 = tiny_config(overrides=["optim.eps=1e-6", "mesh.data=2", "mesh.fsdp=2",
                                    "mesh.tensor=2"] + extra)
  config_8.sharding_rules = sharding.rules_preset("fsdp_tensor")
  params_8, metrics_8 = one_step(config_8, batch)
  assert np.isfinite(metrics_1["loss"])
  if "model.grounding_head=True" in extra:
    assert metrics_1["foreground_loss"] > 0 and metrics_1["saliency_loss"] > 0
  np.testing.assert_allclose(metrics_8["loss"], metrics_1["loss"], rtol=1e-5)
  # Adam's first step is about lr * sign(g): a gradient near eps turns f32 summation-order
  # noise into ~1e-5 of lr (2e-3); anything structurally wrong moves params by ~lr.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-5),
               params_8, params_1)


def test_task_loss_weights_scale_each_tokens_loss():
  """decoder_loss_weights 0.5 on a clip: its summed loss halves, the token count does not."""
  family = video_family.VideoFamily(tiny_config())
  params = init_params(family)
  batch = model_inputs(family, packed_batch(2)[0])
  features = jax.jit(lambda p, b: family.features(p, b, None))
  base = jax.device_get(features(params, batch))
  half = dict(batch, decoder_loss_weights=batch["decoder_loss_weights"] * 0.5)
  got = jax.device_get(features(params, half))
  np.testing.assert_allclose(got["loss_sum"], 0.5 * base["loss_sum"], rtol=1e-6)
  np.testing.assert_array_equal(got["count_sum"], base["count_sum"])
  loss, _ = family.features_loss(params, got)
  base_loss, _ = family.features_loss(params, base)
  np.testing.assert_allclose(loss, 0.5 * base_loss, rtol=1e-6)


def test_frame_features_instead_of_pixels():
  config = tiny_config(overrides=["input.frame_feature_dim=6"], model_extra=dict(
      frame_feature_dim=6, temporal=dict(width=32, depth=1, mlp_dim=64, num_heads=2)))
  family = video_family.VideoFamily(config)
  params = init_params(family)
  assert "img" not in params and "frame_projection" in params
  rng = np.random.default_rng(0)
  examples = [dict(inputs=np.array([IMAGE_ID] * 3 + [9], np.int32),
                   targets=np.array([time_id(3), time_id(9), EOS], np.int32),
                   images=rng.normal(size=(3, 6)).astype(np.float32),
                   image_times=np.array([0.1, 0.5, 0.9], np.float32))] * 4
  rows = packing.pack(examples, row_length=ROW, max_images_per_row=SLOTS, tokens_per_image=1,
                      image_token_id=IMAGE_ID, image_shape=(6,))
  batch = model_inputs(family, packing.batch_rows((rows * 4)[:4]))
  logits = family.model.apply({"params": params}, batch)
  assert logits.shape == (4, ROW, config.model.llm.vocab_size)
  assert np.isfinite(np.asarray(logits)).all()


def test_config_errors():
  with pytest.raises(config_lib.ConfigError, match="frame_feature_dim"):
    video_family.VideoFamily(tiny_config(overrides=["input.frame_feature_dim=8"]))
  with pytest.raises(config_lib.ConfigError, match="temporal"):
    video_family.VideoFamily(tiny_config(overrides=["model.temporal.dpeth=2"]))
  family = video_family.VideoFamily(tiny_config(
      overrides=["model.grounding_head=True", "model.architecture=encoder_decoder"]))
  with pytest.raises(ValueError, match="grounding_head needs architecture='prefix_lm'"):
    init_params(family)
  with pytest.raises(config_lib.ConfigError, match="loss_weights"):
    video_family.VideoFamily(tiny_config(overrides=["loss_weights.forground=1.0"]))
  bad_models = [
      (dict(grounding_head=True, image=dict(width=32, depth=1, mlp_dim=64, num_heads=2,
                                            patch_size=8, pool_type="none")),
       "one token per frame"),
      (dict(image=dict(width=32, depth=1, mlp_dim=64, num_heads=2, patch_size=8,
                       patch_dropout=0.5)), "patch_dropout must be unset"),
      (dict(temporal=dict(width=48, depth=1)), "must equal the ViT width 32"),
      (dict(frame_feature_dim=6, temporal=dict(depth=1)), "set temporal"),
  ]
  for extra, message in bad_models:
    overrides = ["input.frame_feature_dim=6"] if extra.get("frame_feature_dim") else []
    with pytest.raises(ValueError, match=message):  # at build time or, at the latest, init
      init_params(video_family.VideoFamily(tiny_config(overrides=overrides, model_extra=extra)))
  assert video_lib.time_positions(jnp.array([0.0, 0.5, 1.0, 1.5]), 100).tolist() == [
      0, 50, 99, 99]
