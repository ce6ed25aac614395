"""Vid2Seq-style video family: frames -> temporal transformer -> LM over time tokens.

Batches are packed prefix-LM rows of the video tasks (`data_mixtures/videos.py`: dense
captioning, transcript span denoising, temporal grounding), frames in the image slots with
`image_segment_ids` and `image_times`. Objectives are the tasks of the mixture; their token
losses add up with `config.input.task_loss_weights` (e.g. Vid2Seq's span denoising and dense
captioning, weighted).

Temporal grounding works two ways; the config chooses:
  generative   the `videos_grounding` task's targets are `<time_s><time_e>`: the LM learns to
               say the moment, `generate` + `video_targets.parse_moment` read it back;
  head         `model.grounding_head=True` adds UniVTG's clip-level head on the frames' LM
               states, trained on the same grounding examples (a row segment whose targets are
               exactly two time tokens and EOS is one; nothing else has that form):
               foreground (binary cross-entropy: is the frame inside the moment), boundaries
               (L1 of the distances to the moment's start and end, on foreground frames) and
               saliency (intra-video contrastive: softmax over the video's frames, the
               foreground frames are the positives). `ground(params, prompts)` returns the
               moment around the most-foreground frame.
`config.loss_weights` weighs the head's terms (`DEFAULT_LOSS_WEIGHTS`).
"""
from typing import Any, Dict, Mapping

import jax
import jax.numpy as jnp

from vlpjax import config as config_lib
from vlpjax import families
from vlpjax import flops
from vlpjax import losses
from vlpjax.families import FAMILIES
from vlpjax.families import vlm as vlm_family
from vlpjax.models import video as video_lib
from vlpjax.models.vit import ViT

DEFAULT_LOSS_WEIGHTS = {"foreground": 1.0, "boundary": 1.0, "saliency": 0.5}
VIDEO_KEYS = ("image_mask", "image_segment_ids", "image_times")
HEAD_STATS = ("foreground_sum", "frame_count", "boundary_sum", "saliency_sum", "positive_count")


def grounding_windows(batch: Mapping[str, jax.Array], *, time_start: int, num_bins: int,
                      eos_id: int):
  """Each image slot's moment (relative [start, end], [B, N, 2]) and whether it has one.

  A slot has a moment when its segment is a grounding example: targets exactly
  `<time_s><time_e>` EOS. Read from `decoder_target_tokens` / `decoder_loss_weights`.
  """
  targets = batch["decoder_target_tokens"]
  is_target = batch["decoder_loss_weights"] > 0
  segments = batch["decoder_segment_ids"]

  def shifted(x, k, fill):  # x[:, p + k], `fill` past the end.
    pad = jnp.full((x.shape[0], k), fill, x.dtype)
    return jnp.concatenate([x[:, k:], pad], axis=1)

  first = is_target & ~jnp.concatenate(
      [jnp.zeros_like(is_target[:, :1]),
       is_target[:, :-1] & (segments[:, :-1] == segments[:, 1:])], axis=1)
  is_time = lambda t: (t >= time_start) & (t < time_start + num_bins)
  same = lambda k: shifted(segments, k, -1) == segments
  window_at = (first & is_time(targets) & is_time(shifted(targets, 1, 0)) & same(1)
               & (shifted(targets, 2, 0) == eos_id) & same(2) & shifted(is_target, 2, False)
               & ~(shifted(is_target, 3, False) & same(3)))
  start = (targets - time_start) / (num_bins - 1)
  end = (shifted(targets, 1, 0) - time_start) / (num_bins - 1)
  slot_segments = batch["image_segment_ids"]
  match = (window_at[:, None, :] & (segments[:, None, :] == slot_segments[:, :, None])
           & (slot_segments[:, :, None] != 0)).astype(jnp.float32)  # [B, N, L]
  has = jnp.sum(match, axis=-1) > 0
  windows = jnp.stack([jnp.einsum("bnl,bl->bn", match, start),
                       jnp.einsum("bnl,bl->bn", match, end)], axis=-1)
  return windows, has


