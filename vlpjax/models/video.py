"""Vid2Seq-style video model: per-frame ViT -> temporal transformer -> LM with time tokens.

Frames arrive as the images of packed prefix-LM rows (`vlpjax/data/kinds/video_targets.py`:
one `<image>` per frame, `image_segment_ids` naming each slot's example, `image_times` each
frame's time relative to its clip). Each frame is encoded on its own by the ViT (pooled to one
token by default, as Vid2Seq reads one CLIP feature per frame), or, with `frame_feature_dim`,
the "images" are precomputed frame features [D] and a Dense layer replaces the ViT. A temporal
transformer then mixes the frames *of the same video* (a segment mask: packed videos never see
each other) after adding a learned embedding of each frame's relative time, quantised to
`temporal.time_positions` bins, so a frame knows where in its clip it sits whatever the number of
frames sampled. The projector maps the result to the LM's width.

`architecture` says how the LM reads the frames:
  "prefix_lm"        the frame tokens sit at their image positions of the row (as in the VLM);
                     transcript / query and frames attend to each other in the prefix.
  "encoder_decoder"  the temporal encoder's output is cross-attended by every decoder layer
                     (each token reads its own example's frames, `Decoder(cross_attention=True)`);
                     the image positions of the row then hold the plain `<image>` embedding.

Optional `grounding_head` (UniVTG's unified clip-level formulation): from the LM's final hidden
state at each frame's positions, a small MLP gives a foreground logit (is this frame inside the
queried moment?), a saliency score, and the distances from the frame's time back to the
moment's start and on to its end (relative to the clip, >= 0). Prefix-LM only: the frames must
see the query to say whether they match it.
"""
from typing import Any, Dict, Mapping, Optional

import jax
import jax.numpy as jnp
from flax import linen as nn

from vlpjax.models import layers
from vlpjax.models import vlm as vlm_lib
from vlpjax.models.vit import ViT

Array = jax.Array
ARCHITECTURES = ("prefix_lm", "encoder_decoder")
TEMPORAL_KEYS = ("width", "depth", "mlp_dim", "num_heads", "time_positions", "scan_layers")
# Outputs of the grounding head per frame, in this order.
HEAD_OUTPUTS = ("foreground", "saliency", "start_offset", "end_offset")


def time_positions(times: Array, num_positions: int) -> Array:
  """Relative times [..] in [0, 1] -> nearest of `num_positions` bins over [0, 1] (int32)."""
  bins = jnp.round(jnp.clip(times, 0.0, 1.0) * (num_positions - 1))
  return bins.astype(jnp.int32)


def rank_times(image_segment_ids: Array) -> Array:
  """Relative times from slot order alone: (rank + 0.5) / count within each segment.

  For batches without `image_times` (e.g. images of non-video tasks): frames sampled evenly
  over a clip sit at these times up to the sampler's rounding.
  """
  seg = image_segment_ids
  same = (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] != 0)
  count = jnp.sum(same, axis=-1)
  earlier = jnp.sum(same & (jnp.arange(seg.shape[1])[None, None, :]
                            < jnp.arange(seg.shape[1])[None, :, None]), axis=-1)
  return jnp.where(seg != 0, (earlier + 0.5) / jnp.maximum(count, 1), 0.0)


class TemporalEncoder(nn.Module):
  """Frame tokens [B, N, T, D] of packed videos -> the same, mixed over each video's frames.

  `scan_layers=True` runs the encoder blocks as one `nn.scan` (`layers.Encoder`).
  """
  depth: int
  mlp_dim: int
  num_heads: int
  num_time_positions: int = 100
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  remat_policy: str = "none"
  scan_layers: bool = False
  attention_impl: str = "auto"
  norm_impl: str = "auto"

  @nn.compact
  def __call__(self, tokens: Array, times: Array, segment_ids: Array) -> Array:
    batch, num, per_frame, width = tokens.shape
    table = self.param("time_embedding",
                       layers.partitioned(nn.initializers.normal(0.02), ("pos", "embed")),
                       (self.num_time_positions, width), self.param_dtype)
    pos = jnp.take(table, time_positions(times, self.num_time_positions), axis=0)
    x = tokens + pos[:, :, None].astype(tokens.dtype)
    x = x.reshape((batch, num * per_frame, width))
    if self.depth == 0:
      return x.reshape(tokens.shape)
    seg = jnp.repeat(segment_ids, per_frame, axis=1)
    mask = (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] != 0)
    x = layers.Encoder(self.depth, self.mlp_dim, self.num_heads, self.dtype, self.param_dtype,
                       self.remat_policy, scan_layers=self.scan_layers,
                       attention_impl=self.attention_impl, norm_impl=self.norm_impl,
                       name="encoder")(x, mask[:, None])
    return x.reshape(tokens.shape)


