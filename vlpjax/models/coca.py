"""CoCa (Yu et al. 2022, "Contrastive Captioners"): one model, a contrastive and a captioning loss.

Image side: ViT tokens -> a 1-query attentional pooler -> `img_proj` -> L2-normalised `zimg`,
and an n-query pooler (`num_caption_queries`; 0 = every image token) whose outputs are what
the captioning decoder cross-attends to.

Text side: one token embedding serves both decoders. The unimodal decoder (causal, no
cross-attention) reads the caption decoder inputs [BOS, t1..tn] followed by a learned `cls`
token; the cls output -> RMSNorm -> `txt_proj` -> L2-normalised `ztxt`. The multimodal decoder
continues from the unimodal outputs of the text positions (never the cls), cross-attends to the
image, and predicts the next token with logits tied to the embedding (f32).

Padding never matters: padded positions are their own attention segment (nothing attends to
them) and the cls sits at RoPE position n+1 right after the last real input, so `ztxt` and the
logits of real positions are the same for any `text_length`. Because cls is last in the
sequence and attention is causal, no text position sees it, so decoding without cls (the KV
cache path) computes exactly the training-time text states.

Param tree: `img` (ViT), `img_pooler`, `img_caption_pooler` (if num_caption_queries > 0),
`img_proj`, `txt_embedding`, `txt_cls`, `txt_unimodal`, `txt_norm`, `txt_proj`,
`txt_multimodal`, `txt_multimodal_norm`, `logit_scale`, `logit_bias` (if bias_init is set).
"""
import math
from typing import Any, Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
from flax import linen as nn

from vlpjax.models import layers
from vlpjax.models.decoder import DecoderStack, RMSNorm, make_attention_mask
from vlpjax.models.two_tower import l2_normalize
from vlpjax.models.vit import ViT

BOS_ID = 0  # = pad, as in seqio/T5: decoder inputs start with it.
EOS_ID = 1

# The `text` kwargs and their defaults (None = required, except the DecoderStack's own
# None-means-derived `num_kv_heads` and `head_dim`). The DecoderStack knobs reach both decoders.
TEXT_DEFAULTS: Dict[str, Any] = dict(
    vocab_size=None, width=None, unimodal_depth=None, multimodal_depth=None, mlp_dim=None,
    num_heads=None, num_kv_heads=None, head_dim=None, max_len=64, activation="silu",
    norm_eps=1e-6, rope_theta=10_000.)
_TEXT_OPTIONAL = ("num_kv_heads", "head_dim")