def head_statistics(head: jax.Array, windows: jax.Array, has_window: jax.Array,
                    times: jax.Array, slot_segments: jax.Array) -> Dict[str, jax.Array]:
  """Per-row sums of the grounding head's three losses (see the module docstring)."""
  foreground_logit, saliency = head[..., 0], head[..., 1]
  frames = has_window & (slot_segments != 0)
  inside = (times >= windows[..., 0]) & (times <= windows[..., 1])
  positive = frames & inside
  label = inside.astype(jnp.float32)
  bce = (jnp.maximum(foreground_logit, 0) - foreground_logit * label
         + jnp.log1p(jnp.exp(-jnp.abs(foreground_logit))))
  offsets = jnp.stack([times - windows[..., 0], windows[..., 1] - times], axis=-1)
  l1 = jnp.sum(jnp.abs(head[..., 2:] - offsets), axis=-1)
  same_video = ((slot_segments[:, :, None] == slot_segments[:, None, :])
                & frames[:, None, :])
  lse = jax.nn.logsumexp(jnp.where(same_video, saliency[:, None, :], -jnp.inf), axis=-1)
  contrastive = jnp.where(positive, lse - saliency, 0.0)
  f32 = lambda x: x.astype(jnp.float32)
  return {"foreground_sum": jnp.sum(jnp.where(frames, bce, 0.0), axis=1),
          "frame_count": jnp.sum(f32(frames), axis=1),
          "boundary_sum": jnp.sum(jnp.where(positive, l1, 0.0), axis=1),
          "saliency_sum": jnp.sum(contrastive, axis=1),
          "positive_count": jnp.sum(f32(positive), axis=1)}


def moment_from_head(head: jax.Array, times: jax.Array, valid: jax.Array) -> jax.Array:
  """[B, 2] relative moments: the most-foreground valid frame's time minus / plus its offsets."""
  score = jnp.where(valid, head[..., 0], -jnp.inf)
  best = jnp.argmax(score, axis=1)
  pick = lambda x: jnp.take_along_axis(x, best[:, None], axis=1)[:, 0]
  t = pick(times)
  start = jnp.clip(t - pick(head[..., 2]), 0.0, 1.0)
  end = jnp.clip(t + pick(head[..., 3]), 0.0, 1.0)
  return jnp.stack([start, jnp.maximum(start, end)], axis=-1)


