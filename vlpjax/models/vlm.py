"""Prefix-LM vision-language model (PaliGemma / LLaVA / VILA style): ViT -> projector -> LM.

Each image becomes T = (image_size / patch)^2 ViT tokens, projected to the LM's width and
placed, in order, at the image-token positions of the packed token row (see
`vlpjax/data/packing.py`: every image placeholder was expanded into T `image_token_id`
positions, and the k-th group of T belongs to the k-th valid image slot of the row). The
decoder then reads the prefix (BOS, image tokens, prompt) bidirectionally and the rest
causally, as `decoder_causal_attention` says.

Param tree: `img` (ViT, no pooling), `projector` (`linear`: one Dense; `mlp`: Dense - gelu -
Dense, LLaVA-1.5), `llm` (`vlpjax.models.decoder.Decoder`). Image embeddings are not scaled
by the LM's `embed_scale` (only text embeddings are, inside `Decoder.embed`), as in PaliGemma.
"""
from typing import Any, Dict, Mapping, Optional

import jax
import jax.numpy as jnp
from flax import linen as nn

from vlpjax.models import layers
from vlpjax.models.decoder import Decoder, make_attention_mask
from vlpjax.models.vit import ViT
from vlpjax.registry import unknown_name_message

Array = jax.Array
PROJECTORS = ("linear", "mlp")