class GroundingHead(nn.Module):
  """Per-frame hidden states [B, N, D] -> [B, N, 4] (`HEAD_OUTPUTS`; offsets >= 0)."""
  mlp_dim: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    h = layers.Dense(self.mlp_dim, dtype=self.dtype, param_dtype=self.param_dtype,
                     kernel_init=layers.partitioned(nn.initializers.xavier_uniform(),
                                                    ("embed", "mlp")),
                     bias_init=layers.partitioned(nn.initializers.zeros_init(), ("mlp",)),
                     name="fc1")(x)
    h = nn.gelu(h, approximate=True)
    out = layers.Dense(len(HEAD_OUTPUTS), dtype=jnp.float32, param_dtype=self.param_dtype,
                       kernel_init=layers.partitioned(nn.initializers.xavier_uniform(),
                                                      ("mlp", None)),
                       bias_init=layers.partitioned(nn.initializers.zeros_init(), (None,)),
                       name="fc2")(h)
    offsets = nn.softplus(out[..., 2:])
    return jnp.concatenate([out[..., :2], offsets], axis=-1)


class VideoModel(vlm_lib.VLM):
  """Frames (packed as images) + token rows -> next-token logits (see module docstring).

  `image`: ViT kwargs (default `pool_type="gap"`: one token per frame; "none" keeps every
  patch). `temporal`: `TEMPORAL_KEYS` (`width` only with `frame_feature_dim`; defaults depth 2,
  the ViT's heads and mlp_dim, 100 time positions, no scan). `frame_feature_dim` > 0: the
  images are feature vectors of that size and there is no ViT. As in the VLM, `scan_layers`
  scans the LM only; `image.scan_layers` / `temporal.scan_layers` scan the ViT's / the
  temporal encoder's blocks.
  """
  architecture: str = "prefix_lm"
  temporal: Optional[Mapping[str, Any]] = None
  frame_feature_dim: int = 0
  grounding_head: bool = False

  @nn.nowrap
  def image_kwargs(self) -> Dict[str, Any]:
    kwargs = {**self._shared(), "norm_impl": self.norm_impl, **dict(self.image or {})}
    kwargs.setdefault("pool_type", "gap")
    for key in ("patch_dropout", "head_dim_out"):
      if kwargs.get(key):
        raise ValueError(f"VideoModel image.{key} must be unset: every frame gives all of "
                         "its tokens, and the projector maps the width.")
    return kwargs

  @nn.nowrap
  def llm_kwargs(self) -> Dict[str, Any]:
    kwargs = super().llm_kwargs()
    if self.architecture == "encoder_decoder":
      kwargs["cross_attention"] = True
    return kwargs

  @nn.nowrap
  def temporal_kwargs(self) -> Dict[str, Any]:
    """The temporal encoder's settings, defaults filled from the ViT (or required)."""
    given = dict(self.temporal or {})
    unknown = sorted(set(given) - set(TEMPORAL_KEYS))
    if unknown:
      raise ValueError(f"VideoModel temporal keys {unknown} are not among {TEMPORAL_KEYS}.")
    if self.frame_feature_dim:
      missing = [k for k in ("width", "mlp_dim", "num_heads") if k not in given]
      if missing:
        raise ValueError(f"VideoModel with frame_feature_dim={self.frame_feature_dim} has no "
                         f"ViT to take them from: set temporal {missing}.")
      dims = {}
    else:
      dims = ViT(parent=None, **self.image_kwargs()).dims
      if given.get("width", dims["width"]) != dims["width"]:
        raise ValueError(f"VideoModel temporal.width={given['width']} must equal the ViT "
                         f"width {dims['width']} (or be unset).")
    return dict(width=given.get("width", dims.get("width")), depth=given.get("depth", 2),
                mlp_dim=given.get("mlp_dim", dims.get("mlp_dim")),
                num_heads=given.get("num_heads", dims.get("num_heads")),
                time_positions=given.get("time_positions", 100),
                scan_layers=bool(given.get("scan_layers", False)))

  @nn.nowrap
  def num_image_tokens(self, image_size: int) -> int:
    """Tokens per frame: 1 when the frame is pooled or a feature vector, else the patches."""
    if self.frame_feature_dim or self.image_kwargs()["pool_type"] != "none":
      return 1
    return super().num_image_tokens(image_size)

  def setup(self):
    if self.architecture not in ARCHITECTURES:
      raise ValueError(f"VideoModel architecture {self.architecture!r} is not one of "
                       f"{ARCHITECTURES}.")
    if self.grounding_head and self.architecture != "prefix_lm":
      raise ValueError("VideoModel grounding_head needs architecture='prefix_lm': the head "
                       "reads the frames' LM states, which must see the query.")
    if (self.grounding_head and not self.frame_feature_dim
        and self.image_kwargs()["pool_type"] == "none"):
      raise ValueError("VideoModel grounding_head needs one token per frame: set "
                       "image.pool_type to gap/map/tok (or use frame features).")
    if self.image_token_id is None or self.image_token_id <= 0:
      raise ValueError(f"VideoModel image_token_id must be the vocabulary's <image> id (> 0), "
                       f"got {self.image_token_id!r}.")
    temporal = self.temporal_kwargs()
    if self.frame_feature_dim:
      self.frame_projection = layers.Dense(
          temporal["width"], dtype=self.dtype, param_dtype=self.param_dtype,
          kernel_init=layers.partitioned(nn.initializers.lecun_normal(), (None, "embed")),
          bias_init=layers.partitioned(nn.initializers.zeros_init(), ("embed",)))
    else:
      self.img = ViT(**self.image_kwargs())
    self.temporal_encoder = TemporalEncoder(
        temporal["depth"], temporal["mlp_dim"], temporal["num_heads"],
        temporal["time_positions"], self.dtype, self.param_dtype, self.remat_policy,
        scan_layers=temporal["scan_layers"], attention_impl=self.attention_impl,
        norm_impl=self.norm_impl)
    self.llm_module = vlm_lib.Decoder(**self.llm_kwargs(), name="llm")
    self.projector_module = vlm_lib.Projector(self.llm_module.width, self.projector, self.dtype,
                                              self.param_dtype, name="projector")
    if self.grounding_head:
      self.head = GroundingHead(temporal["mlp_dim"], self.dtype, self.param_dtype)

  # -- frames -----------------------------------------------------------------------------

  def encode_frames(self, batch: Mapping[str, Array]) -> Array:
    """A batch's frames -> LM-width frame tokens [B, N * T, D] in slot order."""
    images = batch["images"]
    batch_size, num = images.shape[:2]
    segments = batch.get("image_segment_ids")
    if segments is None:
      segments = batch["image_mask"].astype(jnp.int32)
    times = batch.get("image_times")
    if times is None:
      times = rank_times(segments)
    if self.frame_feature_dim:
      if images.shape[2:] != (self.frame_feature_dim,):
        raise ValueError(f"frame features must be [batch, frames, {self.frame_feature_dim}], "
                         f"got shape {images.shape}.")
      tokens = self.frame_projection(images)[:, :, None]
    else:
      if images.ndim != 5:
        raise ValueError(f"frames must be [batch, frames, size, size, 3], got shape "
                         f"{images.shape}.")
      out, _ = self.img(images.reshape((batch_size * num,) + images.shape[2:]))
      tokens = out.reshape((batch_size, num, -1, out.shape[-1]))  # [B, N, T or 1, D]
    tokens = self.temporal_encoder(tokens, times, segments)
    tokens = self.projector_module(tokens.reshape((batch_size, -1, tokens.shape[-1])))
    return layers.constrain(tokens, layers.ACT_TOKENS)

  def prepare_inputs(self, tokens: Array, batch: Mapping[str, Array]):
    frames = self.encode_frames(batch)
    x = self.llm_module.embed(tokens)
    if self.architecture == "prefix_lm":
      x = vlm_lib.merge_image_tokens(x, tokens == self.image_token_id, frames)
      return layers.constrain(x, layers.ACT_TOKENS), None
    segments = batch.get("image_segment_ids")
    if segments is None:
      segments = batch["image_mask"].astype(jnp.int32)
    per_frame = frames.shape[1] // segments.shape[1]
    return x, {"encoded": frames,
               "encoded_segment_ids": jnp.repeat(segments, per_frame, axis=1)}

  # -- grounding head ----------------------------------------------------------------------

  def frame_states(self, hidden: Array, tokens: Array, num_slots: int) -> Array:
    """Hidden states [B, N, D] at each image slot's position in `tokens` [B, L].

    With one token per frame (the head's requirement), the k-th image position of a row is
    slot k (packing's invariant); slots without a position (empty, or cut by truncation) get
    zeros.
    """
    is_image = tokens == self.image_token_id
    slot = jnp.cumsum(is_image.astype(jnp.int32), axis=1) - 1
    onehot = (jax.nn.one_hot(slot, num_slots, dtype=hidden.dtype)
              * is_image[:, :, None].astype(hidden.dtype))
    return jnp.einsum("bln,bld->bnd", onehot, hidden)

  def train_outputs(self, batch: Mapping[str, Array]):
    """(logits f32 [B, L, V], grounding head outputs f32 [B, N, 4] or None) of packed rows."""
    hidden, _ = self.llm_module.hidden_states(**self._llm_inputs(batch))
    logits = self.llm_module.logits(hidden)
    if not self.grounding_head:
      return logits, None
    states = self.frame_states(hidden, batch["decoder_input_tokens"],
                               batch["images"].shape[1])
    return logits, self.head(states.astype(self.dtype))

  def __call__(self, batch: Mapping[str, Array]) -> Array:
    return self.train_outputs(batch)[0]

  def ground(self, prompts: Mapping[str, Array]) -> Array:
    """Grounding head outputs [B, N, 4] for prompt batches (one example per row)."""
    if not self.grounding_head:
      raise ValueError("VideoModel.ground needs grounding_head=True.")
    tokens, valid = prompts["decoder_input_tokens"], prompts["prompt_mask"]
    x, _ = self.prepare_inputs(tokens, prompts)
    positions = jnp.maximum(jnp.cumsum(valid, axis=1, dtype=jnp.int32) - 1, 0)
    mask = valid[:, None, :, None] & valid[:, None, None, :]  # The whole prompt is prefix.
    hidden, _ = self.llm_module.hidden_states(x, positions=positions, mask=mask)
    states = self.frame_states(hidden, tokens, prompts["images"].shape[1])
    return self.head(states.astype(self.dtype))