@FAMILIES.register("video")
class VideoFamily(vlm_family.VLMFamily):
  """Packed video rows (frames, transcript / query tokens) -> time-token LM (+ grounding head)."""

  model_class = video_lib.VideoModel
  batch_keys = vlm_family.VLMFamily.batch_keys + VIDEO_KEYS

  @classmethod
  def model_parts(cls):
    return {**super().model_parts(), "temporal": video_lib.TEMPORAL_KEYS}

  def __init__(self, config):
    super().__init__(config)
    feature_dim = int(config.input.get("frame_feature_dim", 0) or 0)
    if feature_dim != self.model.frame_feature_dim:
      raise config_lib.ConfigError(
          f"config.input.frame_feature_dim={feature_dim} but config.model.frame_feature_dim="
          f"{self.model.frame_feature_dim}: the model must read what the tasks yield.")
    self.loss_weights = families.loss_weights(config, DEFAULT_LOSS_WEIGHTS)
    from vlpjax.data import vocab  # pylint: disable=g-import-not-at-top  (TF-heavy)
    vocabulary = (vlm_family._task_vocabulary(config.input.task)  # pylint: disable=protected-access
                  if config.input.task else None) or vocab.multimodal_vocabulary()
    self.time_start = int(vocabulary.special_ids.time_id(0))
    self.num_time_bins = int(vocabulary.special_ids.spec.num_time_bins)
    self.eos_id = int(vocabulary.eos_id)

  def input_specs(self, batch_size: int) -> Dict[str, jax.ShapeDtypeStruct]:
    specs = super().input_specs(batch_size)
    num = self.config.input.max_images_per_row
    if self.model.frame_feature_dim:
      specs["images"] = jax.ShapeDtypeStruct((batch_size, num, self.model.frame_feature_dim),
                                             jnp.float32)
    specs["image_mask"] = jax.ShapeDtypeStruct((batch_size, num), jnp.bool_)
    specs["image_segment_ids"] = jax.ShapeDtypeStruct((batch_size, num), jnp.int32)
    specs["image_times"] = jax.ShapeDtypeStruct((batch_size, num), jnp.float32)
    return specs

  def features(self, params, batch, rng) -> Dict[str, Any]:
    del rng  # No stochastic layers.
    logits, head = self.model.apply({"params": params}, batch,
                                    method=video_lib.VideoModel.train_outputs)
    stats = losses.token_statistics(
        logits, batch["decoder_target_tokens"], batch["decoder_loss_weights"].astype(jnp.float32))
    if head is not None:
      windows, has = grounding_windows(batch, time_start=self.time_start,
                                       num_bins=self.num_time_bins, eos_id=self.eos_id)
      stats.update(head_statistics(head, windows, has, batch["image_times"],
                                   batch["image_segment_ids"]))
    return stats

  def features_loss(self, params, features):
    loss, metrics = super().features_loss(params, features)
    if "frame_count" not in features:
      return loss, metrics
    total = lambda k: jnp.sum(features[k])
    frames = jnp.maximum(total("frame_count"), 1.0)
    positives = jnp.maximum(total("positive_count"), 1.0)
    head_losses = {"foreground": total("foreground_sum") / frames,
                   "boundary": total("boundary_sum") / positives,
                   "saliency": total("saliency_sum") / positives}
    metrics["token_loss"] = loss
    for name, value in head_losses.items():
      loss = loss + self.loss_weights[name] * value
      metrics[f"{name}_loss"] = value
    return loss, metrics

  def forward_flops(self, batch_size: int) -> Dict[str, float]:
    """Forward model FLOPs of `batch_size` packed rows per part (`vlpjax.flops`).

    Every frame slot is encoded (ViT, or `frame_projection` of precomputed features). The
    temporal encoder counts full attention over a row's frame tokens (its segment mask keeps
    packed videos apart, but the products run over the whole row). The LM is the VLM's
    (the whole row counted causal), plus, in the encoder-decoder form, cross-attention to
    the frame tokens in every layer. The grounding head's Dense layers run on each frame's
    state; picking those states out of the LM's (a one-hot product) is a gather, not counted.
    """
    inp, model = self.config.input, self.model
    num_frames = inp.max_images_per_row
    frame_tokens = num_frames * self.tokens_per_image
    temporal, llm = model.temporal_kwargs(), model.llm_kwargs()
    if model.frame_feature_dim:
      image = flops.dense(num_frames, model.frame_feature_dim, temporal["width"])
    else:
      vit = ViT(parent=None, **model.image_kwargs())
      image = num_frames * flops.vit_module_forward(vit, inp.image_size)
    cross_tokens = frame_tokens if model.architecture == "encoder_decoder" else 0
    parts = {
        "image_encoder": image,
        "temporal_encoder": flops.encoder_layers(frame_tokens, temporal["width"],
                                                 temporal["depth"], temporal["mlp_dim"]),
        "projector": flops.projector(frame_tokens, temporal["width"], llm["width"],
                                     model.projector),
        "decoder": flops.decoder_forward(llm, inp.row_length, cross_tokens=cross_tokens),
    }
    if model.grounding_head:
      parts["grounding_head"] = flops.mlp_head(num_frames, llm["width"], temporal["mlp_dim"],
                                               len(video_lib.HEAD_OUTPUTS))
    return flops.scaled(parts, batch_size)

  def ground(self, params, prompts: Mapping[str, Any]) -> jax.Array:
    """Relative moments [B, 2] for grounding prompts, from the clip-level head (jittable)."""
    head = self.model.apply({"params": params}, prompts, method=video_lib.VideoModel.ground)
    times = prompts.get("image_times")
    if times is None:
      times = video_lib.rank_times(prompts["image_segment_ids"])
    return moment_from_head(head, times, prompts["image_mask"])