def tokens_per_image(image_size: int, patch_size: int) -> int:
  """T = (image_size / patch_size)^2: the LM positions one image takes."""
  if image_size <= 0 or patch_size <= 0 or image_size % patch_size:
    raise ValueError(f"image_size {image_size} must be a positive multiple of the ViT "
                     f"patch size {patch_size}: every image must give the same whole "
                     "number of tokens.")
  return (image_size // patch_size) ** 2


def merge_image_tokens(token_embeddings: Array, is_image: Array,
                       image_embeddings: Array) -> Array:
  """Puts the image embeddings of each row at its image positions, in order.

  Args:
    token_embeddings: [B, L, D] embedded tokens.
    is_image: bool [B, L], the image-token positions.
    image_embeddings: [B, M, D], a row's image tokens in slot order (M = N * T).

  Returns:
    [B, L, D]: the k-th image position of a row (counting from 0, left to right) holds
    row k of that row's image embeddings; other positions are unchanged. A row must not
    have more than M image positions (packing guarantees it; extra ones would repeat the
    last embedding).
  """
  num = image_embeddings.shape[1]
  if num == 0:  # Text-only batches (max_images_per_row = 0).
    return token_embeddings
  # Rank of each image position among its row's image positions: a gather index.
  index = jnp.clip(jnp.cumsum(is_image.astype(jnp.int32), axis=1) - 1, 0, num - 1)
  gathered = jnp.take_along_axis(image_embeddings, index[:, :, None], axis=1)
  return jnp.where(is_image[:, :, None], gathered.astype(token_embeddings.dtype),
                   token_embeddings)


class Projector(nn.Module):
  """ViT width -> LM width: `linear` (PaliGemma) or `mlp` (Dense-gelu-Dense, LLaVA-1.5)."""
  features: int
  kind: str = "linear"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def _dense(self, features, kernel_axes, name):
    return layers.Dense(
        features, dtype=self.dtype, param_dtype=self.param_dtype,
        kernel_init=layers.partitioned(nn.initializers.xavier_uniform(), kernel_axes),
        bias_init=layers.partitioned(nn.initializers.zeros_init(), kernel_axes[-1:]),
        name=name)

  @nn.compact
  def __call__(self, x: Array) -> Array:
    if self.kind not in PROJECTORS:
      raise ValueError(unknown_name_message("projector", self.kind, PROJECTORS))
    # `embed_in`: the ViT side; a kernel cannot name `embed` twice.
    if self.kind == "linear":
      return self._dense(self.features, ("embed_in", "embed"), "linear")(x)
    h = self._dense(self.features, ("embed_in", "mlp"), "fc1")(x)
    h = layers.constrain(nn.gelu(h, approximate=True), layers.ACT_MLP)
    return self._dense(self.features, ("mlp", "embed"), "fc2")(h)


class VLM(nn.Module):
  """Images + packed prefix-LM token rows -> next-token logits.

  `image`: ViT kwargs (pooling is forced to "none": the LM reads every patch token).
  `llm`: `Decoder` kwargs. `dtype`, `param_dtype`, `remat_policy` and `attention_impl` reach
  both unless their kwargs set them; `scan_layers` reaches the LM only (scan the ViT's encoder blocks with
  `image.scan_layers=True`), `norm_impl` the ViT only (the LM's norms are RMSNorms).
  """
  image: Optional[Mapping[str, Any]] = None
  llm: Optional[Mapping[str, Any]] = None
  projector: str = "linear"
  image_token_id: Optional[int] = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  remat_policy: str = "none"
  scan_layers: bool = False
  attention_impl: str = "auto"
  norm_impl: str = "auto"

  @nn.nowrap
  def _shared(self) -> Dict[str, Any]:
    return dict(dtype=self.dtype, param_dtype=self.param_dtype,
                remat_policy=self.remat_policy, attention_impl=self.attention_impl)

  @nn.nowrap
  def image_kwargs(self) -> Dict[str, Any]:
    """The ViT's kwargs: `image` over the shared ones, checked, pooling off."""
    kwargs = {**self._shared(), "norm_impl": self.norm_impl, **dict(self.image or {})}
    if kwargs.get("pool_type", "none") != "none":
      raise ValueError(f"VLM image.pool_type={kwargs['pool_type']!r}: the LM reads the "
                       "patch tokens, so the ViT must not pool (leave pool_type unset).")
    if kwargs.get("patch_dropout", 0.0):
      raise ValueError("VLM image.patch_dropout must be 0: every image must give all of "
                       "its T tokens to the image positions of the row.")
    if kwargs.get("head_dim_out") is not None:
      raise ValueError("VLM image.head_dim_out is unused (the projector maps the width).")
    kwargs["pool_type"] = "none"
    return kwargs

  @nn.nowrap
  def llm_kwargs(self) -> Dict[str, Any]:
    """The Decoder's kwargs: `llm` over the shared ones and `scan_layers`."""
    return {**self._shared(), "scan_layers": self.scan_layers, **dict(self.llm or {})}

  @property
  def cache_batch_axis(self) -> int:
    """The batch axis of every leaf of the LM's KV cache (usable on an unbound module)."""
    return 1 if self.llm_kwargs()["scan_layers"] else 0

  @nn.nowrap
  def num_image_tokens(self, image_size: int) -> int:
    """T for images of `image_size` px (usable on an unbound module)."""
    patch = ViT(parent=None, **self.image_kwargs()).dims["patch_size"]
    return tokens_per_image(image_size, patch)

  def setup(self):
    if self.image_token_id is None or self.image_token_id <= 0:
      raise ValueError(f"VLM image_token_id must be the vocabulary's <image> id (> 0), got "
                       f"{self.image_token_id!r}.")
    self.img = ViT(**self.image_kwargs())
    self.llm_module = Decoder(**self.llm_kwargs(), name="llm")
    self.projector_module = Projector(self.llm_module.width, self.projector, self.dtype,
                                      self.param_dtype, name="projector")

  # -- pieces ---------------------------------------------------------------------------

  def encode_images(self, images: Array) -> Array:
    """Images [B, N, S, S, 3] in [-1, 1] -> LM-width image tokens [B, N * T, D]."""
    if images.ndim != 5:
      raise ValueError(f"images must be [batch, images, size, size, 3], got shape "
                       f"{images.shape}.")
    batch, num = images.shape[:2]
    tokens, _ = self.img(images.reshape((batch * num,) + images.shape[2:]))
    tokens = self.projector_module(tokens)
    tokens = tokens.reshape((batch, num * tokens.shape[1], tokens.shape[-1]))
    return layers.constrain(tokens, layers.ACT_TOKENS)

  def embed_inputs(self, tokens: Array, images: Array) -> Array:
    """Token ids [B, L] with images [B, N, S, S, 3] merged at `image_token_id` -> [B, L, D]."""
    x = self.llm_module.embed(tokens)
    x = merge_image_tokens(x, tokens == self.image_token_id, self.encode_images(images))
    return layers.constrain(x, layers.ACT_TOKENS)

  # -- training ---------------------------------------------------------------------------

  def prepare_inputs(self, tokens: Array, batch: Mapping[str, Array]):
    """Token ids [B, L] of a packed row or a prompt, with the batch's other features ->
    (embedded inputs [B, L, D], decoder context or None).

    The one place a family's model turns a batch into what its LM reads, used by training
    and by `generate` alike. The VLM merges `batch["images"]` at the image positions and has
    no context; models with cross-attention (the video model's encoder-decoder form) return
    `{"encoded": [B, M, D], "encoded_segment_ids": int32 [B, M]}` (0 = no token).
    """
    return self.embed_inputs(tokens, batch["images"]), None

  def __call__(self, batch: Mapping[str, Array]) -> Array:
    """Packed features (`decoder_input_tokens`, ..., `images`) -> logits f32 [B, L, V]."""
    logits, _ = self.llm_module(**self._llm_inputs(batch))
    return logits

  @nn.nowrap
  def _context_kwargs(self, context, token_segment_ids=None) -> Dict[str, Array]:
    """`encoded` / `encoded_mask` for the LM from a context (none without one).

    With `token_segment_ids` [B, L] (packed rows) a token reads only its own example's
    encoding; without (a prompt batch: one example per row) every valid encoded token.
    """
    if context is None:
      return {}
    enc_segments = context["encoded_segment_ids"]
    if token_segment_ids is None:
      mask = enc_segments != 0
    else:
      mask = ((token_segment_ids[:, :, None] == enc_segments[:, None, :])
              & (enc_segments[:, None, :] != 0))
    return {"encoded": context["encoded"], "encoded_mask": mask}

  def _llm_inputs(self, batch: Mapping[str, Array]) -> Dict[str, Array]:
    """The LM's keyword arguments for a packed row batch."""
    x, context = self.prepare_inputs(batch["decoder_input_tokens"], batch)
    mask = make_attention_mask(batch["decoder_segment_ids"],
                               batch["decoder_causal_attention"])
    return dict(x=x, positions=batch["decoder_positions"], mask=mask,
                **self._context_kwargs(context, batch["decoder_segment_ids"]))

  # -- cached decoding (`vlpjax.decoding.prefix_lm_step_fn` drives these) --------------

  def embed_tokens(self, tokens: Array) -> Array:
    """Token ids [B, L] -> text embeddings [B, L, D] (generated tokens are never images)."""
    return self.llm_module.embed(tokens)

  def run_llm(self, x: Array, *, positions: Array, mask: Array, cache=None,
              cache_index=None, context=None):
    """The LM on embedded inputs: (logits f32 [B, L, V], cache); see `Decoder.__call__`.

    `context`: what `prepare_inputs` returned for the prompt (one example per row).
    """
    return self.llm_module(x, positions=positions, mask=mask, cache=cache,
                           cache_index=cache_index, **self._context_kwargs(context))

  def init_cache(self, batch_size: int, max_len: int):
    return self.llm_module.init_cache(batch_size, max_len)