def text_settings(text: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
  """`text` kwargs with defaults filled in; unknown or missing keys -> ValueError."""
  text = dict(text or {})
  unknown = sorted(set(text) - set(TEXT_DEFAULTS))
  if unknown:
    raise ValueError(f"CoCa text settings {unknown} are not valid keys; valid: "
                     f"{', '.join(TEXT_DEFAULTS)}.")
  merged = {**TEXT_DEFAULTS, **text}
  missing = [k for k, v in merged.items() if v is None and k not in _TEXT_OPTIONAL]
  if missing:
    raise ValueError(f"CoCa text settings need {', '.join(missing)}.")
  return merged


def caption_targets(texts: jax.Array, eos_id: int = EOS_ID
                    ) -> Tuple[jax.Array, jax.Array, jax.Array]:
  """Teacher-forcing arrays from zero-padded token rows [B, L] that carry no EOS.

  Returns (inputs, targets, weights), each [B, L]: `targets` = texts with EOS written at the
  first padding position (none if the row is full), `inputs` = [BOS] + targets[:-1], and
  `weights` (f32) = 1 on the targets up to and including EOS. A full row therefore drops its
  last token from the inputs and is trained without EOS, as a truncated caption should be.
  """
  texts = jnp.asarray(texts, jnp.int32)
  length = texts.shape[1]
  positions = jnp.arange(length)[None]
  num_tokens = text_lengths(texts)[:, None]
  targets = jnp.where(positions == num_tokens, eos_id, texts)
  inputs = jnp.concatenate([jnp.full_like(targets[:, :1], BOS_ID), targets[:, :-1]], axis=1)
  weights = (positions <= num_tokens).astype(jnp.float32)
  return inputs, targets, weights


def text_lengths(texts: jax.Array) -> jax.Array:
  """Index of the first padding (0) in each row of texts [B, L]; L for a full row."""
  is_pad = texts == 0
  return jnp.where(jnp.any(is_pad, axis=1), jnp.argmax(is_pad, axis=1),
                   texts.shape[1]).astype(jnp.int32)


class AttentionPooler(nn.Module):
  """`num_queries` learned queries attend over tokens [B, N, D] -> [B, num_queries, D].

  One multi-head attention layer and a LayerNorm (CoCa's attentional pooler): the queries
  choose what of the image each loss sees, which is why contrastive and captioning get their
  own poolers.
  """
  num_queries: int
  num_heads: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  attention_impl: str = "auto"

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    batch, _, width = tokens.shape
    queries = self.param(
        "queries", layers.partitioned(nn.initializers.normal(stddev=width ** -0.5),
                                      (None, "embed")),
        (self.num_queries, width), self.param_dtype)
    queries = jnp.broadcast_to(queries.astype(self.dtype), (batch, self.num_queries, width))
    x = layers.MultiHeadAttention(self.num_heads, self.dtype, self.param_dtype,
                                  self.attention_impl, name="attention")(queries, tokens)
    return layers.layer_norm("norm", self.param_dtype)(x).astype(self.dtype)


class CoCa(nn.Module):
  """Contrastive captioner; see the module docstring for the structure.

  `image`: ViT kwargs (pool_type is forced to 'none': the poolers here replace the ViT's).
  `text`: see TEXT_DEFAULTS. `temperature_init` / `bias_init` as in TwoTower, so the
  softmax (CLIP, CoCa's choice) and sigmoid (SigLIP) losses both apply. `scan_layers` scans
  the two text decoders (`DecoderStack`s) only; `image.scan_layers=True` scans the ViT's
  encoder blocks.
  """
  image: Optional[Mapping[str, Any]] = None
  text: Optional[Mapping[str, Any]] = None
  embed_dim: Optional[int] = None
  num_caption_queries: int = 256
  temperature_init: float = math.log(1 / 0.07)
  bias_init: Optional[float] = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  remat_policy: str = "none"
  scan_layers: bool = False
  attention_impl: str = "auto"
  norm_impl: str = "auto"

  def _image_kwargs(self) -> Dict[str, Any]:
    kwargs = dict(dtype=self.dtype, param_dtype=self.param_dtype,
                  remat_policy=self.remat_policy, attention_impl=self.attention_impl,
                  norm_impl=self.norm_impl)
    kwargs.update(self.image or {})
    for key, wanted in (("pool_type", "none"), ("head_dim_out", None)):
      if kwargs.get(key, wanted) != wanted:
        raise ValueError(f"CoCa image.{key}={kwargs[key]!r}: CoCa pools the ViT tokens "
                         f"itself; leave {key} unset.")
    kwargs["pool_type"] = "none"
    return kwargs

  def _decoder_stack(self, depth: int, cross_attention: bool, **module_kwargs) -> DecoderStack:
    t = self.settings
    return DecoderStack(
        depth=depth, mlp_dim=t["mlp_dim"], num_heads=t["num_heads"],
        num_kv_heads=t["num_kv_heads"], head_dim=t["head_dim"], activation=t["activation"],
        norm_eps=t["norm_eps"], rope_theta=t["rope_theta"], cross_attention=cross_attention,
        scan_layers=self.scan_layers, dtype=self.dtype, param_dtype=self.param_dtype,
        remat_policy=self.remat_policy, attention_impl=self.attention_impl, **module_kwargs)

  @property
  def settings(self) -> Dict[str, Any]:
    """The text settings, defaults filled in."""
    return text_settings(self.text)

  @property
  def cache_batch_axes(self) -> Dict[str, int]:
    """Batch axis of the leaves of `init_cache`'s two stacks (a prefix tree of the cache)."""
    # parent=None: detached instances, only asked for a property.
    return {name: self._decoder_stack(1, cross, parent=None).cache_batch_axis
            for name, cross in (("unimodal", False), ("multimodal", True))}

  def setup(self):
    t = self.settings
    if self.num_caption_queries < 0:
      raise ValueError(f"CoCa num_caption_queries must be >= 0 (0 = all image tokens), got "
                       f"{self.num_caption_queries}.")
    image_kwargs = self._image_kwargs()
    # parent=None: a detached instance, only asked for its size.
    image_heads = ViT(parent=None, **image_kwargs).dims["num_heads"]
    width = t["width"]
    embed_dim = self.embed_dim or width

    self.img = ViT(**image_kwargs)
    self.img_pooler = AttentionPooler(1, image_heads, self.dtype, self.param_dtype,
                                      self.attention_impl)
    if self.num_caption_queries:
      self.img_caption_pooler = AttentionPooler(self.num_caption_queries, image_heads,
                                                self.dtype, self.param_dtype,
                                                self.attention_impl)
    self.img_proj = layers.projection(embed_dim, "img_proj", self.dtype, self.param_dtype)

    self.txt_embedding = nn.Embed(
        t["vocab_size"], width, dtype=self.dtype, param_dtype=self.param_dtype,
        embedding_init=layers.partitioned(nn.initializers.normal(stddev=0.02),
                                          ("vocab", "embed")))
    self.txt_cls = self.param(
        "txt_cls", layers.partitioned(nn.initializers.normal(stddev=0.02), ("embed",)),
        (width,), self.param_dtype)
    self.txt_unimodal = self._decoder_stack(t["unimodal_depth"], cross_attention=False)
    self.txt_norm = self._rms_norm()
    self.txt_proj = layers.projection(embed_dim, "txt_proj", self.dtype, self.param_dtype)
    self.txt_multimodal = self._decoder_stack(t["multimodal_depth"], cross_attention=True)
    self.txt_multimodal_norm = self._rms_norm()

    self.logit_scale = self.param(
        "logit_scale",
        layers.partitioned(nn.initializers.constant(self.temperature_init), ()),
        (), jnp.float32)
    self.logit_bias = None if self.bias_init is None else self.param(
        "logit_bias", layers.partitioned(nn.initializers.constant(self.bias_init), ()),
        (), jnp.float32)

  def _rms_norm(self) -> RMSNorm:
    # The decoder's own norm (f32 statistics and output under bf16 compute).
    return RMSNorm(self.settings["norm_eps"], param_dtype=self.param_dtype)

  # Image side.

  def encode_images(self, images: jax.Array, train: bool = False
                    ) -> Tuple[jax.Array, jax.Array]:
    """Images [B, H, W, 3] in [-1, 1] -> (zimg f32 [B, embed_dim], caption tokens [B, M, Di]).

    `train=True` applies the ViT's patch dropout (if configured; needs a 'dropout' rng).
    """
    tokens, _ = self.img(images, train=train)
    pooled = self.img_pooler(tokens)[:, 0]
    zimg = l2_normalize(self.img_proj(pooled))
    if self.num_caption_queries:
      encoded = self.img_caption_pooler(tokens)
    else:
      encoded = tokens
    return zimg, layers.constrain(encoded, layers.ACT_TOKENS)

  def embed_images(self, images: jax.Array) -> jax.Array:
    """Images [B, H, W, 3] in [-1, 1] -> L2-normalised f32 [B, embed_dim]."""
    return self.encode_images(images)[0]

  def caption_encoding(self, images: jax.Array) -> jax.Array:
    """Images -> the tokens [B, M, Di] the captioning decoder cross-attends to."""
    return self.encode_images(images)[1]

  # Text side.

  def _check_length(self, length: int, what: str) -> None:
    max_len = self.settings["max_len"]
    if length > max_len:
      raise ValueError(f"CoCa {what} {length} exceeds text.max_len {max_len}.")

  def _unimodal(self, inputs: jax.Array, valid: jax.Array, with_cls: bool):
    """Unimodal decoder over inputs [B, L] (valid: bool [B, L], a prefix of each row).

    -> (text states [B, L, D], cls state [B, D] or None). The cls token is appended after
    the L inputs with RoPE position = number of valid inputs.
    """
    batch, length = inputs.shape
    x = self.txt_embedding(inputs)
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    segments = valid.astype(jnp.int32)
    if with_cls:
      cls = jnp.broadcast_to(self.txt_cls.astype(self.dtype), (batch, 1, x.shape[-1]))
      x = jnp.concatenate([x, cls], axis=1)
      num_valid = jnp.sum(segments, axis=1, dtype=jnp.int32)
      positions = jnp.concatenate([positions, num_valid[:, None]], axis=1)
      segments = jnp.concatenate([segments, jnp.ones((batch, 1), jnp.int32)], axis=1)
    x = layers.constrain(x, layers.ACT_TOKENS)
    x, _ = self.txt_unimodal(x, positions=positions, mask=make_attention_mask(segments))
    if not with_cls:
      return x, None
    return x[:, :length], x[:, length]

  def _text_embedding(self, cls_state: jax.Array) -> jax.Array:
    return l2_normalize(self.txt_proj(self.txt_norm(cls_state).astype(self.dtype)))

  def embed_texts(self, texts: jax.Array) -> jax.Array:
    """Token ids [B, L] (zero-padded, no EOS) -> L2-normalised f32 [B, embed_dim]."""
    self._check_length(texts.shape[1], "text length")
    inputs, _, weights = caption_targets(texts)
    _, cls_state = self._unimodal(inputs, weights > 0, with_cls=True)
    return self._text_embedding(cls_state)

  def _multimodal_logits(self, x, *, positions, mask, encoded, cache=None, cache_index=None):
    x, cache = self.txt_multimodal(x, positions=positions, mask=mask, cache=cache,
                                   cache_index=cache_index, encoded=encoded)
    x = self.txt_multimodal_norm(x).astype(self.dtype)
    # Tied to the embedding; f32 accumulation: the softmax over a large vocabulary needs it.
    logits = layers.token_matmul(x, self.txt_embedding.embedding.astype(self.dtype).T,
                                 preferred_element_type=jnp.float32)
    return logits, cache

  def _decoders(self, encoded, inputs, valid, with_cls: bool):
    """Both decoders over inputs [B, L] (valid: bool [B, L], a prefix of each row).

    -> (logits f32 [B, L, V], cls state [B, D] or None).
    """
    states, cls_state = self._unimodal(inputs, valid, with_cls=with_cls)
    positions = jnp.broadcast_to(jnp.arange(inputs.shape[1], dtype=jnp.int32), inputs.shape)
    logits, _ = self._multimodal_logits(
        states, positions=positions, mask=make_attention_mask(valid.astype(jnp.int32)),
        encoded=encoded)
    return logits, cls_state

  def caption_logits(self, encoded: jax.Array, inputs: jax.Array,
                     valid: Optional[jax.Array] = None) -> jax.Array:
    """Next-token logits f32 [B, L, V] for decoder inputs [B, L], without a cache.

    `encoded`: `caption_encoding(images)`. `valid`: bool [B, L], a prefix of each row
    (default: all); the rest is padding.
    """
    self._check_length(inputs.shape[1], "decoder input length")
    if valid is None:
      valid = jnp.ones(inputs.shape, bool)
    return self._decoders(encoded, inputs, valid, with_cls=False)[0]

  def __call__(self, images: jax.Array, texts: jax.Array, train: bool = False
               ) -> Dict[str, Any]:
    """Images [B, H, W, 3] and zero-padded texts [B, L] (no EOS) -> dict of

    zimg, ztxt (f32 [B, embed_dim], L2-normalised), logits (f32 [B, L, V]: the caption
    decoder's predictions of `caption_targets(texts)`), logit_scale, logit_bias (or None).
    """
    self._check_length(texts.shape[1], "text length")
    zimg, encoded = self.encode_images(images, train=train)
    inputs, _, weights = caption_targets(texts)
    logits, cls_state = self._decoders(encoded, inputs, weights > 0, with_cls=True)
    return dict(zimg=zimg, ztxt=self._text_embedding(cls_state), logits=logits,
                logit_scale=self.logit_scale, logit_bias=self.logit_bias)

  # Cached decoding.

  def init_cache(self, batch_size: int, max_len: int) -> Dict[str, Any]:
    """Zero KV caches {'unimodal', 'multimodal'} for `max_len` positions (BOS included).

    Decoding n tokens needs n slots: BOS and every generated token but the last are fed.
    """
    self._check_length(max_len, "decode length")
    width = self.settings["width"]
    return {"unimodal": self.txt_unimodal.init_cache(batch_size, max_len, width),
            "multimodal": self.txt_multimodal.init_cache(batch_size, max_len, width)}

  def decode_tokens(self, tokens: jax.Array, encoded: jax.Array, cache: Dict[str, Any],
                    cache_index: jax.Array) -> Tuple[jax.Array, Dict[str, Any]]:
    """Feeds tokens [B, L] at positions cache_index.. through both stacks' caches.

    Serves the prefill (the BOS prompt, cache_index 0) and every one-token step. Returns
    (logits f32 [B, L, V], updated cache). Every slot before a token's own is valid: a
    caption being decoded has no padding.
    """
    batch, length = tokens.shape
    max_len = jax.tree.leaves(cache["unimodal"])[0].shape[
        1 + self.cache_batch_axes["unimodal"]]
    positions = cache_index + jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32),
                                               (batch, length))
    slots = jnp.arange(max_len, dtype=jnp.int32)
    mask = (slots[None, None, None, :] <= positions[:, None, :, None])
    x = layers.constrain(self.txt_embedding(tokens), layers.ACT_TOKENS)
    x, uni_cache = self.txt_unimodal(x, positions=positions, mask=mask,
                                     cache=cache["unimodal"], cache_index=cache_index)
    logits, multi_cache = self._multimodal_logits(
        x, positions=positions, mask=mask, encoded=encoded, cache=cache["multimodal"],
        cache_index=cache_index)
    return logits, {"unimodal": uni_cache, "multimodal": multi_cache}
